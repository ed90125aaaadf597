//! Every way a notes call fails, and the one mapping to `tonic::Status`.
//!
//! The machine code travels as `google.rpc.ErrorInfo.reason` (domain `notes.svcset`) and field
//! problems as `google.rpc.BadRequest` violations: the gateway turns them into the problem
//! `code` and `errors[]`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation as PbFieldViolation, StatusExt as _};

use crate::domain::FieldViolation;

const DOMAIN: &str = "notes.svcset";

#[derive(Debug, thiserror::Error)]
pub enum NotesError {
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    /// No such note, or another user's: the same answer for both.
    #[error("note not found")]
    NoteNotFound,
    #[error("chapter not found")]
    ChapterNotFound,
    #[error("topic not found")]
    TopicNotFound,
    /// Batch requests: which ids are not the caller's notes.
    #[error("unknown notes")]
    UnknownNotes(Vec<FieldViolation>),
    #[error("etag mismatch")]
    EtagMismatch,
    /// A note's size or shape limit (chapters, topics, total content) would be passed.
    #[error("limit reached: {reason}")]
    LimitReached {
        reason: &'static str,
        message: String,
    },
    /// No such job, or another user's.
    #[error("job not found")]
    JobNotFound,
    /// The job succeeded or failed already.
    #[error("job finished")]
    JobFinished,
    /// Notifications that are not the caller's (field violations name them).
    #[error("unknown notifications")]
    UnknownNotifications(Vec<FieldViolation>),
    /// The day's generation quota is used up (or the plan has none) until `retry_after`.
    #[error("generation quota exceeded")]
    QuotaExceeded {
        daily_limit: i32,
        retry_after: std::time::Duration,
    },
    /// Profile could not say what the caller's plan allows: fail closed.
    #[error("profile unavailable: {0}")]
    ProfileUnavailable(String),
    /// An operations RPC called by someone who is neither an admin nor a service.
    #[error("admin or service token required")]
    OperatorRequired,
    /// A service token on an RPC that acts on a user's own data.
    #[error("a user token is required")]
    UserTokenRequired,
    /// Authentication failed: the status from `platform::identity`, passed through.
    #[error("unauthenticated: {0}")]
    Identity(Status),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl From<FieldViolation> for NotesError {
    fn from(violation: FieldViolation) -> Self {
        Self::Invalid(vec![violation])
    }
}

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

fn coded(code: Code, message: impl Into<String>, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new()),
    )
}

impl From<NotesError> for Status {
    fn from(error: NotesError) -> Self {
        match error {
            NotesError::Invalid(violations) => {
                let mut details = ErrorDetails::with_bad_request(field_violations(violations));
                details.set_error_info("VALIDATION_FAILED", DOMAIN, HashMap::new());
                Status::with_error_details(Code::InvalidArgument, "invalid request", details)
            }
            NotesError::NoteNotFound => coded(Code::NotFound, "note not found", "NOTE_NOT_FOUND"),
            NotesError::ChapterNotFound => {
                coded(Code::NotFound, "chapter not found", "CHAPTER_NOT_FOUND")
            }
            NotesError::TopicNotFound => {
                coded(Code::NotFound, "topic not found", "TOPIC_NOT_FOUND")
            }
            NotesError::UnknownNotes(violations) => {
                let mut details = ErrorDetails::with_bad_request(field_violations(violations));
                details.set_error_info("NOTE_NOT_FOUND", DOMAIN, HashMap::new());
                Status::with_error_details(
                    Code::NotFound,
                    "some notes do not exist; nothing was changed",
                    details,
                )
            }
            NotesError::JobNotFound => coded(Code::NotFound, "job not found", "JOB_NOT_FOUND"),
            NotesError::JobFinished => coded(
                Code::Aborted,
                "the job has already finished",
                "JOB_FINISHED",
            ),
            NotesError::UnknownNotifications(violations) => {
                let mut details = ErrorDetails::with_bad_request(field_violations(violations));
                details.set_error_info("NOTIFICATION_NOT_FOUND", DOMAIN, HashMap::new());
                Status::with_error_details(Code::NotFound, "notification not found", details)
            }
            NotesError::QuotaExceeded {
                daily_limit,
                retry_after,
            } => {
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_error_info(
                    "QUOTA_EXCEEDED",
                    DOMAIN,
                    HashMap::from([("daily_limit".to_owned(), daily_limit.to_string())]),
                );
                let message = if daily_limit == 0 {
                    "the plan includes no AI generation".to_owned()
                } else {
                    format!(
                        "the daily AI generation quota ({daily_limit}) is used up until 00:00 UTC"
                    )
                };
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            NotesError::ProfileUnavailable(_) => coded(
                Code::Unavailable,
                "the plan cannot be checked right now; retry later",
                "PROFILE_UNAVAILABLE",
            ),
            NotesError::EtagMismatch => coded(
                Code::FailedPrecondition,
                "the note has changed since this etag was read",
                "ETAG_MISMATCH",
            ),
            NotesError::LimitReached { reason, message } => coded(Code::Aborted, message, reason),
            NotesError::OperatorRequired => coded(
                Code::PermissionDenied,
                "an admin's or a service's token is required",
                "PERMISSION_DENIED",
            ),
            NotesError::UserTokenRequired => coded(
                Code::PermissionDenied,
                "this call acts on a signed-in user's notes: a user's access token is required",
                "USER_TOKEN_REQUIRED",
            ),
            NotesError::Identity(status) => status,
            NotesError::Database(e) => platform::error::from_sqlx(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_travel_in_error_info() {
        let status = Status::from(NotesError::EtagMismatch);
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().map(|i| i.reason);
        assert_eq!(info.as_deref(), Some("ETAG_MISMATCH"));

        let status = Status::from(NotesError::NoteNotFound);
        assert_eq!(status.code(), Code::NotFound);
    }

    #[test]
    fn field_violations_name_each_item() {
        let status = Status::from(NotesError::Invalid(vec![
            FieldViolation::new("items[2].title", "REQUIRED", "must not be empty"),
            FieldViolation::new("items[4].tags[0]", "TOO_LONG", "at most 40 characters"),
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<(String, String)> = status
            .get_details_bad_request()
            .map(|b| b.field_violations)
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.field, v.reason))
            .collect();
        assert_eq!(
            fields,
            [
                ("items[2].title".to_owned(), "REQUIRED".to_owned()),
                ("items[4].tags[0]".to_owned(), "TOO_LONG".to_owned())
            ]
        );
    }
}
