//! Live notification fan-out: every replica hears every new notification through notes'
//! Redis pub/sub and wakes its own watchers of that user.
//!
//! A message carries only `<user>:<sequence>`; a woken watcher reads the user's
//! notifications after the last sequence it sent from Postgres (the source of truth), so
//! nothing is skipped or sent twice even if messages are lost, duplicated or reordered.
//! After the subscription was lost, every local watcher is woken once it is back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use platform::redis_pool::{RedisConfig, RedisPool};
use tokio::sync::watch;
use uuid::Uuid;

/// The per-replica registry of watchers, by user, and the Redis channel.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    redis: RedisPool,
    redis_config: RedisConfig,
    channel: String,
    /// Each user's latest known sequence; watchers wait for it to change. A generation
    /// counter wakes everyone after a subscription gap.
    users: Mutex<HashMap<Uuid, watch::Sender<i64>>>,
    everyone: watch::Sender<u64>,
}

/// What a watcher waits on.
#[derive(Debug)]
pub struct Subscription {
    pub user: watch::Receiver<i64>,
    pub everyone: watch::Receiver<u64>,
}

impl Hub {
    pub fn new(redis: RedisPool, redis_config: RedisConfig) -> Self {
        Self {
            inner: Arc::new(HubInner {
                redis,
                channel: redis_config.key("notifications"),
                redis_config,
                users: Mutex::new(HashMap::new()),
                everyone: watch::channel(0).0,
            }),
        }
    }

    /// Follows the Redis channel until `stop` (reconnecting with backoff).
    pub fn start(&self, stop: watch::Receiver<bool>) {
        tokio::spawn(listen(self.clone(), stop));
    }

    pub fn subscribe(&self, user: Uuid) -> Subscription {
        let everyone = self.inner.everyone.subscribe();
        let Ok(mut users) = self.inner.users.lock() else {
            return Subscription {
                user: watch::channel(0).1,
                everyone,
            };
        };
        // Forget users nobody here watches any more, now and then.
        if users.len() > 1024 && users.len().is_power_of_two() {
            users.retain(|_, sender| sender.receiver_count() > 0);
        }
        let sender = users.entry(user).or_insert_with(|| watch::channel(0).0);
        Subscription {
            user: sender.subscribe(),
            everyone,
        }
    }

    /// Wakes this replica's watchers of `user`.
    fn wake(&self, user: Uuid, sequence: i64) {
        let Ok(mut users) = self.inner.users.lock() else {
            return;
        };
        if let Some(sender) = users.get(&user) {
            if sender.receiver_count() == 0 {
                users.remove(&user);
            } else {
                sender.send_if_modified(|known| {
                    let newer = sequence > *known;
                    if newer {
                        *known = sequence;
                    }
                    newer
                });
            }
        }
    }

    /// Tells every replica (this one directly, in case Redis is down).
    pub async fn publish(&self, user: Uuid, sequence: i64) {
        self.wake(user, sequence);
        let channel = self.inner.channel.clone();
        let message = format!("{user}:{sequence}");
        let published = tokio::time::timeout(Duration::from_secs(1), async {
            let mut connection = self.inner.redis.get().await.map_err(|e| e.to_string())?;
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&message)
                .query_async::<i64>(&mut *connection)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        match published {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot publish a notification: other replicas' streams see it on reconnect");
            }
            Err(_) => tracing::warn!("publishing a notification timed out"),
        }
    }
}

fn parse(payload: &str) -> Option<(Uuid, i64)> {
    let (user, sequence) = payload.split_once(':')?;
    Some((Uuid::parse_str(user).ok()?, sequence.parse().ok()?))
}

async fn listen(hub: Hub, mut stop: watch::Receiver<bool>) {
    let client = match redis::Client::open(hub.inner.redis_config.url.expose()) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "invalid redis URL: notifications reach this replica's own streams only");
            return;
        }
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&hub.inner.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                metrics::gauge!("notes_notifications_subscribed").set(1.0);
                // Whatever was published while away: every watcher here looks again.
                hub.inner
                    .everyone
                    .send_modify(|generation| *generation += 1);
                let (mut sink, mut stream) = pubsub.split();
                let mut ping = tokio::time::interval(Duration::from_secs(5));
                ping.tick().await;
                loop {
                    tokio::select! {
                        () = crate::jobs::stopped(&mut stop) => return,
                        message = stream.next() => match message {
                            Some(message) => {
                                let parsed = std::str::from_utf8(message.get_payload_bytes())
                                    .ok()
                                    .and_then(parse);
                                if let Some((user, sequence)) = parsed {
                                    hub.wake(user, sequence);
                                }
                            }
                            None => break,
                        },
                        _ = ping.tick() => {
                            let answered = tokio::time::timeout(Duration::from_secs(2), sink.ping::<String>()).await;
                            if !matches!(answered, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                metrics::gauge!("notes_notifications_subscribed").set(0.0);
                tracing::warn!("notification subscription lost: reconnecting");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to notifications"),
            Err(_) => tracing::debug!("subscribing to notifications timed out"),
        }
        tokio::select! {
            () = crate::jobs::stopped(&mut stop) => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        let user = Uuid::now_v7();
        assert_eq!(parse(&format!("{user}:42")), Some((user, 42)));
        assert_eq!(parse("nope"), None);
    }
}
