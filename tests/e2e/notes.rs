//! Notes through the gateway, against real Postgres and Redis: CRUD with ETags, ownership,
//! chapters and topics, validation, filtered keyset lists, batches, the cache and the SQL
//! statements each read costs.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use e2e::{HttpResponse, Infra, Running, eventually, http_get, http_request};
use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection};

const PASSWORD: &str = "correct horse battery staple";

/// Auth, notes and the gateway (profile is not needed here), with the name of notes'
/// database for the statement counts.
struct NotesStack {
    auth: Running,
    notes: Running,
    gateway: Running,
    notes_database: String,
}

impl NotesStack {
    async fn start(notes_extra: &[(&str, &str)]) -> Self {
        let infra = Infra::from_env();
        let auth = e2e::start_service::<auth::Config>(&infra, &[]).await;
        let auth_url = auth.url();
        let mut extra = vec![("AUTH_URL", auth_url.as_str())];
        extra.extend_from_slice(notes_extra);
        let (config, notes) = e2e::start_service_with_config::<notes::Config>(&infra, &extra).await;
        let url = config.service.postgres.url.expose().to_owned();
        let notes_database = url.rsplit('/').next().unwrap_or_default().to_owned();
        let gateway =
            e2e::start_gateway(&[("AUTH_URL", &auth.url()), ("NOTES_URL", &notes.url())]).await;
        let stack = Self {
            auth,
            notes,
            gateway,
            notes_database,
        };
        // Serving once notes has migrated its database.
        let notes_url = stack.notes.url();
        eventually(Duration::from_secs(30), "notes SERVING", || {
            let url = notes_url.clone();
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
        stack
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.addr
    }

    async fn stop(self) {
        for mut running in [self.gateway, self.notes, self.auth] {
            running.signal_shutdown();
            tokio::time::timeout(Duration::from_secs(10), running.task)
                .await
                .expect("stops within its grace period")
                .expect("no panic")
                .expect("serve returned Ok");
        }
    }
}

/// A signed-in user: their id and access token.
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

fn header<'a>(response: &'a HttpResponse, name: &str) -> &'a str {
    response
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The problem's `(field, code)` pairs, after checking its status and code.
fn problem_fields(response: &HttpResponse, status: u16, code: &str) -> Vec<(String, String)> {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(header(response, "content-type"), "application/problem+json");
    let problem = response.json();
    assert_eq!(problem["code"], code, "{problem}");
    problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    (
                        e["field"].as_str().unwrap_or_default().to_owned(),
                        e["code"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(f, c)| ((*f).to_owned(), (*c).to_owned()))
        .collect()
}

async fn create_note(addr: SocketAddr, user: &User, body: &Value) -> Value {
    let response = send(addr, "POST", "/api/v1/notes", Some(user), Some(body), &[]).await;
    assert_eq!(response.status, 201, "{}", response.text());
    response.json()
}

/// Creates notes through the batch route, 100 at a time.
async fn create_many(addr: SocketAddr, user: &User, items: Vec<Value>) -> Vec<Value> {
    let mut created = Vec::with_capacity(items.len());
    for chunk in items.chunks(100) {
        let body = json!({"items": chunk});
        let response = send(
            addr,
            "POST",
            "/api/v1/notes/batch",
            Some(user),
            Some(&body),
            &[],
        )
        .await;
        assert_eq!(response.status, 201, "{}", response.text());
        created.extend(
            response.json()["items"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
    }
    created
}

fn id_of(value: &Value) -> String {
    value["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn notes_crud_with_etags_and_only_the_owner_sees_them() {
    let stack = NotesStack::start(&[]).await;
    let addr = stack.addr();
    let (ada, bob) = (sign_up(addr).await, sign_up(addr).await);

    // Create: 201 with Location and ETag; defaults applied.
    let body = json!({"title": "  Rust notes ", "body": "# Ownership\n\nBorrowing.", "tags": ["rust", "lang", "rust"]});
    let response = send(addr, "POST", "/api/v1/notes", Some(&ada), Some(&body), &[]).await;
    assert_eq!(response.status, 201, "{}", response.text());
    let note = response.json();
    let id = id_of(&note);
    assert_eq!(header(&response, "location"), format!("/api/v1/notes/{id}"));
    assert_eq!(
        header(&response, "etag"),
        format!("\"{}\"", note["etag"].as_str().unwrap())
    );
    assert_eq!(note["title"], "Rust notes");
    assert_eq!(note["status"], "draft");
    assert_eq!(note["tags"], json!(["rust", "lang"]));
    assert_eq!(note["owner_id"], ada.id.as_str());
    assert_eq!(note["chapters"], json!([]));

    // Read: the same note and ETag; If-None-Match with it answers 304 without a body.
    let path = format!("/api/v1/notes/{id}");
    let read = send(addr, "GET", &path, Some(&ada), None, &[]).await;
    assert_eq!(read.status, 200, "{}", read.text());
    let etag = header(&read, "etag").to_owned();
    assert_eq!(read.json()["body"], "# Ownership\n\nBorrowing.");
    let unchanged = send(
        addr,
        "GET",
        &path,
        Some(&ada),
        None,
        &[("if-none-match", &etag)],
    )
    .await;
    assert_eq!(unchanged.status, 304);
    assert!(unchanged.body.is_empty());

    // Another user: 404 for every route, never 403; nothing changes.
    for (method, body) in [
        ("GET", None),
        ("PATCH", Some(json!({"title": "mine now"}))),
        ("DELETE", None),
    ] {
        let response = send(addr, method, &path, Some(&bob), body.as_ref(), &[]).await;
        problem_fields(&response, 404, "NOTE_NOT_FOUND");
    }
    let chapter_path = format!("{path}/chapters");
    let response = send(
        addr,
        "POST",
        &chapter_path,
        Some(&bob),
        Some(&json!({"title": "x"})),
        &[],
    )
    .await;
    problem_fields(&response, 404, "NOTE_NOT_FOUND");
    let listed = send(addr, "GET", "/api/v1/notes", Some(&bob), None, &[]).await;
    assert_eq!(listed.json()["total"], 0);
    // Without a token: 401 at the edge.
    let response = send(addr, "GET", &path, None, None, &[]).await;
    problem_fields(&response, 401, "UNAUTHENTICATED");

    // Update with If-Match: new ETag; the old one now fails with 412.
    let patch = json!({"title": "Rust, edited", "status": "published"});
    let updated = send(
        addr,
        "PATCH",
        &path,
        Some(&ada),
        Some(&patch),
        &[("if-match", &etag)],
    )
    .await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let new_etag = header(&updated, "etag").to_owned();
    assert_ne!(new_etag, etag);
    assert_eq!(updated.json()["title"], "Rust, edited");
    assert_eq!(updated.json()["status"], "published");
    assert_eq!(
        updated.json()["tags"],
        json!(["rust", "lang"]),
        "untouched fields stay"
    );
    let stale = send(
        addr,
        "PATCH",
        &path,
        Some(&ada),
        Some(&json!({"title": "lost update"})),
        &[("if-match", &etag)],
    )
    .await;
    problem_fields(&stale, 412, "ETAG_MISMATCH");
    let stale = send(
        addr,
        "DELETE",
        &path,
        Some(&ada),
        None,
        &[("if-match", &etag)],
    )
    .await;
    problem_fields(&stale, 412, "ETAG_MISMATCH");
    let read = send(addr, "GET", &path, Some(&ada), None, &[]).await;
    assert_eq!(
        read.json()["title"],
        "Rust, edited",
        "the stale write changed nothing"
    );

    // Chapters: appended, inserted at a position, reordered; every write moves the ETag.
    let mut chapter_ids = Vec::new();
    for (title, position) in [("Borrowing", None), ("Lifetimes", None), ("Intro", Some(0))] {
        let body = match position {
            Some(p) => json!({"title": title, "position": p}),
            None => json!({"title": title, "body": format!("About {title}")}),
        };
        let response = send(addr, "POST", &chapter_path, Some(&ada), Some(&body), &[]).await;
        assert_eq!(response.status, 201, "{}", response.text());
        let chapter = response.json();
        assert_eq!(
            header(&response, "etag"),
            format!("\"{}\"", chapter["note_etag"].as_str().unwrap())
        );
        chapter_ids.push(id_of(&chapter));
    }
    let detail = send(addr, "GET", &path, Some(&ada), None, &[]).await.json();
    let titles: Vec<&str> = detail["chapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Intro", "Borrowing", "Lifetimes"]);
    let positions: Vec<i64> = detail["chapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, [0, 1, 2]);

    // A chapter write with a stale ETag: 412, nothing added.
    let stale = send(
        addr,
        "POST",
        &chapter_path,
        Some(&ada),
        Some(&json!({"title": "late"})),
        &[("if-match", &new_etag)],
    )
    .await;
    problem_fields(&stale, 412, "ETAG_MISMATCH");

    // Topics within the Borrowing chapter.
    let borrowing = &chapter_ids[0];
    let topics_path = format!("{chapter_path}/{borrowing}/topics");
    let mut topic_ids = Vec::new();
    for title in ["Shared", "Mutable"] {
        let response = send(
            addr,
            "POST",
            &topics_path,
            Some(&ada),
            Some(&json!({"title": title, "body": "…"})),
            &[],
        )
        .await;
        assert_eq!(response.status, 201, "{}", response.text());
        topic_ids.push(id_of(&response.json()));
    }
    let reorder = json!({"topic_ids": [topic_ids[1], topic_ids[0]]});
    let response = send(
        addr,
        "POST",
        &format!("{topics_path}/reorder"),
        Some(&ada),
        Some(&reorder),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let response = send(
        addr,
        "PATCH",
        &format!("{topics_path}/{}", topic_ids[0]),
        Some(&ada),
        Some(&json!({"body": "& references"})),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["position"], 1);

    // Reorder chapters: the order must name each chapter once.
    let [intro, lifetimes] = [&chapter_ids[2], &chapter_ids[1]];
    let wrong = json!({"chapter_ids": [intro, borrowing]});
    let response = send(
        addr,
        "POST",
        &format!("{chapter_path}/reorder"),
        Some(&ada),
        Some(&wrong),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("chapter_ids", "NOT_A_PERMUTATION")])
    );
    let order = json!({"chapter_ids": [lifetimes, intro, borrowing]});
    let response = send(
        addr,
        "POST",
        &format!("{chapter_path}/reorder"),
        Some(&ada),
        Some(&order),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());

    let response = send(
        addr,
        "PATCH",
        &format!("{chapter_path}/{intro}"),
        Some(&ada),
        Some(&json!({"title": "Introduction"})),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let response = send(
        addr,
        "DELETE",
        &format!("{chapter_path}/{lifetimes}"),
        Some(&ada),
        None,
        &[],
    )
    .await;
    assert_eq!(response.status, 204, "{}", response.text());

    let detail = send(addr, "GET", &path, Some(&ada), None, &[]).await;
    let detail_etag = header(&detail, "etag").to_owned();
    let detail = detail.json();
    assert_eq!(
        format!("\"{}\"", detail["etag"].as_str().unwrap()),
        detail_etag
    );
    let chapters = detail["chapters"].as_array().unwrap();
    let shown: Vec<(&str, i64)> = chapters
        .iter()
        .map(|c| {
            (
                c["title"].as_str().unwrap(),
                c["position"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [("Introduction", 0), ("Borrowing", 1)],
        "later chapters moved up"
    );
    let topics: Vec<(&str, &str)> = chapters[1]["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["title"].as_str().unwrap(), t["body"].as_str().unwrap()))
        .collect();
    assert_eq!(topics, [("Mutable", "…"), ("Shared", "& references")]);

    // A topic of another chapter, or a chapter of another note: 404.
    let response = send(
        addr,
        "DELETE",
        &format!("{chapter_path}/{intro}/topics/{}", topic_ids[0]),
        Some(&ada),
        None,
        &[],
    )
    .await;
    problem_fields(&response, 404, "TOPIC_NOT_FOUND");
    let other = create_note(addr, &ada, &json!({"title": "Other"})).await;
    let response = send(
        addr,
        "PATCH",
        &format!("/api/v1/notes/{}/chapters/{intro}", id_of(&other)),
        Some(&ada),
        Some(&json!({"title": "x"})),
        &[],
    )
    .await;
    problem_fields(&response, 404, "CHAPTER_NOT_FOUND");

    // Delete with the current ETag: 204; the note, its chapters and topics are gone.
    let response = send(
        addr,
        "DELETE",
        &path,
        Some(&ada),
        None,
        &[("if-match", &detail_etag)],
    )
    .await;
    assert_eq!(response.status, 204, "{}", response.text());
    let response = send(addr, "GET", &path, Some(&ada), None, &[]).await;
    problem_fields(&response, 404, "NOTE_NOT_FOUND");
    let response = send(
        addr,
        "GET",
        "/api/v1/notes/not-a-uuid",
        Some(&ada),
        None,
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("note_id", "INVALID_ID")])
    );
    stack.stop().await;
}

#[tokio::test]
async fn validation_errors_name_the_fields_and_nothing_is_half_written() {
    let stack = NotesStack::start(&[]).await;
    let addr = stack.addr();
    let ada = sign_up(addr).await;

    let mut tags: Vec<String> = (0..21).map(|i| format!("t{i}")).collect();
    tags[3] = "x".repeat(41);
    let body =
        json!({"title": " ", "body": "x".repeat(1024 * 1024 + 1), "status": "draft", "tags": tags});
    let response = send(addr, "POST", "/api/v1/notes", Some(&ada), Some(&body), &[]).await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[
            ("title", "REQUIRED"),
            ("body", "TOO_LONG"),
            ("tags[3]", "TOO_LONG")
        ])
    );
    let many: Vec<String> = (0..21).map(|i| format!("t{i}")).collect();
    let response = send(
        addr,
        "POST",
        "/api/v1/notes",
        Some(&ada),
        Some(&json!({"title": "t", "tags": many})),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("tags", "TOO_MANY")])
    );
    let response = send(
        addr,
        "POST",
        "/api/v1/notes",
        Some(&ada),
        Some(&json!({"title": "t", "colour": "red"})),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("colour", "UNKNOWN_FIELD")])
    );
    let response = send(
        addr,
        "POST",
        "/api/v1/notes",
        Some(&ada),
        Some(&json!({"title": "t", "status": "secret"})),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("status", "INVALID_VALUE")])
    );

    // Past the notes routes' body limit (3 MiB): 413 before any parsing.
    let huge = json!({"title": "t", "body": "x".repeat(3 * 1024 * 1024)});
    let response = send(addr, "POST", "/api/v1/notes", Some(&ada), Some(&huge), &[]).await;
    problem_fields(&response, 413, "PAYLOAD_TOO_LARGE");

    // A note body of exactly 1 MiB is accepted on a route that allows more than 1 MiB.
    let full = json!({"title": "full", "body": "\n".repeat(1024 * 1024)});
    let note = create_note(addr, &ada, &full).await;
    let path = format!("/api/v1/notes/{}", id_of(&note));

    // A PATCH must change something, and names bad fields by their body names.
    let response = send(addr, "PATCH", &path, Some(&ada), Some(&json!({})), &[]).await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("", "REQUIRED")])
    );
    let response = send(
        addr,
        "PATCH",
        &path,
        Some(&ada),
        Some(&json!({"title": "a\u{7}b", "tags": [""]})),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("title", "INVALID_CHARACTERS"), ("tags[0]", "REQUIRED")])
    );

    // A batch with bad items: each named by its index; none of the batch is written.
    let mut items: Vec<Value> = (0..5).map(|i| json!({"title": format!("n{i}")})).collect();
    items[2] = json!({"title": ""});
    items[4] = json!({"title": "ok", "tags": ["a", "b".repeat(50)]});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch",
        Some(&ada),
        Some(&json!({"items": items})),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[
            ("items[2].title", "REQUIRED"),
            ("items[4].tags[1]", "TOO_LONG")
        ])
    );
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch",
        Some(&ada),
        Some(&json!({"items": [{"title": "a", "x": 1}]})),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("items[0].x", "UNKNOWN_FIELD")])
    );
    let listed = send(addr, "GET", "/api/v1/notes", Some(&ada), None, &[])
        .await
        .json();
    assert_eq!(listed["total"], 1, "only the 1 MiB note exists: {listed}");

    let response = send(
        addr,
        "GET",
        "/api/v1/notes?limit=0&sort=new&status=gone",
        Some(&ada),
        None,
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[
            ("limit", "INVALID_VALUE"),
            ("sort", "UNKNOWN_FIELD"),
            ("status", "INVALID_VALUE")
        ])
    );
    let response = send(
        addr,
        "GET",
        &format!("/api/v1/notes?q={}", "a".repeat(201)),
        Some(&ada),
        None,
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("q", "TOO_LONG")])
    );
    stack.stop().await;
}

/// The n-th note of the 1,000: statuses, tags and words vary with n, so every filter
/// combination has a known answer.
fn seeded(n: usize) -> Value {
    let status = ["draft", "published", "archived"][n % 3];
    let mut tags = vec![format!("batch{}", n / 100)];
    if n.is_multiple_of(2) {
        tags.push("even".to_owned());
    }
    if n.is_multiple_of(5) {
        tags.push("five".to_owned());
    }
    let word = if n.is_multiple_of(7) {
        "kangaroo"
    } else {
        "wombat"
    };
    json!({"title": format!("Note {n}"), "body": format!("About the {word} number {n}."), "status": status, "tags": tags})
}

/// Every page of a list, following `next_cursor`: (ids in order, totals seen).
async fn all_pages(
    addr: SocketAddr,
    user: &User,
    query: &str,
    limit: usize,
) -> (Vec<String>, Vec<i64>) {
    let (mut ids, mut totals) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/notes?limit={limit}{query}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let response = send(addr, "GET", &path, Some(user), None, &[]).await;
        assert_eq!(response.status, 200, "{}", response.text());
        let page = response.json();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        ids.extend(items.iter().map(id_of));
        totals.push(page["total"].as_i64().unwrap());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (ids, totals),
        }
        assert!(totals.len() <= 1000, "paging does not end");
    }
}

#[tokio::test]
async fn filters_and_keyset_paging_over_a_thousand_notes_return_each_once() {
    let stack = NotesStack::start(&[]).await;
    let addr = stack.addr();
    let (ada, bob) = (sign_up(addr).await, sign_up(addr).await);
    let created = create_many(addr, &ada, (0..1000).map(seeded).collect()).await;
    assert_eq!(created.len(), 1000);
    create_note(
        addr,
        &bob,
        &json!({"title": "Bob's wombat", "tags": ["even"]}),
    )
    .await;
    // Newest first: the last batch's last note leads; batches share a creation time, so ids
    // (time-ordered) break ties.
    let expected: Vec<String> = created.iter().rev().map(id_of).collect();

    let (ids, totals) = all_pages(addr, &ada, "", 37).await;
    assert_eq!(ids.len(), 1000);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        1000,
        "each note once"
    );
    assert_eq!(ids, expected, "newest first, by (created_at, id)");
    assert!(totals.iter().all(|t| *t == 1000), "total on every page");

    // Paging stays stable when notes are added and edited mid-way.
    let first = send(
        addr,
        "GET",
        "/api/v1/notes?limit=100",
        Some(&ada),
        None,
        &[],
    )
    .await
    .json();
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    create_note(addr, &ada, &json!({"title": "newcomer"})).await;
    let edited = id_of(&first["items"][99]);
    let response = send(
        addr,
        "PATCH",
        &format!("/api/v1/notes/{edited}"),
        Some(&ada),
        Some(&json!({"title": "edited"})),
        &[],
    )
    .await;
    assert_eq!(response.status, 200);
    let second = send(
        addr,
        "GET",
        &format!("/api/v1/notes?limit=100&cursor={cursor}"),
        Some(&ada),
        None,
        &[],
    )
    .await
    .json();
    let second_ids: Vec<String> = second["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(second_ids, expected[100..200], "the next page is unchanged");
    assert_eq!(second["total"], 1001);

    // Filters: each combination gives exactly the notes that match, paged.
    let matching = |keep: &dyn Fn(usize) -> bool| -> HashSet<String> {
        (0..1000)
            .filter(|n| keep(*n))
            .map(|n| id_of(&created[n]))
            .collect()
    };
    let cases: Vec<(&str, HashSet<String>)> = vec![
        ("&status=published", matching(&|n| n % 3 == 1)),
        ("&tag=five", matching(&|n| n % 5 == 0)),
        ("&tag=even&tag=five", matching(&|n| n % 10 == 0)),
        ("&tag=five&tag=even", matching(&|n| n % 10 == 0)),
        ("&q=kangaroo", matching(&|n| n % 7 == 0)),
        ("&q=kangaroos", matching(&|n| n % 7 == 0)),
        (
            "&status=archived&tag=even",
            matching(&|n| n % 3 == 2 && n % 2 == 0),
        ),
        (
            "&status=draft&q=wombat",
            matching(&|n| n % 3 == 0 && n % 7 != 0),
        ),
        (
            "&tag=batch3&q=kangaroo",
            matching(&|n| n / 100 == 3 && n % 7 == 0),
        ),
        (
            "&status=published&tag=even&q=kangaroo",
            matching(&|n| n % 3 == 1 && n % 2 == 0 && n % 7 == 0),
        ),
        ("&tag=nothing", HashSet::new()),
    ];
    for (query, want) in cases {
        let (ids, totals) = all_pages(addr, &ada, query, 50).await;
        let got: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(got.len(), ids.len(), "{query}: each note once");
        assert_eq!(got, want, "{query}");
        let want_total = i64::try_from(want.len()).unwrap();
        assert!(
            totals.iter().all(|t| *t == want_total),
            "{query}: totals {totals:?}"
        );
    }

    // A cursor belongs to its filters.
    let page = send(
        addr,
        "GET",
        "/api/v1/notes?limit=10&tag=even",
        Some(&ada),
        None,
        &[],
    )
    .await
    .json();
    let cursor = page["next_cursor"].as_str().unwrap();
    let response = send(
        addr,
        "GET",
        &format!("/api/v1/notes?limit=10&tag=five&cursor={cursor}"),
        Some(&ada),
        None,
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("cursor", "INVALID_PAGE_TOKEN")])
    );
    let response = send(
        addr,
        "GET",
        "/api/v1/notes?cursor=garbage",
        Some(&ada),
        None,
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("cursor", "INVALID_PAGE_TOKEN")])
    );
    stack.stop().await;
}

#[tokio::test]
async fn batches_are_all_or_nothing() {
    let stack = NotesStack::start(&[]).await;
    let addr = stack.addr();
    let (ada, bob) = (sign_up(addr).await, sign_up(addr).await);

    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"title": format!("n{i}")}))
        .collect();
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch",
        Some(&ada),
        Some(&json!({"items": too_many})),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("items", "TOO_MANY")])
    );

    let notes = create_many(
        addr,
        &ada,
        (0..5)
            .map(|i| json!({"title": format!("n{i}"), "tags": ["keep"]}))
            .collect(),
    )
    .await;
    let ids: Vec<String> = notes.iter().map(id_of).collect();
    let bobs = id_of(&create_note(addr, &bob, &json!({"title": "bob's"})).await);

    // One id that is not Ada's: 404 naming it, and no note changes.
    let mut with_foreign = ids.clone();
    with_foreign.insert(3, bobs.clone());
    let body = json!({"note_ids": with_foreign, "status": "archived"});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch-update",
        Some(&ada),
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 404, "NOTE_NOT_FOUND"),
        pairs(&[("note_ids[3]", "NOT_FOUND")])
    );
    let archived = send(
        addr,
        "GET",
        "/api/v1/notes?status=archived",
        Some(&ada),
        None,
        &[],
    )
    .await
    .json();
    assert_eq!(archived["total"], 0);

    // Tags past the limit on one note refuse the batch, naming that note.
    let crowded = send(
        addr,
        "PATCH",
        &format!("/api/v1/notes/{}", ids[1]),
        Some(&ada),
        Some(&json!({"tags": (0..20).map(|i| format!("t{i}")).collect::<Vec<_>>()})),
        &[],
    )
    .await;
    assert_eq!(crowded.status, 200, "{}", crowded.text());
    let body = json!({"note_ids": ids, "add_tags": ["new"]});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch-update",
        Some(&ada),
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("note_ids[1]", "TOO_MANY_TAGS")])
    );
    let tagged = send(addr, "GET", "/api/v1/notes?tag=new", Some(&ada), None, &[])
        .await
        .json();
    assert_eq!(tagged["total"], 0);
    let body = json!({"note_ids": ids, "set_tags": ["a"], "add_tags": ["b"]});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch-update",
        Some(&ada),
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 400, "VALIDATION_FAILED"),
        pairs(&[("set_tags", "CONFLICT")])
    );

    // A valid batch: every note changes, in request order, with new ETags.
    let chosen = [ids[4].clone(), ids[0].clone(), ids[2].clone()];
    let body = json!({"note_ids": chosen, "status": "published", "add_tags": ["new", "keep"], "remove_tags": ["gone"]});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch-update",
        Some(&ada),
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let items = response.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.iter().map(id_of).collect::<Vec<_>>(), chosen);
    for (item, before) in items.iter().zip([&notes[4], &notes[0], &notes[2]]) {
        assert_eq!(item["status"], "published");
        assert_eq!(item["tags"], json!(["keep", "new"]));
        assert_ne!(item["etag"], before["etag"]);
    }

    // Delete: a missing id fails the batch unless allowed.
    let body = json!({"note_ids": [ids[0], bobs]});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch-delete",
        Some(&ada),
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(
        problem_fields(&response, 404, "NOTE_NOT_FOUND"),
        pairs(&[("note_ids[1]", "NOT_FOUND")])
    );
    assert_eq!(
        send(addr, "GET", "/api/v1/notes", Some(&ada), None, &[])
            .await
            .json()["total"],
        5
    );
    let body = json!({"note_ids": [ids[0], ids[1], bobs], "allow_missing": true});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch-delete",
        Some(&ada),
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["deleted_count"], 2);
    assert_eq!(
        send(addr, "GET", "/api/v1/notes", Some(&ada), None, &[])
            .await
            .json()["total"],
        3
    );
    let bob_sees = send(
        addr,
        "GET",
        &format!("/api/v1/notes/{bobs}"),
        Some(&bob),
        None,
        &[],
    )
    .await;
    assert_eq!(bob_sees.status, 200, "another user's note is untouched");
    stack.stop().await;
}

/// Statements notes' database has executed, from `pg_stat_statements` (the private Postgres
/// of `./dev` loads it), leaving out the health check's ping.
async fn statements_run(admin: &mut PgConnection, database: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "select coalesce(sum(s.calls), 0)::int8
         from pg_stat_statements s join pg_database d on d.oid = s.dbid
         where d.datname = $1 and s.query <> 'select $1'",
    )
    .bind(database)
    .fetch_one(admin)
    .await
    .expect("pg_stat_statements is loaded (./dev configures it; restart an older cluster)")
}

/// How many statements `request` cost in notes' database. Retried when the statistics lost
/// entries meanwhile (pg_stat_statements evicts the least used past its capacity).
async fn statements_for<F, Fut>(admin: &mut PgConnection, database: &str, request: F) -> i64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..3 {
        let evictions = || "select dealloc from pg_stat_statements_info";
        let before_evictions: i64 = sqlx::query_scalar(evictions())
            .fetch_one(&mut *admin)
            .await
            .unwrap();
        let before = statements_run(admin, database).await;
        request().await;
        let after = statements_run(admin, database).await;
        let after_evictions: i64 = sqlx::query_scalar(evictions())
            .fetch_one(&mut *admin)
            .await
            .unwrap();
        if before_evictions == after_evictions {
            return after - before;
        }
    }
    panic!("pg_stat_statements kept evicting entries; raise pg_stat_statements.max");
}

#[tokio::test]
async fn reads_cost_at_most_two_statements_on_a_miss_none_on_a_hit_and_writes_invalidate() {
    // No generation workers: their queue polling would count as statements too.
    let stack = NotesStack::start(&[("JOB_WORKERS", "0")]).await;
    let addr = stack.addr();
    let ada = sign_up(addr).await;
    let infra = Infra::from_env();
    let mut admin = PgConnection::connect(&infra.database_url).await.unwrap();
    let database = stack.notes_database.clone();

    let note = create_note(addr, &ada, &json!({"title": "Cached", "tags": ["c"]})).await;
    let id = id_of(&note);
    let path = format!("/api/v1/notes/{id}");
    for title in ["One", "Two"] {
        let response = send(
            addr,
            "POST",
            &format!("{path}/chapters"),
            Some(&ada),
            Some(&json!({"title": title})),
            &[],
        )
        .await;
        let chapter = id_of(&response.json());
        for topic in ["a", "b"] {
            let response = send(
                addr,
                "POST",
                &format!("{path}/chapters/{chapter}/topics"),
                Some(&ada),
                Some(&json!({"title": topic})),
                &[],
            )
            .await;
            assert_eq!(response.status, 201);
        }
    }
    create_many(
        addr,
        &ada,
        (0..30)
            .map(|i| json!({"title": format!("filler {i}"), "tags": ["c"]}))
            .collect(),
    )
    .await;

    let get = || async {
        let response = send(addr, "GET", &path, Some(&ada), None, &[]).await;
        assert_eq!(response.status, 200, "{}", response.text());
    };
    let list = || async {
        let response = send(
            addr,
            "GET",
            "/api/v1/notes?tag=c&limit=10",
            Some(&ada),
            None,
            &[],
        )
        .await;
        assert_eq!(response.status, 200, "{}", response.text());
    };
    let detail_miss = statements_for(&mut admin, &database, get).await;
    assert!(
        (1..=2).contains(&detail_miss),
        "detail miss: {detail_miss} statements"
    );
    assert_eq!(
        statements_for(&mut admin, &database, get).await,
        0,
        "detail hit"
    );
    assert_eq!(
        statements_for(&mut admin, &database, list).await,
        1,
        "list miss"
    );
    assert_eq!(
        statements_for(&mut admin, &database, list).await,
        0,
        "list hit"
    );
    // Another page and other filters are other entries.
    let page_two = || async {
        let first = send(
            addr,
            "GET",
            "/api/v1/notes?tag=c&limit=10",
            Some(&ada),
            None,
            &[],
        )
        .await
        .json();
        let cursor = first["next_cursor"].as_str().unwrap().to_owned();
        let response = send(
            addr,
            "GET",
            &format!("/api/v1/notes?tag=c&limit=10&cursor={cursor}"),
            Some(&ada),
            None,
            &[],
        )
        .await;
        assert_eq!(response.status, 200);
    };
    assert_eq!(
        statements_for(&mut admin, &database, page_two).await,
        1,
        "first page hit, second missed"
    );

    // A write: the next reads see it (the user's version moved), then are cached again.
    let response = send(
        addr,
        "PATCH",
        &path,
        Some(&ada),
        Some(&json!({"title": "Renamed"})),
        &[],
    )
    .await;
    assert_eq!(response.status, 200);
    let detail = send(addr, "GET", &path, Some(&ada), None, &[]).await.json();
    assert_eq!(detail["title"], "Renamed");
    assert_eq!(detail["chapters"][1]["topics"][1]["title"], "b");
    let listed = send(
        addr,
        "GET",
        "/api/v1/notes?tag=c&limit=100",
        Some(&ada),
        None,
        &[],
    )
    .await
    .json();
    assert!(
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["title"] == "Renamed"),
        "{listed}"
    );
    assert_eq!(
        statements_for(&mut admin, &database, get).await,
        0,
        "cached again"
    );

    // Chapter and batch writes invalidate too.
    let chapter = detail["chapters"][0]["id"].as_str().unwrap().to_owned();
    let response = send(
        addr,
        "DELETE",
        &format!("{path}/chapters/{chapter}"),
        Some(&ada),
        None,
        &[],
    )
    .await;
    assert_eq!(response.status, 204);
    let detail = send(addr, "GET", &path, Some(&ada), None, &[]).await.json();
    assert_eq!(detail["chapters"].as_array().unwrap().len(), 1);
    let body = json!({"note_ids": [id], "status": "archived"});
    let response = send(
        addr,
        "POST",
        "/api/v1/notes/batch-update",
        Some(&ada),
        Some(&body),
        &[],
    )
    .await;
    assert_eq!(response.status, 200);
    let archived = send(
        addr,
        "GET",
        "/api/v1/notes?status=archived",
        Some(&ada),
        None,
        &[],
    )
    .await
    .json();
    assert_eq!(archived["total"], 1);
    assert_eq!(
        send(addr, "GET", &path, Some(&ada), None, &[]).await.json()["status"],
        "archived"
    );
    let response = send(addr, "DELETE", &path, Some(&ada), None, &[]).await;
    assert_eq!(response.status, 204);
    let response = send(addr, "GET", &path, Some(&ada), None, &[]).await;
    problem_fields(&response, 404, "NOTE_NOT_FOUND");
    stack.stop().await;
}

#[tokio::test]
async fn with_redis_down_notes_are_served_from_postgres() {
    // A Redis that refuses connections: every cache call fails at once.
    let stack = NotesStack::start(&[("REDIS_URL", "redis://127.0.0.1:1/0")]).await;
    let addr = stack.addr();
    let ada = sign_up(addr).await;
    let note = create_note(addr, &ada, &json!({"title": "No cache"})).await;
    let path = format!("/api/v1/notes/{}", id_of(&note));
    let response = send(
        addr,
        "PATCH",
        &path,
        Some(&ada),
        Some(&json!({"title": "Still no cache"})),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    for _ in 0..3 {
        let detail = send(addr, "GET", &path, Some(&ada), None, &[]).await;
        assert_eq!(detail.status, 200, "{}", detail.text());
        assert_eq!(detail.json()["title"], "Still no cache");
        let listed = send(addr, "GET", "/api/v1/notes", Some(&ada), None, &[])
            .await
            .json();
        assert_eq!(listed["total"], 1);
    }
    let metrics = http_get(stack.notes.addr, "/metrics").await.text();
    assert!(
        e2e::prometheus_value(
            &metrics,
            r#"notes_cache_lookups_total{cache="detail",result="bypass"}"#
        ) >= 3.0,
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_chapter_writes_keep_positions_dense() {
    let stack = NotesStack::start(&[]).await;
    let addr = stack.addr();
    let ada = sign_up(addr).await;
    let note = create_note(addr, &ada, &json!({"title": "Busy"})).await;
    let path = format!("/api/v1/notes/{}/chapters", id_of(&note));
    let ada = &ada;
    let path = &path;
    // Twelve writers at once, half inserting at the front: each write locks the note, so
    // positions never collide nor leave gaps.
    let created = futures::future::join_all((0..12).map(|i| async move {
        let body = if i % 2 == 0 {
            json!({"title": format!("c{i}"), "position": 0})
        } else {
            json!({"title": format!("c{i}")})
        };
        send(addr, "POST", path, Some(ada), Some(&body), &[]).await
    }))
    .await;
    assert!(
        created.iter().all(|r| r.status == 201),
        "{:?}",
        created.iter().map(|r| r.text()).collect::<Vec<_>>()
    );
    let etags: HashSet<&str> = created.iter().map(|r| header(r, "etag")).collect();
    assert_eq!(etags.len(), 12, "every write got its own note version");
    let detail = send(
        addr,
        "GET",
        &format!("/api/v1/notes/{}", id_of(&note)),
        Some(ada),
        None,
        &[],
    )
    .await
    .json();
    let positions: Vec<i64> = detail["chapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, (0..12).collect::<Vec<i64>>());
    stack.stop().await;
}

#[tokio::test]
async fn every_rpc_needs_a_user_token() {
    use proto::{
        auth::v1::{IssueServiceTokenRequest, auth_service_client::AuthServiceClient},
        notes::v1::{self as pb, notes_service_client::NotesServiceClient},
    };
    let stack = NotesStack::start(&[]).await;
    let mut notes = NotesServiceClient::new(stack.notes.channel().await);
    let status = notes
        .list_notes(pb::ListNotesRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let mut request = tonic::Request::new(pb::GetNoteRequest {
        note_id: uuid::Uuid::now_v7().to_string(),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer not-a-token".parse().unwrap());
    let status = notes.get_note(request).await.expect_err("junk token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A service token is a valid caller, but these RPCs act on a user's own notes.
    let token = AuthServiceClient::new(stack.auth.channel().await)
        .issue_service_token(IssueServiceTokenRequest {
            service_name: "gateway".to_owned(),
            client_secret: e2e::test_client_secret("gateway"),
            audience: String::new(),
        })
        .await
        .expect("service token")
        .into_inner()
        .access_token;
    let mut request = tonic::Request::new(pb::ListNotesRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let status = notes.list_notes(request).await.expect_err("service token");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    stack.stop().await;
}

#[tokio::test]
async fn a_write_through_one_replica_invalidates_what_the_other_cached() {
    let infra = Infra::from_env();
    let auth = e2e::start_service::<auth::Config>(&infra, &[]).await;
    let auth_url = auth.url();
    // Two notes replicas: one database, one Redis key prefix, as in a deployment.
    let database = infra.create_database("notes").await;
    let prefix = format!("e2e:{}:notes:", uuid::Uuid::now_v7().simple());
    let shared = [
        ("AUTH_URL", auth_url.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        // No generation workers: their queue polling would count as statements too.
        ("JOB_WORKERS", "0"),
    ];
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let config: notes::Config =
            e2e::service_config(e2e::service_vars(&infra, "NOTES", &database, &shared));
        replicas.push(
            Running::start(move |listener, shutdown| {
                use platform::service::GrpcService as _;
                config.serve(listener, shutdown)
            })
            .await,
        );
    }
    let mut gateways = Vec::new();
    for replica in &replicas {
        gateways.push(
            e2e::start_gateway(&[("AUTH_URL", &auth_url), ("NOTES_URL", &replica.url())]).await,
        );
    }
    let (one, two) = (gateways[0].addr, gateways[1].addr);
    let ada = sign_up(one).await;
    let note = eventually(Duration::from_secs(30), "notes migrated", || async {
        let body = json!({"title": "Shared", "tags": ["s"]});
        let response = send(one, "POST", "/api/v1/notes", Some(&ada), Some(&body), &[]).await;
        (response.status == 201).then(|| response.json())
    })
    .await;
    let path = format!("/api/v1/notes/{}", id_of(&note));

    // Replica two caches the detail and the list: its second reads cost no statement.
    let mut admin = PgConnection::connect(&infra.database_url).await.unwrap();
    let read_both = || async {
        let detail = send(two, "GET", &path, Some(&ada), None, &[]).await.json();
        assert_eq!(detail["title"], "Shared");
        let listed = send(two, "GET", "/api/v1/notes?tag=s", Some(&ada), None, &[])
            .await
            .json();
        assert_eq!(listed["items"][0]["title"], "Shared");
    };
    assert_eq!(
        statements_for(&mut admin, &database, read_both).await,
        2,
        "misses"
    );
    assert_eq!(
        statements_for(&mut admin, &database, read_both).await,
        0,
        "hits"
    );
    // A write through replica one: replica two's next reads show it at once.
    let response = send(
        one,
        "PATCH",
        &path,
        Some(&ada),
        Some(&json!({"title": "Changed on one"})),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        send(two, "GET", &path, Some(&ada), None, &[]).await.json()["title"],
        "Changed on one"
    );
    assert_eq!(
        send(two, "GET", "/api/v1/notes?tag=s", Some(&ada), None, &[])
            .await
            .json()["items"][0]["title"],
        "Changed on one"
    );

    for mut running in gateways.into_iter().chain(replicas).chain([auth]) {
        running.signal_shutdown();
        tokio::time::timeout(Duration::from_secs(10), running.task)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("serve returned Ok");
    }
}

/// A TCP forwarder to the real Redis that a test can cut (open connections dropped, new
/// ones refused) and restore: Redis going away and coming back, as the service sees it.
struct CuttableProxy {
    addr: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(target: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepting = tokio::spawn({
            let (up, links) = (up.clone(), links.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let target = target.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().unwrap().push(link.abort_handle());
                }
            }
        });
        Self {
            addr,
            up,
            links,
            accepting,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

#[tokio::test]
async fn a_write_while_redis_is_away_is_not_hidden_by_the_cache_when_it_returns() {
    let infra = Infra::from_env();
    // redis://:password@host:port/db → the same through the proxy.
    let (head, rest) = infra.redis_url.rsplit_once('@').unwrap();
    let (target, db) = rest.split_once('/').unwrap();
    let proxy = CuttableProxy::start(target.to_owned()).await;
    let redis_url = format!("{head}@{}/{db}", proxy.addr);
    let stack = NotesStack::start(&[
        ("REDIS_URL", redis_url.as_str()),
        ("CACHE_BREAKER_COOLDOWN", "200ms"),
        ("JOB_WORKERS", "0"),
    ])
    .await;
    let addr = stack.addr();
    let ada = sign_up(addr).await;
    let mut admin = PgConnection::connect(&infra.database_url).await.unwrap();
    let database = stack.notes_database.clone();
    let note = create_note(addr, &ada, &json!({"title": "Before"})).await;
    let path = format!("/api/v1/notes/{}", id_of(&note));
    let title = || async {
        send(addr, "GET", &path, Some(&ada), None, &[]).await.json()["title"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(title().await, "Before");
    let cached = || async { assert_eq!(title().await, "Before") };
    assert_eq!(
        statements_for(&mut admin, &database, cached).await,
        0,
        "cached"
    );

    // Redis goes away: the write succeeds, reads come from Postgres.
    proxy.cut();
    let response = send(
        addr,
        "PATCH",
        &path,
        Some(&ada),
        Some(&json!({"title": "After"})),
        &[],
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(title().await, "After");

    // Redis is back: the stale entry (still in Redis under the old version) is never served,
    // and reads are cached again.
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(title().await, "After");
    eventually(Duration::from_secs(5), "reads cached again", || async {
        let hit = || async { assert_eq!(title().await, "After") };
        let mut admin = PgConnection::connect(&Infra::from_env().database_url)
            .await
            .unwrap();
        (statements_for(&mut admin, &database, hit).await == 0).then_some(())
    })
    .await;
    stack.stop().await;
}

#[tokio::test]
async fn a_retried_create_or_batch_with_an_idempotency_key_writes_once() {
    let stack = NotesStack::start(&[]).await;
    let addr = stack.addr();
    let ada = sign_up(addr).await;
    let body = json!({"title": "Sent twice over a flaky network"});
    let key = [("idempotency-key", "create-1")];
    let first = send(addr, "POST", "/api/v1/notes", Some(&ada), Some(&body), &key).await;
    assert_eq!(first.status, 201, "{}", first.text());
    let retry = send(addr, "POST", "/api/v1/notes", Some(&ada), Some(&body), &key).await;
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(
        retry.json()["id"],
        first.json()["id"],
        "the first answer, replayed"
    );
    assert_eq!(header(&retry, "etag"), header(&first, "etag"));

    let batch = json!({"items": [{"title": "a"}, {"title": "b"}]});
    let key = [("idempotency-key", "batch-1")];
    for _ in 0..2 {
        let response = send(
            addr,
            "POST",
            "/api/v1/notes/batch",
            Some(&ada),
            Some(&batch),
            &key,
        )
        .await;
        assert_eq!(response.status, 201, "{}", response.text());
    }
    let listed = send(addr, "GET", "/api/v1/notes", Some(&ada), None, &[])
        .await
        .json();
    assert_eq!(
        listed["total"], 3,
        "one note and one batch of two: {listed}"
    );
    stack.stop().await;
}
