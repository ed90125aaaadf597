//! The OpenAPI 3.1 document of the gateway, served at `GET /openapi.json`, and the page that
//! renders it at `GET /docs`.
//!
//! Each route is registered once, from its handler's `#[utoipa::path]`, through
//! `utoipa_axum::routes!` (see [`crate::routes`]): the router and the document are built from
//! the same list, so they cannot disagree. What every operation shares is added here: the
//! bearer scheme, and the problem+json answers (`default` on every operation, `401` on those
//! that need a token).

use std::sync::LazyLock;

use axum::{
    body::Bytes,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{
        ContentBuilder, InfoBuilder, OpenApi, Ref, RefOr, ResponseBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use crate::error::{ApiError, PROBLEM_JSON, Problem};

/// The name of the bearer security scheme; handlers for signed-in callers say
/// `security(("bearer" = []))`.
pub const BEARER: &str = "bearer";

/// The name of the shared problem+json response under `components.responses`.
const PROBLEM_RESPONSE: &str = "Problem";

/// The document: what the routes describe, completed with what every operation shares.
pub fn document() -> OpenApi {
    complete(crate::routes::documented().into_openapi())
}

fn complete(mut document: OpenApi) -> OpenApi {
    document.info = InfoBuilder::new()
        .title("svcset gateway")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The HTTP/JSON API of the service set. Every failure is an RFC 9457 problem \
             (`application/problem+json`) with a stable `code` (see docs/errors.md), \
             `request_id` and `trace_id`.",
        ))
        .build();

    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "An access token from `POST /api/v1/auth/login` or `/refresh`.",
                ))
                .build(),
        ),
    );
    components
        .schemas
        .insert(Problem::name().into_owned(), Problem::schema());
    let mut dependencies = Vec::new();
    Problem::schemas(&mut dependencies);
    components.schemas.extend(dependencies);
    components.responses.insert(
        PROBLEM_RESPONSE.to_owned(),
        RefOr::T(
            ResponseBuilder::new()
                .description("The failure, as RFC 9457 problem details")
                .content(
                    PROBLEM_JSON,
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name(Problem::name())))
                        .build(),
                )
                .build(),
        ),
    );

    for item in document.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ];
        for operation in operations.into_iter().flatten() {
            let problem = || RefOr::Ref(Ref::from_response_name(PROBLEM_RESPONSE));
            let responses = &mut operation.responses.responses;
            responses
                .entry("default".to_owned())
                .or_insert_with(problem);
            if operation
                .security
                .as_ref()
                .is_some_and(|requirements| !requirements.is_empty())
            {
                responses.entry("401".to_owned()).or_insert_with(problem);
            }
        }
    }
    document
}

/// The document as JSON, serialized once: it is the same for the life of the process.
static DOCUMENT_JSON: LazyLock<Result<Bytes, String>> = LazyLock::new(|| {
    serde_json::to_vec(&document())
        .map(Bytes::from)
        .map_err(|e| e.to_string())
});

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
pub(crate) async fn openapi_json() -> Result<Response, ApiError> {
    let json = DOCUMENT_JSON
        .as_ref()
        .map_err(|e| ApiError::internal(format!("cannot serialize the OpenAPI document: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json.clone(),
    )
        .into_response())
}

/// The docs page: a self-contained HTML page (no CDN, no third-party code) that fetches
/// `/openapi.json` and lists every operation with its parameters, body and answers.
const DOCS_PAGE: &str = include_str!("../assets/docs.html");

/// `GET /docs`.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "ops",
    responses((status = 200, description = "The API reference page", content_type = "text/html", body = String))
)]
pub(crate) async fn docs_page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            // The page runs only its own inline script and reads only this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                ),
            ),
        ],
        DOCS_PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::expect_used,
        clippy::unwrap_used,
        reason = "tests: fail loudly"
    )]

    use std::collections::HashSet;

    use serde_json::Value;

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];

    fn document() -> Value {
        serde_json::to_value(super::document()).expect("serializes")
    }

    fn operations(document: &Value) -> Vec<(String, &'static str, Value)> {
        let mut found = Vec::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for method in METHODS {
                if let Some(operation) = item.get(method) {
                    found.push((path.clone(), method, operation.clone()));
                }
            }
        }
        found
    }

    /// Every `$ref` anywhere in `value`.
    fn references<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(members) => {
                if let Some(Value::String(reference)) = members.get("$ref") {
                    found.push(reference);
                }
                members.values().for_each(|v| references(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| references(v, found)),
            _ => {}
        }
    }

    fn success_codes(operation: &Value) -> Vec<String> {
        operation["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .filter(|code| code.starts_with('2') || code.starts_with('3'))
            .cloned()
            .collect()
    }

    fn secured(operation: &Value) -> bool {
        operation["security"]
            .as_array()
            .is_some_and(|requirements| requirements.iter().any(|r| r.get("bearer").is_some()))
    }

    #[test]
    fn the_document_is_openapi_3_1_by_structure() {
        let document = document();
        assert_eq!(document["openapi"], "3.1.0");
        assert!(document["info"]["title"].is_string());
        assert!(document["info"]["version"].is_string());

        // Every reference resolves inside the document.
        let mut found = Vec::new();
        references(&document, &mut found);
        assert!(!found.is_empty());
        for reference in found {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            assert!(
                document.pointer(pointer).is_some(),
                "{reference} does not resolve"
            );
        }

        let mut operation_ids = HashSet::new();
        for (path, method, operation) in operations(&document) {
            assert!(path.starts_with('/'), "{path}");
            let id = operation["operationId"].as_str().expect("an operationId");
            assert!(operation_ids.insert(id.to_owned()), "{id} is not unique");
            // Each template parameter is declared as a required path parameter, and no
            // other path parameter is.
            let templated: HashSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            let declared: HashSet<&str> = operation["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .inspect(|p| assert_eq!(p["required"], true, "{method} {path}"))
                        .map(|p| p["name"].as_str().expect("a name"))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(templated, declared, "{method} {path}");
            // Every answer is described; there is a success and the shared problem.
            let responses = operation["responses"].as_object().expect("responses");
            assert!(
                !success_codes(&operation).is_empty(),
                "{method} {path} has no success response"
            );
            assert_eq!(
                responses["default"]["$ref"], "#/components/responses/Problem",
                "{method} {path}"
            );
            for (code, response) in responses {
                if response.get("$ref").is_none() {
                    assert!(
                        response["description"].is_string(),
                        "{method} {path} {code}"
                    );
                }
            }
            if secured(&operation) {
                assert_eq!(
                    responses["401"]["$ref"], "#/components/responses/Problem",
                    "{method} {path}"
                );
            }
        }
    }

    #[test]
    fn success_codes_and_security_are_those_of_the_routes() {
        let document = document();
        let operation = |method: &str, path: &str| document["paths"][path][method].clone();
        for (method, path, code) in [
            ("post", "/api/v1/auth/register", "201"),
            ("post", "/api/v1/auth/login", "200"),
            ("post", "/api/v1/auth/logout-all", "204"),
            ("post", "/api/v1/notes", "201"),
            ("post", "/api/v1/notes/batch", "201"),
            ("delete", "/api/v1/notes/{id}", "204"),
            ("post", "/api/v1/admin/cache/warm", "202"),
            ("put", "/api/v1/admin/users/{id}/roles/{role}", "204"),
            ("get", "/health", "200"),
        ] {
            assert_eq!(
                success_codes(&operation(method, path)),
                [code],
                "{method} {path}"
            );
        }
        assert_eq!(
            success_codes(&operation("get", "/api/v1/notes/{id}")),
            ["200", "304"]
        );

        for (method, path) in [
            ("get", "/api/v1/notes"),
            ("get", "/api/v1/auth/profile"),
            ("patch", "/api/v1/auth/profile"),
            ("get", "/api/v1/admin/roles"),
            ("get", "/admin/db-pool-status"),
        ] {
            assert!(secured(&operation(method, path)), "{method} {path}");
        }
        for (method, path) in [
            ("post", "/api/v1/auth/register"),
            ("post", "/api/v1/auth/login"),
            ("post", "/api/v1/auth/refresh"),
            ("get", "/.well-known/jwks.json"),
            ("get", "/health"),
            ("get", "/openapi.json"),
        ] {
            assert!(!secured(&operation(method, path)), "{method} {path}");
        }
        let scheme = &document["components"]["securitySchemes"][super::BEARER];
        assert_eq!(scheme["type"], "http");
        assert_eq!(scheme["scheme"], "bearer");

        let register = operation("post", "/api/v1/auth/register");
        assert_eq!(
            register["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/RegisterBody"
        );
    }

    #[test]
    fn the_problem_schema_has_the_documented_members() {
        let document = document();
        let problem = &document["components"]["schemas"]["Problem"];
        let required: HashSet<&str> = problem["required"]
            .as_array()
            .expect("required members")
            .iter()
            .map(|m| m.as_str().expect("a name"))
            .collect();
        for member in [
            "type",
            "title",
            "status",
            "detail",
            "code",
            "request_id",
            "trace_id",
        ] {
            assert!(required.contains(member), "{member} is not required");
        }
        assert!(!required.contains("errors"));
        assert_eq!(
            problem["properties"]["errors"]["items"]["$ref"],
            "#/components/schemas/FieldError"
        );
        let response = &document["components"]["responses"]["Problem"];
        assert_eq!(
            response["content"][crate::error::PROBLEM_JSON]["schema"]["$ref"],
            "#/components/schemas/Problem"
        );
    }
}
