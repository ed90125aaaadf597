//! Generation jobs and notifications, onto `notes.v1.NotesService`:
//! `POST /api/v1/notes/{id}/generate`, `/api/v1/jobs[/{id}[/cancel]]`, and
//! `/api/v1/notifications[/stream | /read-all | /{id}/read]`.
//!
//! The notification stream is Server-Sent Events bridged from notes' `WatchNotifications`
//! server stream: each notification is an event whose id is its sequence, so a client that
//! reconnects with `Last-Event-ID` gets every one it missed. Idle streams get keep-alive
//! comments. A stream is an async body over the gRPC stream: no thread or polling per
//! stream.

use std::time::Duration;

use axum::{
    extract::{Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::StreamExt as _;
use proto::notes::v1::{
    self as pb, job_result::Content, notes_service_client::NotesServiceClient,
    watch_notifications_response::Event as WatchEvent,
};
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{forward as request, rfc3339};
use crate::{
    AppState,
    context::{Deadline, RequestContext, SignedIn},
    error::{ApiError, ErrorCode, FieldError},
    extract::ApiJson,
    upstream::Upstreams,
};

/// Comments on an idle event stream, so proxies and clients see it alive.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(generate))
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(cancel_job))
        .routes(routes!(list_notifications))
        .routes(routes!(stream_notifications))
        .routes(routes!(read_all))
        .routes(routes!(read_one))
}

fn client(upstreams: &Upstreams) -> NotesServiceClient<platform::grpc::TracedChannel> {
    NotesServiceClient::new(upstreams.notes.channel.clone())
}

// ---------------------------------------------------------------------------
// HTTP shapes
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Summary,
    Explanation,
    Quiz,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct OptionsBody {
    #[serde(default)]
    max_sentences: Option<i32>,
    #[serde(default)]
    max_terms: Option<i32>,
    #[serde(default)]
    question_count: Option<i32>,
    #[serde(default)]
    language: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    kind: Kind,
    #[serde(default)]
    options: Option<OptionsBody>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Accepted {
    job_id: String,
    status_url: String,
    status: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct OptionsReply {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_sentences: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_terms: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    question_count: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    language: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TermReply {
    term: String,
    explanation: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct QuestionReply {
    prompt: String,
    answer: String,
    choices: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ResultReply {
    generator: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    terms: Option<Vec<TermReply>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    questions: Option<Vec<QuestionReply>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ErrorReply {
    code: String,
    message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct JobReply {
    id: String,
    note_id: String,
    kind: &'static str,
    options: Option<OptionsReply>,
    status: &'static str,
    progress: i32,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<ResultReply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorReply>,
    attempt: i32,
    max_attempts: i32,
    cancel_requested: bool,
    created_at: Option<String>,
    started_at: Option<String>,
    updated_at: Option<String>,
    finished_at: Option<String>,
}

fn status_name(status: i32) -> &'static str {
    match pb::JobStatus::try_from(status) {
        Ok(pb::JobStatus::Queued) => "queued",
        Ok(pb::JobStatus::Running) => "running",
        Ok(pb::JobStatus::Succeeded) => "succeeded",
        Ok(pb::JobStatus::Failed) => "failed",
        Ok(pb::JobStatus::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

impl From<pb::Job> for JobReply {
    fn from(job: pb::Job) -> Self {
        let kind = match pb::GenerationKind::try_from(job.kind) {
            Ok(pb::GenerationKind::Summary) => "summary",
            Ok(pb::GenerationKind::Explanation) => "explanation",
            Ok(pb::GenerationKind::Quiz) => "quiz",
            _ => "unknown",
        };
        let result = job.result.map(|result| {
            let mut reply = ResultReply {
                generator: result.generator,
                summary: None,
                terms: None,
                questions: None,
            };
            match result.content {
                Some(Content::Summary(summary)) => reply.summary = Some(summary.text),
                Some(Content::Explanation(explanation)) => {
                    reply.terms = Some(
                        explanation
                            .terms
                            .into_iter()
                            .map(|t| TermReply {
                                term: t.term,
                                explanation: t.explanation,
                            })
                            .collect(),
                    );
                }
                Some(Content::Quiz(quiz)) => {
                    reply.questions = Some(
                        quiz.questions
                            .into_iter()
                            .map(|q| QuestionReply {
                                prompt: q.prompt,
                                answer: q.answer,
                                choices: q.choices,
                            })
                            .collect(),
                    );
                }
                None => {}
            }
            reply
        });
        Self {
            id: job.job_id,
            note_id: job.note_id,
            kind,
            options: job.options.map(|o| OptionsReply {
                max_sentences: o.max_sentences,
                max_terms: o.max_terms,
                question_count: o.question_count,
                language: o.language,
            }),
            status: status_name(job.status),
            progress: job.progress_percent,
            message: job.message,
            result,
            error: job.error.map(|e| ErrorReply {
                code: e.code,
                message: e.message,
            }),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            cancel_requested: job.cancel_requested,
            created_at: rfc3339(job.created_at),
            started_at: rfc3339(job.started_at),
            updated_at: rfc3339(job.updated_at),
            finished_at: rfc3339(job.finished_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct JobList {
    items: Vec<JobReply>,
    next_cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct NotificationReply {
    id: String,
    sequence: i64,
    kind: &'static str,
    title: String,
    body: String,
    job_id: Option<String>,
    note_id: Option<String>,
    created_at: Option<String>,
    read_at: Option<String>,
}

impl From<pb::Notification> for NotificationReply {
    fn from(n: pb::Notification) -> Self {
        let kind = match pb::NotificationKind::try_from(n.kind) {
            Ok(pb::NotificationKind::JobSucceeded) => "job_succeeded",
            Ok(pb::NotificationKind::JobFailed) => "job_failed",
            Ok(pb::NotificationKind::JobCancelled) => "job_cancelled",
            _ => "unknown",
        };
        Self {
            id: n.notification_id,
            sequence: n.sequence,
            kind,
            title: n.title,
            body: n.body,
            job_id: Some(n.job_id).filter(|id| !id.is_empty()),
            note_id: Some(n.note_id).filter(|id| !id.is_empty()),
            created_at: rfc3339(n.created_at),
            read_at: rfc3339(n.read_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct NotificationList {
    items: Vec<NotificationReply>,
    next_cursor: Option<String>,
    unread_count: i32,
}

/// Field paths of the gRPC request as the HTTP request names them.
fn renamed(error: ApiError, renames: &[(&str, &str)]) -> ApiError {
    if error.field_errors().is_empty() {
        return error;
    }
    let fields = error
        .field_errors()
        .iter()
        .map(|e| {
            let field = renames
                .iter()
                .find(|(from, _)| *from == e.field)
                .map_or(e.field.clone(), |(_, to)| (*to).to_owned());
            FieldError::new(field, e.code.clone(), e.message.clone())
        })
        .collect();
    error.with_field_errors(fields)
}

fn limit_of(value: &str, errors: &mut Vec<FieldError>) -> i32 {
    match value.parse::<i32>() {
        Ok(limit) if (1..=100).contains(&limit) => limit,
        _ => {
            errors.push(FieldError::new("limit", "OUT_OF_RANGE", "1–100"));
            0
        }
    }
}

fn query_error(errors: Vec<FieldError>) -> Result<(), ApiError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::ValidationFailed, "invalid query").with_field_errors(errors))
    }
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

#[utoipa::path(
    post, path = "/api/v1/notes/{id}/generate", tag = "jobs",
    params(("id" = String, Path, description = "The note id")),
    request_body = GenerateBody,
    responses(
        (status = 202, description = "A new job is queued", body = Accepted, headers(("Location" = String, description = "The job's status URL"))),
        (status = 200, description = "The same request is already queued or running: that job", body = Accepted, headers(("Location" = String, description = "The job's status URL"))),
    ),
    security(("bearer" = []))
)]
async fn generate(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<GenerateBody>,
) -> Result<Response, ApiError> {
    let options = body.options.unwrap_or_default();
    let message = pb::StartGenerationRequest {
        note_id: id,
        kind: match body.kind {
            Kind::Summary => pb::GenerationKind::Summary,
            Kind::Explanation => pb::GenerationKind::Explanation,
            Kind::Quiz => pb::GenerationKind::Quiz,
        }
        .into(),
        options: Some(pb::GenerationOptions {
            max_sentences: options.max_sentences,
            max_terms: options.max_terms,
            question_count: options.question_count,
            language: options.language,
        }),
    };
    let reply = client(&state.upstreams)
        .start_generation(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| renamed(s.into(), &[("note_id", "id")]))?
        .into_inner();
    let job = reply.job.unwrap_or_default();
    let status_url = format!("/api/v1/jobs/{}", job.job_id);
    let location = HeaderValue::from_str(&status_url).map_err(ApiError::internal)?;
    let code = if reply.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        [(header::LOCATION, location)],
        ApiJson(Accepted {
            job_id: job.job_id,
            status_url,
            status: status_name(job.status),
        }),
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses((status = 200, description = "The job, its progress and, once finished, its result or error", body = JobReply)),
    security(("bearer" = []))
)]
async fn get_job(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<ApiJson<JobReply>, ApiError> {
    let message = pb::GetJobRequest { job_id: id };
    let job = client(&state.upstreams)
        .get_job(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| renamed(s.into(), &[("job_id", "id")]))?
        .into_inner()
        .job
        .unwrap_or_default();
    Ok(ApiJson(job.into()))
}

#[utoipa::path(
    post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses((status = 202, description = "Cancellation requested: a running job stops at its next step", body = JobReply)),
    security(("bearer" = []))
)]
async fn cancel_job(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let message = pb::CancelJobRequest { job_id: id };
    let job = client(&state.upstreams)
        .cancel_job(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| renamed(s.into(), &[("job_id", "id")]))?
        .into_inner()
        .job
        .unwrap_or_default();
    Ok((StatusCode::ACCEPTED, ApiJson(JobReply::from(job))).into_response())
}

/// `?status=&note_id=&limit=&cursor=`
#[utoipa::path(
    get, path = "/api/v1/jobs", tag = "jobs",
    params(
        ("status" = Option<String>, Query, description = "queued, running, succeeded, failed or cancelled"),
        ("note_id" = Option<String>, Query, description = "Only this note's jobs"),
        ("limit" = Option<i32>, Query, description = "1 to 100"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, description = "The caller's recent jobs, newest first", body = JobList)),
    security(("bearer" = []))
)]
async fn list_jobs(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<ApiJson<JobList>, ApiError> {
    let mut message = pb::ListJobsRequest::default();
    let mut errors = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "status" => {
                message.status = match value.as_ref() {
                    "" => pb::JobStatus::Unspecified,
                    "queued" => pb::JobStatus::Queued,
                    "running" => pb::JobStatus::Running,
                    "succeeded" => pb::JobStatus::Succeeded,
                    "failed" => pb::JobStatus::Failed,
                    "cancelled" => pb::JobStatus::Cancelled,
                    _ => {
                        errors.push(FieldError::new(
                            "status",
                            "INVALID_STATUS",
                            "queued, running, succeeded, failed or cancelled",
                        ));
                        pb::JobStatus::Unspecified
                    }
                }
                .into();
            }
            "note_id" => message.note_id = value.into_owned(),
            "limit" => message.page_size = limit_of(&value, &mut errors),
            "cursor" => message.page_token = value.into_owned(),
            other => errors.push(FieldError::new(
                other,
                "UNKNOWN_PARAMETER",
                "not a filter of this list",
            )),
        }
    }
    query_error(errors)?;
    let reply = client(&state.upstreams)
        .list_jobs(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| {
            renamed(
                s.into(),
                &[("page_token", "cursor"), ("page_size", "limit")],
            )
        })?
        .into_inner();
    Ok(ApiJson(JobList {
        items: reply.items.into_iter().map(JobReply::from).collect(),
        next_cursor: Some(reply.next_page_token).filter(|t| !t.is_empty()),
    }))
}

// ---------------------------------------------------------------------------
// Notifications
// ---------------------------------------------------------------------------

/// `?unread=true&limit=&cursor=`
#[utoipa::path(
    get, path = "/api/v1/notifications", tag = "notifications",
    params(
        ("unread" = Option<bool>, Query, description = "Only unread ones"),
        ("limit" = Option<i32>, Query, description = "1 to 100"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, description = "The caller's notifications, newest first", body = NotificationList)),
    security(("bearer" = []))
)]
async fn list_notifications(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<ApiJson<NotificationList>, ApiError> {
    let mut message = pb::ListNotificationsRequest::default();
    let mut errors = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "unread" => match value.as_ref() {
                "true" | "1" => message.unread_only = true,
                "false" | "0" | "" => message.unread_only = false,
                _ => errors.push(FieldError::new(
                    "unread",
                    "INVALID_BOOLEAN",
                    "true or false",
                )),
            },
            "limit" => message.page_size = limit_of(&value, &mut errors),
            "cursor" => message.page_token = value.into_owned(),
            other => errors.push(FieldError::new(
                other,
                "UNKNOWN_PARAMETER",
                "not a filter of this list",
            )),
        }
    }
    query_error(errors)?;
    let reply = client(&state.upstreams)
        .list_notifications(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| {
            renamed(
                s.into(),
                &[("page_token", "cursor"), ("page_size", "limit")],
            )
        })?
        .into_inner();
    Ok(ApiJson(NotificationList {
        items: reply
            .items
            .into_iter()
            .map(NotificationReply::from)
            .collect(),
        next_cursor: Some(reply.next_page_token).filter(|t| !t.is_empty()),
        unread_count: reply.unread_count,
    }))
}

#[utoipa::path(
    post, path = "/api/v1/notifications/{id}/read", tag = "notifications",
    params(("id" = String, Path, description = "The notification id")),
    responses((status = 204, description = "Marked read")),
    security(("bearer" = []))
)]
async fn read_one(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let message = pb::MarkNotificationsReadRequest {
        notification_ids: vec![id],
        all: false,
    };
    client(&state.upstreams)
        .mark_notifications_read(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| renamed(s.into(), &[("notification_ids[0]", "id")]))?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post, path = "/api/v1/notifications/read-all", tag = "notifications",
    responses((status = 204, description = "Every notification marked read")),
    security(("bearer" = []))
)]
async fn read_all(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let message = pb::MarkNotificationsReadRequest {
        notification_ids: Vec::new(),
        all: true,
    };
    client(&state.upstreams)
        .mark_notifications_read(request(&context, deadline, &headers, message)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Server-Sent Events: `event: notification`, `id: <sequence>`, `data: <notification JSON>`.
#[utoipa::path(
    get, path = "/api/v1/notifications/stream", tag = "notifications",
    params(("Last-Event-ID" = Option<String>, Header, description = "The last event id received: every later notification is sent first")),
    responses((status = 200, description = "Server-Sent Events: one `notification` event per notification (id = its sequence, data = the notification as JSON), keep-alive comments when idle", content_type = "text/event-stream", body = String)),
    security(("bearer" = []))
)]
async fn stream_notifications(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after_sequence = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|v| *v >= 0)
                .ok_or_else(|| {
                    ApiError::new(ErrorCode::ValidationFailed, "invalid Last-Event-ID")
                        .with_field_errors(vec![FieldError::new(
                            "Last-Event-ID",
                            "INVALID_EVENT_ID",
                            "an event id this stream sent (a non-negative integer)",
                        )])
                })?,
        ),
    };
    let message = pb::WatchNotificationsRequest { after_sequence };
    let mut request = request(&context, deadline, &headers, message)?;
    // The stream outlives the request deadline (which bounds only its opening): no
    // grpc-timeout on it.
    request.metadata_mut().remove("grpc-timeout");
    let upstream = client(&state.upstreams)
        .watch_notifications(request)
        .await?
        .into_inner();
    let events = upstream.filter_map(|item| async move {
        match item {
            Ok(response) => match response.event {
                Some(WatchEvent::Notification(notification)) => {
                    let id = notification.sequence.to_string();
                    let reply = NotificationReply::from(notification);
                    Some(
                        Event::default()
                            .event("notification")
                            .id(id)
                            .json_data(reply)
                            .map_err(axum::BoxError::from),
                    )
                }
                Some(WatchEvent::Heartbeat(_)) => Some(Ok(Event::default().comment("heartbeat"))),
                None => None,
            },
            // The client reconnects with its last event id.
            Err(status) => Some(Err(axum::BoxError::from(status))),
        }
    });
    metrics::counter!("gateway_sse_streams_opened_total").increment(1);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response())
}
