//! The gateway's edge over real HTTP: problem details, request ids, trace ids,
//! `X-Process-Time`, compression, JSON bodies (415/400/413), load shedding, deadlines, CORS.
//!
//! The gateway runs alone (no service is needed for any of this), its upstreams pointing at a
//! closed port, with this file's own routes mounted behind the same guard and middleware as
//! the real API routes.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::DefaultBodyLimit, routing::get, routing::post};
use e2e::{HttpResponse, Running, eventually, http_get, http_request, start_gateway_with_routes};
use gateway::{
    AppState,
    context::{Deadline, RequestContext},
    extract::ApiJson,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Nothing listens on port 1: upstream calls fail fast, whatever else runs on the machine.
const NO_UPSTREAM: &str = "http://127.0.0.1:1";

/// What the held route shares with its test: how many requests got in, and the permits
/// that let them finish.
#[derive(Debug)]
struct Held {
    entered: AtomicUsize,
    release: Semaphore,
}

impl Held {
    fn new() -> Self {
        Self {
            entered: AtomicUsize::new(0),
            release: Semaphore::new(0),
        }
    }
}

/// This file's routes: a JSON echo through `ApiJson`, one with a raised body limit, a large
/// and a small response, a route that waits until released, a slow one, and one that shows
/// what an upstream call would carry.
fn test_routes(held: Arc<Held>) -> Router<AppState> {
    type Lists = HashMap<String, Vec<u32>>;
    async fn echo(ApiJson(body): ApiJson<Lists>) -> ApiJson<Lists> {
        ApiJson(body)
    }
    Router::new()
        .route("/test/echo", post(echo))
        .route(
            "/test/echo-up-to-64k",
            post(echo).layer(DefaultBodyLimit::max(64 * 1024)),
        )
        .route(
            "/test/large",
            get(|| async { ApiJson(json!({ "lines": vec!["a fairly compressible line"; 400] })) }),
        )
        .route(
            "/test/small",
            get(|| async { ApiJson(json!({ "ok": true })) }),
        )
        .route(
            "/test/held",
            get(move || {
                let held = held.clone();
                async move {
                    held.entered.fetch_add(1, Ordering::SeqCst);
                    let _permit = held.release.acquire().await;
                    "released"
                }
            }),
        )
        .route(
            "/test/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .route(
            "/test/upstream-call",
            get(|context: RequestContext, deadline: Deadline| async move {
                let call = context.grpc_request((), deadline)?;
                let metadata = call.metadata();
                let text = |key: &str| {
                    metadata
                        .get(key)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                Ok::<_, gateway::error::ApiError>(ApiJson(json!({
                    "grpc_timeout": text("grpc-timeout"),
                    "x_request_id": text("x-request-id"),
                    "trace_id": context.trace_id(),
                })))
            }),
        )
}

async fn start(extra: &[(&str, &str)]) -> (Running, Arc<Held>) {
    let held = Arc::new(Held::new());
    let mut vars = vec![
        ("AUTH_URL", NO_UPSTREAM),
        ("PROFILE_URL", NO_UPSTREAM),
        ("NOTES_URL", NO_UPSTREAM),
    ];
    vars.extend_from_slice(extra);
    let gateway = start_gateway_with_routes(&vars, test_routes(held.clone())).await;
    (gateway, held)
}

async fn stop(mut gateway: Running) {
    gateway.signal_shutdown();
    tokio::time::timeout(Duration::from_secs(10), gateway.task)
        .await
        .expect("stops within its grace period")
        .expect("task did not panic")
        .expect("serve returned Ok");
}

fn header<'a>(response: &'a HttpResponse, name: &str) -> &'a str {
    response
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {response:?}"))
        .to_str()
        .expect("an ASCII header")
}

fn is_trace_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

/// Checks every member of a problem and that it agrees with the response around it; returns
/// the body for more checks.
fn assert_problem(response: &HttpResponse, status: u16, code: &str) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(header(response, "content-type"), "application/problem+json");
    let body = response.json();
    assert_eq!(body["type"], format!("https://errors.svcset.dev/{code}"));
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert_eq!(body["code"], code);
    assert_eq!(body["request_id"], header(response, "x-request-id"));
    assert!(body["trace_id"].as_str().is_some_and(is_trace_id), "{body}");
    body
}

#[tokio::test]
async fn unknown_paths_answer_a_complete_problem() {
    let (gateway, _) = start(&[]).await;

    let response = http_get(gateway.addr, "/no/such/route").await;
    let body = assert_problem(&response, 404, "ROUTE_NOT_FOUND");
    assert_eq!(body["title"], "Route not found");
    assert_eq!(body["detail"], "no route for GET /no/such/route");
    assert!(body.get("errors").is_none(), "errors only for validation");
    assert!(uuid::Uuid::parse_str(header(&response, "x-request-id")).is_ok());

    // Two requests, two trace ids: each request gets its own.
    let again = http_get(gateway.addr, "/no/such/route").await;
    assert_ne!(again.json()["trace_id"], body["trace_id"]);

    stop(gateway).await;
}

#[tokio::test]
async fn wrong_methods_answer_405_with_allow() {
    let (gateway, _) = start(&[]).await;

    let response = http_request(gateway.addr, "DELETE", "/health", &[], "").await;
    assert_problem(&response, 405, "METHOD_NOT_ALLOWED");
    assert!(header(&response, "allow").contains("GET"), "{response:?}");

    let response = http_request(gateway.addr, "GET", "/test/echo", &[], "").await;
    assert_problem(&response, 405, "METHOD_NOT_ALLOWED");
    assert_eq!(header(&response, "allow"), "POST");

    stop(gateway).await;
}

#[tokio::test]
async fn a_printable_request_id_is_echoed_and_passed_on() {
    let (gateway, _) = start(&[]).await;
    let id = "mobile-7f3a 2026/01/01 ~ok";
    let longest = "r".repeat(128);

    for sent in [id, longest.as_str()] {
        let response = http_request(
            gateway.addr,
            "GET",
            "/no/such/route",
            &[("x-request-id", sent)],
            "",
        )
        .await;
        assert_eq!(header(&response, "x-request-id"), sent);
        assert_eq!(response.json()["request_id"], sent);
    }

    let response = http_request(
        gateway.addr,
        "GET",
        "/test/upstream-call",
        &[("x-request-id", id)],
        "",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.json()["x_request_id"],
        id,
        "the services get it too"
    );

    stop(gateway).await;
}

#[tokio::test]
async fn unacceptable_request_ids_are_replaced_by_generated_ones() {
    let (gateway, _) = start(&[]).await;
    let too_long = "r".repeat(129);

    for sent in [too_long.as_str(), "tab\tinside", "caf\u{e9}"] {
        let response = http_request(
            gateway.addr,
            "GET",
            "/test/upstream-call",
            &[("x-request-id", sent)],
            "",
        )
        .await;
        let answered = header(&response, "x-request-id");
        assert_ne!(answered, sent);
        assert!(uuid::Uuid::parse_str(answered).is_ok(), "{answered}");
        assert_eq!(
            response.json()["x_request_id"],
            answered,
            "services get the replacement, never the rejected id"
        );
    }

    stop(gateway).await;
}

#[tokio::test]
async fn the_trace_id_joins_an_incoming_traceparent() {
    let (gateway, _) = start(&[]).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");

    let response = http_request(
        gateway.addr,
        "GET",
        "/no/such/route",
        &[("traceparent", &traceparent)],
        "",
    )
    .await;
    assert_eq!(response.json()["trace_id"], trace_id);

    // A handler sees the same id as the problem body would.
    let response = http_request(
        gateway.addr,
        "GET",
        "/test/upstream-call",
        &[("traceparent", &traceparent)],
        "",
    )
    .await;
    assert_eq!(response.json()["trace_id"], trace_id);

    stop(gateway).await;
}

#[tokio::test]
async fn every_response_has_a_process_time_in_seconds() {
    let (gateway, _) = start(&[]).await;

    for response in [
        http_get(gateway.addr, "/health").await,
        http_get(gateway.addr, "/no/such/route").await,
        http_get(gateway.addr, "/test/small").await,
    ] {
        let value = header(&response, "x-process-time");
        let (_, decimals) = value.split_once('.').expect("a decimal number");
        assert_eq!(decimals.len(), 6, "microsecond precision: {value}");
        let seconds: f64 = value.parse().expect("seconds");
        assert!((0.0..5.0).contains(&seconds), "{value}");
    }

    stop(gateway).await;
}

#[tokio::test]
async fn large_responses_are_compressed_as_the_client_accepts() {
    let (gateway, _) = start(&[]).await;
    let get = |path: &'static str, accept: Option<&'static str>| {
        let headers: Vec<(&str, &str)> =
            accept.map(|a| ("accept-encoding", a)).into_iter().collect();
        async move { http_request(gateway.addr, "GET", path, &headers, "").await }
    };

    let plain = get("/test/large", None).await;
    assert_eq!(plain.status, 200);
    assert!(
        plain.body.len() > 8 * 1024,
        "large enough: {}",
        plain.body.len()
    );
    assert!(plain.headers.get("content-encoding").is_none());

    let gzip = get("/test/large", Some("gzip")).await;
    assert_eq!(header(&gzip, "content-encoding"), "gzip");
    assert_eq!(&gzip.body[..2], [0x1f, 0x8b], "gzip magic");
    assert!(gzip.body.len() < plain.body.len() / 4);

    let brotli = get("/test/large", Some("br")).await;
    assert_eq!(header(&brotli, "content-encoding"), "br");
    assert!(brotli.body.len() < plain.body.len() / 4);

    let preferred = get("/test/large", Some("gzip;q=0.5, br;q=1")).await;
    assert_eq!(header(&preferred, "content-encoding"), "br");

    let identity = get("/test/large", Some("identity")).await;
    assert!(identity.headers.get("content-encoding").is_none());

    let small = get("/test/small", Some("gzip, br")).await;
    assert_eq!(small.status, 200);
    assert!(
        small.headers.get("content-encoding").is_none(),
        "below GATEWAY_COMPRESSION_MIN_BYTES"
    );
    assert_eq!(small.json(), json!({ "ok": true }));

    stop(gateway).await;
}

#[tokio::test]
async fn json_bodies_need_a_json_content_type() {
    let (gateway, _) = start(&[]).await;
    let body = r#"{"a": [1]}"#;

    let missing = http_request(gateway.addr, "POST", "/test/echo", &[], body).await;
    assert_problem(&missing, 415, "UNSUPPORTED_MEDIA_TYPE");

    let text = http_request(
        gateway.addr,
        "POST",
        "/test/echo",
        &[("content-type", "text/plain")],
        body,
    )
    .await;
    assert_problem(&text, 415, "UNSUPPORTED_MEDIA_TYPE");

    let json = http_request(
        gateway.addr,
        "POST",
        "/test/echo",
        &[("content-type", "application/json; charset=utf-8")],
        body,
    )
    .await;
    assert_eq!(json.status, 200, "{}", json.text());
    assert_eq!(json.json(), json!({ "a": [1] }));

    stop(gateway).await;
}

#[tokio::test]
async fn malformed_json_is_a_400_with_its_position_and_path() {
    let (gateway, _) = start(&[]).await;
    let post = |body: &'static str| {
        http_request(
            gateway.addr,
            "POST",
            "/test/echo",
            &[("content-type", "application/json")],
            body,
        )
    };

    let response = post("{\n  \"a\": [1, 2,]\n}").await;
    let problem = assert_problem(&response, 400, "MALFORMED_JSON");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("line 2, column"), "{detail}");
    assert_eq!(
        problem["errors"][0]["field"], "a",
        "the array the stray comma is in"
    );
    assert_eq!(problem["errors"][0]["code"], "SYNTAX");

    let response = post(r#"{"a": [1, "two"]}"#).await;
    let problem = assert_problem(&response, 400, "VALIDATION_FAILED");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("line 1, column")
    );
    assert_eq!(
        problem["errors"],
        json!([{
            "field": "a[1]",
            "code": "INVALID_TYPE",
            "message": "invalid type: string \"two\", expected u32",
        }])
    );

    let response = post("").await;
    assert_problem(&response, 400, "MALFORMED_JSON");

    stop(gateway).await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_unless_the_route_raises_it() {
    let (gateway, _) = start(&[("BODY_LIMIT", "1KiB")]).await;
    let numbers = vec!["12345"; 400].join(",");
    let body = format!(r#"{{"a": [{numbers}]}}"#);
    assert!(body.len() > 2 * 1024);
    let json = [("content-type", "application/json")];

    let response = http_request(gateway.addr, "POST", "/test/echo", &json, body.clone()).await;
    assert_problem(&response, 413, "PAYLOAD_TOO_LARGE");

    let response = http_request(gateway.addr, "POST", "/test/echo-up-to-64k", &json, body).await;
    assert_eq!(response.status, 200, "{}", response.text());

    stop(gateway).await;
}

#[tokio::test]
async fn when_full_requests_are_shed_while_operations_routes_answer() {
    let (gateway, held) = start(&[("MAX_CONCURRENT_REQUESTS", "2")]).await;
    let addr = gateway.addr;

    let in_flight: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { http_get(addr, "/test/held").await }))
        .collect();
    eventually(
        Duration::from_secs(5),
        "both requests in flight",
        || async { (held.entered.load(Ordering::SeqCst) == 2).then_some(()) },
    )
    .await;

    let shed = http_get(addr, "/test/small").await;
    let problem = assert_problem(&shed, 503, "OVERLOADED");
    assert_eq!(header(&shed, "retry-after"), "1");
    assert!(problem["detail"].as_str().is_some());

    assert_eq!(http_get(addr, "/health").await.status, 200);
    let ready = http_get(addr, "/ready").await;
    assert_eq!(
        ready.json()["status"],
        "not_ready",
        "readiness answers (no service runs here), it is not shed"
    );
    let metrics = http_get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("http_requests_shed_total"));

    held.release.add_permits(2);
    for request in in_flight {
        let response = request.await.expect("request task");
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), "released");
    }
    assert_eq!(
        http_get(addr, "/test/small").await.status,
        200,
        "room again"
    );

    stop(gateway).await;
}

#[tokio::test]
async fn a_request_past_its_deadline_is_a_504_and_calls_get_what_is_left() {
    let (gateway, _) = start(&[("REQUEST_TIMEOUT", "300ms")]).await;

    let started = std::time::Instant::now();
    let response = http_get(gateway.addr, "/test/slow").await;
    assert_problem(&response, 504, "DEADLINE_EXCEEDED");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let response = http_get(gateway.addr, "/test/upstream-call").await;
    let grpc_timeout = response.json()["grpc_timeout"].as_str().unwrap().to_owned();
    let (digits, unit) = grpc_timeout.split_at(grpc_timeout.len() - 1);
    let amount: u64 = digits.parse().unwrap();
    let left = match unit {
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        other => panic!("unexpected grpc-timeout unit {other} in {grpc_timeout}"),
    };
    assert!(
        left <= Duration::from_millis(300) && left > Duration::ZERO,
        "{grpc_timeout}"
    );

    stop(gateway).await;
}

#[tokio::test]
async fn cors_headers_only_when_origins_are_configured() {
    let preflight = [
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "content-type, x-request-id",
        ),
    ];

    let (without, _) = start(&[]).await;
    let response = http_request(without.addr, "OPTIONS", "/test/echo", &preflight, "").await;
    assert!(
        response
            .headers
            .get("access-control-allow-origin")
            .is_none()
    );
    stop(without).await;

    let (with, _) = start(&[("CORS_ALLOWED_ORIGINS", "https://app.example.com")]).await;
    let response = http_request(with.addr, "OPTIONS", "/test/echo", &preflight, "").await;
    assert_eq!(response.status, 200);
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        "https://app.example.com"
    );
    assert!(header(&response, "access-control-allow-methods").contains("POST"));

    let response = http_request(
        with.addr,
        "GET",
        "/no/such/route",
        &[("origin", "https://app.example.com")],
        "",
    )
    .await;
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        "https://app.example.com",
        "errors carry CORS headers too, so browsers can read them"
    );
    assert!(header(&response, "access-control-expose-headers").contains("x-request-id"));

    let response = http_request(
        with.addr,
        "GET",
        "/test/small",
        &[("origin", "https://evil.example.com")],
        "",
    )
    .await;
    assert!(
        response
            .headers
            .get("access-control-allow-origin")
            .is_none()
    );
    stop(with).await;
}
