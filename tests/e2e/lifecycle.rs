//! Start-up, readiness and shutdown behaviour of one binary at a time.

use std::time::Duration;

use e2e::{Infra, Running, eventually, http_get, service_config, service_vars, start_gateway};
use platform::service::GrpcService as _;
use tokio_stream::StreamExt as _;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn check(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check answers")
        .into_inner()
        .status()
}

#[tokio::test]
async fn shutdown_reports_not_serving_before_the_service_exits() {
    let infra = Infra::from_env();
    let database = infra.create_database("drain").await;
    let vars = service_vars(
        &infra,
        "AUTH",
        &database,
        &[
            ("SHUTDOWN_DRAIN_DELAY", "600ms"),
            ("SHUTDOWN_GRACE_PERIOD", "2s"),
        ],
    );
    let config: auth::Config = service_config(vars);
    let mut running =
        Running::start(move |listener, shutdown| config.serve(listener, shutdown)).await;
    let mut health = HealthClient::new(running.channel().await);

    eventually(Duration::from_secs(30), "SERVING", || {
        let mut health = health.clone();
        async move {
            (check(&mut health, "auth.v1.AuthService").await == ServingStatus::Serving)
                .then_some(())
        }
    })
    .await;

    // A watcher sees the switch as it happens; a fresh check during the drain delay sees it too.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "auth.v1.AuthService".to_owned(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("current status").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);

    let signalled = tokio::time::Instant::now();
    running.signal_shutdown();
    let update = tokio::time::timeout(Duration::from_secs(2), watch.next())
        .await
        .expect("an update soon after the signal")
        .expect("stream open")
        .expect("ok");
    assert_eq!(update.status(), ServingStatus::NotServing);
    assert_eq!(check(&mut health, "").await, ServingStatus::NotServing);
    assert_eq!(
        check(&mut health, "auth.v1.AuthService").await,
        ServingStatus::NotServing
    );

    // The open watch stream is an in-flight request that never ends by itself: the grace
    // period bounds the exit.
    let result = tokio::time::timeout(Duration::from_secs(5), running.task)
        .await
        .expect("exits within the grace period");
    result.expect("no panic").expect("serve returned Ok");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(4),
        "exit after the drain delay and within the grace period, took {took:?}"
    );
}

#[tokio::test]
async fn not_serving_until_the_database_exists_then_serving() {
    let infra = Infra::from_env();
    let database = infra.database_name("late");
    let vars = service_vars(&infra, "PROFILE", &database, &[]);
    let config: profile::Config = service_config(vars);
    let mut running =
        Running::start(move |listener, shutdown| config.serve(listener, shutdown)).await;
    let mut health = HealthClient::new(running.channel().await);

    // The process serves gRPC at once (liveness), but not SERVING: its database is missing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(check(&mut health, "").await, ServingStatus::NotServing);
    assert_eq!(
        check(&mut health, "profile.v1.ProfileService").await,
        ServingStatus::NotServing
    );

    infra.create_named_database(&database).await;
    eventually(
        Duration::from_secs(30),
        "SERVING once the database exists",
        || {
            let mut health = health.clone();
            async move { (check(&mut health, "").await == ServingStatus::Serving).then_some(()) }
        },
    )
    .await;

    // Migrations ran on the way: the service's first table is there.
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&infra.url_for(&database))
        .await
        .expect("connect");
    let exists: bool = sqlx::query_scalar("select to_regclass('profiles') is not null")
        .fetch_one(&mut db)
        .await
        .expect("query");
    assert!(exists);

    running.signal_shutdown();
    running
        .task
        .await
        .expect("no panic")
        .expect("serve returned Ok");
}

#[tokio::test]
async fn replicas_migrating_together_apply_each_migration_once() {
    let infra = Infra::from_env();
    let database = infra.create_database("race").await;
    let config: notes::Config = service_config(service_vars(&infra, "NOTES", &database, &[]));
    let spec = &notes::SPEC;

    let runs = (0..4).map(|_| platform::service::migrate_once(spec, config.service_config()));
    for result in futures::future::join_all(runs).await {
        result.expect("every replica's migrate succeeds");
    }

    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&infra.url_for(&database))
        .await
        .expect("connect");
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
        .fetch_one(&mut db)
        .await
        .expect("query");
    let migrations = notes::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .count();
    assert_eq!(applied, i64::try_from(migrations).unwrap());
}

#[tokio::test]
async fn ready_is_503_and_names_the_dependency_that_is_down() {
    // Nothing listens on these ports: bind and drop to get addresses that refuse connections.
    let closed = |_: ()| async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        format!("http://{addr}")
    };
    let (auth, profile, notes) = (closed(()).await, closed(()).await, closed(()).await);
    let mut gateway = start_gateway(&[
        ("AUTH_URL", &auth),
        ("PROFILE_URL", &profile),
        ("NOTES_URL", &notes),
        ("READY_TIMEOUT", "500ms"),
    ])
    .await;

    let response = http_get(gateway.addr, "/ready").await;
    assert_eq!(response.status, 503);
    let body = response.json();
    assert_eq!(body["status"], "not_ready");
    for dependency in body["dependencies"].as_array().expect("list") {
        assert_ne!(dependency["state"], "SERVING", "{body}");
    }
    // Liveness does no I/O, so it stays 200.
    assert_eq!(http_get(gateway.addr, "/health").await.status, 200);

    gateway.signal_shutdown();
    gateway
        .task
        .await
        .expect("no panic")
        .expect("serve returned Ok");
}

#[test]
fn a_missing_required_variable_is_named() {
    let env =
        platform::config::Env::from_pairs("NOTES", [("NOTES_REDIS_URL", "redis://127.0.0.1:1")]);
    let _ = <notes::Config as platform::service::GrpcService>::from_env(&env);
    let message = env
        .finish()
        .expect_err("DATABASE_URL is required")
        .to_string();
    assert!(message.contains("NOTES_DATABASE_URL"), "{message}");
}
