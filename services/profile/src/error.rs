//! Every way a profile call fails, and the one mapping to `tonic::Status`.
//!
//! The machine code travels as `google.rpc.ErrorInfo.reason` (domain `profile.svcset`), field
//! problems as `google.rpc.BadRequest` violations: the gateway turns them into the problem
//! `code` and `errors[]`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation as PbFieldViolation, StatusExt as _};

use crate::{domain::FieldViolation, store::UpdateError};

const DOMAIN: &str = "profile.svcset";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    #[error("access token missing or invalid")]
    Unauthenticated,
    #[error("permission denied")]
    Forbidden,
    #[error("user not found")]
    UserNotFound,
    #[error("plan not found")]
    PlanNotFound,
    #[error("catalog entry not found")]
    EntryNotFound,
    #[error("etag mismatch")]
    EtagMismatch,
    #[error("name taken")]
    NameTaken,
    #[error("plan exists")]
    PlanExists,
    #[error("plan archived")]
    PlanArchived,
    #[error("default plan")]
    DefaultPlan,
    /// A failure of a call to another service, passed on as it came (its code and message
    /// were written for callers).
    #[error("upstream: {0}")]
    Upstream(Status),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<FieldViolation> for ProfileError {
    fn from(violation: FieldViolation) -> Self {
        Self::Invalid(vec![violation])
    }
}

impl From<UpdateError> for ProfileError {
    fn from(error: UpdateError) -> Self {
        match error {
            UpdateError::UnknownReference(field) => Self::from(FieldViolation::new(
                field,
                "UNKNOWN_REFERENCE",
                "no such active catalog entry",
            )),
            UpdateError::Database(e) => Self::Database(e),
        }
    }
}

fn coded(code: Code, message: &str, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new()),
    )
}

impl From<ProfileError> for Status {
    fn from(error: ProfileError) -> Self {
        match error {
            ProfileError::Invalid(violations) => {
                let violations: Vec<PbFieldViolation> = violations
                    .into_iter()
                    .map(|v| {
                        let mut violation = PbFieldViolation::new(v.field, v.message);
                        violation.reason = v.code.to_owned();
                        violation
                    })
                    .collect();
                let mut details = ErrorDetails::with_bad_request(violations);
                details.set_error_info("VALIDATION_FAILED", DOMAIN, HashMap::new());
                Status::with_error_details(Code::InvalidArgument, "invalid request", details)
            }
            ProfileError::Unauthenticated => coded(
                Code::Unauthenticated,
                "a valid access token is required",
                "UNAUTHENTICATED",
            ),
            ProfileError::Forbidden => coded(
                Code::PermissionDenied,
                "this requires the admin role",
                "FORBIDDEN",
            ),
            ProfileError::UserNotFound => coded(Code::NotFound, "user not found", "USER_NOT_FOUND"),
            ProfileError::PlanNotFound => coded(Code::NotFound, "plan not found", "PLAN_NOT_FOUND"),
            ProfileError::EntryNotFound => coded(
                Code::NotFound,
                "catalog entry not found",
                "CATALOG_ENTRY_NOT_FOUND",
            ),
            ProfileError::EtagMismatch => coded(
                Code::FailedPrecondition,
                "the profile changed since the etag was read",
                "ETAG_MISMATCH",
            ),
            ProfileError::NameTaken => coded(
                Code::AlreadyExists,
                "an entry with this name already exists",
                "NAME_TAKEN",
            ),
            ProfileError::PlanExists => coded(
                Code::AlreadyExists,
                "a plan with this id already exists",
                "PLAN_EXISTS",
            ),
            ProfileError::PlanArchived => coded(
                Code::Aborted,
                "the plan is archived: it takes no new subscribers",
                "PLAN_ARCHIVED",
            ),
            ProfileError::DefaultPlan => coded(
                Code::Aborted,
                "the default plan cannot be archived",
                "DEFAULT_PLAN",
            ),
            ProfileError::Upstream(status) => status,
            ProfileError::Database(e) => platform::error::from_sqlx(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_name_the_field_and_reasons_travel_in_error_info() {
        let status = Status::from(ProfileError::Invalid(vec![FieldViolation::new(
            "email",
            "READ_ONLY",
            "this field cannot be changed here",
        )]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let violations = status
            .get_details_bad_request()
            .map(|b| b.field_violations)
            .unwrap_or_default();
        assert_eq!(violations[0].field, "email");
        assert_eq!(violations[0].reason, "READ_ONLY");

        let status = Status::from(ProfileError::EtagMismatch);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.get_details_error_info().map(|i| i.reason).as_deref(),
            Some("ETAG_MISMATCH")
        );
    }
}
