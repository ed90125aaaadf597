//! Rate limits at the gateway: shared by replicas through Redis, per address for anonymous
//! routes, per user for signed-in ones, headers as the IETF draft has them, and a local
//! limiter when Redis is down.

use std::{net::SocketAddr, time::Duration};

use axum::Router;
use e2e::{
    HttpResponse, Infra, Running, Stack, eventually, http_get, http_request,
    start_gateway_with_routes,
};
use serde_json::json;

const PASSWORD: &str = "correct horse battery staple";

fn unique_email() -> String {
    format!("{}@example.com", uuid::Uuid::now_v7().simple())
}

async fn gateway(stack: &Stack, extra: &[(&str, &str)]) -> Running {
    let (auth, profile, notes) = (stack.auth.url(), stack.profile.url(), stack.notes.url());
    let mut vars = vec![
        ("AUTH_URL", auth.as_str()),
        ("PROFILE_URL", profile.as_str()),
        ("NOTES_URL", notes.as_str()),
        ("RATE_LIMIT_SCALE", "1"),
    ];
    vars.extend_from_slice(extra);
    start_gateway_with_routes(&vars, Router::new()).await
}

async fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> HttpResponse {
    http_request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

async fn get_with_token(addr: SocketAddr, path: &str, token: &str) -> HttpResponse {
    let authorization = format!("Bearer {token}");
    http_request(addr, "GET", path, &[("authorization", &authorization)], "").await
}

fn header<'a>(response: &'a HttpResponse, name: &str) -> &'a str {
    response
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn assert_rate_limited(response: &HttpResponse, tier: &str) {
    assert_eq!(response.status, 429, "{}", response.text());
    let problem = response.json();
    assert_eq!(problem["code"], "RATE_LIMITED", "{problem}");
    let retry_after: u64 = header(response, "retry-after")
        .parse()
        .expect("Retry-After");
    assert!(retry_after >= 1);
    assert!(
        header(response, "ratelimit").starts_with(&format!("\"{tier}\";r=0;")),
        "{}",
        header(response, "ratelimit")
    );
}

async fn ready(addr: SocketAddr) {
    eventually(Duration::from_secs(30), "/ready = 200", || async {
        (http_get(addr, "/ready").await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn limits_are_shared_by_replicas_and_signed_in_traffic_is_per_user() {
    let stack = Stack::start(&Infra::from_env()).await;
    ready(stack.gateway.addr).await;
    let prefix = format!("e2e:{}:shared:", uuid::Uuid::new_v4().simple());
    let tiers = [
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("RATE_LIMIT_LOGIN", "3/1m"),
        ("RATE_LIMIT_BURST", "4/1m"),
        ("RATE_LIMIT_SUSTAINED", "off"),
    ];
    let (one, two) = (gateway(&stack, &tiers).await, gateway(&stack, &tiers).await);

    // Two users, registered through the stack's own gateway (its own keys), so the shared
    // replicas start counting from nothing.
    let emails = [unique_email(), unique_email()];
    for email in &emails {
        let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
        assert_eq!(
            post(stack.gateway.addr, "/api/v1/auth/register", &body)
                .await
                .status,
            201
        );
    }

    // Anonymous credential routes: per address, across both replicas.
    let login = |email: &str| json!({"email": email, "password": PASSWORD});
    let first = post(one.addr, "/api/v1/auth/login", &login(&emails[0])).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        header(&first, "ratelimit-policy"),
        "\"burst\";q=4;w=60, \"login\";q=3;w=60"
    );
    assert!(header(&first, "ratelimit").starts_with("\"login\";r=2;"));
    let token_one = first.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let second = post(two.addr, "/api/v1/auth/login", &login(&emails[1])).await;
    assert_eq!(second.status, 200, "{}", second.text());
    let token_two = second.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let wrong = json!({"email": emails[0], "password": "not the password"});
    assert_eq!(
        post(one.addr, "/api/v1/auth/login", &wrong).await.status,
        401
    );
    assert_rate_limited(&post(two.addr, "/api/v1/auth/login", &wrong).await, "login");

    // Signed-in routes: per user, never capped by the address they share.
    for (i, gateway) in [&one, &two, &one, &two].into_iter().enumerate() {
        let response = get_with_token(gateway.addr, "/api/v1/auth/sessions", &token_one).await;
        assert_eq!(response.status, 200, "request {i}: {}", response.text());
    }
    assert_rate_limited(
        &get_with_token(two.addr, "/api/v1/auth/sessions", &token_one).await,
        "burst",
    );
    let other_user = get_with_token(one.addr, "/api/v1/auth/sessions", &token_two).await;
    assert_eq!(other_user.status, 200, "{}", other_user.text());
    assert!(header(&other_user, "ratelimit").starts_with("\"burst\";r=3;"));

    for mut running in [one, two] {
        running.signal_shutdown();
        running.task.await.expect("no panic").expect("stopped");
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_local_limiter_takes_over_when_redis_is_down() {
    let stack = Stack::start(&Infra::from_env()).await;
    ready(stack.gateway.addr).await;
    // Nothing listens on port 1: every Redis call fails at once.
    let mut lonely = gateway(
        &stack,
        &[
            ("REDIS_URL", "redis://127.0.0.1:1/0"),
            ("RATE_LIMIT_LOGIN", "2/1m"),
            ("RATE_LIMIT_BURST", "off"),
            ("RATE_LIMIT_SUSTAINED", "off"),
        ],
    )
    .await;
    let body = json!({"email": unique_email(), "password": "wrong password!"});
    for _ in 0..2 {
        assert_eq!(
            post(lonely.addr, "/api/v1/auth/login", &body).await.status,
            401
        );
    }
    assert_rate_limited(
        &post(lonely.addr, "/api/v1/auth/login", &body).await,
        "login",
    );
    // Still ready: Redis down only degrades the gateway.
    eventually(
        Duration::from_secs(10),
        "ready, degraded by Redis",
        || async {
            let ready = http_get(lonely.addr, "/ready").await;
            (ready.status == 200 && ready.json()["degraded"] == json!(["redis"])).then_some(())
        },
    )
    .await;
    lonely.signal_shutdown();
    lonely.task.await.expect("no panic").expect("stopped");
    stack.stop().await;
}
