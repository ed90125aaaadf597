//! Extractors whose rejections are [`ApiError`]s, so a bad request gets the same problem
//! shape as every other failure.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::error::Category;

use crate::error::{ApiError, ErrorCode, FieldError};

/// A JSON request body (or response). Rejects with
/// - 415 `UNSUPPORTED_MEDIA_TYPE` unless `Content-Type` is `application/json` or
///   `application/*+json`;
/// - 413 `PAYLOAD_TOO_LARGE` past the route's body limit (`GATEWAY_BODY_LIMIT`, 1 MiB by
///   default; a route raises its own with `axum::extract::DefaultBodyLimit::max`);
/// - 400 `MALFORMED_JSON` when the body is not JSON, and 400 `VALIDATION_FAILED` when it is
///   JSON of the wrong shape; both give the line, column and field path of the first error.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !has_json_content_type(request.headers()) {
            return Err(ApiError::from_code(ErrorCode::UnsupportedMediaType));
        }
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::from_code(ErrorCode::PayloadTooLarge)
                } else {
                    // The client went away or sent a broken body.
                    ApiError::new(ErrorCode::BadRequest, "the request body cannot be read")
                        .with_internal(rejection.body_text())
                }
            })?;
        parse_json(&body).map(Self)
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// `application/json` or a JSON-based type such as `application/merge-patch+json`,
/// parameters (`; charset=utf-8`) allowed.
fn has_json_content_type(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json"))
}

/// Parses a JSON document into `T`, reporting the first error with its position and the path
/// of the field it is in.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        json_error(error.into_inner(), &path)
    })?;
    // Trailing characters after the document are malformed JSON too.
    deserializer.end().map_err(|error| json_error(error, "."))?;
    Ok(value)
}

fn json_error(error: serde_json::Error, path: &str) -> ApiError {
    let (line, column) = (error.line(), error.column());
    let full = error.to_string();
    // serde_json appends the position; it is given separately here.
    let message = full
        .strip_suffix(&format!(" at line {line} column {column}"))
        .unwrap_or(&full);
    let mut field = if path == "." {
        String::new()
    } else {
        path.to_owned()
    };
    match error.classify() {
        Category::Data => {
            let field_code = data_error_code(message);
            // A missing field is reported at the object that lacks it: name the field itself.
            if let Some(missing) = backquoted(message).filter(|_| field_code == "MISSING") {
                field = if field.is_empty() {
                    missing.to_owned()
                } else {
                    format!("{field}.{missing}")
                };
            }
            ApiError::new(
                ErrorCode::ValidationFailed,
                format!(
                    "the body does not have the expected shape at line {line}, column {column}: {message}"
                ),
            )
            .with_field_errors(vec![FieldError::new(field, field_code, message)])
        }
        Category::Syntax | Category::Eof | Category::Io => ApiError::new(
            ErrorCode::MalformedJson,
            format!("the body is not valid JSON at line {line}, column {column}: {message}"),
        )
        .with_field_errors(vec![FieldError::new(
            field,
            "SYNTAX",
            format!("{message} at line {line}, column {column}"),
        )]),
    }
}

/// What kind of shape error serde reported, as a field code (see `docs/errors.md`).
fn data_error_code(message: &str) -> &'static str {
    if message.starts_with("missing field") {
        "MISSING"
    } else if message.starts_with("unknown field") {
        "UNKNOWN_FIELD"
    } else if message.starts_with("invalid type") {
        "INVALID_TYPE"
    } else {
        "INVALID_VALUE"
    }
}

/// The first `quoted` name in a serde message: "missing field `title`" → `title`.
fn backquoted(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let length = message[start..].find('`')?;
    Some(&message[start..start + length])
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: fail loudly"
    )]

    use std::collections::HashMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code, reason = "only deserialized")]
    struct Note {
        title: String,
        tags: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code, reason = "only deserialized")]
    struct Batch {
        items: Vec<Note>,
    }

    #[test]
    fn content_types() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            has_json_content_type(&headers)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(with("application/merge-patch+json"));
        assert!(!with("text/plain"));
        assert!(!with("application/jsonx"));
        assert!(!has_json_content_type(&HeaderMap::new()));
    }

    #[test]
    fn malformed_json_names_line_column_and_path() {
        let error = parse_json::<Batch>(
            b"{\"items\": [\n  {\"title\": \"a\", \"tags\": []},\n  {\"title\" \"b\"}]}",
        )
        .unwrap_err();
        assert_eq!(error.code(), "MALFORMED_JSON");
        assert!(
            error.detail().contains("line 3, column"),
            "{}",
            error.detail()
        );
        assert_eq!(error.field_errors()[0].field, "items[1]");
        assert_eq!(error.field_errors()[0].code, "SYNTAX");

        let error = parse_json::<Batch>(br#"{"items": [{"title": tru}]}"#).unwrap_err();
        assert_eq!(error.field_errors()[0].field, "items[0].title");
    }

    #[test]
    fn wrong_shapes_name_the_field() {
        let error =
            parse_json::<Batch>(br#"{"items": [{"title": "a", "tags": [1]}]}"#).unwrap_err();
        assert_eq!(error.code(), "VALIDATION_FAILED");
        assert_eq!(error.status().as_u16(), 400);
        assert_eq!(
            error.field_errors()[0],
            FieldError::new(
                "items[0].tags[0]",
                "INVALID_TYPE",
                "invalid type: integer `1`, expected a string"
            )
        );

        let error = parse_json::<Batch>(br#"{"items": [{"tags": []}]}"#).unwrap_err();
        assert_eq!(error.field_errors()[0].field, "items[0].title");
        assert_eq!(error.field_errors()[0].code, "MISSING");

        let error = parse_json::<HashMap<String, u8>>(b"[]").unwrap_err();
        assert_eq!(error.field_errors()[0].field, "");
    }

    #[test]
    fn trailing_characters_and_empty_bodies_are_malformed() {
        let error = parse_json::<HashMap<String, u8>>(b"{} x").unwrap_err();
        assert_eq!(error.code(), "MALFORMED_JSON");
        assert!(error.detail().contains("trailing characters"));
        let error = parse_json::<HashMap<String, u8>>(b"").unwrap_err();
        assert_eq!(error.code(), "MALFORMED_JSON");
    }
}
