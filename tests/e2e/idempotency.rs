//! `Idempotency-Key` at the gateway: replay after the first response, 409 while it runs,
//! 422 for another request under the same key, per-user scope, and shared by replicas.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, http::StatusCode, routing::post};
use e2e::{HttpResponse, Infra, Running, Stack, eventually, http_get, http_request};
use gateway::context::SignedIn;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// A write that counts how often it really ran; `{"slow": true}` makes it take a while.
fn counter_routes(runs: Arc<AtomicU64>) -> Router<gateway::AppState> {
    Router::new().route(
        "/api/v1/test/counter",
        post(move |_: SignedIn, Json(body): Json<Value>| {
            let runs = runs.clone();
            async move {
                if body["slow"] == true {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                }
                if body["fail"] == true {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"failed": true})),
                    );
                }
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                (StatusCode::CREATED, Json(json!({"run": run})))
            }
        }),
    )
}

async fn gateway(stack: &Stack, prefix: &str, runs: Arc<AtomicU64>) -> Running {
    e2e::start_gateway_with_routes(
        &[
            ("AUTH_URL", &stack.auth.url()),
            ("PROFILE_URL", &stack.profile.url()),
            ("NOTES_URL", &stack.notes.url()),
            ("REDIS_KEY_PREFIX", prefix),
        ],
        counter_routes(runs),
    )
    .await
}

async fn signed_in(addr: SocketAddr) -> String {
    let email = format!("{}@example.com", uuid::Uuid::now_v7().simple());
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
    let json = [("content-type", "application/json")];
    let registered = http_request(
        addr,
        "POST",
        "/api/v1/auth/register",
        &json,
        body.to_string(),
    )
    .await;
    assert_eq!(registered.status, 201);
    let body = json!({"email": email, "password": PASSWORD});
    let login = http_request(addr, "POST", "/api/v1/auth/login", &json, body.to_string()).await;
    assert_eq!(login.status, 200);
    login.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned()
}

async fn write(addr: SocketAddr, token: &str, key: &str, body: &Value) -> HttpResponse {
    let authorization = format!("Bearer {token}");
    http_request(
        addr,
        "POST",
        "/api/v1/test/counter",
        &[
            ("authorization", &authorization),
            ("content-type", "application/json"),
            ("idempotency-key", key),
        ],
        body.to_string(),
    )
    .await
}

fn replayed(response: &HttpResponse) -> bool {
    response.headers.get("idempotent-replayed").is_some()
}

#[tokio::test]
async fn retries_replay_the_first_response_on_any_replica() {
    let stack = Stack::start(&Infra::from_env()).await;
    eventually(Duration::from_secs(30), "/ready = 200", || async {
        (http_get(stack.gateway.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
    let runs = Arc::new(AtomicU64::new(0));
    let prefix = format!("e2e:{}:idem:", uuid::Uuid::new_v4().simple());
    let one = gateway(&stack, &prefix, runs.clone()).await;
    let two = gateway(&stack, &prefix, runs.clone()).await;
    let (alice, bob) = (signed_in(one.addr).await, signed_in(one.addr).await);

    // First time runs; the retry, on the other replica, is the stored answer.
    let body = json!({"note": "hello"});
    let first = write(one.addr, &alice, "key-1", &body).await;
    assert_eq!(first.status, 201, "{}", first.text());
    assert!(!replayed(&first));
    let retry = write(two.addr, &alice, "key-1", &body).await;
    assert_eq!(retry.status, 201);
    assert!(replayed(&retry));
    assert_eq!(retry.json(), first.json());
    assert_eq!(
        retry.headers.get("content-type"),
        first.headers.get("content-type")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "ran once");

    // The same key with another body: 422.
    let other = write(one.addr, &alice, "key-1", &json!({"note": "else"})).await;
    assert_eq!(other.status, 422, "{}", other.text());
    assert_eq!(other.json()["code"], "IDEMPOTENCY_KEY_REUSED");

    // Keys are per user: Bob's "key-1" is his own.
    let bobs = write(one.addr, &bob, "key-1", &body).await;
    assert_eq!(bobs.status, 201);
    assert!(!replayed(&bobs));
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // A duplicate while the first still runs: 409, and the first completes once.
    let slow = json!({"slow": true});
    let (a, b) = tokio::join!(write(one.addr, &alice, "key-2", &slow), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        write(two.addr, &alice, "key-2", &slow).await
    });
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(b.status, 409, "{}", b.text());
    assert_eq!(b.json()["code"], "CONFLICT");
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    // A "try again" answer is not stored: the retry runs for real.
    let failing = write(one.addr, &alice, "key-3", &json!({"fail": true})).await;
    assert_eq!(failing.status, 503);
    let again = write(one.addr, &alice, "key-3", &json!({"fail": true})).await;
    assert!(!replayed(&again));

    // No key, no replay: each request runs.
    let authorization = format!("Bearer {alice}");
    for _ in 0..2 {
        let plain = http_request(
            one.addr,
            "POST",
            "/api/v1/test/counter",
            &[
                ("authorization", &authorization),
                ("content-type", "application/json"),
            ],
            "{}",
        )
        .await;
        assert_eq!(plain.status, 201);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 5);

    for mut running in [one, two] {
        running.signal_shutdown();
        running.task.await.expect("no panic").expect("stopped");
    }
    stack.stop().await;
}
