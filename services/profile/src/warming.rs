//! Cache warming: who was active recently (recorded off the request path, flushed to
//! Postgres in batches), and loading their profiles into both cache levels at a bounded
//! rate, at start-up and on demand.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use uuid::Uuid;

use crate::{
    cache::{CachedProfile, Caches},
    store::Store,
};

/// At most this many users wait in memory; past it a flush is due at once.
const PENDING_MAX: usize = 50_000;
/// Users per statement when flushing; profiles per tick when warming.
const BATCH: usize = 500;

/// Users who read their profile since the last flush.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    pending: Arc<Mutex<HashSet<Uuid>>>,
    full: Arc<tokio::sync::Notify>,
}

impl Activity {
    /// Notes that `user_id` read their profile (called on cache misses only: `last_active_at`
    /// is hourly anyway).
    pub fn record(&self, user_id: Uuid) {
        let len = match self.pending.lock() {
            Ok(mut pending) => {
                pending.insert(user_id);
                pending.len()
            }
            Err(_) => return,
        };
        if len >= PENDING_MAX {
            self.full.notify_one();
        }
    }

    fn take(&self) -> Vec<Uuid> {
        self.pending
            .lock()
            .map(|mut pending| pending.drain().collect())
            .unwrap_or_default()
    }

    /// Writes what was recorded every `interval` (or sooner when full), until the process
    /// ends.
    pub async fn flush_forever(self, store: Store, interval: Duration) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.full.notified() => {}
            }
            let users = self.take();
            for chunk in users.chunks(BATCH) {
                if let Err(e) = store.touch_active(chunk).await {
                    tracing::warn!(error = %e, "cannot record active users; warming will miss them");
                }
            }
        }
    }
}

/// Loads the profiles of users active within `window` into both cache levels, at most
/// `max_per_second` profiles a second and `max_profiles` in all. Returns how many were
/// scheduled; the loading runs in the background.
pub async fn warm(
    store: &Store,
    caches: &Caches,
    window: Duration,
    max_per_second: u32,
    max_profiles: u32,
) -> Result<usize, sqlx::Error> {
    let users = store
        .recently_active(window.as_secs_f64(), i64::from(max_profiles))
        .await?;
    let scheduled = users.len();
    let store = store.clone();
    let caches = caches.clone();
    tokio::spawn(async move {
        let per_batch = usize::try_from(max_per_second.max(1))
            .unwrap_or(1)
            .min(BATCH);
        let pause = Duration::from_secs_f64(per_batch as f64 / f64::from(max_per_second.max(1)));
        let mut loaded = 0usize;
        for chunk in users.chunks(per_batch) {
            let started = tokio::time::Instant::now();
            for user_id in chunk {
                // Loaded inside the cache's loader, after its read of Redis, so an update
                // that commits meanwhile cannot be overwritten by this older copy.
                let stored = caches
                    .profiles
                    .get_or_load(&user_id.to_string(), || async {
                        let rows = store.load_profiles(&[*user_id]).await.map_err(|e| {
                            tracing::warn!(error = %e, "cache warming: load failed");
                        })?;
                        Ok::<_, ()>(rows.into_iter().next().map(CachedProfile::from_row))
                    })
                    .await;
                loaded += usize::from(stored.is_ok());
            }
            tokio::time::sleep_until(started + pause).await;
        }
        tracing::info!(loaded, "cache warmed");
    });
    Ok(scheduled)
}

/// Warming at start-up: waits for the schema (migrations run in the background), then warms.
pub async fn warm_at_start(
    store: Store,
    caches: Caches,
    window: Duration,
    max_per_second: u32,
    max_profiles: u32,
) {
    let mut backoff = Duration::from_millis(200);
    for _ in 0..10 {
        match warm(&store, &caches, window, max_per_second, max_profiles).await {
            Ok(scheduled) => {
                tracing::info!(scheduled, "warming the cache with recently active profiles");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cache warming waits for the database"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    tracing::warn!("cache warming at start-up gave up: the database did not answer");
}
