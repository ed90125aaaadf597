//! Route classes at the gateway: each class has its own deadline, passed on to the services.

use std::time::Duration;

use axum::Router;
use e2e::{Infra, Stack, eventually, http_get, http_request, start_gateway_with_routes};
use serde_json::json;

const PASSWORD: &str = "correct horse battery staple";

#[tokio::test]
async fn batch_routes_keep_their_own_longer_deadline() {
    let stack = Stack::start(&Infra::from_env()).await;
    let addr = stack.gateway.addr;
    eventually(Duration::from_secs(30), "/ready = 200", || async {
        (http_get(addr, "/ready").await.status == 200).then_some(())
    })
    .await;
    let json_type = ("content-type", "application/json");
    let email = format!("{}@example.com", uuid::Uuid::now_v7().simple());
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
    let registered = http_request(
        addr,
        "POST",
        "/api/v1/auth/register",
        &[json_type],
        body.to_string(),
    )
    .await;
    assert_eq!(registered.status, 201);
    let body = json!({"email": email, "password": PASSWORD});
    let login = http_request(
        addr,
        "POST",
        "/api/v1/auth/login",
        &[json_type],
        body.to_string(),
    )
    .await;
    let token = login.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let authorization = format!("Bearer {token}");

    // A gateway whose ordinary deadline cannot be met, and whose batch class is the default.
    let mut tight = start_gateway_with_routes(
        &[
            ("AUTH_URL", &stack.auth.url()),
            ("PROFILE_URL", &stack.profile.url()),
            ("NOTES_URL", &stack.notes.url()),
            ("REQUEST_TIMEOUT", "1ms"),
        ],
        Router::new(),
    )
    .await;
    let headers = [json_type, ("authorization", authorization.as_str())];
    let ordinary = http_request(tight.addr, "GET", "/api/v1/notes", &headers, "").await;
    assert_eq!(ordinary.status, 504, "{}", ordinary.text());
    let batch = json!({"items": [{"title": "One"}, {"title": "Two"}]});
    let created = http_request(
        tight.addr,
        "POST",
        "/api/v1/notes/batch",
        &headers,
        batch.to_string(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());

    tight.signal_shutdown();
    tight.task.await.expect("no panic").expect("stopped");
    stack.stop().await;
}
