//! Client-side balancing: calls spread over every replica behind a name, and move off a
//! replica that drains or leaves DNS without a failed call. Replicas stand on distinct
//! loopback addresses behind a resolver the test controls.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use platform::{
    balance::Resolver,
    grpc::{ClientConfig, lazy_channel_with},
};
use tokio::net::TcpListener;
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_client::HealthClient},
    server::HealthReporter,
};

/// The addresses the test says the name has, changed as replicas come and go.
#[derive(Default)]
struct TestResolver(Mutex<Vec<SocketAddr>>);

impl Resolver for TestResolver {
    fn resolve(
        &self,
        _host: &str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
        let addresses = self.0.lock().expect("lock").clone();
        Box::pin(async move { Ok(addresses) })
    }
}

/// One replica: a health service counting the `Check` calls it answers.
struct Replica {
    addr: SocketAddr,
    checks: Arc<AtomicUsize>,
    health: HealthReporter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(ip: &str) -> Self {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind a loopback address");
        let addr = listener.local_addr().expect("addr");
        let (health, service) = tonic_health::server::health_reporter();
        let checks = Arc::new(AtomicUsize::new(0));
        let counted = checks.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let count = tower::util::MapRequestLayer::new(move |request: http::Request<_>| {
                if request.uri().path().ends_with("/Check") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                request
            });
            tonic::transport::Server::builder()
                .layer(count)
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .expect("replica serves");
        });
        Self {
            addr,
            checks,
            health,
            stop: Some(stop),
            task,
        }
    }

    fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }

    /// What a replica does on SIGTERM: NOT_SERVING first, then, after the drain delay, it
    /// stops accepting and finishes what is in flight within a grace period (streams such
    /// as health watches are cut at its end).
    async fn drain_and_stop(self, drain: Duration) {
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        tokio::time::sleep(drain).await;
        self.stop().await;
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_millis(300), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

#[tokio::test]
async fn calls_spread_over_replicas_and_move_off_stopping_ones_without_failing() {
    let mut replicas = vec![
        Replica::start("127.0.0.2").await,
        Replica::start("127.0.0.3").await,
        Replica::start("127.0.0.4").await,
    ];
    let resolver = Arc::new(TestResolver::default());
    *resolver.0.lock().expect("lock") = replicas.iter().map(|r| r.addr).collect();
    let config = ClientConfig {
        resolve_interval: Duration::from_millis(100),
        ..ClientConfig::default()
    };
    let channel =
        lazy_channel_with("http://replicas.test:50052", config, resolver.clone()).expect("channel");

    // A steady stream of calls for the whole test, every failure counted.
    let failures = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (channel, failures, calls, running) = (
            channel.clone(),
            failures.clone(),
            calls.clone(),
            running.clone(),
        );
        callers.push(tokio::spawn(async move {
            let mut client = HealthClient::new(channel);
            while running.load(Ordering::SeqCst) {
                let answer = client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if answer.is_err() {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    // Every replica takes a share.
    e2e::eventually(
        Duration::from_secs(10),
        "calls on every replica",
        || async { replicas.iter().all(|r| r.checks() >= 20).then_some(()) },
    )
    .await;

    // The third drains (NOT_SERVING for 500 ms, then stops): calls move off it at once.
    let third = replicas.pop().expect("three");
    third.drain_and_stop(Duration::from_millis(500)).await;
    let after_third = calls.load(Ordering::SeqCst);

    // The second leaves DNS first (a pod deleted), then stops after a short while.
    *resolver.0.lock().expect("lock") = vec![replicas[0].addr, replicas[1].addr];
    // A new replica joins meanwhile.
    let fourth = Replica::start("127.0.0.5").await;
    *resolver.0.lock().expect("lock") = vec![replicas[0].addr, fourth.addr];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second_before_stop = replicas[1].checks();
    let second = replicas.pop().expect("two");
    let second_checks = second.checks.clone();
    second.stop().await;

    e2e::eventually(
        Duration::from_secs(10),
        "calls on the new replica",
        || async { (fourth.checks() >= 20).then_some(()) },
    )
    .await;
    let first_before = replicas[0].checks();
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::SeqCst);
    for caller in callers {
        caller.await.expect("caller");
    }

    assert_eq!(failures.load(Ordering::SeqCst), 0, "no call failed");
    assert!(calls.load(Ordering::SeqCst) > after_third, "calls went on");
    assert_eq!(
        second_checks.load(Ordering::SeqCst),
        second_before_stop,
        "nothing reached the replica after it left DNS"
    );
    assert!(
        replicas[0].checks() > first_before,
        "the first keeps serving"
    );
}
