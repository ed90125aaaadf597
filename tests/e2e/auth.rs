//! The auth service over gRPC against real Postgres: accounts, login, rotating refresh
//! tokens, sessions, password change.

use std::time::Duration;

use e2e::{Infra, Running, eventually, service_config, service_vars};
use platform::{
    access_token::{AccessTokenVerifier, PublicKey},
    service::GrpcService as _,
};
use proto::auth::v1::{self as pb, auth_service_client::AuthServiceClient};
use sqlx::{Connection as _, PgConnection};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

const PASSWORD: &str = "correct horse battery staple";

/// One auth service on its own database, plus a connection to that database.
struct Auth {
    config: auth::Config,
    running: Running,
    client: AuthServiceClient<Channel>,
    database_url: String,
}

impl Auth {
    async fn start(extra: &[(&str, &str)]) -> Self {
        let infra = Infra::from_env();
        let database = infra.create_database("auth").await;
        let config: auth::Config = service_config(service_vars(&infra, "AUTH", &database, extra));
        let serving = config.clone();
        let running =
            Running::start(move |listener, shutdown| serving.serve(listener, shutdown)).await;
        let channel = running.channel().await;
        let health = HealthClient::new(channel.clone());
        eventually(Duration::from_secs(30), "auth SERVING", || {
            let mut health = health.clone();
            async move {
                let status = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .status();
                (status == ServingStatus::Serving).then_some(())
            }
        })
        .await;
        Self {
            config,
            running,
            client: AuthServiceClient::new(channel),
            database_url: infra.url_for(&database),
        }
    }

    async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database_url)
            .await
            .expect("connect")
    }

    async fn register(&self, email: &str) -> String {
        self.client
            .clone()
            .register(pb::RegisterRequest {
                email: email.to_owned(),
                password: PASSWORD.to_owned(),
                display_name: "Ada".to_owned(),
            })
            .await
            .expect("register")
            .into_inner()
            .user_id
    }

    async fn login(&self, email: &str, password: &str) -> Result<pb::LoginResponse, tonic::Status> {
        self.client
            .clone()
            .login(pb::LoginRequest {
                email: email.to_owned(),
                password: password.to_owned(),
                device_name: Some("Pixel 8".to_owned()),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn refresh(&self, token: &str) -> Result<pb::RefreshResponse, tonic::Status> {
        self.client
            .clone()
            .refresh(pb::RefreshRequest {
                refresh_token: token.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn sessions(&self, access_token: &str) -> Result<Vec<pb::Session>, tonic::Status> {
        self.client
            .clone()
            .list_sessions(bearer(pb::ListSessionsRequest::default(), access_token))
            .await
            .map(|r| r.into_inner().sessions)
    }

    async fn stop(mut self) {
        self.running.signal_shutdown();
        self.running
            .task
            .await
            .expect("no panic")
            .expect("serve returned Ok");
    }
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value = format!("Bearer {token}").parse().expect("ascii header");
    request.metadata_mut().insert("authorization", value);
    request
}

fn unique_email() -> String {
    format!("user-{}@Example.com", uuid::Uuid::new_v4().simple())
}

fn reason(status: &tonic::Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

#[tokio::test]
async fn register_login_and_verify_the_token_with_the_published_keys() {
    let auth = Auth::start(&[]).await;
    let email = unique_email();
    let user_id = auth.register(&email).await;

    // Emails are case-insensitive: the upper-case form logs in.
    let login = auth
        .login(&email.to_uppercase(), PASSWORD)
        .await
        .expect("login");
    assert_eq!(login.user_id, user_id);
    assert_eq!(login.token_type, "Bearer");
    assert_eq!(login.expires_in, 900);
    assert_eq!(
        login.refresh_token.len(),
        43,
        "256-bit base64url refresh token"
    );

    let jwks = auth
        .client
        .clone()
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    assert_eq!(jwks.keys.len(), 2, "both configured keys are published");
    assert!(
        jwks.keys
            .iter()
            .all(|k| k.kty == "OKP" && k.alg == "EdDSA" && k.r#use == "sig")
    );
    let keys: Vec<PublicKey> = jwks
        .keys
        .into_iter()
        .map(|k| PublicKey { kid: k.kid, x: k.x })
        .collect();
    let verifier =
        AccessTokenVerifier::new(&keys, "svcset-auth", "svcset", false).expect("verifier");
    let claims = verifier
        .verify(&login.access_token)
        .expect("token verifies");
    assert_eq!(claims.sub, user_id);
    assert!(!claims.sid.is_empty() && !claims.jti.is_empty());

    let sessions = auth.sessions(&login.access_token).await.expect("sessions");
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0].current);
    assert_eq!(sessions[0].device_name, "Pixel 8");
    assert_eq!(sessions[0].session_id, claims.sid);

    // The database holds only a hash of the refresh token, never the token.
    let mut db = auth.db().await;
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("select token_hash from refresh_tokens")
        .fetch_all(&mut db)
        .await
        .expect("query");
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], login.refresh_token.as_bytes());
    let hash: String = sqlx::query_scalar("select password_hash from users")
        .fetch_one(&mut db)
        .await
        .expect("query");
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );

    auth.stop().await;
}

#[tokio::test]
async fn registration_rules_and_duplicates() {
    let auth = Auth::start(&[]).await;
    let weak = auth
        .client
        .clone()
        .register(pb::RegisterRequest {
            email: "not-an-email".to_owned(),
            password: "password1".to_owned(),
            display_name: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(weak.code(), Code::InvalidArgument);
    let violations = weak
        .get_details_bad_request()
        .expect("field violations")
        .field_violations;
    let mut fields: Vec<(String, String)> = violations
        .into_iter()
        .map(|v| (v.field, v.reason))
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            ("display_name".to_owned(), "REQUIRED".to_owned()),
            ("email".to_owned(), "EMAIL_INVALID".to_owned()),
            ("password".to_owned(), "PASSWORD_TOO_COMMON".to_owned()),
        ]
    );

    let email = unique_email();
    auth.register(&email).await;
    let duplicate = auth
        .client
        .clone()
        .register(pb::RegisterRequest {
            email: format!("  {}  ", email.to_lowercase()),
            password: PASSWORD.to_owned(),
            display_name: "Eve".to_owned(),
        })
        .await
        .expect_err("taken");
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    assert_eq!(reason(&duplicate).as_deref(), Some("EMAIL_TAKEN"));

    auth.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_email_are_indistinguishable() {
    let auth = Auth::start(&[]).await;
    let email = unique_email();
    auth.register(&email).await;

    let wrong = auth
        .login(&email, "not the password at all")
        .await
        .expect_err("refused");
    let unknown = auth
        .login(&unique_email(), PASSWORD)
        .await
        .expect_err("refused");
    let malformed = auth.login("nobody", PASSWORD).await.expect_err("refused");
    for status in [&wrong, &unknown, &malformed] {
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), wrong.message());
        assert_eq!(reason(status).as_deref(), Some("INVALID_CREDENTIALS"));
    }

    let mut db = auth.db().await;
    let failures: i64 =
        sqlx::query_scalar("select count(*) from audit_events where kind = 'login_failed'")
            .fetch_one(&mut db)
            .await
            .expect("query");
    assert_eq!(failures, 3, "every failure is audited");

    auth.stop().await;
}

#[tokio::test]
async fn concurrent_refreshes_rotate_once_and_share_the_successor() {
    let auth = Auth::start(&[]).await;
    let email = unique_email();
    auth.register(&email).await;
    let login = auth.login(&email, PASSWORD).await.expect("login");

    let calls = (0..20).map(|_| auth.refresh(&login.refresh_token));
    let results = futures::future::join_all(calls).await;
    let successors: Vec<String> = results
        .into_iter()
        .map(|r| {
            r.expect("every duplicate within the grace window succeeds")
                .refresh_token
        })
        .collect();
    assert!(
        successors.iter().all(|s| s == &successors[0]),
        "one successor for all"
    );
    assert_ne!(successors[0], login.refresh_token);

    let mut db = auth.db().await;
    let (total, live): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where rotated_at is null) from refresh_tokens",
    )
    .fetch_one(&mut db)
    .await
    .expect("query");
    assert_eq!((total, live), (2, 1), "exactly one rotation happened");

    // The successor works, and rotates in turn.
    let next = auth
        .refresh(&successors[0])
        .await
        .expect("successor refreshes");
    assert_ne!(next.refresh_token, successors[0]);

    auth.stop().await;
}

#[tokio::test]
async fn reuse_after_the_grace_window_revokes_the_whole_session() {
    let auth = Auth::start(&[]).await;
    let email = unique_email();
    auth.register(&email).await;
    let login = auth.login(&email, PASSWORD).await.expect("login");
    let rotated = auth.refresh(&login.refresh_token).await.expect("rotate");

    // The test harness sets a 2 s grace window.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reuse = auth
        .refresh(&login.refresh_token)
        .await
        .expect_err("reuse refused");
    assert_eq!(reuse.code(), Code::Unauthenticated);
    assert_eq!(reason(&reuse).as_deref(), Some("REFRESH_TOKEN_INVALID"));

    // The thief's and the owner's tokens are dead alike.
    assert!(auth.refresh(&rotated.refresh_token).await.is_err());
    let denied = auth
        .sessions(&rotated.access_token)
        .await
        .expect_err("session revoked");
    assert_eq!(denied.code(), Code::Unauthenticated);

    let mut db = auth.db().await;
    let audited: i64 =
        sqlx::query_scalar("select count(*) from audit_events where kind = 'refresh_token_reuse'")
            .fetch_one(&mut db)
            .await
            .expect("query");
    assert_eq!(audited, 1);

    auth.stop().await;
}

#[tokio::test]
async fn password_change_revokes_every_other_session() {
    let auth = Auth::start(&[]).await;
    let email = unique_email();
    auth.register(&email).await;
    let phone = auth.login(&email, PASSWORD).await.expect("login");
    let tablet = auth.login(&email, PASSWORD).await.expect("login");
    assert_eq!(
        auth.sessions(&phone.access_token)
            .await
            .expect("list")
            .len(),
        2
    );

    let wrong = auth
        .client
        .clone()
        .change_password(bearer(
            pb::ChangePasswordRequest {
                current_password: "not my password".to_owned(),
                new_password: "a brand new passphrase".to_owned(),
            },
            &phone.access_token,
        ))
        .await
        .expect_err("wrong current password");
    assert_eq!(wrong.code(), Code::InvalidArgument);
    assert_eq!(reason(&wrong).as_deref(), Some("WRONG_PASSWORD"));

    let changed = auth
        .client
        .clone()
        .change_password(bearer(
            pb::ChangePasswordRequest {
                current_password: PASSWORD.to_owned(),
                new_password: "a brand new passphrase".to_owned(),
            },
            &phone.access_token,
        ))
        .await
        .expect("changed")
        .into_inner();
    assert_eq!(changed.revoked_session_count, 1);

    assert!(
        auth.refresh(&tablet.refresh_token).await.is_err(),
        "other session ended"
    );
    assert!(auth.sessions(&tablet.access_token).await.is_err());
    assert_eq!(
        auth.sessions(&phone.access_token)
            .await
            .expect("still in")
            .len(),
        1
    );
    assert!(
        auth.login(&email, PASSWORD).await.is_err(),
        "old password gone"
    );
    auth.login(&email, "a brand new passphrase")
        .await
        .expect("new password works");

    auth.stop().await;
}

#[tokio::test]
async fn logout_revoke_and_logout_all() {
    let auth = Auth::start(&[]).await;
    let email = unique_email();
    auth.register(&email).await;
    let first = auth.login(&email, PASSWORD).await.expect("login");
    let second = auth.login(&email, PASSWORD).await.expect("login");
    let third = auth.login(&email, PASSWORD).await.expect("login");

    // Logout ends this session only.
    auth.client
        .clone()
        .logout(bearer(pb::LogoutRequest::default(), &first.access_token))
        .await
        .expect("logout");
    assert!(auth.refresh(&first.refresh_token).await.is_err());
    assert!(auth.sessions(&first.access_token).await.is_err());
    assert_eq!(
        auth.sessions(&second.access_token)
            .await
            .expect("list")
            .len(),
        2
    );

    // Another user cannot end my session: it looks like a missing one.
    let other = unique_email();
    auth.register(&other).await;
    let intruder = auth.login(&other, PASSWORD).await.expect("login");
    let second_sid = auth
        .sessions(&second.access_token)
        .await
        .expect("list")
        .into_iter()
        .find(|s| s.current)
        .expect("current")
        .session_id;
    let refused = auth
        .client
        .clone()
        .revoke_session(bearer(
            pb::RevokeSessionRequest {
                session_id: second_sid.clone(),
            },
            &intruder.access_token,
        ))
        .await
        .expect_err("not theirs");
    assert_eq!(refused.code(), Code::NotFound);

    // I can, from another device.
    auth.client
        .clone()
        .revoke_session(bearer(
            pb::RevokeSessionRequest {
                session_id: second_sid,
            },
            &third.access_token,
        ))
        .await
        .expect("revoked");
    assert!(auth.refresh(&second.refresh_token).await.is_err());

    let all = auth
        .client
        .clone()
        .logout_all(bearer(pb::LogoutAllRequest {}, &third.access_token))
        .await
        .expect("logout all")
        .into_inner();
    assert_eq!(all.revoked_count, 1);
    assert!(auth.refresh(&third.refresh_token).await.is_err());
    // The intruder's own session is untouched.
    assert!(auth.refresh(&intruder.refresh_token).await.is_ok());

    auth.stop().await;
}

#[tokio::test]
async fn a_full_hash_queue_refuses_logins_at_once() {
    let auth = Auth::start(&[("HASH_WORKERS", "1"), ("HASH_QUEUE", "1")]).await;
    let email = unique_email();
    auth.register(&email).await;

    let attempts = (0..8).map(|_| auth.login(&email, PASSWORD));
    let results = futures::future::join_all(attempts).await;
    let busy: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!busy.is_empty(), "some logins must be refused");
    for status in &busy {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(reason(status).as_deref(), Some("HASH_POOL_BUSY"));
        assert!(
            status.get_details_retry_info().is_some(),
            "carries a retry delay"
        );
    }
    assert!(
        results.iter().any(Result::is_ok),
        "the queue still serves some"
    );

    auth.stop().await;
}

#[tokio::test]
async fn roles_are_admin_only_and_the_first_admin_comes_from_the_cli() {
    let auth = Auth::start(&[]).await;
    let (admin_email, user_email) = (unique_email(), unique_email());
    let admin_id = auth.register(&admin_email).await;
    let user_id = auth.register(&user_email).await;
    let user = auth.login(&user_email, PASSWORD).await.expect("login");

    // Nobody is admin yet: the user is refused.
    let denied = auth
        .client
        .clone()
        .list_roles(bearer(pb::ListRolesRequest::default(), &user.access_token))
        .await
        .expect_err("not an admin");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = auth
        .client
        .clone()
        .assign_role(bearer(
            pb::AssignRoleRequest {
                user_id: user_id.clone(),
                role: "admin".to_owned(),
            },
            &user.access_token,
        ))
        .await
        .expect_err("cannot make itself admin");
    assert_eq!(denied.code(), Code::PermissionDenied);

    // `auth grant-role EMAIL admin` makes the first admin.
    auth::grant_role(&auth.config, &admin_email, "admin")
        .await
        .expect("grant-role");
    let admin = auth.login(&admin_email, PASSWORD).await.expect("login");
    let roles = auth
        .client
        .clone()
        .list_roles(bearer(pb::ListRolesRequest::default(), &admin.access_token))
        .await
        .expect("admin lists roles")
        .into_inner()
        .roles;
    let admin_role = roles
        .iter()
        .find(|r| r.name == "admin")
        .expect("admin role exists");
    assert!(admin_role.permissions.iter().any(|p| p == "roles:manage"));

    let assign = |role: &str| {
        let mut client = auth.client.clone();
        let request = bearer(
            pb::AssignRoleRequest {
                user_id: user_id.clone(),
                role: role.to_owned(),
            },
            &admin.access_token,
        );
        async move { client.assign_role(request).await }
    };
    assign("admin").await.expect("assigned");
    assign("admin")
        .await
        .expect("assigning a held role is fine (PUT)");
    let missing = assign("no-such-role").await.expect_err("unknown role");
    assert_eq!(missing.code(), Code::NotFound);

    let held = auth
        .client
        .clone()
        .get_user_roles(bearer(
            pb::GetUserRolesRequest {
                user_id: user_id.clone(),
            },
            &user.access_token,
        ))
        .await
        .expect("a user reads its own roles")
        .into_inner();
    assert_eq!(held.roles, ["admin"]);
    assert!(held.permissions.contains(&"roles:manage".to_owned()));

    auth.client
        .clone()
        .revoke_role(bearer(
            pb::RevokeRoleRequest {
                user_id: user_id.clone(),
                role: "admin".to_owned(),
            },
            &admin.access_token,
        ))
        .await
        .expect("revoked");
    // Admin checks read the database: the old token's claim no longer opens the door.
    let denied = auth
        .client
        .clone()
        .list_roles(bearer(pb::ListRolesRequest::default(), &user.access_token))
        .await
        .expect_err("no longer admin");
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Users: self yes, others look missing, admins see anyone.
    let mut client = auth.client.clone();
    let own = client
        .get_user(bearer(
            pb::GetUserRequest {
                user_id: user_id.clone(),
            },
            &user.access_token,
        ))
        .await
        .expect("self")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(own.email, user_email.to_lowercase());
    assert_eq!(own.display_name, "Ada");
    let hidden = client
        .get_user(bearer(
            pb::GetUserRequest {
                user_id: admin_id.clone(),
            },
            &user.access_token,
        ))
        .await
        .expect_err("another user's account");
    assert_eq!(hidden.code(), Code::NotFound);
    client
        .get_user(bearer(
            pb::GetUserRequest {
                user_id: user_id.clone(),
            },
            &admin.access_token,
        ))
        .await
        .expect("admin reads anyone");

    let mut db = auth.db().await;
    let audited: i64 = sqlx::query_scalar(
        "select count(*) from audit_events where kind in ('role_assigned', 'role_revoked')",
    )
    .fetch_one(&mut db)
    .await
    .expect("query");
    assert_eq!(
        audited, 3,
        "the CLI grant, the assignment and the revocation; not the no-op"
    );

    auth.stop().await;
}

#[tokio::test]
async fn seeding_creates_accounts_once_with_one_hash() {
    let auth = Auth::start(&[]).await;
    auth.register("user1@example.com").await;
    auth::seed_users(&auth.config, 3, None).await.expect("seed");
    auth::seed_users(&auth.config, 3, None)
        .await
        .expect("seed again");
    let mut db = auth.db().await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("select email, display_name from users order by email")
            .fetch_all(&mut db)
            .await
            .expect("users");
    assert_eq!(
        rows.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
        [
            "user0@example.com",
            "user1@example.com",
            "user2@example.com"
        ],
        "the registered account is left as it was, no duplicates"
    );
    assert_eq!(rows[1].1, "Ada", "an existing account keeps its data");
    assert_eq!(rows[2].1, "User 2");
    let hashes: i64 = sqlx::query_scalar(
        "select count(distinct password_hash) from users where display_name like 'User %'",
    )
    .fetch_one(&mut db)
    .await
    .expect("hashes");
    assert_eq!(hashes, 1, "one precomputed hash");
    auth.login("user2@example.com", auth::SEED_PASSWORD)
        .await
        .expect("a seeded account logs in with the seed password");
    auth.stop().await;
}

#[tokio::test]
async fn bulk_assignment_is_all_or_nothing() {
    let auth = Auth::start(&[]).await;
    let admin_email = unique_email();
    auth.register(&admin_email).await;
    auth::grant_role(&auth.config, &admin_email, "admin")
        .await
        .expect("grant-role");
    let admin = auth.login(&admin_email, PASSWORD).await.expect("login");

    let mut users = Vec::new();
    for _ in 0..5 {
        users.push(auth.register(&unique_email()).await);
    }
    let pairs = |ids: &[String], role: &str| pb::BulkAssignRolesRequest {
        assignments: ids
            .iter()
            .map(|id| pb::RoleAssignment {
                user_id: id.clone(),
                role: role.to_owned(),
            })
            .collect(),
    };

    // One unknown user spoils the batch: nothing is written, the item is named.
    let mut with_unknown = pairs(&users, "admin");
    with_unknown.assignments[3].user_id = uuid::Uuid::now_v7().to_string();
    let refused = auth
        .client
        .clone()
        .bulk_assign_roles(bearer(with_unknown, &admin.access_token))
        .await
        .expect_err("unknown user");
    assert_eq!(refused.code(), Code::NotFound);
    let fields: Vec<String> = refused
        .get_details_bad_request()
        .expect("violations")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["assignments[3]"]);
    let mut db = auth.db().await;
    let held: i64 = sqlx::query_scalar("select count(*) from user_roles")
        .fetch_one(&mut db)
        .await
        .expect("query");
    assert_eq!(held, 1, "only the admin: the failed batch wrote nothing");

    let done = auth
        .client
        .clone()
        .bulk_assign_roles(bearer(pairs(&users[..3], "admin"), &admin.access_token))
        .await
        .expect("assigned")
        .into_inner();
    assert_eq!((done.assigned_count, done.unchanged_count), (3, 0));
    let again = auth
        .client
        .clone()
        .bulk_assign_roles(bearer(pairs(&users, "admin"), &admin.access_token))
        .await
        .expect("assigned")
        .into_inner();
    assert_eq!((again.assigned_count, again.unchanged_count), (2, 3));

    auth.stop().await;
}

impl Auth {
    async fn login_from(
        &self,
        email: &str,
        password: &str,
        ip: &str,
    ) -> Result<pb::LoginResponse, tonic::Status> {
        let mut request = Request::new(pb::LoginRequest {
            email: email.to_owned(),
            password: password.to_owned(),
            device_name: None,
        });
        request
            .metadata_mut()
            .insert("x-forwarded-for", ip.parse().expect("ascii"));
        self.client
            .clone()
            .login(request)
            .await
            .map(tonic::Response::into_inner)
    }
}

fn assert_throttled(status: &tonic::Status) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status).as_deref(), Some("LOGIN_THROTTLED"));
    let retry = status.get_details_retry_info().and_then(|r| r.retry_delay);
    assert!(
        retry.is_some_and(|d| d >= Duration::from_secs(1)),
        "{retry:?}"
    );
}

#[tokio::test]
async fn failed_logins_throttle_the_account_until_the_window_ends() {
    let auth = Auth::start(&[
        ("LOGIN_MAX_FAILURES_PER_ACCOUNT", "3"),
        // Long enough that a loaded CI machine still fails three logins inside it.
        ("LOGIN_THROTTLE_WINDOW", "6s"),
    ])
    .await;
    let email = unique_email();
    auth.register(&email).await;
    for _ in 0..3 {
        let refused = auth
            .login(&email, "wrong password!")
            .await
            .expect_err("wrong");
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    // Even the right password is refused now, with the time left.
    assert_throttled(&auth.login(&email, PASSWORD).await.expect_err("throttled"));

    // An address with no account is throttled the same way: a block says nothing.
    let nobody = unique_email();
    for _ in 0..3 {
        let _ = auth.login(&nobody, "wrong password!").await;
    }
    assert_throttled(&auth.login(&nobody, PASSWORD).await.expect_err("throttled"));

    // Other accounts are untouched, and the block lifts by itself.
    let other = unique_email();
    auth.register(&other).await;
    auth.login(&other, PASSWORD)
        .await
        .expect("another account logs in");
    tokio::time::sleep(Duration::from_millis(6200)).await;
    auth.login(&email, PASSWORD)
        .await
        .expect("the window has passed");

    let mut db = auth.db().await;
    let throttled: i64 =
        sqlx::query_scalar("select count(*) from audit_events where kind = 'login_throttled'")
            .fetch_one(&mut db)
            .await
            .expect("query");
    assert_eq!(throttled, 2, "each refused attempt is audited");

    auth.stop().await;
}

#[tokio::test]
async fn failed_logins_throttle_the_client_ip_across_accounts() {
    let auth = Auth::start(&[("LOGIN_MAX_FAILURES_PER_IP", "4")]).await;
    let email = unique_email();
    auth.register(&email).await;
    // Credential stuffing: one address, many accounts.
    for _ in 0..4 {
        let _ = auth
            .login_from(&unique_email(), "guess guess guess", "203.0.113.7")
            .await;
    }
    assert_throttled(
        &auth
            .login_from(&email, PASSWORD, "203.0.113.7")
            .await
            .expect_err("this address is throttled"),
    );
    auth.login_from(&email, PASSWORD, "198.51.100.2")
        .await
        .expect("another address is not");
    auth.stop().await;
}

#[tokio::test]
async fn throttling_holds_without_redis() {
    // Nothing listens there: Redis is down from the start.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_redis = format!("redis://{}/0", listener.local_addr().expect("addr"));
    drop(listener);
    let auth = Auth::start(&[
        ("REDIS_URL", &dead_redis),
        ("LOGIN_MAX_FAILURES_PER_ACCOUNT", "2"),
    ])
    .await;
    let email = unique_email();
    auth.register(&email).await;
    auth.login(&email, PASSWORD)
        .await
        .expect("login works without Redis");
    for _ in 0..2 {
        let _ = auth.login(&email, "wrong password!").await;
    }
    assert_throttled(
        &auth
            .login(&email, PASSWORD)
            .await
            .expect_err("counted locally"),
    );
    auth.stop().await;
}

#[tokio::test]
async fn pruning_removes_only_what_retention_allows() {
    let auth = Auth::start(&[]).await;
    let email = unique_email();
    auth.register(&email).await;
    let live = auth.login(&email, PASSWORD).await.expect("login");
    let revoked = auth.login(&email, PASSWORD).await.expect("login");
    let expired = auth.login(&email, PASSWORD).await.expect("login");
    auth.client
        .clone()
        .logout(bearer(pb::LogoutRequest::default(), &revoked.access_token))
        .await
        .expect("logout");
    // Two rotations of the live session: two rotated tokens, one of them old.
    let first = auth.refresh(&live.refresh_token).await.expect("rotate");
    let current = auth.refresh(&first.refresh_token).await.expect("rotate");

    let mut db = auth.db().await;
    let sid = |token: &str| {
        let claims: serde_json::Value =
            serde_json::from_slice(&base64_decode(token.split('.').nth(1).expect("payload")))
                .expect("claims");
        uuid::Uuid::parse_str(claims["sid"].as_str().expect("sid")).expect("uuid")
    };
    for (sql, id) in [
        (
            "update sessions set revoked_at = now() - interval '40 days' where id = $1",
            sid(&revoked.access_token),
        ),
        (
            "update sessions set expires_at = now() - interval '40 days' where id = $1",
            sid(&expired.access_token),
        ),
    ] {
        sqlx::query(sql)
            .bind(id)
            .execute(&mut db)
            .await
            .expect("age a session");
    }
    sqlx::query(
        "update refresh_tokens set rotated_at = now() - interval '10 days'
         where token_hash = (select token_hash from refresh_tokens
                             where rotated_at is not null order by issued_at limit 1)",
    )
    .execute(&mut db)
    .await
    .expect("age a rotated token");
    let aged_audit = sqlx::query(
        "update audit_events set occurred_at = now() - interval '200 days' where kind = 'user_registered'",
    )
    .execute(&mut db)
    .await
    .expect("age audit rows")
    .rows_affected();
    assert_eq!(aged_audit, 1);
    // The key set announced at start-up is the oldest change-log entry.
    let aged_change: i64 = sqlx::query_scalar(
        "update change_events set occurred_at = now() - interval '2 days'
         where kind = 'key_set' returning sequence",
    )
    .fetch_one(&mut db)
    .await
    .expect("age the key-set entry");

    let store = auth::store::Store::new(
        sqlx::PgPool::connect(&auth.database_url)
            .await
            .expect("pool"),
    );
    let days = |d: f64| d * 24.0 * 3600.0;
    let idle = days(30.0);

    // While another replica holds the lock, this one does nothing.
    let mut other = auth.db().await;
    sqlx::query("select pg_advisory_lock(7022647185866126702)")
        .execute(&mut other)
        .await
        .expect("lock");
    let skipped = store
        .prune(days(30.0), idle, days(7.0), days(180.0), days(1.0), 1)
        .await
        .expect("prune");
    assert_eq!(skipped, None);
    sqlx::query("select pg_advisory_unlock(7022647185866126702)")
        .execute(&mut other)
        .await
        .expect("unlock");

    // Batches of one row exercise the loops.
    let counts = store
        .prune(days(30.0), idle, days(7.0), days(180.0), days(1.0), 1)
        .await
        .expect("prune")
        .expect("lock taken");
    assert_eq!(counts.sessions, 2, "the revoked and the expired session");
    // The old rotated token, plus the tokens of the two deleted sessions went by cascade.
    assert_eq!(counts.refresh_tokens, 1);
    assert_eq!(counts.audit_events, 1);
    assert_eq!(counts.change_events, 1);
    let horizon: i64 = sqlx::query_scalar("select pruned_through from change_log_horizon")
        .fetch_one(&mut db)
        .await
        .expect("horizon");
    assert_eq!(horizon, aged_change, "consumers from before it start over");

    let sessions: i64 = sqlx::query_scalar("select count(*) from sessions")
        .fetch_one(&mut db)
        .await
        .expect("count");
    assert_eq!(sessions, 1, "only the live session remains");
    auth.refresh(&current.refresh_token)
        .await
        .expect("the live session still refreshes");

    auth.stop().await;
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .expect("base64url")
}
