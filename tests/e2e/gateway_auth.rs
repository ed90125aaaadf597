//! Auth through the gateway: the HTTP/JSON contract mobile clients use.

use std::{net::SocketAddr, time::Duration};

use e2e::{HttpResponse, Infra, Stack, eventually, http_get, http_request};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";
const JSON: (&str, &str) = ("content-type", "application/json");

async fn post(addr: SocketAddr, path: &str, body: &Value, token: Option<&str>) -> HttpResponse {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![JSON];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    http_request(addr, "POST", path, &headers, body.to_string()).await
}

async fn with_token(addr: SocketAddr, method: &str, path: &str, token: &str) -> HttpResponse {
    let bearer = format!("Bearer {token}");
    http_request(
        addr,
        method,
        path,
        &[("authorization", &bearer)],
        Vec::new(),
    )
    .await
}

fn unique_email() -> String {
    format!("user-{}@example.com", uuid::Uuid::new_v4().simple())
}

/// The whole set, ready to serve.
async fn ready_stack(auth_extra: &[(&str, &str)]) -> Stack {
    let infra = Infra::from_env();
    let stack = Stack::start_with(&infra, auth_extra).await;
    eventually(Duration::from_secs(30), "/ready = 200", || async {
        (http_get(stack.gateway.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
    stack
}

async fn register(addr: SocketAddr, email: &str) -> String {
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
    let response = post(addr, "/api/v1/auth/register", &body, None).await;
    assert_eq!(response.status, 201, "{}", response.text());
    response.json()["user_id"]
        .as_str()
        .expect("user_id")
        .to_owned()
}

async fn login(addr: SocketAddr, email: &str, password: &str) -> HttpResponse {
    let body = json!({"email": email, "password": password, "device_name": "Pixel 8"});
    post(addr, "/api/v1/auth/login", &body, None).await
}

fn assert_problem(response: &HttpResponse, status: u16, code: &str) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    let content_type = response
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(content_type, "application/problem+json");
    let problem = response.json();
    assert_eq!(problem["code"], code, "{problem}");
    assert_eq!(problem["status"], status);
    problem
}

#[tokio::test]
async fn a_mobile_session_register_login_refresh_logout() {
    let stack = ready_stack(&[]).await;
    let addr = stack.gateway.addr;
    let email = unique_email();
    let user_id = register(addr, &email).await;

    let response = login(addr, &email, PASSWORD).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response
            .headers
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store"),
        "credentials are never cached"
    );
    let tokens = response.json();
    let keys: Vec<&str> = tokens
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "access_token",
            "expires_in",
            "refresh_token",
            "token_type",
            "user_id"
        ],
        "the login payload is minimal"
    );
    assert_eq!(tokens["user_id"], user_id.as_str());
    assert_eq!(tokens["token_type"], "Bearer");
    let access = tokens["access_token"].as_str().expect("token").to_owned();

    let sessions = with_token(addr, "GET", "/api/v1/auth/sessions", &access).await;
    assert_eq!(sessions.status, 200, "{}", sessions.text());
    let sessions = sessions.json();
    let list = sessions["sessions"].as_array().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["current"], true);
    assert_eq!(list[0]["device_name"], "Pixel 8");
    assert_eq!(list[0]["ip_address"], "127.0.0.1", "the socket's address");
    assert!(
        list[0]["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let refreshed = post(
        addr,
        "/api/v1/auth/refresh",
        &json!({"refresh_token": tokens["refresh_token"]}),
        None,
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text());
    let refreshed = refreshed.json();
    assert_ne!(refreshed["refresh_token"], tokens["refresh_token"]);

    let logout = post(
        addr,
        "/api/v1/auth/logout",
        &json!({}),
        refreshed["access_token"].as_str(),
    )
    .await;
    assert_eq!(logout.status, 204, "{}", logout.text());
    let after = with_token(addr, "GET", "/api/v1/auth/sessions", &access).await;
    let problem = assert_problem(&after, 401, "UNAUTHENTICATED");
    assert!(problem["request_id"].is_string() && problem["trace_id"].is_string());
    let stale = post(
        addr,
        "/api/v1/auth/refresh",
        &json!({"refresh_token": refreshed["refresh_token"]}),
        None,
    )
    .await;
    assert_problem(&stale, 401, "REFRESH_TOKEN_INVALID");

    stack.stop().await;
}

#[tokio::test]
async fn errors_are_problems_that_reveal_nothing_about_accounts() {
    let stack = ready_stack(&[]).await;
    let addr = stack.gateway.addr;
    let email = unique_email();
    register(addr, &email).await;

    let wrong = login(addr, &email, "not the password").await;
    let unknown = login(addr, &unique_email(), PASSWORD).await;
    let wrong = assert_problem(&wrong, 401, "INVALID_CREDENTIALS");
    let unknown = assert_problem(&unknown, 401, "INVALID_CREDENTIALS");
    for field in ["type", "title", "status", "detail", "code"] {
        assert_eq!(wrong[field], unknown[field], "{field} differs");
    }

    let weak = post(
        addr,
        "/api/v1/auth/register",
        &json!({"email": unique_email(), "password": "short", "display_name": "Ada"}),
        None,
    )
    .await;
    let problem = assert_problem(&weak, 400, "VALIDATION_FAILED");
    assert_eq!(problem["errors"][0]["field"], "password");
    assert_eq!(problem["errors"][0]["code"], "PASSWORD_TOO_SHORT");

    let duplicate = post(
        addr,
        "/api/v1/auth/register",
        &json!({"email": email.to_uppercase(), "password": PASSWORD, "display_name": "Eve"}),
        None,
    )
    .await;
    assert_problem(&duplicate, 409, "EMAIL_TAKEN");

    // A missing field is caught at the edge, named by its path.
    let missing = post(addr, "/api/v1/auth/login", &json!({"email": email}), None).await;
    let problem = assert_problem(&missing, 400, "VALIDATION_FAILED");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("password")),
        "{problem}"
    );

    let not_json = http_request(
        addr,
        "POST",
        "/api/v1/auth/login",
        &[("content-type", "text/plain")],
        "x",
    )
    .await;
    assert_problem(&not_json, 415, "UNSUPPORTED_MEDIA_TYPE");

    stack.stop().await;
}

#[tokio::test]
async fn throttled_logins_are_429_with_retry_after() {
    let stack = ready_stack(&[("LOGIN_MAX_FAILURES_PER_ACCOUNT", "2")]).await;
    let addr = stack.gateway.addr;
    let email = unique_email();
    register(addr, &email).await;
    for _ in 0..2 {
        assert_eq!(login(addr, &email, "not the password").await.status, 401);
    }
    let throttled = login(addr, &email, PASSWORD).await;
    assert_problem(&throttled, 429, "LOGIN_THROTTLED");
    let retry_after: u64 = throttled
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=15 * 60).contains(&retry_after), "{retry_after}");
    stack.stop().await;
}

#[tokio::test]
async fn key_set_and_admin_roles() {
    let stack = ready_stack(&[]).await;
    let addr = stack.gateway.addr;

    let jwks = http_get(addr, "/.well-known/jwks.json").await;
    assert_eq!(jwks.status, 200);
    let jwks = jwks.json();
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0]["kty"], "OKP");
    assert_eq!(keys[0]["use"], "sig");

    let (admin_email, user_email) = (unique_email(), unique_email());
    register(addr, &admin_email).await;
    let user_id = register(addr, &user_email).await;
    let user = login(addr, &user_email, PASSWORD).await.json();
    let user_token = user["access_token"].as_str().expect("token");

    let denied = with_token(addr, "GET", "/api/v1/admin/roles", user_token).await;
    assert_problem(&denied, 403, "PERMISSION_DENIED");
    let path = format!("/api/v1/admin/users/{user_id}/roles/admin");
    assert_problem(
        &with_token(addr, "PUT", &path, user_token).await,
        403,
        "PERMISSION_DENIED",
    );

    // The first admin comes from the CLI, run against the same database.
    auth::grant_role(&stack.auth_config, &admin_email, "admin")
        .await
        .expect("grant-role");
    let admin = login(addr, &admin_email, PASSWORD).await.json();
    let admin_token = admin["access_token"].as_str().expect("token");

    // Pool status: admins only; auth and profile report both pools.
    assert_problem(
        &with_token(addr, "GET", "/admin/db-pool-status", user_token).await,
        403,
        "PERMISSION_DENIED",
    );
    let pools = with_token(addr, "GET", "/admin/db-pool-status", admin_token).await;
    assert_eq!(pools.status, 200, "{}", pools.text());
    let pools = pools.json();
    for service in ["auth", "profile", "notes"] {
        let entry = pools["services"]
            .as_array()
            .and_then(|s| s.iter().find(|e| e["service"] == service))
            .unwrap_or_else(|| panic!("{service} in {pools}"));
        let names: Vec<&str> = entry["pools"]
            .as_array()
            .expect("pools")
            .iter()
            .map(|p| p["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, ["postgres", "redis"], "{pools}");
        assert!(entry["pools"][0]["max_size"].as_i64() >= Some(1));
    }

    let roles = with_token(addr, "GET", "/api/v1/admin/roles", admin_token).await;
    assert_eq!(roles.status, 200, "{}", roles.text());
    assert!(
        roles.json()["roles"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["name"] == "admin"))
    );
    assert_eq!(
        with_token(addr, "PUT", &path, admin_token).await.status,
        204
    );
    assert_eq!(
        with_token(addr, "PUT", &path, admin_token).await.status,
        204,
        "idempotent"
    );
    let unknown = format!("/api/v1/admin/users/{user_id}/roles/no-such-role");
    assert_problem(
        &with_token(addr, "PUT", &unknown, admin_token).await,
        404,
        "ROLE_NOT_FOUND",
    );
    let malformed = "/api/v1/admin/users/not-a-uuid/roles/admin";
    assert_problem(
        &with_token(addr, "PUT", malformed, admin_token).await,
        400,
        "VALIDATION_FAILED",
    );
    assert_eq!(
        with_token(addr, "DELETE", &path, admin_token).await.status,
        204
    );

    stack.stop().await;
}
