//! What operators see of a service: `/metrics` on its gRPC port, and the trace a caller's
//! `traceparent` starts carried on, named back in the response.
//!
//! The metrics registry is process-wide and other tests run in parallel, so counters are
//! compared before and after this test's own calls (they only grow), and gauges are read from
//! a service configured with values no other test uses.

use std::time::Duration;

use e2e::{
    Infra, eventually, grpc_call_raw, http_get, install_tracing, prometheus_value, start_service,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const HEALTH_OK: &str =
    r#"rpc_server_requests_total{service="grpc.health.v1.Health",method="Check",code="OK"}"#;
const HEALTH_NOT_FOUND: &str =
    r#"rpc_server_requests_total{service="grpc.health.v1.Health",method="Check",code="NOT_FOUND"}"#;
const OTHER_UNIMPLEMENTED: &str =
    r#"rpc_server_requests_total{service="_OTHER",method="_OTHER",code="UNIMPLEMENTED"}"#;

async fn scrape(addr: std::net::SocketAddr) -> String {
    let response = http_get(addr, "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(
        response
            .headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or_default().starts_with("text/plain")),
        "{:?}",
        response.headers
    );
    response.text()
}

#[tokio::test]
async fn a_service_serves_rpc_and_pool_metrics_on_its_grpc_port() {
    let infra = Infra::from_env();
    let profile = start_service::<profile::Config>(
        &infra,
        &[("DB_MAX_CONNECTIONS", "7"), ("REDIS_MAX_CONNECTIONS", "3")],
    )
    .await;
    let before = scrape(profile.addr).await;

    let mut health = HealthClient::new(profile.channel().await);
    for _ in 0..3 {
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(unknown.code(), Code::NotFound);

    let after = scrape(profile.addr).await;
    assert!(
        prometheus_value(&after, HEALTH_OK) - prometheus_value(&before, HEALTH_OK) >= 3.0,
        "{after}"
    );
    assert!(
        prometheus_value(&after, HEALTH_NOT_FOUND) - prometheus_value(&before, HEALTH_NOT_FOUND)
            >= 1.0,
        "{after}"
    );
    assert!(
        prometheus_value(
            &after,
            r#"rpc_server_duration_seconds_count{service="grpc.health.v1.Health",method="Check"}"#
        ) >= 4.0,
        "{after}"
    );
    assert!(
        after.contains(
            r#"rpc_server_duration_seconds_bucket{service="grpc.health.v1.Health",method="Check",le="0.005"}"#
        ),
        "latency buckets: {after}"
    );

    // Pools, sampled at the scrape. Redis is pinged once at start; the database answers
    // health pings every 100 ms, so a connection is open by the time it reports SERVING.
    let text = eventually(Duration::from_secs(30), "pool use in /metrics", || async {
        let text = scrape(profile.addr).await;
        let gets = prometheus_value(
            &text,
            r#"redis_pool_gets_total{service="profile",result="direct"}"#,
        ) + prometheus_value(
            &text,
            r#"redis_pool_gets_total{service="profile",result="waited"}"#,
        );
        let db_open = prometheus_value(
            &text,
            r#"db_pool_connections{service="profile",state="idle"}"#,
        ) + prometheus_value(
            &text,
            r#"db_pool_connections{service="profile",state="in_use"}"#,
        );
        (gets >= 1.0 && db_open >= 1.0).then_some(text)
    })
    .await;
    assert_eq!(
        prometheus_value(&text, r#"db_pool_max_connections{service="profile"}"#),
        7.0,
        "{text}"
    );
    assert_eq!(
        prometheus_value(&text, r#"redis_pool_max_connections{service="profile"}"#),
        3.0,
        "{text}"
    );
    let redis_open = prometheus_value(
        &text,
        r#"redis_pool_connections{service="profile",state="idle"}"#,
    ) + prometheus_value(
        &text,
        r#"redis_pool_connections{service="profile",state="in_use"}"#,
    );
    assert!((1.0..=3.0).contains(&redis_open), "{text}");
    assert!(
        text.contains(r#"redis_pool_pending_gets{service="profile"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_traceparent_in_metadata_is_continued_and_named_in_the_response() {
    install_tracing();
    let infra = Infra::from_env();
    let notes = start_service::<notes::Config>(&infra, &[]).await;
    let before = scrape(notes.addr).await;

    // A method no service has: always UNIMPLEMENTED, whatever the services implement.
    let path = "/notes.v1.NotesService/NoSuchMethodForObservabilityTests";
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let (headers, code) = grpc_call_raw(&notes, path, &[("traceparent", &traceparent)]).await;
    assert_eq!(code, Code::Unimplemented);
    assert_eq!(
        headers.get("x-trace-id").and_then(|v| v.to_str().ok()),
        Some(trace_id.as_str()),
        "the server span continues the caller's trace: {headers:?}"
    );

    // Without one, each call starts a trace of its own, and still names it.
    let mut fresh = Vec::new();
    for _ in 0..2 {
        let (headers, _) = grpc_call_raw(&notes, path, &[]).await;
        let id = headers
            .get("x-trace-id")
            .and_then(|v| v.to_str().ok())
            .expect("a trace id on every response")
            .to_owned();
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_ne!(id, "0".repeat(32));
        assert_ne!(id, trace_id);
        fresh.push(id);
    }
    assert_ne!(fresh[0], fresh[1]);

    // Unknown methods are counted under one label, whatever their names.
    let after = scrape(notes.addr).await;
    assert!(
        prometheus_value(&after, OTHER_UNIMPLEMENTED)
            - prometheus_value(&before, OTHER_UNIMPLEMENTED)
            >= 3.0,
        "{after}"
    );
    assert!(!after.contains("NoSuchMethod"), "{after}");
}
