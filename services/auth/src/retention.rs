//! Scheduled pruning of what auth no longer needs: ended sessions (with their refresh
//! tokens), rotated refresh tokens of live sessions, old audit rows, and old change-log
//! entries.
//!
//! Every replica runs the schedule; a Postgres advisory lock lets one prune at a time.
//! Deletes go in batches so no statement holds locks for long.

use std::time::Duration;

use platform::config::Env;

use crate::store::Store;

/// Retention periods (`AUTH_RETENTION_*`, `AUTH_PRUNE_INTERVAL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    /// How often pruning runs (default 1h).
    pub interval: Duration,
    /// Ended (revoked, expired or idle) sessions are kept this long after they ended, for
    /// support questions and the sessions' audit context (default 30 days).
    pub ended_sessions: Duration,
    /// Rotated refresh tokens are kept this long: a reuse within it revokes the session
    /// (theft detection); after it, a replayed token is merely unknown (default 7 days).
    pub rotated_tokens: Duration,
    /// Audit rows are kept this long (default 180 days).
    pub audit_events: Duration,
    /// Change-log entries (what WatchChanges replays) are kept this long (default 24h, at
    /// least the access-token lifetime plus a margin): a consumer away for longer starts over
    /// from a Reset.
    pub change_events: Duration,
}

impl RetentionConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);
    pub const DEFAULT_ENDED_SESSIONS: Duration = Duration::from_secs(30 * 24 * 3600);
    pub const DEFAULT_ROTATED_TOKENS: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const DEFAULT_AUDIT_EVENTS: Duration = Duration::from_secs(180 * 24 * 3600);
    pub const DEFAULT_CHANGE_EVENTS: Duration = Duration::from_secs(24 * 3600);
    /// Added to the access-token lifetime for the shortest change-log retention allowed.
    pub const CHANGE_EVENTS_MARGIN: Duration = Duration::from_secs(5 * 60);

    /// `access_ttl` bounds the change-log retention from below: a revocation must outlive
    /// every token it revokes.
    pub fn from_env(env: &Env, access_ttl: Duration) -> Self {
        let config = Self {
            interval: env.duration_or("PRUNE_INTERVAL", Self::DEFAULT_INTERVAL),
            ended_sessions: env
                .duration_or("RETENTION_ENDED_SESSIONS", Self::DEFAULT_ENDED_SESSIONS),
            rotated_tokens: env
                .duration_or("RETENTION_ROTATED_TOKENS", Self::DEFAULT_ROTATED_TOKENS),
            audit_events: env.duration_or("RETENTION_AUDIT_EVENTS", Self::DEFAULT_AUDIT_EVENTS),
            change_events: env.duration_or("RETENTION_CHANGE_EVENTS", Self::DEFAULT_CHANGE_EVENTS),
        };
        let shortest = access_ttl + Self::CHANGE_EVENTS_MARGIN;
        if config.change_events < shortest {
            env.problem(
                &env.name("RETENTION_CHANGE_EVENTS"),
                format!(
                    "must be at least the access-token lifetime plus {}s ({}s)",
                    Self::CHANGE_EVENTS_MARGIN.as_secs(),
                    shortest.as_secs()
                ),
            );
        }
        config
    }
}

/// Rows deleted per statement.
const BATCH: i64 = 5_000;

/// Prunes every `interval` (if no other replica is at it), until the task is dropped with
/// the service. The first run waits one interval, so start-up (and its migrations) comes first.
pub async fn run(store: Store, config: RetentionConfig, idle_timeout: Duration) {
    loop {
        tokio::time::sleep(config.interval).await;
        match store
            .prune(
                config.ended_sessions.as_secs_f64(),
                idle_timeout.as_secs_f64(),
                config.rotated_tokens.as_secs_f64(),
                config.audit_events.as_secs_f64(),
                config.change_events.as_secs_f64(),
                BATCH,
            )
            .await
        {
            Ok(Some(counts)) => {
                tracing::info!(
                    sessions = counts.sessions,
                    refresh_tokens = counts.refresh_tokens,
                    audit_events = counts.audit_events,
                    change_events = counts.change_events,
                    "pruned"
                );
            }
            Ok(None) => tracing::debug!("another replica is pruning"),
            Err(e) => tracing::warn!(error = %e, "pruning failed; retrying at the next interval"),
        }
    }
}
