//! Service tokens, auth's change stream, and verifiers that honour revocations and role
//! changes within about a second — at the gateway's edge and in any service.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{Json, Router, routing::get};
use e2e::{
    HttpResponse, Infra, Stack, eventually, http_get, http_request, start_gateway_with_routes,
    test_client_secret,
};
use gateway::context::SignedIn;
use platform::{
    access_token::TokenError,
    config::Secret,
    grpc::ClientConfig,
    identity::{Caller, Identity, IdentityConfig, VerifyError},
};
use proto::auth::v1::{
    self as pb, auth_service_client::AuthServiceClient, watch_changes_response::Event,
};
use serde_json::{Value, json};
use tonic::{Code, Request, Streaming, transport::Channel};

const PASSWORD: &str = "correct horse battery staple";
/// "Within about one second": the bound the tests hold verifiers to.
const PROPAGATION_BOUND: Duration = Duration::from_millis(1500);

fn unique_email() -> String {
    format!("{}@example.com", uuid::Uuid::now_v7().simple())
}

async fn ready_stack() -> Stack {
    let infra = Infra::from_env();
    let stack = Stack::start(&infra).await;
    eventually(Duration::from_secs(30), "/ready = 200", || async {
        (http_get(stack.gateway.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
    stack
}

async fn post(addr: SocketAddr, path: &str, body: &Value, token: Option<&str>) -> HttpResponse {
    let authorization = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(value) = authorization.as_deref() {
        headers.push(("authorization", value));
    }
    http_request(addr, "POST", path, &headers, body.to_string()).await
}

async fn with_token(addr: SocketAddr, method: &str, path: &str, token: &str) -> HttpResponse {
    let authorization = format!("Bearer {token}");
    http_request(addr, method, path, &[("authorization", &authorization)], "").await
}

/// Registers and logs in through the gateway: (user id, token reply).
async fn signed_in_user(addr: SocketAddr, email: &str) -> (String, Value) {
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
    let registered = post(addr, "/api/v1/auth/register", &body, None).await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let user_id = registered.json()["user_id"]
        .as_str()
        .expect("id")
        .to_owned();
    (user_id, login(addr, email).await)
}

async fn login(addr: SocketAddr, email: &str) -> Value {
    let body = json!({"email": email, "password": PASSWORD});
    let response = post(addr, "/api/v1/auth/login", &body, None).await;
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()
}

fn token(reply: &Value, field: &str) -> String {
    reply[field].as_str().expect("token field").to_owned()
}

/// A verifier as a service holds it ("profile", with its test secret).
fn service_identity(auth_url: &str) -> Identity {
    let config = IdentityConfig {
        auth_url: auth_url.to_owned(),
        client_secret: Secret::new(test_client_secret("profile")),
        issuer: platform::access_token::DEFAULT_ISSUER.to_owned(),
        audience: platform::access_token::DEFAULT_AUDIENCE.to_owned(),
    };
    let channel = platform::grpc::lazy_channel(auth_url, ClientConfig::default()).expect("channel");
    Identity::start(&config, "profile", channel, true)
}

/// Waits until `identity` refuses `token` as revoked; returns how long that took.
async fn refused_within(identity: &Identity, token: &str, since: Instant) -> Duration {
    eventually(
        PROPAGATION_BOUND,
        "the verifier to refuse the token",
        || async {
            matches!(
                identity.verify(token).await,
                Err(VerifyError::Token(TokenError::Revoked))
            )
            .then(|| since.elapsed())
        },
    )
    .await
}

async fn service_token(client: &mut AuthServiceClient<Channel>, service: &str) -> String {
    client
        .issue_service_token(pb::IssueServiceTokenRequest {
            service_name: service.to_owned(),
            client_secret: test_client_secret(service),
            audience: String::new(),
        })
        .await
        .expect("service token")
        .into_inner()
        .access_token
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

async fn next(stream: &mut Streaming<pb::WatchChangesResponse>) -> pb::WatchChangesResponse {
    tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("a message within 15s")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads until the next Heartbeat, returning the events before it.
async fn until_heartbeat(
    stream: &mut Streaming<pb::WatchChangesResponse>,
) -> (Vec<pb::WatchChangesResponse>, i64) {
    let mut events = Vec::new();
    loop {
        let message = next(stream).await;
        if matches!(message.event, Some(Event::Heartbeat(_))) {
            return (events, message.sequence);
        }
        events.push(message);
    }
}

#[tokio::test]
async fn service_tokens_and_the_change_stream() {
    let stack = ready_stack().await;
    let addr = stack.gateway.addr;
    let mut client = AuthServiceClient::new(stack.auth.channel().await);

    // Service tokens: only with the right secret, and never accepted at the edge.
    let wrong = client
        .issue_service_token(pb::IssueServiceTokenRequest {
            service_name: "profile".to_owned(),
            client_secret: "not the secret".to_owned(),
            audience: String::new(),
        })
        .await
        .expect_err("wrong secret");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let unknown = client
        .issue_service_token(pb::IssueServiceTokenRequest {
            service_name: "billing".to_owned(),
            client_secret: test_client_secret("profile"),
            audience: String::new(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::Unauthenticated);
    let service = service_token(&mut client, "notes").await;
    let at_edge = with_token(addr, "GET", "/api/v1/auth/sessions", &service).await;
    assert_eq!(at_edge.status, 401, "{}", at_edge.text());

    // The stream is internal: no token, or a user's without admin, is refused.
    let email = unique_email();
    let (user_id, tokens) = signed_in_user(addr, &email).await;
    let user_token = token(&tokens, "access_token");
    let anonymous = client
        .watch_changes(pb::WatchChangesRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let as_user = client
        .watch_changes(bearer(pb::WatchChangesRequest::default(), &user_token))
        .await
        .expect_err("a user");
    assert_eq!(as_user.code(), Code::PermissionDenied);

    // From scratch: Reset, the retained log (the key set announced at start-up), Heartbeat.
    let mut stream = client
        .watch_changes(bearer(pb::WatchChangesRequest::default(), &service))
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(
        next(&mut stream).await.event,
        Some(Event::Reset(_))
    ));
    let (replayed, caught_up) = until_heartbeat(&mut stream).await;
    assert!(
        replayed
            .iter()
            .any(|m| matches!(&m.event, Some(Event::KeySetChanged(k)) if k.kids.len() == 2)),
        "{replayed:?}"
    );
    assert!(caught_up >= replayed.last().map_or(0, |m| m.sequence));

    // A logout arrives live, after the position the heartbeat named.
    let session_id = {
        let payload = token(&tokens, "access_token");
        let claims = payload.split('.').nth(1).expect("payload");
        let claims: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims)
                .expect("base64"),
        )
        .expect("claims");
        claims["sid"].as_str().expect("sid").to_owned()
    };
    let logout = post(addr, "/api/v1/auth/logout", &json!({}), Some(&user_token)).await;
    assert_eq!(logout.status, 204, "{}", logout.text());
    let revoked = loop {
        let message = next(&mut stream).await;
        if let Some(Event::SessionRevoked(_)) = &message.event {
            break message;
        }
    };
    let Some(Event::SessionRevoked(event)) = &revoked.event else {
        unreachable!("matched above")
    };
    assert_eq!(event.session_id, session_id);
    assert_eq!(event.user_id, user_id);
    assert_eq!(event.reason(), pb::SessionRevokedReason::Logout);
    assert!(revoked.sequence > caught_up);
    let forget_after = event.forget_after.as_ref().map_or(0, |t| t.seconds);
    let occurred = revoked.occurred_at.as_ref().map_or(0, |t| t.seconds);
    assert!(
        forget_after >= occurred + 15 * 60,
        "a revocation outlives the tokens it revokes"
    );
    drop(stream);

    // Resuming after that sequence replays nothing and says so with a heartbeat.
    let mut resumed = client
        .watch_changes(bearer(
            pb::WatchChangesRequest {
                after_sequence: Some(revoked.sequence),
                kinds: Vec::new(),
            },
            &service,
        ))
        .await
        .expect("resume")
        .into_inner();
    let (missed, position) = until_heartbeat(&mut resumed).await;
    assert!(missed.is_empty(), "{missed:?}");
    assert_eq!(position, revoked.sequence);
    // A position the log never had starts over.
    let mut foreign = client
        .watch_changes(bearer(
            pb::WatchChangesRequest {
                after_sequence: Some(1_000_000_000),
                kinds: Vec::new(),
            },
            &service,
        ))
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(
        next(&mut foreign).await.event,
        Some(Event::Reset(_))
    ));

    // Services read users and validate tokens with their service token.
    let user = client
        .get_user(bearer(
            pb::GetUserRequest {
                user_id: user_id.clone(),
            },
            &service,
        ))
        .await
        .expect("get user as a service")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(user.email, email);
    let batch = client
        .batch_get_users(bearer(
            pb::BatchGetUsersRequest {
                user_ids: vec![user_id.clone()],
            },
            &service,
        ))
        .await
        .expect("batch as a service")
        .into_inner();
    assert_eq!(batch.users.len(), 1);
    let validate = |access_token: String| pb::ValidateAccessTokenRequest {
        access_token,
        audience: String::new(),
    };
    let revoked_token = client
        .validate_access_token(bearer(validate(user_token.clone()), &service))
        .await
        .expect_err("the logged-out session's token");
    assert_eq!(revoked_token.code(), Code::Unauthenticated);
    let live = login(addr, &email).await;
    let valid = client
        .validate_access_token(bearer(validate(token(&live, "access_token")), &service))
        .await
        .expect("a live token")
        .into_inner();
    assert_eq!(valid.principal_kind(), pb::PrincipalKind::User);
    assert_eq!(valid.subject, user_id);

    stack.stop().await;
}

/// A route that answers from the edge's verification alone, never calling a service.
fn whoami_routes() -> Router<gateway::AppState> {
    Router::new().route(
        "/api/v1/test/whoami",
        get(|SignedIn(caller): SignedIn| async move {
            Json(match caller {
                Caller::User { user_id, roles, .. } => {
                    json!({"user_id": user_id.to_string(), "roles": roles})
                }
                Caller::Service { name } => json!({"service": name}),
            })
        }),
    )
}

#[tokio::test]
async fn verifiers_refuse_revoked_sessions_and_stale_roles_within_a_second() {
    let stack = ready_stack().await;
    let addr = stack.gateway.addr;
    let auth_url = stack.auth.url();
    let edge = start_gateway_with_routes(
        &[
            ("AUTH_URL", &auth_url),
            ("PROFILE_URL", &stack.profile.url()),
            ("NOTES_URL", &stack.notes.url()),
        ],
        whoami_routes(),
    )
    .await;
    let identity = service_identity(&auth_url);

    let email = unique_email();
    let (user_id, phone) = signed_in_user(addr, &email).await;
    let tablet = login(addr, &email).await;
    let (phone_token, tablet_token) = (
        token(&phone, "access_token"),
        token(&tablet, "access_token"),
    );
    let whoami = with_token(edge.addr, "GET", "/api/v1/test/whoami", &phone_token).await;
    assert_eq!(whoami.status, 200, "{}", whoami.text());
    assert_eq!(whoami.json()["user_id"], user_id.as_str());
    assert!(identity.verify(&phone_token).await.is_ok());
    assert!(
        eventually(
            Duration::from_secs(5),
            "the verifier to catch up",
            || async { identity.is_live().then_some(true) }
        )
        .await
    );

    // Logout: the service-side verifier and the edge both refuse the token within ~1s.
    let started = Instant::now();
    let logout = post(addr, "/api/v1/auth/logout", &json!({}), Some(&phone_token)).await;
    assert_eq!(logout.status, 204);
    let took = refused_within(&identity, &phone_token, started).await;
    assert!(took <= PROPAGATION_BOUND, "{took:?}");
    eventually(
        PROPAGATION_BOUND,
        "the edge to refuse the token",
        || async {
            let response = with_token(edge.addr, "GET", "/api/v1/test/whoami", &phone_token).await;
            (response.status == 401).then_some(())
        },
    )
    .await;
    assert!(
        identity.verify(&tablet_token).await.is_ok(),
        "other sessions are untouched"
    );

    // A role change: tokens issued before it with the old roles stop being accepted.
    let admin_email = unique_email();
    let (_, _) = signed_in_user(addr, &admin_email).await;
    auth::grant_role(&stack.auth_config, &admin_email, "admin")
        .await
        .expect("grant-role");
    let admin_token = token(&login(addr, &admin_email).await, "access_token");
    let whoami = with_token(edge.addr, "GET", "/api/v1/test/whoami", &admin_token).await;
    assert_eq!(whoami.json()["roles"], json!(["admin"]));
    let started = Instant::now();
    let path = format!("/api/v1/admin/users/{user_id}/roles/admin");
    assert_eq!(
        with_token(addr, "PUT", &path, &admin_token).await.status,
        204
    );
    refused_within(&identity, &tablet_token, started).await;
    eventually(
        PROPAGATION_BOUND,
        "the edge to refuse the stale token",
        || async {
            let response = with_token(edge.addr, "GET", "/api/v1/test/whoami", &tablet_token).await;
            (response.status == 401).then_some(())
        },
    )
    .await;
    // The client refreshes and carries the new roles.
    let refreshed = post(
        addr,
        "/api/v1/auth/refresh",
        &json!({"refresh_token": token(&tablet, "refresh_token")}),
        None,
    )
    .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.text());
    let fresh = token(&refreshed.json(), "access_token");
    let whoami = with_token(edge.addr, "GET", "/api/v1/test/whoami", &fresh).await;
    assert_eq!(whoami.status, 200, "{}", whoami.text());
    assert_eq!(whoami.json()["roles"], json!(["admin"]));
    assert!(identity.verify(&fresh).await.is_ok_and(|c| c.is_admin()));

    // Refresh-token reuse after the grace window revokes the family: its access tokens go.
    let old_refresh = token(&tablet, "refresh_token");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let started = Instant::now();
    let reuse = post(
        addr,
        "/api/v1/auth/refresh",
        &json!({"refresh_token": old_refresh}),
        None,
    )
    .await;
    assert_eq!(reuse.status, 401, "{}", reuse.text());
    refused_within(&identity, &fresh, started).await;

    let mut edge = edge;
    edge.signal_shutdown();
    edge.task.await.expect("no panic").expect("gateway stopped");
    stack.stop().await;
}

#[tokio::test]
async fn the_change_stream_delivers_concurrent_revocations_once_each_in_commit_order() {
    let stack = ready_stack().await;
    let addr = stack.gateway.addr;
    let mut client = AuthServiceClient::new(stack.auth.channel().await);
    let service = service_token(&mut client, "gateway").await;

    let email = unique_email();
    let (_, first) = signed_in_user(addr, &email).await;
    let mut tokens = vec![token(&first, "access_token")];
    for _ in 0..11 {
        tokens.push(token(&login(addr, &email).await, "access_token"));
    }
    let mut stream = client
        .watch_changes(bearer(
            pb::WatchChangesRequest {
                after_sequence: None,
                kinds: vec![pb::ChangeKind::SessionRevoked.into()],
            },
            &service,
        ))
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(
        next(&mut stream).await.event,
        Some(Event::Reset(_))
    ));
    let (before, _) = until_heartbeat(&mut stream).await;
    assert!(before.is_empty(), "only session revocations were asked for");

    // Twelve logouts at once, from concurrent transactions.
    let logouts = tokens.iter().map(|t| async move {
        post(addr, "/api/v1/auth/logout", &json!({}), Some(t))
            .await
            .status
    });
    for status in futures::future::join_all(logouts).await {
        assert_eq!(status, 204);
    }
    let mut seen = Vec::new();
    let mut last = 0;
    while seen.len() < tokens.len() {
        let message = next(&mut stream).await;
        match message.event {
            Some(Event::SessionRevoked(revoked)) => {
                assert!(message.sequence > last, "sequences increase");
                last = message.sequence;
                assert!(!seen.contains(&revoked.session_id), "each once");
                seen.push(revoked.session_id);
            }
            Some(Event::Heartbeat(_)) => assert!(message.sequence >= last),
            other => panic!("unexpected event {other:?}"),
        }
    }
    stack.stop().await;
}
