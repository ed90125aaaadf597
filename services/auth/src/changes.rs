//! The change stream (`WatchChanges`): what other processes must learn from auth —
//! revoked sessions, role changes, user changes, key-set changes — in commit order.
//!
//! Triggers write every change to the `change_events` log (see its migration for why the
//! sequence follows commit order). Each replica runs one follower that learns the newest
//! sequence from Postgres `LISTEN` (woken at each commit) and, as a fallback that also
//! works behind a transaction-mode pooler, from a poll every second. Each stream reads the
//! log after its position whenever the newest sequence moves, so a consumer on any replica
//! sees every change, whichever replica made it, within about a second.

use std::{pin::Pin, time::Duration};

use chrono::{DateTime, Utc};
use proto::auth::v1::{self as pb, watch_changes_response::Event};
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::store::{ChangeRow, Store};

/// The Postgres channel `record_change` notifies at each commit.
const CHANNEL: &str = "auth_changes";
/// How often the follower reads the newest sequence when no notification came.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Entries read per query while catching up.
const PAGE: i64 = 500;
/// The contract promises a heartbeat at least this often.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Verifiers tolerate this much clock skew on `exp`; a revocation must outlive it too.
const EXPIRY_LEEWAY: Duration =
    Duration::from_secs(platform::access_token::AccessTokenVerifier::LEEWAY_SECONDS);

pub type ChangeStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchChangesResponse, Status>> + Send>>;

/// The newest committed sequence, followed for every stream this replica serves.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    store: Store,
    latest: watch::Receiver<i64>,
    /// How long after a revocation a token of the session can still be unexpired.
    forget_after: Duration,
}

impl ChangeFeed {
    /// Starts following the log; the follower stops when the returned handle is aborted.
    pub fn start(
        db: PgPool,
        store: Store,
        access_ttl: Duration,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, latest) = watch::channel(0);
        let follower = tokio::spawn(follow(db, store.clone(), sender));
        let feed = Self {
            store,
            latest,
            forget_after: access_ttl + EXPIRY_LEEWAY,
        };
        (feed, follower)
    }

    /// A stream of the changes after `after` (or a Reset and every retained change), then
    /// live ones, limited to `kinds` (empty: all).
    pub fn watch(&self, after: Option<i64>, kinds: Vec<pb::ChangeKind>) -> ChangeStream {
        let (sender, receiver) = mpsc::channel(64);
        let pump = Pump {
            store: self.store.clone(),
            latest: self.latest.clone(),
            forget_after: self.forget_after,
            kinds,
            sender,
        };
        tokio::spawn(async move {
            if let Err(status) = pump.run(after).await {
                // The consumer reconnects with its last sequence; nothing is lost.
                tracing::debug!(code = ?status.code(), "change stream ended");
                let _ = pump.sender.send(Err(status)).await;
            }
        });
        Box::pin(ReceiverStream::new(receiver))
    }
}

/// Keeps `latest` at the newest committed sequence, until the task is aborted.
async fn follow(db: PgPool, store: Store, latest: watch::Sender<i64>) {
    let mut listener = None;
    loop {
        if listener.is_none() {
            listener = listen(&db).await;
        }
        // Wake on a notification or after the poll interval, whichever comes first. A lost
        // connection (`Ok(None)` / `Err`) drops the listener; the poll covers the gap.
        if let Some(active) = listener.as_mut() {
            match tokio::time::timeout(POLL_INTERVAL, active.try_recv()).await {
                Ok(Ok(Some(_))) | Err(_) => {}
                Ok(Ok(None)) | Ok(Err(_)) => listener = None,
            }
        } else {
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        match store.change_log_bounds().await {
            Ok(bounds) => {
                latest.send_if_modified(|seen| {
                    let moved = *seen != bounds.latest;
                    *seen = bounds.latest;
                    moved
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the change log's newest sequence"),
        }
    }
}

async fn listen(db: &PgPool) -> Option<PgListener> {
    let attempt = async {
        let mut listener = PgListener::connect_with(db).await?;
        listener.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match attempt.await {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %e, "cannot LISTEN for changes; polling every second");
            None
        }
    }
}

/// One consumer's stream.
struct Pump {
    store: Store,
    latest: watch::Receiver<i64>,
    forget_after: Duration,
    kinds: Vec<pb::ChangeKind>,
    sender: mpsc::Sender<Result<pb::WatchChangesResponse, Status>>,
}

impl Pump {
    async fn run(&self, after: Option<i64>) -> Result<(), Status> {
        let mut latest = self.latest.clone();
        let bounds = self
            .store
            .change_log_bounds()
            .await
            .map_err(|e| platform::error::from_sqlx(&e))?;
        // A position from before the pruned range (or from another database) cannot be
        // resumed: the consumer starts over.
        let mut cursor = match after {
            Some(after) if (bounds.pruned_through..=bounds.latest).contains(&after) => after,
            _ => {
                self.send(pb::WatchChangesResponse {
                    sequence: 0,
                    occurred_at: Some(timestamp(Utc::now())),
                    event: Some(Event::Reset(pb::Reset {})),
                })
                .await?;
                bounds.pruned_through
            }
        };
        let mut last_heartbeat = None::<tokio::time::Instant>;
        loop {
            latest.borrow_and_update();
            let page = self
                .store
                .changes_after(cursor, PAGE)
                .await
                .map_err(|e| platform::error::from_sqlx(&e))?;
            let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= PAGE;
            for row in page {
                cursor = row.sequence;
                if let Some(event) = self.event(row) {
                    self.send(event).await?;
                }
            }
            if full {
                continue;
            }
            // Caught up with everything committed when the page was read.
            let due = last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT_INTERVAL);
            if due {
                self.send(heartbeat(cursor)).await?;
                last_heartbeat = Some(tokio::time::Instant::now());
            }
            let next_heartbeat =
                last_heartbeat.map_or_else(tokio::time::Instant::now, |at| at + HEARTBEAT_INTERVAL);
            tokio::select! {
                changed = latest.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the service is shutting down"));
                    }
                }
                () = tokio::time::sleep_until(next_heartbeat) => {}
                () = self.sender.closed() => return Ok(()),
            }
        }
    }

    async fn send(&self, message: pb::WatchChangesResponse) -> Result<(), Status> {
        // A closed receiver means the consumer went away: stop quietly.
        self.sender
            .send(Ok(message))
            .await
            .map_err(|_| Status::cancelled("the consumer went away"))
    }

    /// The event for one log entry, if the consumer asked for its kind.
    fn event(&self, row: ChangeRow) -> Option<pb::WatchChangesResponse> {
        let kind = match row.kind.as_str() {
            "user" => pb::ChangeKind::User,
            "roles" => pb::ChangeKind::Roles,
            "session_revoked" => pb::ChangeKind::SessionRevoked,
            "key_set" => pb::ChangeKind::KeySet,
            _ => return None,
        };
        if !self.kinds.is_empty() && !self.kinds.contains(&kind) {
            return None;
        }
        let user_id = row.user_id.map(|id| id.to_string()).unwrap_or_default();
        let event = match kind {
            pb::ChangeKind::User => Event::UserChanged(pb::UserChanged {
                user: Some(pb::User {
                    user_id,
                    email: row.email.unwrap_or_default(),
                    display_name: row.display_name.unwrap_or_default(),
                    status: user_status(row.status.as_deref()).into(),
                    roles: row.roles.unwrap_or_default(),
                    created_at: row.created_at.map(timestamp),
                    updated_at: row.updated_at.map(timestamp),
                }),
            }),
            pb::ChangeKind::Roles => Event::RolesChanged(pb::RolesChanged {
                user_id,
                roles: row.roles.unwrap_or_default(),
                tokens_not_before: Some(timestamp(row.occurred_at)),
            }),
            pb::ChangeKind::SessionRevoked => Event::SessionRevoked(pb::SessionRevoked {
                user_id,
                session_id: row.session_id.map(|id| id.to_string()).unwrap_or_default(),
                reason: revoked_reason(row.detail["reason"].as_str()).into(),
                forget_after: Some(timestamp(
                    row.occurred_at
                        + chrono::Duration::from_std(self.forget_after)
                            .unwrap_or(chrono::Duration::MAX),
                )),
            }),
            pb::ChangeKind::KeySet | pb::ChangeKind::Unspecified => {
                Event::KeySetChanged(pb::KeySetChanged {
                    kids: row.detail["kids"]
                        .as_array()
                        .map(|kids| {
                            kids.iter()
                                .filter_map(|kid| kid.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            }
        };
        Some(pb::WatchChangesResponse {
            sequence: row.sequence,
            occurred_at: Some(timestamp(row.occurred_at)),
            event: Some(event),
        })
    }
}

fn heartbeat(sequence: i64) -> pb::WatchChangesResponse {
    pb::WatchChangesResponse {
        sequence,
        occurred_at: Some(timestamp(Utc::now())),
        event: Some(Event::Heartbeat(pb::Heartbeat {})),
    }
}

pub(crate) fn user_status(status: Option<&str>) -> pb::UserStatus {
    match status {
        Some("active") => pb::UserStatus::Active,
        Some("disabled") => pb::UserStatus::Disabled,
        _ => pb::UserStatus::Unspecified,
    }
}

fn revoked_reason(reason: Option<&str>) -> pb::SessionRevokedReason {
    use pb::SessionRevokedReason as R;
    match reason {
        Some("logout") => R::Logout,
        Some("logout_all") => R::LogoutAll,
        Some("revoked_by_user") => R::RevokedByUser,
        Some("password_changed") => R::PasswordChanged,
        Some("refresh_token_reuse") => R::RefreshReuse,
        _ => R::Unspecified,
    }
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}
