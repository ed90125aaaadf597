//! Generation jobs and notifications through the gateway, against real Postgres and Redis:
//! a job's life from queued to a result with its notification streamed live (SSE, with
//! `Last-Event-ID` resume), deduplication, the daily quota under concurrency, cancel, and a
//! job whose worker dies finishing exactly once on another notes replica.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use e2e::{HttpResponse, Infra, Running, eventually, http_request};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";
/// The gateway's per-call timeout in these tests: an event stream stays open past it.
const UPSTREAM_TIMEOUT: &str = "3s";

/// Sentences enough for every kind of generation.
const NOTE_BODY: &str = "Photosynthesis converts light energy into chemical energy in plants. \
    Chlorophyll absorbs light energy mostly in the blue and red wavelengths. \
    The light reactions happen in the thylakoid membranes of the chloroplast. \
    The Calvin cycle uses chemical energy to fix carbon dioxide into sugar. \
    Plants release oxygen as a product of splitting water in the light reactions. \
    Chloroplast structure matters for light capture in plants.";

/// Auth, profile, notes replicas sharing one database and Redis prefix, and a gateway per
/// notes replica.
struct JobsStack {
    infra: Infra,
    auth_config: auth::Config,
    auth: Running,
    profile: Running,
    notes_database: String,
    notes_redis_prefix: String,
    replicas: Vec<Replica>,
}

struct Replica {
    notes: Running,
    gateway: Running,
}

impl JobsStack {
    async fn start(notes_extra: &[(&str, &str)]) -> Self {
        let infra = Infra::from_env();
        let (auth_config, auth) = e2e::start_service_with_config::<auth::Config>(&infra, &[]).await;
        let auth_url = auth.url();
        let profile =
            e2e::start_service::<profile::Config>(&infra, &[("AUTH_URL", &auth_url)]).await;
        let notes_database = infra.create_database("notes").await;
        let mut stack = Self {
            infra,
            auth_config,
            auth,
            profile,
            notes_database,
            notes_redis_prefix: format!("e2e:{}:notes:", uuid::Uuid::new_v4().simple()),
            replicas: Vec::new(),
        };
        stack.add_replica(notes_extra).await;
        stack
    }

    /// Another notes replica on the same database and Redis prefix, with its own gateway.
    async fn add_replica(&mut self, notes_extra: &[(&str, &str)]) -> usize {
        let auth_url = self.auth.url();
        let profile_url = self.profile.url();
        let mut extra = vec![
            ("AUTH_URL", auth_url.as_str()),
            ("PROFILE_URL", profile_url.as_str()),
            ("REDIS_KEY_PREFIX", self.notes_redis_prefix.as_str()),
            ("JOB_POLL_INTERVAL", "50ms"),
            ("GENERATOR_STEP_DELAY", "100ms"),
            ("NOTIFICATION_HEARTBEAT", "500ms"),
        ];
        extra.extend_from_slice(notes_extra);
        let vars = e2e::service_vars(&self.infra, "NOTES", &self.notes_database, &extra);
        let config: notes::Config = e2e::service_config(vars);
        let notes = Running::start(move |listener, shutdown| {
            platform::service::GrpcService::serve(config, listener, shutdown)
        })
        .await;
        wait_serving(&notes).await;
        let gateway = e2e::start_gateway(&[
            ("AUTH_URL", &self.auth.url()),
            ("PROFILE_URL", &self.profile.url()),
            ("NOTES_URL", &notes.url()),
            // Event streams must outlive the per-call timeouts.
            ("UPSTREAM_TIMEOUT", UPSTREAM_TIMEOUT),
        ])
        .await;
        self.replicas.push(Replica { notes, gateway });
        self.replicas.len() - 1
    }

    fn addr(&self) -> SocketAddr {
        self.replicas[0].gateway.addr
    }

    async fn stop(self) {
        let mut all = Vec::new();
        for replica in self.replicas {
            all.push(replica.gateway);
            all.push(replica.notes);
        }
        all.push(self.profile);
        all.push(self.auth);
        for mut running in all {
            running.signal_shutdown();
            tokio::time::timeout(Duration::from_secs(10), running.task)
                .await
                .expect("stops within its grace period")
                .expect("no panic")
                .expect("serve returned Ok");
        }
    }
}

async fn wait_serving(notes: &Running) {
    let url = notes.url();
    eventually(Duration::from_secs(30), "notes SERVING", || {
        let url = url.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .ok()?
                .connect()
                .await
                .ok()?;
            let reply = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "notes.v1.NotesService".to_owned(),
                })
                .await
                .ok()?;
            (reply.into_inner().status == 1).then_some(())
        }
    })
    .await;
}

struct User {
    id: String,
    token: String,
}

async fn sign_up(addr: SocketAddr) -> User {
    let email = format!("{}@example.com", uuid::Uuid::now_v7().simple());
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
    let registered = send(
        addr,
        "POST",
        "/api/v1/auth/register",
        None,
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let login = json!({"email": email, "password": PASSWORD});
    let reply = send(addr, "POST", "/api/v1/auth/login", None, Some(&login), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = reply.json();
    User {
        id: reply["user_id"].as_str().expect("user_id").to_owned(),
        token: reply["access_token"].as_str().expect("token").to_owned(),
    }
}

/// A new account with the admin role, logged in after the grant.
async fn admin(stack: &JobsStack) -> User {
    let addr = stack.addr();
    let email = format!("admin-{}@example.com", uuid::Uuid::now_v7().simple());
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Admin"});
    let registered = send(
        addr,
        "POST",
        "/api/v1/auth/register",
        None,
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    auth::grant_role(&stack.auth_config, &email, "admin")
        .await
        .expect("grant-role");
    let login = json!({"email": email, "password": PASSWORD});
    let reply = send(addr, "POST", "/api/v1/auth/login", None, Some(&login), &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = reply.json();
    User {
        id: reply["user_id"].as_str().expect("user_id").to_owned(),
        token: reply["access_token"].as_str().expect("token").to_owned(),
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    user: Option<&User>,
    body: Option<&Value>,
    extra: &[(&str, &str)],
) -> HttpResponse {
    let bearer = user.map(|u| format!("Bearer {}", u.token));
    let mut headers: Vec<(&str, &str)> = extra.to_vec();
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    let bytes = body.map(Value::to_string).unwrap_or_default();
    http_request(addr, method, path, &headers, bytes).await
}

async fn create_note(addr: SocketAddr, user: &User) -> String {
    let body = json!({"title": "Photosynthesis", "body": NOTE_BODY});
    let created = send(addr, "POST", "/api/v1/notes", Some(user), Some(&body), &[]).await;
    assert_eq!(created.status, 201, "{}", created.text());
    created.json()["id"].as_str().expect("note id").to_owned()
}

async fn generate(addr: SocketAddr, user: &User, note: &str, body: &Value) -> HttpResponse {
    let path = format!("/api/v1/notes/{note}/generate");
    send(addr, "POST", &path, Some(user), Some(body), &[]).await
}

async fn job(addr: SocketAddr, user: &User, id: &str) -> Value {
    let reply = send(
        addr,
        "GET",
        &format!("/api/v1/jobs/{id}"),
        Some(user),
        None,
        &[],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// Polls the job until it is in a final state; every (status, progress) seen, in order.
async fn follow(addr: SocketAddr, user: &User, id: &str) -> (Value, Vec<(String, i64)>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job = job(addr, user, id).await;
        let status = job["status"].as_str().expect("status").to_owned();
        seen.push((status.clone(), job["progress"].as_i64().expect("progress")));
        if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) {
            return (job, seen);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never finished: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Server-Sent Events stream, read event by event.
struct EventStream {
    body: hyper::body::Incoming,
    buffer: String,
}

#[derive(Debug)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

impl EventStream {
    async fn open(addr: SocketAddr, user: &User, last_event_id: Option<i64>) -> Self {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
        let mut request = http::Request::get(format!("http://{addr}/api/v1/notifications/stream"))
            .header("authorization", format!("Bearer {}", user.token))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(request.body(http_body_util::Empty::new()).expect("request")),
        )
        .await
        .expect("stream opens within 10s")
        .expect("HTTP response");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"]
                .to_str()
                .unwrap_or_default(),
            "text/event-stream"
        );
        Self {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event that is not only comments (keep-alives, heartbeats).
    async fn next(&mut self, within: Duration) -> SseEvent {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut fields = false;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        event.id = Some(value.trim().to_owned());
                        fields = true;
                    } else if let Some(value) = line.strip_prefix("event:") {
                        event.event = Some(value.trim().to_owned());
                        fields = true;
                    } else if let Some(value) = line.strip_prefix("data:") {
                        event.data.push_str(value.trim_start());
                        fields = true;
                    }
                }
                if fields {
                    return event;
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("an event in time")
                .expect("the stream stays open")
                .expect("a body frame");
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }

    /// The next notification event as JSON, checking its id is its sequence.
    async fn notification(&mut self) -> Value {
        let event = self.next(Duration::from_secs(30)).await;
        assert_eq!(event.event.as_deref(), Some("notification"), "{event:?}");
        let data: Value = serde_json::from_str(&event.data).expect("JSON data");
        assert_eq!(event.id, Some(data["sequence"].to_string()));
        data
    }
}

#[tokio::test]
async fn a_job_runs_to_a_result_and_its_notification_streams_live_and_on_resume() {
    let stack = JobsStack::start(&[]).await;
    let addr = stack.addr();
    let user = sign_up(addr).await;
    let note = create_note(addr, &user).await;
    let mut live = EventStream::open(addr, &user, None).await;
    // Idle past the gateway's call timeout: heartbeats and keep-alives, and the stream lives.
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let request = json!({"kind": "summary", "options": {"max_sentences": 2}});
    let accepted = generate(addr, &user, &note, &request).await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let body = accepted.json();
    let job_id = body["job_id"].as_str().expect("job_id").to_owned();
    assert_eq!(body["status_url"], format!("/api/v1/jobs/{job_id}"));
    assert_eq!(body["status"], "queued");

    // The same request while it is queued or running: the same job, 200, no new quota.
    let again = generate(addr, &user, &note, &request).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["job_id"], job_id.as_str());

    let (done, seen) = follow(addr, &user, &job_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["progress"], 100);
    let running: Vec<i64> = seen
        .iter()
        .filter(|(status, _)| status == "running")
        .map(|(_, progress)| *progress)
        .collect();
    assert!(
        running.len() >= 2,
        "seen running while it progressed: {seen:?}"
    );
    assert!(running.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert!(running.first() < running.last(), "progress rose: {seen:?}");
    let summary = done["result"]["summary"].as_str().expect("a summary");
    assert!(!summary.is_empty() && NOTE_BODY.contains(summary.split(". ").next().unwrap_or("")));
    assert_eq!(done["result"]["generator"], "builtin");
    assert_eq!(done["attempt"], 1);
    assert!(done["finished_at"].is_string());

    // Its notification, live on the stream that was open all along.
    let first = live.notification().await;
    assert_eq!(first["kind"], "job_succeeded");
    assert_eq!(first["job_id"], job_id.as_str());
    assert_eq!(first["note_id"], note.as_str());

    // A second job; then a stream resumed after the first event gets only the second, and
    // one resumed from 0 gets both, in order.
    let quiz = generate(addr, &user, &note, &json!({"kind": "quiz"})).await;
    assert_eq!(quiz.status, 202, "{}", quiz.text());
    let quiz_id = quiz.json()["job_id"].as_str().expect("job_id").to_owned();
    let (quiz_done, _) = follow(addr, &user, &quiz_id).await;
    assert_eq!(quiz_done["status"], "succeeded", "{quiz_done}");
    assert!(
        !quiz_done["result"]["questions"]
            .as_array()
            .expect("questions")
            .is_empty()
    );
    let second = live.notification().await;
    assert_eq!(second["job_id"], quiz_id.as_str());
    let first_sequence = first["sequence"].as_i64().expect("sequence");
    assert_eq!(second["sequence"].as_i64(), Some(first_sequence + 1));

    let mut resumed = EventStream::open(addr, &user, Some(first_sequence)).await;
    assert_eq!(resumed.notification().await["job_id"], quiz_id.as_str());
    let mut replayed = EventStream::open(addr, &user, Some(0)).await;
    assert_eq!(replayed.notification().await["job_id"], job_id.as_str());
    assert_eq!(replayed.notification().await["job_id"], quiz_id.as_str());
    // And the resumed streams go on live.
    let terms = generate(addr, &user, &note, &json!({"kind": "explanation"})).await;
    assert_eq!(terms.status, 202, "{}", terms.text());
    let terms_id = terms.json()["job_id"].as_str().expect("job_id").to_owned();
    assert_eq!(resumed.notification().await["job_id"], terms_id.as_str());
    assert_eq!(replayed.notification().await["job_id"], terms_id.as_str());
    assert_eq!(live.notification().await["job_id"], terms_id.as_str());

    // The pending list is the source of truth; reading empties it.
    let unread = send(
        addr,
        "GET",
        "/api/v1/notifications?unread=true",
        Some(&user),
        None,
        &[],
    )
    .await;
    assert_eq!(unread.status, 200, "{}", unread.text());
    let unread = unread.json();
    assert_eq!(unread["unread_count"], 3);
    let items = unread["items"].as_array().expect("items");
    assert_eq!(items[0]["job_id"], terms_id.as_str(), "newest first");
    let one = items[2]["id"].as_str().expect("id");
    let read = send(
        addr,
        "POST",
        &format!("/api/v1/notifications/{one}/read"),
        Some(&user),
        None,
        &[],
    )
    .await;
    assert_eq!(read.status, 204, "{}", read.text());
    let unread = send(
        addr,
        "GET",
        "/api/v1/notifications?unread=true",
        Some(&user),
        None,
        &[],
    )
    .await;
    assert_eq!(unread.json()["unread_count"], 2);
    let all = send(
        addr,
        "POST",
        "/api/v1/notifications/read-all",
        Some(&user),
        None,
        &[],
    )
    .await;
    assert_eq!(all.status, 204, "{}", all.text());
    let unread = send(
        addr,
        "GET",
        "/api/v1/notifications?unread=true",
        Some(&user),
        None,
        &[],
    )
    .await;
    assert_eq!(unread.json()["items"], json!([]));
    let everything = send(addr, "GET", "/api/v1/notifications", Some(&user), None, &[]).await;
    assert_eq!(everything.json()["items"].as_array().map(Vec::len), Some(3));

    // The caller's jobs, newest first.
    let jobs = send(addr, "GET", "/api/v1/jobs", Some(&user), None, &[]).await;
    assert_eq!(jobs.status, 200, "{}", jobs.text());
    let ids: Vec<String> = jobs.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|j| j["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids, [terms_id.clone(), quiz_id.clone(), job_id.clone()]);

    // Someone else sees none of it.
    let other = sign_up(addr).await;
    let hidden = send(
        addr,
        "GET",
        &format!("/api/v1/jobs/{job_id}"),
        Some(&other),
        None,
        &[],
    )
    .await;
    assert_eq!(hidden.status, 404, "{}", hidden.text());
    let hidden = send(
        addr,
        "POST",
        &format!("/api/v1/notifications/{one}/read"),
        Some(&other),
        None,
        &[],
    )
    .await;
    assert_eq!(hidden.status, 404, "{}", hidden.text());
    let theirs = generate(addr, &other, &note, &request).await;
    assert_eq!(theirs.status, 404, "{}", theirs.text());

    drop((live, resumed, replayed));
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_generates_past_the_daily_limit_are_refused_and_never_run() {
    let stack = JobsStack::start(&[]).await;
    let addr = stack.addr();
    // A plan of 2 generations a day, set for the user by an admin through profile.
    let admin = admin(&stack).await;
    let plan = json!({"id": "tiny", "name": "Tiny", "features": ["ai_generation"],
                      "ai_daily_limit": 2, "is_paid": false, "sort_order": 30});
    let created = send(
        addr,
        "POST",
        "/api/v1/admin/plans",
        Some(&admin),
        Some(&plan),
        &[],
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let user = sign_up(addr).await;
    let path = format!("/api/v1/admin/users/{}/subscription", user.id);
    let subscription = json!({"plan_id": "tiny", "status": "active"});
    let set = send(addr, "PUT", &path, Some(&admin), Some(&subscription), &[]).await;
    assert_eq!(set.status, 200, "{}", set.text());
    let note = create_note(addr, &user).await;
    let requests = (1..=10).map(|n| {
        let body = json!({"kind": "summary", "options": {"max_sentences": n}});
        let (user, note) = (&user, &note);
        async move { generate(addr, user, note, &body).await }
    });
    let replies = futures::future::join_all(requests).await;
    let accepted: Vec<&HttpResponse> = replies.iter().filter(|r| r.status == 202).collect();
    let refused: Vec<&HttpResponse> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(
        accepted.len(),
        2,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), 8);
    for reply in &refused {
        assert_eq!(reply.json()["code"], "QUOTA_EXCEEDED", "{}", reply.text());
        let retry_after: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap_or_default()
            .parse()
            .expect("Retry-After seconds");
        assert!(
            (1..=86_400).contains(&retry_after),
            "until 00:00 UTC: {retry_after}"
        );
    }
    // Only the accepted ones exist and run.
    let accepted_ids: HashSet<String> = accepted
        .iter()
        .map(|r| r.json()["job_id"].as_str().expect("id").to_owned())
        .collect();
    for id in &accepted_ids {
        let (done, _) = follow(addr, &user, id).await;
        assert_eq!(done["status"], "succeeded");
    }
    let jobs = send(addr, "GET", "/api/v1/jobs", Some(&user), None, &[]).await;
    let listed: HashSet<String> = jobs.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(listed, accepted_ids);
    // Still refused later in the day, even for a request that never ran.
    let later = generate(addr, &user, &note, &json!({"kind": "quiz"})).await;
    assert_eq!(later.status, 429, "{}", later.text());
    stack.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_a_finished_one_answers_409() {
    let stack = JobsStack::start(&[("GENERATOR_STEP_DELAY", "300ms")]).await;
    let addr = stack.addr();
    let user = sign_up(addr).await;
    let note = create_note(addr, &user).await;
    let accepted = generate(addr, &user, &note, &json!({"kind": "summary"})).await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let id = accepted.json()["job_id"].as_str().expect("id").to_owned();
    eventually(Duration::from_secs(10), "the job running", || {
        let (user, id) = (&user, &id);
        async move { (job(addr, user, id).await["status"] == "running").then_some(()) }
    })
    .await;
    let cancel = send(
        addr,
        "POST",
        &format!("/api/v1/jobs/{id}/cancel"),
        Some(&user),
        None,
        &[],
    )
    .await;
    assert_eq!(cancel.status, 202, "{}", cancel.text());
    assert_eq!(cancel.json()["cancel_requested"], true);
    let (done, _) = follow(addr, &user, &id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["progress"].as_i64() < Some(100));
    assert!(done.get("result").is_none());

    // A job that finished: 409.
    let quiz = generate(addr, &user, &note, &json!({"kind": "quiz"})).await;
    let quiz_id = quiz.json()["job_id"].as_str().expect("id").to_owned();
    let (done, _) = follow(addr, &user, &quiz_id).await;
    assert_eq!(done["status"], "succeeded");
    let late = send(
        addr,
        "POST",
        &format!("/api/v1/jobs/{quiz_id}/cancel"),
        Some(&user),
        None,
        &[],
    )
    .await;
    assert_eq!(late.status, 409, "{}", late.text());
    assert_eq!(late.json()["code"], "JOB_FINISHED");
    // Another user's job: 404.
    let other = sign_up(addr).await;
    let hidden = send(
        addr,
        "POST",
        &format!("/api/v1/jobs/{quiz_id}/cancel"),
        Some(&other),
        None,
        &[],
    )
    .await;
    assert_eq!(hidden.status, 404, "{}", hidden.text());
    stack.stop().await;
}

#[tokio::test]
async fn a_job_whose_worker_stops_mid_job_finishes_once_on_another_replica() {
    let lease = [("JOB_LEASE", "1s"), ("GENERATOR_STEP_DELAY", "300ms")];
    let mut stack = JobsStack::start(&lease).await;
    let addr = stack.addr();
    let user = sign_up(addr).await;
    let note = create_note(addr, &user).await;
    let accepted = generate(addr, &user, &note, &json!({"kind": "summary"})).await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let id = accepted.json()["job_id"].as_str().expect("id").to_owned();
    eventually(Duration::from_secs(10), "the job under way", || {
        let (user, id) = (&user, &id);
        async move {
            let job = job(addr, user, id).await;
            (job["status"] == "running" && job["progress"].as_i64() > Some(0)).then_some(())
        }
    })
    .await;
    // A second replica; it cannot take the job while the first one's lease is renewed.
    let second = stack.add_replica(&lease).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first replica stops mid-job (its worker drops the job where it is, as if killed).
    let mut first = stack.replicas.remove(0);
    first.gateway.signal_shutdown();
    first.notes.signal_shutdown();
    let _ = first.gateway.task.await;
    let _ = first.notes.task.await;
    let second = second - 1;
    let addr = stack.replicas[second].gateway.addr;
    assert_eq!(
        job(addr, &user, &id).await["status"],
        "running",
        "left behind, not finished"
    );

    let (done, _) = follow(addr, &user, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["attempt"], 2,
        "re-claimed once after the lease: {done}"
    );
    // Exactly one outcome: one notification for the job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = send(addr, "GET", "/api/v1/notifications", Some(&user), None, &[]).await;
    let for_job: Vec<Value> = all.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|n| n["job_id"] == id.as_str())
        .cloned()
        .collect();
    assert_eq!(for_job.len(), 1, "{for_job:?}");
    stack.stop().await;
}

/// An OpenAI-compatible chat-completions server for the test: it answers by the kind the
/// system message asks for — a summary after one 503, a quiz never (400), key terms too
/// slowly (past the generator's timeout) — and records every request.
#[derive(Clone, Default)]
struct FakeModel {
    requests: std::sync::Arc<std::sync::Mutex<Vec<SeenRequest>>>,
    summary_calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A request's `Authorization` header and JSON body.
type SeenRequest = (Option<String>, Value);

async fn fake_completion(
    axum::extract::State(model): axum::extract::State<FakeModel>,
    headers: http::HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    model.requests.lock().unwrap().push((bearer, body.clone()));
    let instruction = body["messages"][0]["content"].as_str().unwrap_or_default();
    let answer = |content: &str| {
        axum::Json(json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
        }))
        .into_response()
    };
    if instruction.starts_with("Summarise") {
        let call = model
            .summary_calls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if call == 0 {
            return (http::StatusCode::SERVICE_UNAVAILABLE, "warming up").into_response();
        }
        answer("Plants turn light into sugar.")
    } else if instruction.contains("quiz") {
        (http::StatusCode::BAD_REQUEST, "unsupported").into_response()
    } else {
        tokio::time::sleep(Duration::from_secs(2)).await;
        answer(r#"{"terms": []}"#)
    }
}

#[tokio::test]
async fn the_openai_compatible_generator_retries_what_may_pass_and_fails_what_cannot() {
    let model = FakeModel::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let model_addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(fake_completion))
        .with_state(model.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let base_url = format!("http://{model_addr}/v1");
    let stack = JobsStack::start(&[
        ("GENERATOR", "openai"),
        ("OPENAI_BASE_URL", &base_url),
        ("OPENAI_MODEL", "test-model"),
        ("OPENAI_API_KEY", "sk-test"),
        ("OPENAI_TIMEOUT", "300ms"),
        ("OPENAI_RETRIES", "1"),
        ("JOB_MAX_ATTEMPTS", "2"),
        ("JOB_RETRY_BASE_DELAY", "100ms"),
    ])
    .await;
    let addr = stack.addr();
    let user = sign_up(addr).await;
    let note = create_note(addr, &user).await;
    let start = |kind: &'static str| {
        let (user, note) = (&user, &note);
        async move {
            let reply = generate(addr, user, note, &json!({"kind": kind})).await;
            assert_eq!(reply.status, 202, "{}", reply.text());
            reply.json()["job_id"].as_str().expect("id").to_owned()
        }
    };

    // A 503 is tried again within the attempt.
    let summary = start("summary").await;
    let (done, _) = follow(addr, &user, &summary).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["result"]["generator"], "openai:test-model");
    assert_eq!(done["result"]["summary"], "Plants turn light into sugar.");

    // A 400 fails for good, at once.
    let quiz = start("quiz").await;
    let (done, _) = follow(addr, &user, &quiz).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "GENERATOR_REJECTED");
    assert_eq!(done["attempt"], 1);

    // Timeouts: tried again in the attempt, then the job retries, then fails with the error.
    let terms = start("explanation").await;
    let (done, _) = follow(addr, &user, &terms).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "GENERATOR_TIMEOUT");
    assert_eq!(done["attempt"], 2);

    let requests = model.requests.lock().unwrap().clone();
    // summary 2, quiz 1, explanation 2 per attempt × 2.
    assert_eq!(requests.len(), 7, "{requests:?}");
    for (bearer, body) in &requests {
        assert_eq!(bearer.as_deref(), Some("Bearer sk-test"));
        assert_eq!(body["model"], "test-model");
        let note_text = body["messages"][1]["content"].as_str().unwrap_or_default();
        assert!(
            note_text.contains("Chlorophyll absorbs light"),
            "the note is sent"
        );
    }
    stack.stop().await;
    server.abort();
}
