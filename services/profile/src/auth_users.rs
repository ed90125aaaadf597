//! What auth owns about a user (email, display name at registration, status, roles), read
//! from auth's `GetUser` and cached in both levels for at most `PROFILE_AUTH_CACHE_TTL`
//! (60 s); auth's change events evict sooner.

use std::sync::Arc;

use platform::{
    cache::{Miss, TwoLevelCache},
    identity::Identity,
};
use proto::auth::v1::{
    self as auth_pb, auth_service_client::AuthServiceClient, watch_changes_response::Event,
};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::error::ProfileError;

#[derive(Debug, Clone)]
pub struct AuthUsers {
    identity: Identity,
    cache: TwoLevelCache<auth_pb::User>,
}

impl AuthUsers {
    pub fn new(identity: Identity, cache: TwoLevelCache<auth_pb::User>) -> Self {
        Self { identity, cache }
    }

    /// The user as auth knows them; `None` when auth has no such (live) user.
    pub async fn get(&self, user_id: Uuid) -> Result<Option<Arc<auth_pb::User>>, ProfileError> {
        let key = user_id.to_string();
        let loaded = self
            .cache
            .get_or_load(&key, || async {
                let mut request = Request::new(auth_pb::GetUserRequest {
                    user_id: user_id.to_string(),
                });
                // This service's own token: auth lets services read any user.
                self.identity.authorize(&mut request).await?;
                let mut client = AuthServiceClient::new(self.identity.auth_channel());
                match client.get_user(request).await {
                    Ok(response) => Ok(response
                        .into_inner()
                        .user
                        .filter(|u| u.status != i32::from(auth_pb::UserStatus::Deleted))),
                    Err(status) if status.code() == Code::NotFound => Ok(None),
                    Err(status) => Err(upstream(&status)),
                }
            })
            .await;
        match loaded {
            Ok(user) => Ok(Some(user)),
            Err(Miss::Absent) => Ok(None),
            Err(Miss::Failed(status)) => Err(ProfileError::Upstream(status)),
        }
    }

    /// Drops a user's cached auth data on every replica (after a change event).
    pub async fn invalidate(&self, user_id: &str) {
        self.cache.invalidate(user_id).await;
    }

    /// Drops every cached user (auth's stream was reset).
    pub async fn invalidate_all(&self) {
        self.cache.invalidate_all().await;
    }

    /// Follows auth's change events until the process ends: a user's changed account or
    /// roles evict their cached copy on every replica; a reset (or falling behind) drops
    /// them all. Without events, entries still expire within `PROFILE_AUTH_CACHE_TTL`.
    pub async fn follow_changes(self) {
        let mut events = self.identity.subscribe();
        loop {
            match events.recv().await {
                Ok(event) => match &event.event {
                    Some(Event::UserChanged(changed)) => {
                        if let Some(user) = &changed.user {
                            self.invalidate(&user.user_id).await;
                        }
                    }
                    Some(Event::RolesChanged(changed)) => self.invalidate(&changed.user_id).await,
                    Some(Event::Reset(_)) => self.invalidate_all().await,
                    _ => {}
                },
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "fell behind auth's changes: dropping cached users");
                    self.invalidate_all().await;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// A failed call to auth as this service answers it: the caller's own credential problems
/// pass through; anything else is auth being unavailable (details logged).
fn upstream(status: &Status) -> Status {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => status.clone(),
        Code::DeadlineExceeded => Status::deadline_exceeded("auth did not answer in time"),
        _ => {
            tracing::warn!(code = ?status.code(), message = status.message(), "auth call failed");
            Status::unavailable("auth is unavailable, retry later")
        }
    }
}
