//! Turning failures of shared machinery (Postgres, Redis) into gRPC statuses.
//!
//! A service's own `error.rs` owns its domain errors and calls these for the rest. The rule
//! throughout: the caller gets a code and a short, fixed message; the details go to the log,
//! on the span of the request, where the trace id joins them to the response.

use tonic::{Code, Status};

/// A failure the caller cannot act on: logged in full, answered with a fixed message.
pub fn internal(error: &(dyn std::error::Error + 'static)) -> Status {
    tracing::error!(error = %error, source = ?error.source(), "internal error");
    Status::internal("internal error")
}

/// The status for a failed database call.
///
/// Overload and outages (`UNAVAILABLE`) are told apart from bugs (`INTERNAL`), so callers and
/// the gateway know what is worth retrying. Constraint violations are the service's to map
/// (it knows which constraint means what) — here they are `INTERNAL`, as an unmapped one is a
/// bug.
pub fn from_sqlx(error: &sqlx::Error) -> Status {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            tracing::warn!(error = %error, "database unavailable");
            Status::unavailable("database unavailable, retry later")
        }
        sqlx::Error::Database(db) if db.code().as_deref() == Some(QUERY_CANCELED) => {
            // statement_timeout fired: the work took too long, not a bug in the request.
            tracing::warn!(error = %error, "statement timed out");
            Status::deadline_exceeded("the request took too long")
        }
        sqlx::Error::Database(db) if is_unavailable_class(db.code().as_deref()) => {
            tracing::warn!(error = %error, "database unavailable");
            Status::unavailable("database unavailable, retry later")
        }
        other => internal(other),
    }
}

/// The status for a failed Redis call, when Redis is not merely a cache to skip.
pub fn from_redis(error: &redis::RedisError) -> Status {
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        tracing::warn!(error = %error, "redis unavailable");
        Status::unavailable("cache unavailable, retry later")
    } else {
        internal(error)
    }
}

/// `57014 query_canceled`: what `statement_timeout` raises.
const QUERY_CANCELED: &str = "57014";

/// SQLSTATE classes that mean "the server cannot take this now": `08` connection exception,
/// `53` insufficient resources, `57P0x` operator intervention (shutdown, restart).
fn is_unavailable_class(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57P"))
}

/// Whether a status is worth retrying by the caller (with backoff).
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_exhaustion_is_unavailable_and_says_nothing_internal() {
        let status = from_sqlx(&sqlx::Error::PoolTimedOut);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(is_retryable(&status));
    }

    #[test]
    fn unexpected_errors_are_internal_with_a_fixed_message() {
        let status = from_sqlx(&sqlx::Error::ColumnNotFound("password_hash".to_owned()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        assert!(!is_retryable(&status));
    }

    #[test]
    fn sqlstate_classes() {
        assert!(is_unavailable_class(Some("08006")));
        assert!(is_unavailable_class(Some("53300")));
        assert!(is_unavailable_class(Some("57P01")));
        assert!(!is_unavailable_class(Some("23505")));
        assert!(!is_unavailable_class(None));
    }
}
