//! The profile service through the gateway, against real Postgres and Redis: creation on
//! first read, PATCH validation and ETags, the two cache levels across two replicas, Redis
//! outages, admin routes and catalogs.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use e2e::{
    HttpResponse, Infra, Running, eventually, http_get, http_request, service_config, service_vars,
    start_gateway, start_service_with_config,
};
use platform::service::GrpcService as _;
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Mutex,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const PASSWORD: &str = "correct horse battery staple";
const JSON: (&str, &str) = ("content-type", "application/json");

/// Auth, one profile database and Redis key prefix shared by the replicas started on it, and
/// a gateway in front of each replica.
struct ProfileSet {
    infra: Infra,
    auth_config: auth::Config,
    auth: Running,
    database: String,
    /// The variables every replica starts from (same database, same key prefix).
    vars: Vec<(String, String)>,
    replicas: Vec<Replica>,
}

struct Replica {
    profile: Running,
    gateway: Running,
}

impl ProfileSet {
    /// Auth and `replicas` profile replicas with `extra` `PROFILE_*` settings.
    async fn start(replicas: usize, extra: &[(&str, &str)]) -> Self {
        let infra = Infra::from_env();
        let (auth_config, auth) = start_service_with_config::<auth::Config>(&infra, &[]).await;
        let database = infra.create_database("profile").await;
        let auth_url = auth.url();
        let mut settings: Vec<(&str, &str)> = vec![("AUTH_URL", &auth_url)];
        settings.extend_from_slice(extra);
        let vars = service_vars(&infra, "PROFILE", &database, &settings);
        let mut set = Self {
            infra,
            auth_config,
            auth,
            database,
            vars,
            replicas: Vec::new(),
        };
        for _ in 0..replicas {
            set.add_replica(&[]).await;
        }
        set
    }

    /// Another replica on the same database and key prefix, with `overrides` of its own.
    async fn add_replica(&mut self, overrides: &[(&str, &str)]) -> usize {
        let mut vars = self.vars.clone();
        for (name, value) in overrides {
            let name = format!("PROFILE_{name}");
            vars.retain(|(n, _)| *n != name);
            vars.push((name, (*value).to_owned()));
        }
        let config: profile::Config = service_config(vars);
        let profile =
            Running::start(move |listener, shutdown| config.serve(listener, shutdown)).await;
        let gateway = start_gateway(&[
            ("AUTH_URL", &self.auth.url()),
            ("PROFILE_URL", &profile.url()),
        ])
        .await;
        let health = HealthClient::new(profile.channel().await);
        eventually(Duration::from_secs(30), "profile SERVING", || {
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
        self.replicas.push(Replica { profile, gateway });
        self.replicas.len() - 1
    }

    fn gateway(&self, replica: usize) -> SocketAddr {
        self.replicas[replica].gateway.addr
    }

    fn key_prefix(&self) -> String {
        self.vars
            .iter()
            .find(|(n, _)| n == "PROFILE_REDIS_KEY_PREFIX")
            .map(|(_, v)| v.clone())
            .expect("a key prefix")
    }

    async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.infra.url_for(&self.database))
            .await
            .expect("connect to the profile database")
    }

    /// A new account, logged in: (user id, access token).
    async fn user(&self) -> (String, String) {
        let email = format!("user-{}@example.com", uuid::Uuid::new_v4().simple());
        self.account(&email, "Ada Lovelace").await
    }

    async fn account(&self, email: &str, display_name: &str) -> (String, String) {
        let addr = self.gateway(0);
        let body = json!({"email": email, "password": PASSWORD, "display_name": display_name});
        let registered = send(addr, "POST", "/api/v1/auth/register", None, Some(&body)).await;
        assert_eq!(registered.status, 201, "{}", registered.text());
        let login = send(
            addr,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(&json!({"email": email, "password": PASSWORD})),
        )
        .await;
        assert_eq!(login.status, 200, "{}", login.text());
        let tokens = login.json();
        (
            tokens["user_id"].as_str().expect("user_id").to_owned(),
            tokens["access_token"].as_str().expect("token").to_owned(),
        )
    }

    /// A new account with the admin role, logged in after the grant.
    async fn admin(&self) -> (String, String) {
        let email = format!("admin-{}@example.com", uuid::Uuid::new_v4().simple());
        let addr = self.gateway(0);
        let body = json!({"email": email, "password": PASSWORD, "display_name": "Admin"});
        assert_eq!(
            send(addr, "POST", "/api/v1/auth/register", None, Some(&body))
                .await
                .status,
            201
        );
        auth::grant_role(&self.auth_config, &email, "admin")
            .await
            .expect("grant-role");
        let login = send(
            addr,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(&json!({"email": email, "password": PASSWORD})),
        )
        .await;
        let tokens = login.json();
        (
            tokens["user_id"].as_str().expect("user_id").to_owned(),
            tokens["access_token"].as_str().expect("token").to_owned(),
        )
    }

    async fn stop(self) {
        let Self {
            mut auth, replicas, ..
        } = self;
        let mut running: Vec<Running> = Vec::new();
        for replica in replicas {
            running.push(replica.gateway);
            running.push(replica.profile);
        }
        auth.signal_shutdown();
        for r in &mut running {
            r.signal_shutdown();
        }
        running.push(auth);
        for r in running {
            tokio::time::timeout(Duration::from_secs(10), r.task)
                .await
                .expect("stops within its grace period")
                .expect("task did not panic")
                .expect("serve returned Ok");
        }
    }
}

/// One request with an optional bearer token and JSON body, and extra headers.
async fn send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
    extra: &[(&str, &str)],
) -> HttpResponse {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    if body.is_some() {
        headers.push(JSON);
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    http_request(addr, method, path, &headers, body).await
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> HttpResponse {
    send_with(addr, method, path, token, body, &[]).await
}

async fn my_profile(addr: SocketAddr, token: &str) -> HttpResponse {
    send(addr, "GET", "/api/v1/auth/profile", Some(token), None).await
}

async fn patch_profile(
    addr: SocketAddr,
    token: &str,
    body: &Value,
    if_match: Option<&str>,
) -> HttpResponse {
    let extra: Vec<(&str, &str)> = if_match.map(|e| vec![("if-match", e)]).unwrap_or_default();
    send_with(
        addr,
        "PATCH",
        "/api/v1/auth/profile",
        Some(token),
        Some(body),
        &extra,
    )
    .await
}

fn etag_header(response: &HttpResponse) -> String {
    response
        .headers
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("an ETag header")
        .to_owned()
}

fn assert_problem(response: &HttpResponse, status: u16, code: &str) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(
        response
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem = response.json();
    assert_eq!(problem["code"], code, "{problem}");
    problem
}

#[tokio::test]
async fn the_first_read_creates_the_profile_exactly_once_under_concurrent_reads() {
    // Two replicas, so the creation races in the database and not only in one process.
    let set = ProfileSet::start(2, &[]).await;
    let (user_id, token) = set.user().await;

    let reads = (0..20).map(|i| {
        let addr = set.gateway(i % 2);
        let token = token.clone();
        async move { my_profile(addr, &token).await }
    });
    let responses = futures::future::join_all(reads).await;
    let mut created = Vec::new();
    for response in &responses {
        assert_eq!(response.status, 200, "{}", response.text());
        let profile = response.json();
        assert_eq!(profile["user_id"], user_id.as_str());
        assert_eq!(profile["display_name"], "Ada Lovelace", "from registration");
        assert!(profile["email"].as_str().is_some_and(|e| e.contains('@')));
        assert_eq!(profile["subscription"]["plan_id"], "free");
        assert_eq!(profile["subscription"]["status"], "active");
        assert_eq!(profile["subscription"]["is_expired"], false);
        assert_eq!(profile["roles"], json!([]));
        created.push(profile["created_at"].clone());
    }
    created.dedup();
    assert_eq!(created.len(), 1, "every read saw the same profile");

    let mut db = set.db().await;
    let rows: i64 = sqlx::query_scalar("select count(*) from profiles where user_id = $1::uuid")
        .bind(&user_id)
        .fetch_one(&mut db)
        .await
        .expect("count");
    assert_eq!(rows, 1);
    set.stop().await;
}

#[tokio::test]
async fn patch_validates_every_field_names_it_and_changes_nothing() {
    let set = ProfileSet::start(1, &[]).await;
    let addr = set.gateway(0);
    let (_, token) = set.user().await;
    let before = my_profile(addr, &token).await;
    assert_eq!(before.status, 200, "{}", before.text());

    let cases = [
        (json!({"email": "eve@example.com"}), "email", "READ_ONLY"),
        (json!({"subscription": {}}), "subscription", "READ_ONLY"),
        (
            json!({"favourite_colour": "green"}),
            "favourite_colour",
            "UNKNOWN_FIELD",
        ),
        (json!({"display_name": "   "}), "display_name", "REQUIRED"),
        (json!({"display_name": null}), "display_name", "REQUIRED"),
        (
            json!({"display_name": "x".repeat(101)}),
            "display_name",
            "TOO_LONG",
        ),
        (json!({"bio": "y".repeat(1001)}), "bio", "TOO_LONG"),
        (
            json!({"avatar_url": "http://example.com/a.png"}),
            "avatar_url",
            "INVALID_URL",
        ),
        (json!({"locale": "english"}), "locale", "INVALID_LOCALE"),
        (
            json!({"profession_type_id": "nope"}),
            "profession_type_id",
            "INVALID_ID",
        ),
        (
            json!({"business_category_id": uuid::Uuid::now_v7().to_string()}),
            "business_category_id",
            "UNKNOWN_REFERENCE",
        ),
        (json!({"bio": 42}), "bio", "INVALID_TYPE"),
    ];
    for (body, field, code) in cases {
        let response = patch_profile(addr, &token, &body, None).await;
        let problem = assert_problem(&response, 400, "VALIDATION_FAILED");
        assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
        assert_eq!(problem["errors"][0]["code"], code, "{body}: {problem}");
    }
    // Several bad fields at once: each is named.
    let response = patch_profile(
        addr,
        &token,
        &json!({"email": "x@y.z", "locale": "?", "bio": "fine"}),
        None,
    )
    .await;
    let problem = assert_problem(&response, 400, "VALIDATION_FAILED");
    let mut fields: Vec<&str> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["email", "locale"]);

    let after = my_profile(addr, &token).await;
    assert_eq!(after.json(), before.json(), "nothing changed");
    assert_eq!(etag_header(&after), etag_header(&before));
    set.stop().await;
}

#[tokio::test]
async fn patch_updates_with_if_match_and_refuses_a_stale_etag() {
    let set = ProfileSet::start(1, &[]).await;
    let addr = set.gateway(0);
    let (_, token) = set.user().await;
    let first = my_profile(addr, &token).await;
    let etag = etag_header(&first);
    assert_eq!(
        etag,
        format!("\"{}\"", first.json()["etag"].as_str().expect("etag"))
    );

    let teacher = "01937a4c-0000-7000-8000-000000000001";
    let updated = patch_profile(
        addr,
        &token,
        &json!({
            "display_name": "  Ada K. ",
            "bio": "Counting engines.",
            "avatar_url": "https://cdn.example.com/ada.png",
            "locale": "en-GB",
            "profession_type_id": teacher,
        }),
        Some(&etag),
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let profile = updated.json();
    assert_eq!(profile["display_name"], "Ada K.");
    assert_eq!(profile["locale"], "en-GB");
    assert_eq!(
        profile["profession_type"],
        json!({"id": teacher, "name": "Teacher"})
    );
    assert_eq!(profile["business_category"], Value::Null);
    let new_etag = etag_header(&updated);
    assert_ne!(new_etag, etag);

    // Another device still holding the first ETag is refused, and changes nothing.
    let stale = patch_profile(addr, &token, &json!({"bio": "overwrite"}), Some(&etag)).await;
    assert_problem(&stale, 412, "ETAG_MISMATCH");
    let weak = patch_profile(
        addr,
        &token,
        &json!({"bio": "overwrite"}),
        Some(&format!("W/{new_etag}")),
    )
    .await;
    assert_problem(&weak, 412, "ETAG_MISMATCH");
    let now = my_profile(addr, &token).await;
    assert_eq!(now.json()["bio"], "Counting engines.");
    assert_eq!(etag_header(&now), new_etag);

    // Clearing with null, unconditionally.
    let cleared = patch_profile(
        addr,
        &token,
        &json!({"bio": null, "profession_type_id": null}),
        Some("*"),
    )
    .await;
    assert_eq!(cleared.status, 200, "{}", cleared.text());
    assert_eq!(cleared.json()["bio"], "");
    assert_eq!(cleared.json()["profession_type"], Value::Null);

    let anonymous = send(addr, "GET", "/api/v1/auth/profile", None, None).await;
    assert_problem(&anonymous, 401, "UNAUTHENTICATED");
    set.stop().await;
}

#[tokio::test]
async fn an_update_through_one_replica_is_visible_through_the_other_at_once() {
    // In-process copies live 10 minutes here: only an invalidation can explain a change.
    let set = ProfileSet::start(2, &[("CACHE_L1_TTL", "10m")]).await;
    let (_, token) = set.user().await;
    let (a, b) = (set.gateway(0), set.gateway(1));

    // Both replicas hold the profile in memory.
    for addr in [a, b, a, b] {
        assert_eq!(my_profile(addr, &token).await.status, 200);
    }
    let updated = patch_profile(a, &token, &json!({"bio": "written through A"}), None).await;
    assert_eq!(updated.status, 200, "{}", updated.text());

    let started = Instant::now();
    let seen = eventually(Duration::from_secs(2), "B sees A's update", || async {
        let profile = my_profile(b, &token).await.json();
        (profile["bio"] == "written through A").then_some(profile)
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "seen after {:?}",
        started.elapsed()
    );
    assert_eq!(seen["etag"], updated.json()["etag"]);
    set.stop().await;
}

#[tokio::test]
async fn an_admin_subscription_change_reaches_every_replica_and_non_admins_get_403() {
    let set = ProfileSet::start(2, &[("CACHE_L1_TTL", "10m")]).await;
    let (a, b) = (set.gateway(0), set.gateway(1));
    let (user_id, token) = set.user().await;
    let (_, admin) = set.admin().await;
    let before = my_profile(b, &token).await;
    assert_eq!(before.json()["subscription"]["plan_id"], "free");

    let path = format!("/api/v1/admin/users/{user_id}/subscription");
    let body = json!({"plan_id": "pro", "status": "trialing", "end_date": "2099-01-31T00:00:00Z"});
    // A signed-in user who is not an admin.
    for (method, path, body) in [
        ("PUT", path.as_str(), Some(&body)),
        ("GET", "/api/v1/admin/plans", None),
        (
            "POST",
            "/api/v1/admin/plans",
            Some(&json!({"id": "x", "name": "X"})),
        ),
        (
            "PATCH",
            "/api/v1/admin/plans/free",
            Some(&json!({"name": "X"})),
        ),
        ("DELETE", "/api/v1/admin/plans/pro", None),
        (
            "POST",
            "/api/v1/admin/profession-types",
            Some(&json!({"name": "Pilot"})),
        ),
        (
            "DELETE",
            "/api/v1/admin/business-categories/01937a4c-0000-7000-8000-000000000101",
            None,
        ),
        ("POST", "/api/v1/admin/cache/warm", None),
    ] {
        // Refused at the edge, before any call to profile (which would refuse too).
        let response = send(a, method, path, Some(&token), body).await;
        assert_problem(&response, 403, "PERMISSION_DENIED");
    }

    // The service checks for itself too: a user's token straight to profile over gRPC.
    let mut direct = proto::profile::v1::profile_service_client::ProfileServiceClient::new(
        set.replicas[0].profile.channel().await,
    );
    let mut request = tonic::Request::new(proto::profile::v1::SetSubscriptionRequest {
        user_id: user_id.clone(),
        plan_id: "pro".to_owned(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    let refused = direct
        .set_subscription(request)
        .await
        .expect_err("not an admin");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    let set_response = send(a, "PUT", &path, Some(&admin), Some(&body)).await;
    assert_eq!(set_response.status, 200, "{}", set_response.text());
    assert_eq!(set_response.json()["plan_id"], "pro");
    assert_eq!(set_response.json()["is_customer"], true);

    // The eviction travels by Redis pub/sub: B sees it within the same bound as a PATCH.
    let after = eventually(Duration::from_millis(500), "B's copy evicted", || async {
        let profile = my_profile(b, &token).await;
        (profile.json()["subscription"]["plan_id"] == "pro").then_some(profile)
    })
    .await;
    let subscription = &after.json()["subscription"];
    assert_eq!(subscription["plan_id"], "pro", "B's copy was evicted");
    assert_eq!(subscription["status"], "trialing");
    assert_eq!(subscription["end_date"], "2099-01-31T00:00:00.000Z");
    assert!(
        subscription["features"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("custom_frames")))
    );
    assert_ne!(etag_header(&after), etag_header(&before), "the ETag moved");

    // An expired subscription shows as expired.
    let expired = json!({"plan_id": "pro", "end_date": "2001-01-01T00:00:00Z"});
    assert_eq!(
        send(a, "PUT", &path, Some(&admin), Some(&expired))
            .await
            .status,
        200
    );
    assert_eq!(
        my_profile(b, &token).await.json()["subscription"]["is_expired"],
        true
    );

    // Unknown plan, bad status, unknown user.
    let unknown_plan = send(
        a,
        "PUT",
        &path,
        Some(&admin),
        Some(&json!({"plan_id": "gold"})),
    )
    .await;
    assert_problem(&unknown_plan, 404, "PLAN_NOT_FOUND");
    let bad_status = send(
        a,
        "PUT",
        &path,
        Some(&admin),
        Some(&json!({"plan_id": "pro", "status": "paused"})),
    )
    .await;
    assert_problem(&bad_status, 400, "VALIDATION_FAILED");
    let nobody = format!("/api/v1/admin/users/{}/subscription", uuid::Uuid::now_v7());
    assert_problem(
        &send(
            a,
            "PUT",
            &nobody,
            Some(&admin),
            Some(&json!({"plan_id": "pro"})),
        )
        .await,
        404,
        "USER_NOT_FOUND",
    );
    set.stop().await;
}

#[tokio::test]
async fn plans_and_catalogs_follow_admin_changes_on_every_replica() {
    let set = ProfileSet::start(2, &[("CACHE_L1_TTL", "10m")]).await;
    let (a, b) = (set.gateway(0), set.gateway(1));
    let (_, token) = set.user().await;
    let (_, admin) = set.admin().await;

    let types = send(
        b,
        "GET",
        "/api/v1/auth/profession-types",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(types.status, 200, "{}", types.text());
    let names: Vec<String> = types.json()["profession_types"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["Teacher", "Student", "Designer", "Engineer"]);
    let categories = send(
        b,
        "GET",
        "/api/v1/auth/business-categories?limit=2",
        Some(&token),
        None,
    )
    .await;
    let categories = categories.json();
    assert_eq!(
        categories["business_categories"].as_array().map(Vec::len),
        Some(2)
    );
    let next = categories["next_cursor"].as_str().expect("a second page");
    let rest = send(
        b,
        "GET",
        &format!("/api/v1/auth/business-categories?limit=2&cursor={next}"),
        Some(&token),
        None,
    )
    .await
    .json();
    assert_eq!(rest["business_categories"][1]["name"], "Health");
    assert_eq!(rest["next_cursor"], Value::Null);

    // Create through A; B's cached list has it at once.
    let created = send(
        a,
        "POST",
        "/api/v1/admin/profession-types",
        Some(&admin),
        Some(&json!({"name": "Architect", "sort_order": 5})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let architect = created.json()["id"].as_str().expect("id").to_owned();
    let duplicate = send(
        a,
        "POST",
        "/api/v1/admin/profession-types",
        Some(&admin),
        Some(&json!({"name": "architect"})),
    )
    .await;
    assert_problem(&duplicate, 409, "NAME_TAKEN");
    let listed = send(
        b,
        "GET",
        "/api/v1/auth/profession-types",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(listed.json()["profession_types"][0]["name"], "Architect");

    // The user picks it; a rename shows in their profile on B at once.
    let picked = patch_profile(a, &token, &json!({"profession_type_id": architect}), None).await;
    assert_eq!(picked.status, 200, "{}", picked.text());
    assert_eq!(
        my_profile(b, &token).await.json()["profession_type"]["name"],
        "Architect"
    );
    let renamed = send(
        a,
        "PATCH",
        &format!("/api/v1/admin/profession-types/{architect}"),
        Some(&admin),
        Some(&json!({"name": "Landscape Architect"})),
    )
    .await;
    assert_eq!(renamed.status, 200, "{}", renamed.text());
    let profile = my_profile(b, &token).await;
    assert_eq!(
        profile.json()["profession_type"]["name"],
        "Landscape Architect"
    );

    // Archived: gone from the list, still shown where chosen, no longer selectable.
    let archived = send(
        a,
        "DELETE",
        &format!("/api/v1/admin/profession-types/{architect}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(archived.status, 204);
    let listed = send(
        b,
        "GET",
        "/api/v1/auth/profession-types",
        Some(&token),
        None,
    )
    .await;
    assert!(
        !listed.text().contains("Landscape Architect"),
        "{}",
        listed.text()
    );
    let admin_list = send(
        b,
        "GET",
        "/api/v1/admin/profession-types",
        Some(&admin),
        None,
    )
    .await;
    assert!(
        admin_list.text().contains("\"archived\":true"),
        "{}",
        admin_list.text()
    );
    assert_eq!(
        my_profile(b, &token).await.json()["profession_type"]["name"],
        "Landscape Architect"
    );
    let (_, other) = set.user().await;
    let refused = patch_profile(a, &other, &json!({"profession_type_id": architect}), None).await;
    assert_problem(&refused, 400, "VALIDATION_FAILED");

    // Plans: a rename of the free plan reaches every cached profile.
    let before = my_profile(b, &token).await;
    let renamed = send(
        a,
        "PATCH",
        "/api/v1/admin/plans/free",
        Some(&admin),
        Some(&json!({"name": "Starter", "ai_daily_limit": 5})),
    )
    .await;
    assert_eq!(renamed.status, 200, "{}", renamed.text());
    let after = eventually(Duration::from_millis(500), "B sees the rename", || async {
        let profile = my_profile(b, &token).await;
        (profile.json()["subscription"]["plan_name"] == "Starter").then_some(profile)
    })
    .await;
    assert_eq!(after.json()["subscription"]["plan_name"], "Starter");
    assert_eq!(after.json()["subscription"]["ai_daily_limit"], 5);
    assert_ne!(etag_header(&after), etag_header(&before));
    let plans = send(b, "GET", "/api/v1/plans", Some(&token), None)
        .await
        .json();
    assert_eq!(plans["plans"][0]["name"], "Starter");
    let created = send(
        a,
        "POST",
        "/api/v1/admin/plans",
        Some(&admin),
        Some(&json!({"id": "team", "name": "Team", "features": ["ai_generation"], "is_paid": true, "sort_order": 20})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let bad = send(
        a,
        "POST",
        "/api/v1/admin/plans",
        Some(&admin),
        Some(&json!({"id": "Not A Slug", "name": ""})),
    )
    .await;
    let problem = assert_problem(&bad, 400, "VALIDATION_FAILED");
    assert_eq!(
        problem["errors"].as_array().map(Vec::len),
        Some(2),
        "{problem}"
    );
    assert_problem(
        &send(a, "DELETE", "/api/v1/admin/plans/free", Some(&admin), None).await,
        409,
        "DEFAULT_PLAN",
    );
    assert_eq!(
        send(a, "DELETE", "/api/v1/admin/plans/team", Some(&admin), None)
            .await
            .status,
        204
    );
    let plans = send(b, "GET", "/api/v1/plans", Some(&token), None).await;
    assert!(!plans.text().contains("\"team\""), "{}", plans.text());
    set.stop().await;
}

#[tokio::test]
async fn profile_data_lists_the_users_frames_with_their_categories() {
    let set = ProfileSet::start(1, &[]).await;
    let addr = set.gateway(0);
    let (user_id, token) = set.user().await;
    let (_, other) = set.user().await;
    // The profile exists after the first read; frames belong to it.
    assert_eq!(my_profile(addr, &token).await.status, 200);
    let mut db = set.db().await;
    for (name, category, order) in [
        ("Storefront", "01937a4c-0000-7000-8000-000000000102", 2),
        ("Classroom", "01937a4c-0000-7000-8000-000000000101", 1),
    ] {
        sqlx::query(
            "insert into customer_frames (id, user_id, business_category_id, name, image_url, sort_order)
             values ($1, $2::uuid, $3::uuid, $4, 'https://cdn.example.com/f.png', $5)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(&user_id)
        .bind(category)
        .bind(name)
        .bind(order)
        .execute(&mut db)
        .await
        .expect("insert a frame");
    }
    let data = send(addr, "GET", "/api/v1/auth/profile-data", Some(&token), None).await;
    assert_eq!(data.status, 200, "{}", data.text());
    let frames = data.json()["customer_frames"].clone();
    assert_eq!(frames[0]["name"], "Classroom");
    assert_eq!(frames[0]["business_category"]["name"], "Education");
    assert_eq!(frames[1]["business_category"]["name"], "Retail");
    let theirs = send(addr, "GET", "/api/v1/auth/profile-data", Some(&other), None).await;
    assert_eq!(theirs.json()["customer_frames"], json!([]));
    set.stop().await;
}

/// A TCP forwarder in front of Redis that a test can black-hole: connections stay open and
/// commands go unanswered, the worst kind of outage for a client.
struct RedisProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Connections held open while black-holed, dropped when service resumes.
    held: Arc<Mutex<Vec<TcpStream>>>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl RedisProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let held = Arc::new(Mutex::new(Vec::new()));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (up2, held2, generation2) = (up.clone(), held.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    held2.lock().await.push(client);
                    continue;
                }
                let mut cut = generation2.subscribe();
                let held = held2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => held.lock().await.push(client),
                    }
                });
            }
        });
        Self {
            addr,
            up,
            held,
            generation,
        }
    }

    fn url(&self, password_url: &str) -> String {
        // Same credentials and database, our address.
        let (scheme_auth, rest) = password_url
            .rsplit_once('@')
            .map(|(a, r)| (format!("{a}@"), r))
            .unwrap_or_else(|| {
                (
                    "redis://".to_owned(),
                    password_url.trim_start_matches("redis://"),
                )
            });
        let db = rest.split_once('/').map(|(_, db)| db).unwrap_or("0");
        format!("{scheme_auth}{}/{db}", self.addr)
    }

    fn black_hole(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    async fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.held.lock().await.clear();
    }
}

fn redis_addr(url: &str) -> SocketAddr {
    let host_port = url
        .rsplit_once('@')
        .map_or_else(|| url.trim_start_matches("redis://"), |(_, rest)| rest);
    let host_port = host_port.split('/').next().expect("host:port");
    host_port.parse().expect("a socket address")
}

#[tokio::test]
async fn with_redis_black_holed_reads_keep_succeeding_fast_and_caching_resumes() {
    let infra = Infra::from_env();
    let proxy = RedisProxy::start(redis_addr(&infra.redis_url)).await;
    let proxied = proxy.url(&infra.redis_url);
    let mut set = ProfileSet::start(
        0,
        &[("CACHE_BREAKER_COOLDOWN", "300ms"), ("CACHE_L1_TTL", "2s")],
    )
    .await;
    // Replica 0 reaches Redis through the proxy; replica 1 directly.
    set.add_replica(&[("REDIS_URL", &proxied)]).await;
    set.add_replica(&[]).await;
    let (a, b) = (set.gateway(0), set.gateway(1));
    let (user_id, token) = set.user().await;
    assert_eq!(my_profile(a, &token).await.status, 200);
    assert_eq!(my_profile(b, &token).await.status, 200);

    proxy.black_hole();
    let mut health = HealthClient::new(set.replicas[0].profile.channel().await);
    // A write while Redis cannot hear it, then reads: all served from Postgres.
    let updated = patch_profile(a, &token, &json!({"bio": "while redis was away"}), None).await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let response = my_profile(a, &token).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["bio"], "while redis was away");
    }
    // The first call after the cut may wait one Redis timeout (100 ms); the breaker spares
    // the others.
    assert!(
        slowest < Duration::from_millis(400),
        "slowest read {slowest:?}"
    );
    let (_, stranger) = set.user().await;
    assert_eq!(my_profile(a, &stranger).await.status, 200, "cold reads too");
    let status = health
        .check(HealthCheckRequest {
            service: "profile.v1.ProfileService".to_owned(),
        })
        .await
        .expect("health")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving, "Redis is only a cache");

    // Redis is back: A replays the invalidation it could not send, caching resumes.
    proxy.restore().await;
    let key = format!("{}profile:v1:{user_id}", set.key_prefix());
    let client = redis::Client::open(infra.redis_url.as_str()).expect("client");
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    eventually(Duration::from_secs(10), "A caches in Redis again", || {
        let mut redis = redis.clone();
        let key = key.clone();
        let token = token.clone();
        async move {
            // A read on A probes Redis and closes the breaker (replaying what it missed);
            // another through B, cold, then fills L2 from Postgres.
            let _ = my_profile(a, &token).await;
            let seen = my_profile(b, &token).await.json();
            let cached: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .ok()?;
            let cached = String::from_utf8_lossy(&cached?).into_owned();
            (seen["bio"] == "while redis was away" && cached.contains("while redis was away"))
                .then_some(())
        }
    })
    .await;
    set.stop().await;
}

/// `seq_scan + idx_scan` of `profiles`: every execution of the profile read scans it once.
async fn profile_scans(db: &mut PgConnection) -> i64 {
    sqlx::query("select pg_stat_clear_snapshot()")
        .execute(&mut *db)
        .await
        .expect("clear snapshot");
    sqlx::query_scalar(
        "select coalesce(seq_scan, 0) + coalesce(idx_scan, 0) from pg_stat_user_tables where relname = 'profiles'",
    )
    .fetch_one(&mut *db)
    .await
    .expect("table statistics")
}

/// Stops a replica's service and waits until its database sessions have ended: a backend
/// flushes its statistics when it exits, so what it did is counted from then on.
async fn stop_profile(set: &mut ProfileSet, replica: usize, db: &mut PgConnection) {
    let profile = &mut set.replicas[replica].profile;
    profile.signal_shutdown();
    let task = std::mem::replace(&mut profile.task, tokio::spawn(async { Ok(()) }));
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops within its grace period")
        .expect("task did not panic")
        .expect("serve returned Ok");
    let database = set.database.clone();
    let started = Instant::now();
    loop {
        let sessions: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = $1 and application_name = 'profile'",
        )
        .bind(&database)
        .fetch_one(&mut *db)
        .await
        .expect("sessions");
        if sessions == 0 {
            // A backend leaves the activity view and flushes its statistics in the same
            // exit; give the last of them a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sessions linger"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_hundred_concurrent_reads_of_a_cold_profile_run_one_statement() {
    // Nothing else may scan `profiles` meanwhile: no warming, no activity flush.
    let quiet = [
        ("WARM_ON_START", "false"),
        ("ACTIVITY_FLUSH_INTERVAL", "1h"),
    ];
    let mut set = ProfileSet::start(1, &quiet).await;
    let (_, token) = set.user().await;
    assert_eq!(my_profile(set.gateway(0), &token).await.status, 200);
    let mut db = set.db().await;
    // The replica that created the profile stops: its scans are counted from here on.
    stop_profile(&mut set, 0, &mut db).await;
    let before = profile_scans(&mut db).await;

    // A replica with a key prefix of its own: both of its levels are cold for this user.
    let cold_prefix = format!("{}cold:", set.key_prefix());
    let cold = set.add_replica(&[("REDIS_KEY_PREFIX", &cold_prefix)]).await;
    let addr = set.gateway(cold);
    let reads = (0..100).map(|_| {
        let token = token.clone();
        async move { my_profile(addr, &token).await }
    });
    for response in futures::future::join_all(reads).await {
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let metrics = http_get(set.replicas[cold].profile.addr, "/metrics")
        .await
        .text();
    // The cold profile was a miss at least once (whether any of the 100 then hit L1 or
    // all joined the one load depends on timing; the statement count below is the point).
    assert!(
        metrics.contains(r#"cache_requests_total{cache="profile",level="l1",result="miss"}"#),
        "{metrics}"
    );
    stop_profile(&mut set, cold, &mut db).await;
    let after = profile_scans(&mut db).await;
    assert_eq!(after - before, 1, "one statement for 100 cold reads");
    set.stop().await;
}

#[tokio::test]
async fn roles_granted_in_auth_show_in_the_profile_through_the_change_stream() {
    // Auth data may be cached a minute; the change event must evict it far sooner.
    let set = ProfileSet::start(2, &[("AUTH_CACHE_TTL", "60s"), ("CACHE_L1_TTL", "10m")]).await;
    let email = format!("user-{}@example.com", uuid::Uuid::new_v4().simple());
    let (user_id, token) = set.account(&email, "Grace").await;
    let (_, admin) = set.admin().await;
    for replica in [0, 1] {
        let profile = my_profile(set.gateway(replica), &token).await.json();
        assert_eq!(profile["roles"], json!([]));
    }
    let granted = send(
        set.gateway(0),
        "PUT",
        &format!("/api/v1/admin/users/{user_id}/roles/admin"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(granted.status, 204, "{}", granted.text());
    // Tokens from before a role change are refused: the client logs in (or refreshes) again.
    let login = send(
        set.gateway(0),
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&json!({"email": email, "password": PASSWORD})),
    )
    .await;
    let fresh = login.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let started = Instant::now();
    for replica in [0, 1] {
        eventually(
            Duration::from_secs(5),
            "the new role in the profile",
            || {
                let fresh = fresh.clone();
                let addr = set.gateway(replica);
                async move {
                    let profile = my_profile(addr, &fresh).await.json();
                    (profile["roles"] == json!(["admin"])).then_some(())
                }
            },
        )
        .await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    set.stop().await;
}

/// A gRPC request to profile with `token` as its bearer.
fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    request
}

#[tokio::test]
async fn internal_callers_read_entitlements_and_batches_with_a_service_token() {
    use proto::{
        auth::v1 as auth_pb,
        profile::v1::{self as pb, profile_service_client::ProfileServiceClient},
    };
    let set = ProfileSet::start(1, &[]).await;
    let (user_id, token) = set.user().await;
    let (other_id, other) = set.user().await;
    let (_, admin) = set.admin().await;
    // The notes service's own token, as notes gets it.
    let mut auth = auth_pb::auth_service_client::AuthServiceClient::new(set.auth.channel().await);
    let service = auth
        .issue_service_token(auth_pb::IssueServiceTokenRequest {
            service_name: "notes".to_owned(),
            client_secret: e2e::test_client_secret("notes"),
            ..Default::default()
        })
        .await
        .expect("a service token")
        .into_inner()
        .access_token;
    let mut profile = ProfileServiceClient::new(set.replicas[0].profile.channel().await);

    // A service reads any user's entitlements, creating the profile on first read.
    let entitlements = profile
        .get_entitlements(bearer(
            pb::GetEntitlementsRequest {
                user_id: user_id.clone(),
            },
            &service,
        ))
        .await
        .expect("entitlements")
        .into_inner();
    assert_eq!(entitlements.plan_id, "free");
    assert_eq!(entitlements.ai_daily_limit, 3);
    assert_eq!(entitlements.features, ["ai_generation"]);
    assert!(!entitlements.is_expired && !entitlements.is_customer);

    // An expired paid plan grants the default plan's entitlements.
    let path = format!("/api/v1/admin/users/{user_id}/subscription");
    let expired = json!({"plan_id": "pro", "end_date": "2001-01-01T00:00:00Z"});
    assert_eq!(
        send(set.gateway(0), "PUT", &path, Some(&admin), Some(&expired))
            .await
            .status,
        200
    );
    let entitlements = profile
        .get_entitlements(bearer(
            pb::GetEntitlementsRequest {
                user_id: user_id.clone(),
            },
            &service,
        ))
        .await
        .expect("entitlements")
        .into_inner();
    assert_eq!(entitlements.plan_id, "pro");
    assert!(entitlements.is_expired && entitlements.is_customer);
    assert_eq!(entitlements.ai_daily_limit, 3, "the default plan's");

    // Users see their own, and nobody else's (as if it did not exist).
    let theirs = profile
        .get_entitlements(bearer(
            pb::GetEntitlementsRequest {
                user_id: user_id.clone(),
            },
            &other,
        ))
        .await
        .expect_err("another user's");
    assert_eq!(theirs.code(), tonic::Code::NotFound);
    assert!(
        profile
            .get_profile(bearer(
                pb::GetProfileRequest {
                    user_id: user_id.clone()
                },
                &token
            ))
            .await
            .is_ok()
    );

    // Batches: service or admin; unknown ids skipped, request order kept.
    let unknown = uuid::Uuid::now_v7().to_string();
    let batch = profile
        .batch_get_profiles(bearer(
            pb::BatchGetProfilesRequest {
                user_ids: vec![other_id.clone(), unknown, user_id.clone()],
            },
            &service,
        ))
        .await
        .expect("batch")
        .into_inner();
    let ids: Vec<&str> = batch.profiles.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(ids, [other_id.as_str(), user_id.as_str()]);
    assert!(batch.profiles.iter().all(|p| p.email.contains('@')));
    let refused = profile
        .batch_get_profiles(bearer(
            pb::BatchGetProfilesRequest {
                user_ids: vec![user_id.clone()],
            },
            &token,
        ))
        .await
        .expect_err("users may not batch");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let malformed = profile
        .batch_get_profiles(bearer(
            pb::BatchGetProfilesRequest {
                user_ids: vec!["nope".to_owned()],
            },
            &service,
        ))
        .await
        .expect_err("malformed id");
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);

    // Pool figures for the admin view.
    let pools = profile
        .get_pool_status(bearer(pb::GetPoolStatusRequest {}, &service))
        .await
        .expect("pool status")
        .into_inner();
    let names: Vec<&str> = pools.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["postgres", "redis"]);
    assert_eq!(pools.pools[0].max_size, 4, "the test's DB_MAX_CONNECTIONS");
    set.stop().await;
}

#[tokio::test]
async fn a_new_replica_warms_its_caches_with_recently_active_profiles() {
    let mut set = ProfileSet::start(1, &[]).await;
    let (user_id, token) = set.user().await;
    assert_eq!(my_profile(set.gateway(0), &token).await.status, 200);
    let db = sqlx::PgPool::connect(&set.infra.url_for(&set.database))
        .await
        .expect("a pool on the profile database");
    // Created by that read, so recently active (later reads refresh it at most hourly).
    eventually(Duration::from_secs(5), "the user recently active", || {
        let db = db.clone();
        let user_id = user_id.clone();
        async move {
            let recent: bool = sqlx::query_scalar(
                "select last_active_at > now() - interval '1 minute' from profiles where user_id = $1::uuid",
            )
            .bind(&user_id)
            .fetch_one(&db)
            .await
            .ok()?;
            recent.then_some(())
        }
    })
    .await;

    // A replica with empty levels of its own warms them at start, without any read.
    let warm_prefix = format!("{}warm:", set.key_prefix());
    set.add_replica(&[("REDIS_KEY_PREFIX", &warm_prefix)]).await;
    let key = format!("{warm_prefix}profile:v1:{user_id}");
    let infra = Infra::from_env();
    let client = redis::Client::open(infra.redis_url.as_str()).expect("client");
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    eventually(
        Duration::from_secs(10),
        "the profile warmed into Redis",
        || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move {
                let exists: bool = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .ok()?;
                exists.then_some(())
            }
        },
    )
    .await;

    // And on demand, by an admin.
    let (_, admin) = set.admin().await;
    let warmed = send(
        set.gateway(0),
        "POST",
        "/api/v1/admin/cache/warm",
        Some(&admin),
        Some(&json!({"active_within_seconds": 3600})),
    )
    .await;
    assert_eq!(warmed.status, 202, "{}", warmed.text());
    assert!(warmed.json()["scheduled"].as_i64().is_some_and(|n| n >= 1));
    let bad = send(
        set.gateway(0),
        "POST",
        "/api/v1/admin/cache/warm",
        Some(&admin),
        Some(&json!({"max_per_second": -1})),
    )
    .await;
    assert_problem(&bad, 400, "VALIDATION_FAILED");
    set.stop().await;
}
