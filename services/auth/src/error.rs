//! Every way an auth call fails, and the one mapping to `tonic::Status`.
//!
//! The machine code travels as `google.rpc.ErrorInfo.reason` (domain `auth.svcset`), field
//! problems as `google.rpc.BadRequest` violations, and waits as `google.rpc.RetryInfo`: the
//! gateway turns them into the problem `code`, `errors[]` and `Retry-After`.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation as PbFieldViolation, StatusExt as _};

use crate::{domain::FieldViolation, password::HashError};

const DOMAIN: &str = "auth.svcset";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    /// Unknown email and wrong password alike: one message, one code.
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("account disabled")]
    AccountDisabled,
    #[error("email already registered")]
    EmailTaken,
    #[error("refresh token invalid")]
    RefreshTokenInvalid,
    #[error("access token missing or invalid")]
    Unauthenticated,
    #[error("session not found")]
    SessionNotFound,
    #[error("user not found")]
    UserNotFound,
    #[error("role not found")]
    RoleNotFound,
    /// Bulk requests: which items name something unknown.
    #[error("unknown users or roles")]
    UnknownItems(Vec<FieldViolation>),
    #[error("permission denied")]
    Forbidden,
    #[error("wrong current password")]
    WrongPassword,
    #[error("password-hash queue full")]
    HashPoolBusy,
    #[error("too many failed logins")]
    LoginThrottled { retry_after: Duration },
    #[error(transparent)]
    Hashing(HashError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("signing failed: {0}")]
    Signing(#[from] jsonwebtoken::errors::Error),
}

impl From<HashError> for AuthError {
    fn from(error: HashError) -> Self {
        match error {
            HashError::Busy => Self::HashPoolBusy,
            other => Self::Hashing(other),
        }
    }
}

impl From<FieldViolation> for AuthError {
    fn from(violation: FieldViolation) -> Self {
        Self::Invalid(vec![violation])
    }
}

/// How long a client should wait after HASH_POOL_BUSY: about one queue's worth of hashes.
const HASH_POOL_RETRY_AFTER: Duration = Duration::from_secs(1);

fn field_violations(violations: Vec<FieldViolation>) -> Vec<PbFieldViolation> {
    violations
        .into_iter()
        .map(|v| {
            let mut violation = PbFieldViolation::new(v.field, v.message);
            violation.reason = v.code.to_owned();
            violation
        })
        .collect()
}

fn coded(code: Code, message: &str, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new()),
    )
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Invalid(violations) => {
                let mut details = ErrorDetails::with_bad_request(field_violations(violations));
                details.set_error_info("VALIDATION_FAILED", DOMAIN, HashMap::new());
                Status::with_error_details(Code::InvalidArgument, "invalid request", details)
            }
            AuthError::InvalidCredentials => coded(
                Code::Unauthenticated,
                "invalid email or password",
                "INVALID_CREDENTIALS",
            ),
            AuthError::AccountDisabled => coded(
                Code::PermissionDenied,
                "account disabled",
                "ACCOUNT_DISABLED",
            ),
            AuthError::EmailTaken => coded(
                Code::AlreadyExists,
                "an account with this email already exists",
                "EMAIL_TAKEN",
            ),
            AuthError::RefreshTokenInvalid => coded(
                Code::Unauthenticated,
                "refresh token is invalid, expired or revoked",
                "REFRESH_TOKEN_INVALID",
            ),
            AuthError::Unauthenticated => coded(
                Code::Unauthenticated,
                "a valid access token is required",
                "UNAUTHENTICATED",
            ),
            AuthError::SessionNotFound => {
                coded(Code::NotFound, "session not found", "SESSION_NOT_FOUND")
            }
            AuthError::UserNotFound => coded(Code::NotFound, "user not found", "USER_NOT_FOUND"),
            AuthError::RoleNotFound => coded(Code::NotFound, "role not found", "ROLE_NOT_FOUND"),
            AuthError::UnknownItems(violations) => {
                let mut details = ErrorDetails::with_bad_request(field_violations(violations));
                details.set_error_info("NOT_FOUND", DOMAIN, HashMap::new());
                Status::with_error_details(Code::NotFound, "unknown users or roles", details)
            }
            AuthError::Forbidden => coded(
                Code::PermissionDenied,
                "this requires the admin role",
                "PERMISSION_DENIED",
            ),
            AuthError::WrongPassword => {
                let mut violation =
                    PbFieldViolation::new("current_password", "the current password is wrong");
                violation.reason = "WRONG_PASSWORD".to_owned();
                let mut details = ErrorDetails::with_bad_request(vec![violation]);
                details.set_error_info("WRONG_PASSWORD", DOMAIN, HashMap::new());
                Status::with_error_details(Code::InvalidArgument, "wrong current password", details)
            }
            AuthError::HashPoolBusy => {
                let mut details =
                    ErrorDetails::with_error_info("HASH_POOL_BUSY", DOMAIN, HashMap::new());
                details.set_retry_info(Some(HASH_POOL_RETRY_AFTER));
                Status::with_error_details(
                    Code::ResourceExhausted,
                    "too many logins in progress, retry shortly",
                    details,
                )
            }
            AuthError::LoginThrottled { retry_after } => {
                let mut details =
                    ErrorDetails::with_error_info("LOGIN_THROTTLED", DOMAIN, HashMap::new());
                // Whole seconds, at least one: what Retry-After can say.
                details.set_retry_info(Some(Duration::from_secs(retry_after.as_secs().max(1))));
                Status::with_error_details(
                    Code::ResourceExhausted,
                    "too many failed logins, retry later",
                    details,
                )
            }
            AuthError::Hashing(e) => platform::error::internal(&e),
            AuthError::Database(e) => platform::error::from_sqlx(&e),
            AuthError::Signing(e) => platform::error::internal(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_travel_in_error_info() {
        let status = Status::from(AuthError::InvalidCredentials);
        assert_eq!(status.code(), Code::Unauthenticated);
        let info = status.get_details_error_info().map(|i| i.reason);
        assert_eq!(info.as_deref(), Some("INVALID_CREDENTIALS"));

        let status = Status::from(AuthError::HashPoolBusy);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.get_details_retry_info().is_some());
    }

    #[test]
    fn field_violations_name_the_field_and_its_code() {
        let status = Status::from(AuthError::Invalid(vec![FieldViolation::new(
            "password",
            "PASSWORD_TOO_SHORT",
            "at least 8 characters",
        )]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let violations = status
            .get_details_bad_request()
            .map(|b| b.field_violations)
            .unwrap_or_default();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "password");
        assert_eq!(violations[0].reason, "PASSWORD_TOO_SHORT");
    }
}
