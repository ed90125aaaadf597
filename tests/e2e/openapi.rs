//! `/openapi.json` and the router agree: every operation the document lists is served (no
//! ROUTE_NOT_FOUND, no 405), and what it says of answers holds for a few real ones. The
//! converse (every route served is documented) holds by construction: the router is built
//! from the same `routes!` registrations as the document.

use std::net::SocketAddr;

use e2e::{HttpResponse, Infra, Stack, http_get, http_request};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";
const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];

async fn signed_in(addr: SocketAddr) -> String {
    let email = format!("{}@example.com", uuid::Uuid::now_v7().simple());
    let json = [("content-type", "application/json")];
    let body = json!({"email": email, "password": PASSWORD, "display_name": "Ada"});
    let registered = http_request(
        addr,
        "POST",
        "/api/v1/auth/register",
        &json,
        body.to_string(),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", registered.text());
    let body = json!({"email": email, "password": PASSWORD});
    let login = http_request(addr, "POST", "/api/v1/auth/login", &json, body.to_string()).await;
    assert_eq!(login.status, 200, "{}", login.text());
    login.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// The answer came from no route: the router's own 404 or 405.
fn unrouted(response: &HttpResponse) -> bool {
    response.status == 405
        || (response.status == 404
            && serde_json::from_slice::<Value>(&response.body)
                .is_ok_and(|problem| problem["code"] == "ROUTE_NOT_FOUND"))
}

/// The status of a GET whose body never ends (an event stream): the head only.
async fn stream_status(addr: SocketAddr, path: &str, authorization: &str) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header("authorization", authorization)
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .expect("a valid request");
    let response =
        tokio::time::timeout(std::time::Duration::from_secs(10), client.request(request))
            .await
            .expect("a response head within 10s")
            .expect("HTTP request");
    // Dropping the response closes the stream.
    response.status().as_u16()
}

/// `$ref`s followed to what they name.
fn resolve<'a>(document: &'a Value, mut value: &'a Value) -> &'a Value {
    while let Some(reference) = value["$ref"].as_str() {
        let pointer = reference.strip_prefix('#').expect("a local reference");
        value = document.pointer(pointer).expect("the reference resolves");
    }
    value
}

/// The success schema of `method path` for `status`, resolved.
fn success_schema<'a>(document: &'a Value, path: &str, method: &str, status: &str) -> &'a Value {
    let operation = &document["paths"][path][method];
    let response = resolve(document, &operation["responses"][status]);
    resolve(document, &response["content"]["application/json"]["schema"])
}

/// Every member `schema` requires is in `body`.
fn assert_required_members(document: &Value, schema: &Value, body: &Value) {
    let required = schema["required"]
        .as_array()
        .expect("an object schema with required members");
    assert!(!required.is_empty());
    for member in required {
        let name = member.as_str().expect("a member name");
        assert!(body.get(name).is_some(), "{name} is missing from {body}");
    }
    let _ = document;
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_answers_as_documented() {
    let infra = Infra::from_env();
    let stack = Stack::start(&infra).await;
    let addr = stack.gateway.addr;
    let token = signed_in(addr).await;
    let bearer = format!("Bearer {token}");

    let served = http_get(addr, "/openapi.json").await;
    assert_eq!(served.status, 200);
    assert_eq!(served.headers["content-type"], "application/json");
    let document = served.json();
    assert_eq!(document["openapi"], "3.1.0");

    // Requests that end the caller's session go last, so the others still pass the edge.
    let mut operations: Vec<(String, String)> = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in METHODS.iter().filter(|m| item.get(**m).is_some()) {
            operations.push(((*method).to_owned(), path.clone()));
        }
    }
    operations.sort_by_key(|(_, path)| path.contains("logout"));
    assert!(operations.len() >= 50, "{} operations", operations.len());

    for (method, path) in &operations {
        // Each `{param}` gets an id that names nothing: the route still answers (404 from
        // the service, 403 for a non-admin, 400 for an empty body), never the router's 404.
        let concrete: String = path
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    uuid::Uuid::now_v7().to_string()
                } else {
                    segment.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        if concrete.ends_with("/stream") {
            // An event stream answers its head and then stays open: check the head only.
            let status = stream_status(addr, &concrete, &bearer).await;
            assert!(
                status != 404 && status != 405 && status < 500,
                "{method} {path}: {status}"
            );
            continue;
        }
        let with_body = matches!(method.as_str(), "post" | "put" | "patch");
        let mut headers = vec![("authorization", bearer.as_str())];
        if with_body {
            headers.push(("content-type", "application/json"));
        }
        let body = if with_body { "{}" } else { "" };
        let response = http_request(addr, &method.to_uppercase(), &concrete, &headers, body).await;
        assert!(
            !unrouted(&response),
            "{method} {path} is documented but not routed: {} {}",
            response.status,
            response.text()
        );
        assert!(
            response.status.as_u16() < 500,
            "{method} {path}: {} {}",
            response.status,
            response.text()
        );
    }

    // The probe tells routed from unrouted: an undocumented path and method are refused by
    // the router itself.
    let token = signed_in(addr).await;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    assert!(unrouted(
        &http_request(addr, "GET", "/api/v1/undocumented", &auth, "").await
    ));
    assert!(unrouted(
        &http_request(addr, "PUT", "/api/v1/notes", &auth, "").await
    ));

    // Real answers carry what the document says they must.
    let profile = http_request(addr, "GET", "/api/v1/auth/profile", &auth, "").await;
    assert_eq!(profile.status, 200, "{}", profile.text());
    let schema = success_schema(&document, "/api/v1/auth/profile", "get", "200");
    assert_required_members(&document, schema, &profile.json());

    let json = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let created = http_request(
        addr,
        "POST",
        "/api/v1/notes",
        &json,
        json!({"title": "Spec", "tags": ["a"]}).to_string(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let schema = success_schema(&document, "/api/v1/notes", "post", "201");
    assert_required_members(&document, schema, &created.json());

    let listed = http_request(addr, "GET", "/api/v1/notes", &auth, "").await;
    assert_eq!(listed.status, 200);
    let schema = success_schema(&document, "/api/v1/notes", "get", "200");
    assert_required_members(&document, schema, &listed.json());

    // Failures are the shared Problem.
    let missing = http_request(
        addr,
        "GET",
        &format!("/api/v1/notes/{}", uuid::Uuid::now_v7()),
        &auth,
        "",
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.headers["content-type"], "application/problem+json");
    let problem = resolve(&document, &document["components"]["schemas"]["Problem"]);
    assert_required_members(&document, problem, &missing.json());

    // The docs page is served from the gateway itself and reads the document.
    let page = http_get(addr, "/docs").await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .expect("text")
            .starts_with("text/html")
    );
    assert!(page.text().contains("fetch(\"/openapi.json\")"));

    stack.stop().await;
}
