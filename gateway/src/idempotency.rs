//! `Idempotency-Key` on signed-in POST, PATCH and DELETE: the first response is stored for
//! 24 h and replayed to retries, so a mobile client that lost a response can retry a write
//! without doing it twice.
//!
//! Keys are scoped per user and live in the gateway's Redis, so a retry landing on another
//! replica is answered the same. A request claims its key with `SET NX` before it runs
//! (briefly, so a crashed replica's claim lapses); a retry while it runs gets 409, the same
//! key with another request (method, route or body) 422, and a retry after it finished the
//! stored response with `Idempotent-Replayed: true`. Server failures (5xx) and refusals that
//! say "try again" (429) release the key instead of being stored, so the retry runs for
//! real. Credential routes (login, register, refresh) are never stored: their retries are
//! covered by the refresh grace window, and a stored token would outlive its purpose.
//!
//! When Redis fails, the request runs without the guarantee (counted in
//! `idempotency_unavailable_total`): refusing every write while the cache is down would be
//! the worse failure.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse as _, Response},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use http_body_util::BodyExt as _;
use platform::{
    identity::Caller,
    redis_pool::{CommandSpan as _, RedisConfig, RedisPool},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    error::{ApiError, ErrorCode},
    ratelimit::Verified,
};

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// How long a finished response is replayed.
const STORED_FOR: Duration = Duration::from_secs(24 * 3600);
/// How long a claim outlives its request at most (a replica that died mid-request).
const CLAIM_FOR: Duration = Duration::from_secs(120);
/// Longer keys are refused: a UUID is 36 characters.
const MAX_KEY_LEN: usize = 255;
/// Larger responses are not stored (the key is released instead).
const MAX_STORED_BODY: usize = 1024 * 1024;
/// Response headers worth replaying.
const KEPT_HEADERS: [HeaderName; 3] = [header::CONTENT_TYPE, header::ETAG, header::LOCATION];

/// The gateway's Redis, where keys are claimed and responses kept.
#[derive(Clone)]
pub struct IdempotencyStore {
    redis: RedisPool,
    config: RedisConfig,
    /// The largest body any route accepts: a request body is read (to fingerprint it) up to
    /// this, never further.
    max_body: usize,
}

impl std::fmt::Debug for IdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyStore").finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Entry {
    /// A request with this key is running.
    Claimed { fingerprint: String },
    /// It finished: what to replay.
    Done {
        fingerprint: String,
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
}

impl Entry {
    fn fingerprint(&self) -> &str {
        match self {
            Self::Claimed { fingerprint } | Self::Done { fingerprint, .. } => fingerprint,
        }
    }
}

impl IdempotencyStore {
    pub fn new(redis: RedisPool, config: RedisConfig, max_body: usize) -> Self {
        Self {
            redis,
            config,
            max_body,
        }
    }

    async fn connection(
        &self,
    ) -> Result<
        bb8_redis::bb8::PooledConnection<'_, platform::redis_pool::RedisManager>,
        redis::RedisError,
    > {
        self.redis.get().await.map_err(|e| match e {
            bb8_redis::bb8::RunError::User(e) => e,
            bb8_redis::bb8::RunError::TimedOut => redis::RedisError::from((
                redis::ErrorKind::Io,
                "timed out waiting for a Redis connection",
            )),
        })
    }

    /// Claims `key`, or returns what holds it.
    async fn claim(&self, key: &str, fingerprint: &str) -> Result<Option<Entry>, Failure> {
        let claim = serde_json::to_string(&Entry::Claimed {
            fingerprint: fingerprint.to_owned(),
        })?;
        let mut conn = self.connection().await?;
        let claimed: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(&claim)
            .arg("NX")
            .arg("PX")
            .arg(millis(CLAIM_FOR))
            .query_async(&mut *conn)
            .command("gateway.idempotency.claim")
            .await?;
        if claimed.is_some() {
            return Ok(None);
        }
        let held: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut *conn)
            .command("gateway.idempotency.read")
            .await?;
        match held {
            Some(text) => Ok(Some(serde_json::from_str(&text)?)),
            // It lapsed between the two commands: the caller may retry at once.
            None => Err(Failure::Lapsed),
        }
    }

    async fn store(&self, key: &str, entry: &Entry) -> Result<(), Failure> {
        let text = serde_json::to_string(entry)?;
        let mut conn = self.connection().await?;
        let () = redis::cmd("SET")
            .arg(key)
            .arg(text)
            .arg("PX")
            .arg(millis(STORED_FOR))
            .query_async(&mut *conn)
            .command("gateway.idempotency.store")
            .await?;
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), Failure> {
        let mut conn = self.connection().await?;
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut *conn)
            .command("gateway.idempotency.release")
            .await?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error("stored entry unreadable: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the claim lapsed")]
    Lapsed,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The middleware (inside the rate limiter, which leaves the verified caller).
pub(crate) async fn idempotency(
    State(store): State<IdempotencyStore>,
    request: Request,
    next: Next,
) -> Response {
    if !matches!(
        *request.method(),
        Method::POST | Method::PATCH | Method::DELETE
    ) {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(&IDEMPOTENCY_KEY).cloned() else {
        return next.run(request).await;
    };
    let Some(key) = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
        .map(str::to_owned)
    else {
        return ApiError::new(
            ErrorCode::BadRequest,
            format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters"),
        )
        .into_response();
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    if crate::ratelimit::is_credential_route(&route) {
        return next.run(request).await;
    }
    let user = match request.extensions().get::<Verified>() {
        Some(Verified(Caller::User { user_id, .. })) => *user_id,
        // Keys are per user: without a signed-in user the route answers 401 by itself.
        _ => return next.run(request).await,
    };

    // The body is part of the request's identity: read it (the edge bounds its size).
    let (parts, body) = request.into_parts();
    let bytes = match http_body_util::Limited::new(body, store.max_body)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return ApiError::from_code(ErrorCode::PayloadTooLarge).into_response();
        }
        Err(e) => {
            return ApiError::new(ErrorCode::BadRequest, "the request body could not be read")
                .with_internal(e)
                .into_response();
        }
    };
    let fingerprint = {
        let mut digest = Sha256::new();
        digest.update(parts.method.as_str().as_bytes());
        digest.update([0]);
        digest.update(parts.uri.path().as_bytes());
        digest.update([0]);
        digest.update(&bytes);
        hex(&digest.finalize())
    };
    let redis_key = store.config.key(&format!(
        "idem:{user}:{}",
        hex(&Sha256::digest(key.as_bytes()))
    ));
    let request = Request::from_parts(parts, Body::from(bytes));

    match store.claim(&redis_key, &fingerprint).await {
        Ok(None) => {}
        Ok(Some(held)) if held.fingerprint() != fingerprint => {
            return ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request",
            )
            .into_response();
        }
        Ok(Some(Entry::Claimed { .. })) => {
            return ApiError::new(
                ErrorCode::Conflict,
                "a request with this Idempotency-Key is still in progress",
            )
            .with_retry_after(Duration::from_secs(1))
            .into_response();
        }
        Ok(Some(Entry::Done {
            status,
            headers,
            body,
            ..
        })) => return replay(status, &headers, &body),
        Err(failure) => {
            tracing::warn!(error = %failure, "idempotency unavailable; running the request without it");
            metrics::counter!("idempotency_unavailable_total").increment(1);
            return next.run(request).await;
        }
    }

    let response = next.run(request).await;
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        // "Try again" answers are not the request's result: let the retry run.
        if let Err(failure) = store.release(&redis_key).await {
            tracing::warn!(error = %failure, "could not release an idempotency key");
        }
        return response;
    }
    finish(&store, &redis_key, fingerprint, response).await
}

/// Stores the response for replay and returns it (a response too large to keep, or one
/// that cannot be stored, releases the key instead).
async fn finish(
    store: &IdempotencyStore,
    key: &str,
    fingerprint: String,
    response: Response,
) -> Response {
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "response body failed while being stored");
            let _ = store.release(key).await;
            return ApiError::from_code(ErrorCode::Internal).into_response();
        }
    };
    let stored = if bytes.len() > MAX_STORED_BODY {
        store.release(key).await
    } else {
        let entry = Entry::Done {
            fingerprint,
            status: parts.status.as_u16(),
            headers: kept_headers(&parts.headers),
            body: STANDARD.encode(&bytes),
        };
        store.store(key, &entry).await
    };
    if let Err(failure) = stored {
        tracing::warn!(error = %failure, "could not store the idempotent response");
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.as_str().to_owned(), value.to_owned()))
        })
        .collect()
}

fn replay(status: u16, headers: &[(String, String)], body: &str) -> Response {
    let Ok(body) = STANDARD.decode(body) else {
        return ApiError::from_code(ErrorCode::Internal)
            .with_internal("a stored response is not base64")
            .into_response();
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
