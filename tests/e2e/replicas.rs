//! Two replicas of every service behind the gateway: calls spread over both, and a replica
//! stopped with SIGTERM under load costs no request.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use e2e::{Infra, Stack, eventually, http_get, http_request};
use serde_json::json;

const PASSWORD: &str = "correct horse battery staple";

async fn sign_in(addr: SocketAddr, email: &str) -> String {
    let json_type = ("content-type", "application/json");
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
    let registered = http_request(
        addr,
        "POST",
        "/api/v1/auth/register",
        &[json_type],
        body.to_string(),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let body = json!({"email": email, "password": PASSWORD});
    let login = http_request(
        addr,
        "POST",
        "/api/v1/auth/login",
        &[json_type],
        body.to_string(),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.text());
    login.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned()
}

async fn get(addr: SocketAddr, path: &str, token: &str) -> e2e::HttpResponse {
    let authorization = format!("Bearer {token}");
    http_request(addr, "GET", path, &[("authorization", &authorization)], "").await
}

#[tokio::test]
async fn calls_spread_over_replicas_and_a_stopped_replica_costs_no_request() {
    let infra = Infra::from_env();
    // A real drain delay: NOT_SERVING for half a second before the listener closes.
    let mut stack =
        Stack::start_replicated_with(&infra, 2, &[], &[("SHUTDOWN_DRAIN_DELAY", "500ms")]).await;
    let addr = stack.gateway.addr;
    eventually(Duration::from_secs(30), "/ready = 200", || async {
        (http_get(addr, "/ready").await.status == 200).then_some(())
    })
    .await;

    // An admin sees which replica answered each pool-status call: both of each service.
    let admin_email = format!("{}@example.com", uuid::Uuid::now_v7().simple());
    sign_in(addr, &admin_email).await;
    auth::grant_role(&stack.auth_config, &admin_email, "admin")
        .await
        .expect("grant-role");
    let body = json!({"email": admin_email, "password": PASSWORD});
    let login = http_request(
        addr,
        "POST",
        "/api/v1/auth/login",
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await;
    let admin = login.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let status = get(addr, "/admin/db-pool-status", &admin).await;
        assert_eq!(status.status, 200, "{}", status.text());
        for entry in status.json()["services"].as_array().expect("services") {
            if let Some(instance) = entry["instance"].as_str() {
                seen.insert(instance.to_owned());
            }
        }
    }
    for instance in ["auth-0", "auth-1", "profile-0", "profile-1"] {
        assert!(
            seen.contains(instance),
            "{instance} never answered: {seen:?}"
        );
    }

    // Steady profile reads while one profile replica and one auth replica stop.
    let user = sign_in(
        addr,
        &format!("{}@example.com", uuid::Uuid::now_v7().simple()),
    )
    .await;
    let (failures, answered, running) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(true)),
    );
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (user, failures, answered, running) = (
            user.clone(),
            failures.clone(),
            answered.clone(),
            running.clone(),
        );
        readers.push(tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let response = get(addr, "/api/v1/auth/profile", &user).await;
                if response.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (_, replica) in stack
        .replicas
        .iter_mut()
        .filter(|(name, _)| *name == "profile" || *name == "auth")
    {
        replica.signal_shutdown();
    }
    let before = answered.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.store(false, Ordering::SeqCst);
    for reader in readers {
        reader.await.expect("reader");
    }
    assert!(
        answered.load(Ordering::SeqCst) > before,
        "reads went on while replicas stopped"
    );
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no read failed");

    stack.stop().await;
}
