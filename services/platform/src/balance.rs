//! Per-request balancing across every replica behind one name.
//!
//! gRPC keeps one HTTP/2 connection open for a long time, so a Kubernetes `Service` that
//! balances connections (L4) sends every request of a client to the replica it happened to
//! connect to. Clients here balance requests instead: the name of a headless `Service`
//! resolves to one address per ready replica, re-resolved every few seconds, and each call
//! goes to the less loaded of two replicas picked at random (tower's power of two choices).
//!
//! Each resolved replica's `grpc.health.v1` status is watched too. A replica that starts to
//! drain reports NOT_SERVING for its drain delay before it stops accepting, and leaves the
//! rotation the moment that arrives — before DNS catches up — so stopping a replica fails
//! no request. When no replica is healthy, every resolved one stays in, so calls fail fast
//! rather than wait; a resolution that fails or comes back empty keeps the last known set.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, mpsc::Sender};

use crate::grpc::{ClientConfig, endpoint};
use tonic::transport::{Channel, Endpoint, channel::Change};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Finds the addresses behind a host name.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>>;
}

/// The system resolver (DNS, `/etc/hosts`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// A fixed list of replicas (several on one machine, from a comma-separated URL list).
#[derive(Debug, Clone, Default)]
pub struct StaticResolver(pub Vec<SocketAddr>);

impl Resolver for StaticResolver {
    fn resolve(
        &self,
        _host: &str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
        let addresses = self.0.clone();
        Box::pin(async move { Ok(addresses) })
    }
}

/// Where to find the replicas: `scheme://host:port`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) scheme: String,
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Target {
    /// The endpoint for one replica, with the client settings.
    fn endpoint(&self, address: SocketAddr, config: ClientConfig) -> Option<Endpoint> {
        endpoint(&format!("{}://{address}", self.scheme), config).ok()
    }
}

/// A channel over every replica `resolver` finds for the target, re-resolved every
/// `config.resolve_interval`. The follower task stops when the last clone of the channel is
/// dropped. Needs a Tokio runtime.
pub(crate) fn balanced(
    target: Target,
    config: ClientConfig,
    resolver: Arc<dyn Resolver>,
) -> Channel {
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
    tokio::spawn(follow(target, config, resolver, changes));
    channel
}

/// What the follower knows of one replica.
#[derive(Debug, Default)]
struct Replicas {
    /// Address → whether its health says SERVING (unknown counts as serving).
    serving: HashMap<SocketAddr, bool>,
}

async fn follow(
    target: Target,
    config: ClientConfig,
    resolver: Arc<dyn Resolver>,
    changes: Sender<Change<SocketAddr, Endpoint>>,
) {
    let host = target.host.clone();
    let replicas = Arc::new(Mutex::new(Replicas::default()));
    let health_changed = Arc::new(Notify::new());
    let mut watchers: HashMap<SocketAddr, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut in_rotation: HashSet<SocketAddr> = HashSet::new();
    let mut resolved: Vec<SocketAddr> = Vec::new();
    let mut next_resolve = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_resolve {
            match resolver.resolve(&host, target.port).await {
                Ok(addresses) if !addresses.is_empty() => resolved = addresses,
                Ok(_) => tracing::warn!(%host, "no address for the name; keeping the last known"),
                Err(e) => {
                    tracing::warn!(%host, error = %e, "cannot resolve; keeping the last known");
                }
            }
            next_resolve = tokio::time::Instant::now() + config.resolve_interval;
            // One health watcher per resolved replica; replicas gone from DNS lose theirs.
            watchers.retain(|address, task| {
                let keep = resolved.contains(address);
                if !keep {
                    task.abort();
                }
                keep
            });
            for address in &resolved {
                let Some(endpoint) = target.endpoint(*address, config) else {
                    continue;
                };
                watchers.entry(*address).or_insert_with(|| {
                    tokio::spawn(watch_health(
                        endpoint,
                        *address,
                        replicas.clone(),
                        health_changed.clone(),
                    ))
                });
            }
        }

        let wanted = {
            let state = replicas
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let healthy: HashSet<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| state.serving.get(a).copied().unwrap_or(true))
                .collect();
            if healthy.is_empty() {
                resolved.iter().copied().collect()
            } else {
                healthy
            }
        };
        for gone in in_rotation.difference(&wanted).copied().collect::<Vec<_>>() {
            tracing::info!(%host, address = %gone, "replica leaves the rotation");
            if changes.send(Change::Remove(gone)).await.is_err() {
                break;
            }
            in_rotation.remove(&gone);
        }
        for new in wanted.difference(&in_rotation).copied().collect::<Vec<_>>() {
            let Some(endpoint) = target.endpoint(new, config) else {
                continue;
            };
            tracing::info!(%host, address = %new, "replica joins the rotation");
            if changes.send(Change::Insert(new, endpoint)).await.is_err() {
                break;
            }
            in_rotation.insert(new);
        }
        if changes.is_closed() {
            // Every clone of the channel is gone.
            for task in watchers.values() {
                task.abort();
            }
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(next_resolve) => {}
            () = health_changed.notified() => {}
            () = changes.closed() => {}
        }
    }
}

/// Follows one replica's overall health (`""`) with `Health/Watch`, reconnecting while the
/// replica is listed; an unreachable replica counts as not serving.
async fn watch_health(
    endpoint: Endpoint,
    address: SocketAddr,
    replicas: Arc<Mutex<Replicas>>,
    changed: Arc<Notify>,
) {
    let set = |serving: bool| {
        let mut state = replicas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.serving.insert(address, serving) != Some(serving) {
            changed.notify_one();
        }
    };
    let channel = endpoint.connect_lazy();
    loop {
        let mut client = HealthClient::new(channel.clone());
        let watched = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        match watched {
            Ok(response) => {
                let mut stream = response.into_inner();
                while let Ok(Some(status)) = stream.message().await {
                    set(status.status() == ServingStatus::Serving);
                }
                set(false);
            }
            Err(_) => set(false),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
