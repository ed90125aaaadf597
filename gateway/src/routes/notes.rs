//! `/api/v1/notes/*`, onto `notes.v1.NotesService`: notes, their chapters and topics, lists
//! and batches. HTTP bodies are their own types, converted here. Every route is for a
//! signed-in caller: the token is verified at the edge ([`SignedIn`]) and forwarded, and
//! notes verifies it again.
//!
//! ETags: responses that show a note carry its `ETag` (and chapter and topic writes the
//! note's new one); `If-Match` on writes makes them conditional (412 when the note changed);
//! `If-None-Match` on `GET /api/v1/notes/{id}` answers 304 when the client's copy is current.

use axum::{
    extract::{DefaultBodyLimit, Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use proto::notes::v1::{self as pb, notes_service_client::NotesServiceClient};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::UtoipaMethodRouterExt as _;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{forward as request, rfc3339};
use crate::{
    AppState,
    context::{Deadline, RequestContext, SignedIn},
    error::{ApiError, ErrorCode, FieldError},
    extract::ApiJson,
    upstream::Upstreams,
};

/// Body limit of the routes that carry one note, chapter or topic: a body of 1 MiB of
/// markdown can take 2 MiB as a JSON string (quotes, backslashes and line breaks are
/// escaped), plus the other fields.
pub(crate) const NOTE_BODY_LIMIT: usize = 3 * 1024 * 1024;
/// Body limit of `POST /api/v1/notes/batch`: up to 100 notes of about 80 KiB each; larger
/// notes are created one by one.
pub(crate) const BATCH_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// The batch routes: their own route class, with the longer `GATEWAY_BATCH_REQUEST_TIMEOUT`
/// (up to 500 notes in one transaction).
pub(crate) fn batch_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(batch_create).layer(DefaultBodyLimit::max(BATCH_BODY_LIMIT)))
        .routes(routes!(batch_update))
        .routes(routes!(batch_delete))
}

pub(crate) fn router() -> OpenApiRouter<AppState> {
    let note_limit = DefaultBodyLimit::max(NOTE_BODY_LIMIT);
    OpenApiRouter::new()
        .routes(routes!(list_notes, create_note).layer(note_limit))
        .routes(routes!(get_note, update_note, delete_note).layer(note_limit))
        .routes(routes!(create_chapter).layer(note_limit))
        .routes(routes!(reorder_chapters))
        .routes(routes!(update_chapter, delete_chapter).layer(note_limit))
        .routes(routes!(create_topic).layer(note_limit))
        .routes(routes!(reorder_topics))
        .routes(routes!(update_topic, delete_topic).layer(note_limit))
}

fn client(upstreams: &Upstreams) -> NotesServiceClient<platform::grpc::TracedChannel> {
    NotesServiceClient::new(upstreams.notes.channel.clone())
        .max_decoding_message_size(proto::notes::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::notes::MAX_MESSAGE_BYTES)
}

// ---------------------------------------------------------------------------
// HTTP shapes
// ---------------------------------------------------------------------------

/// A note's state as JSON: `draft`, `published`, `archived`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum Status {
    Draft,
    Published,
    Archived,
}

impl Status {
    fn to_proto(self) -> pb::NoteStatus {
        match self {
            Self::Draft => pb::NoteStatus::Draft,
            Self::Published => pb::NoteStatus::Published,
            Self::Archived => pb::NoteStatus::Archived,
        }
    }

    fn from_proto(value: i32) -> Option<Self> {
        match pb::NoteStatus::try_from(value).ok()? {
            pb::NoteStatus::Draft => Some(Self::Draft),
            pb::NoteStatus::Published => Some(Self::Published),
            pb::NoteStatus::Archived => Some(Self::Archived),
            pb::NoteStatus::Unspecified => None,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NoteBody {
    title: String,
    #[serde(default)]
    body: String,
    /// Default `draft`.
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    tags: Vec<String>,
}

impl NoteBody {
    fn into_proto(self) -> pb::Note {
        pb::Note {
            title: self.title,
            body: self.body,
            status: self
                .status
                .map_or(pb::NoteStatus::Unspecified, Status::to_proto)
                .into(),
            tags: self.tags,
            ..pb::Note::default()
        }
    }
}

/// A PATCH names what it changes: absent (or null) fields stay as they are.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NotePatch {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct NoteReply {
    id: String,
    owner_id: String,
    title: String,
    body: String,
    status: Option<Status>,
    tags: Vec<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
    etag: String,
    chapters: Vec<ChapterReply>,
}

impl From<pb::Note> for NoteReply {
    fn from(n: pb::Note) -> Self {
        Self {
            id: n.note_id,
            owner_id: n.owner_id,
            title: n.title,
            body: n.body,
            status: Status::from_proto(n.status),
            tags: n.tags,
            created_at: rfc3339(n.created_at),
            updated_at: rfc3339(n.updated_at),
            etag: n.etag,
            chapters: n.chapters.into_iter().map(ChapterReply::from).collect(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct NoteSummaryReply {
    id: String,
    title: String,
    status: Option<Status>,
    tags: Vec<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
    etag: String,
}

impl From<pb::NoteSummary> for NoteSummaryReply {
    fn from(n: pb::NoteSummary) -> Self {
        Self {
            id: n.note_id,
            title: n.title,
            status: Status::from_proto(n.status),
            tags: n.tags,
            created_at: rfc3339(n.created_at),
            updated_at: rfc3339(n.updated_at),
            etag: n.etag,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ChapterReply {
    id: String,
    note_id: String,
    title: String,
    body: String,
    position: i32,
    topics: Vec<TopicReply>,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl From<pb::Chapter> for ChapterReply {
    fn from(c: pb::Chapter) -> Self {
        Self {
            id: c.chapter_id,
            note_id: c.note_id,
            title: c.title,
            body: c.body,
            position: c.position,
            topics: c.topics.into_iter().map(TopicReply::from).collect(),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct TopicReply {
    id: String,
    chapter_id: String,
    note_id: String,
    title: String,
    body: String,
    position: i32,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl From<pb::Topic> for TopicReply {
    fn from(t: pb::Topic) -> Self {
        Self {
            id: t.topic_id,
            chapter_id: t.chapter_id,
            note_id: t.note_id,
            title: t.title,
            body: t.body,
            position: t.position,
            created_at: rfc3339(t.created_at),
            updated_at: rfc3339(t.updated_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ListReply {
    items: Vec<NoteSummaryReply>,
    /// Absent on the last page.
    next_cursor: Option<String>,
    /// Notes matching the filters, on all pages.
    total: i32,
}

/// A chapter or topic to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PartBody {
    title: String,
    #[serde(default)]
    body: String,
    /// 0-based index to insert at; absent or past the end appends.
    #[serde(default)]
    position: Option<i32>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PartPatch {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    body: Option<String>,
}

/// A chapter or topic write's answer: the part and the note's new ETag.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct PartReply<T> {
    #[serde(flatten)]
    part: T,
    note_etag: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReorderChaptersBody {
    chapter_ids: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ReorderChaptersReply {
    chapter_ids: Vec<String>,
    note_etag: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReorderTopicsBody {
    topic_ids: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ReorderTopicsReply {
    topic_ids: Vec<String>,
    note_etag: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchCreateBody {
    items: Vec<NoteBody>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct BatchCreateReply {
    items: Vec<NoteReply>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchUpdateBody {
    note_ids: Vec<String>,
    #[serde(default)]
    status: Option<Status>,
    /// Replaces the tags; exclusive with `add_tags` and `remove_tags`.
    #[serde(default)]
    set_tags: Option<Vec<String>>,
    #[serde(default)]
    add_tags: Vec<String>,
    #[serde(default)]
    remove_tags: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct BatchUpdateReply {
    items: Vec<NoteSummaryReply>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchDeleteBody {
    note_ids: Vec<String>,
    /// Ids that are not the caller's notes are skipped instead of failing the batch.
    #[serde(default)]
    allow_missing: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct BatchDeleteReply {
    deleted_count: i32,
}

// ---------------------------------------------------------------------------
// ETags and field names
// ---------------------------------------------------------------------------

/// The `ETag` header for a note's etag (a strong entity tag).
fn etag_header(etag: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&format!("\"{etag}\"")).map_err(ApiError::internal)
}

/// The etag a write is conditional on, from `If-Match`: `None` without the header or with
/// `*` (any current note). One entity tag only. A weak tag never matches (RFC 9110 compares
/// strongly), so it is passed on as a tag no note has.
fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let malformed = || {
        ApiError::new(
            ErrorCode::BadRequest,
            "If-Match must be `*` or one entity tag in quotes, e.g. \"7\"",
        )
    };
    let text = value.to_str().map_err(|_| malformed())?.trim();
    if text == "*" {
        return Ok(None);
    }
    if text.contains(',') {
        return Err(malformed());
    }
    if text.starts_with("W/") {
        return Ok(Some(text.to_owned()));
    }
    text.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .map(|t| Some(t.to_owned()))
        .ok_or_else(malformed)
}

/// Whether `If-None-Match` names `etag` (or is `*`): the client's copy is current.
fn none_match_hits(headers: &HeaderMap, etag: &str) -> bool {
    let Some(text) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    text.split(',').map(str::trim).any(|tag| {
        // If-None-Match compares weakly.
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag == "*" || tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')) == Some(etag)
    })
}

/// Renames the service's field paths to the HTTP body's: each `(from, to)` replaces the
/// prefix `from` (a whole path segment) with `to`; an empty `to` drops it.
fn http_fields(error: ApiError, renames: &[(&str, &str)]) -> ApiError {
    if error.field_errors().is_empty() {
        return error;
    }
    let renamed = error
        .field_errors()
        .iter()
        .map(|e| FieldError {
            field: rename_field(&e.field, renames),
            ..e.clone()
        })
        .collect();
    error.with_field_errors(renamed)
}

fn rename_field(field: &str, renames: &[(&str, &str)]) -> String {
    for (from, to) in renames {
        let Some(rest) = field.strip_prefix(from) else {
            continue;
        };
        if rest.is_empty() || rest.starts_with('[') {
            return format!("{to}{rest}");
        }
        if let Some(rest) = rest.strip_prefix('.') {
            return if to.is_empty() {
                rest.to_owned()
            } else {
                format!("{to}.{rest}")
            };
        }
    }
    field.to_owned()
}

/// Field renames for notes written as a whole (`note.title` → `title`).
const NOTE_FIELDS: &[(&str, &str)] = &[("note", ""), ("update_mask", "")];
const CHAPTER_FIELDS: &[(&str, &str)] = &[("chapter", ""), ("update_mask", "")];
const TOPIC_FIELDS: &[(&str, &str)] = &[("topic", ""), ("update_mask", "")];

// ---------------------------------------------------------------------------
// Notes
// ---------------------------------------------------------------------------

#[utoipa::path(
    post, path = "/api/v1/notes", tag = "notes",
    request_body = NoteBody,
    responses((status = 201, description = "The new note", body = NoteReply, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn create_note(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    ApiJson(body): ApiJson<NoteBody>,
) -> Result<Response, ApiError> {
    let message = pb::CreateNoteRequest {
        note: Some(body.into_proto()),
    };
    let note = client(&state.upstreams)
        .create_note(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| http_fields(s.into(), NOTE_FIELDS))?
        .into_inner()
        .note
        .unwrap_or_default();
    let location = HeaderValue::from_str(&format!("/api/v1/notes/{}", note.note_id))
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::CREATED,
        [
            (header::ETAG, etag_header(&note.etag)?),
            (header::LOCATION, location),
        ],
        ApiJson(NoteReply::from(note)),
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/api/v1/notes/{id}", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("If-None-Match" = Option<String>, Header, description = "ETags the client holds: 304 when one is current")),
    responses(
        (status = 200, description = "The note with its chapters and topics", body = NoteReply, headers(("ETag" = String, description = "The note's version"))),
        (status = 304, description = "The client's copy is current", headers(("ETag" = String, description = "The note's version"))),
    ),
    security(("bearer" = []))
)]
async fn get_note(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let message = pb::GetNoteRequest { note_id: id };
    let note = client(&state.upstreams)
        .get_note(request(&context, deadline, &headers, message)?)
        .await?
        .into_inner()
        .note
        .unwrap_or_default();
    let etag = etag_header(&note.etag)?;
    if none_match_hits(&headers, &note.etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(([(header::ETAG, etag)], ApiJson(NoteReply::from(note))).into_response())
}

#[utoipa::path(
    patch, path = "/api/v1/notes/{id}", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    request_body = NotePatch,
    responses((status = 200, description = "The changed note", body = NoteReply, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn update_note(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<NotePatch>,
) -> Result<Response, ApiError> {
    let mut paths = Vec::new();
    let mut note = pb::Note {
        note_id: id,
        ..pb::Note::default()
    };
    if let Some(title) = patch.title {
        note.title = title;
        paths.push("title".to_owned());
    }
    if let Some(body) = patch.body {
        note.body = body;
        paths.push("body".to_owned());
    }
    if let Some(status) = patch.status {
        note.status = status.to_proto().into();
        paths.push("status".to_owned());
    }
    if let Some(tags) = patch.tags {
        note.tags = tags;
        paths.push("tags".to_owned());
    }
    let message = pb::UpdateNoteRequest {
        note: Some(note),
        update_mask: Some(prost_types::FieldMask { paths }),
        expected_etag: if_match(&headers)?,
    };
    let note = client(&state.upstreams)
        .update_note(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| http_fields(s.into(), NOTE_FIELDS))?
        .into_inner()
        .note
        .unwrap_or_default();
    Ok((
        [(header::ETAG, etag_header(&note.etag)?)],
        ApiJson(NoteReply::from(note)),
    )
        .into_response())
}

#[utoipa::path(
    delete, path = "/api/v1/notes/{id}", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    responses((status = 204, description = "The note is gone")),
    security(("bearer" = []))
)]
async fn delete_note(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let message = pb::DeleteNoteRequest {
        note_id: id,
        expected_etag: if_match(&headers)?,
        allow_missing: false,
    };
    client(&state.upstreams)
        .delete_note(request(&context, deadline, &headers, message)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?status=&tag=a&tag=b&q=&limit=&cursor=`; `tag` repeats (notes with all of them).
fn list_query(query: Option<&str>) -> Result<pb::ListNotesRequest, ApiError> {
    let mut message = pb::ListNotesRequest::default();
    let mut errors = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "status" => match value.as_ref() {
                "" => {}
                "draft" => message.status = pb::NoteStatus::Draft.into(),
                "published" => message.status = pb::NoteStatus::Published.into(),
                "archived" => message.status = pb::NoteStatus::Archived.into(),
                _ => errors.push(FieldError::new(
                    "status",
                    "INVALID_VALUE",
                    "one of draft, published, archived",
                )),
            },
            "tag" => message.tags.push(value.into_owned()),
            "q" => message.query = value.into_owned(),
            "limit" => match value.parse::<i32>() {
                Ok(limit) if limit > 0 => message.page_size = limit,
                _ => errors.push(FieldError::new(
                    "limit",
                    "INVALID_VALUE",
                    "a whole number from 1 (at most 100 are returned)",
                )),
            },
            "cursor" => message.page_token = value.into_owned(),
            other => errors.push(FieldError::new(
                other,
                "UNKNOWN_FIELD",
                "accepted: status, tag, q, limit, cursor",
            )),
        }
    }
    if errors.is_empty() {
        Ok(message)
    } else {
        Err(
            ApiError::new(ErrorCode::ValidationFailed, "the query string is invalid")
                .with_field_errors(errors),
        )
    }
}

#[utoipa::path(
    get, path = "/api/v1/notes", tag = "notes",
    params(
        ("status" = Option<Status>, Query, description = "Only notes in this state"),
        ("tag" = Option<Vec<String>>, Query, explode = true, description = "Only notes with every one of these tags (repeat the parameter)"),
        ("q" = Option<String>, Query, description = "Words the title or body contains"),
        ("limit" = Option<i32>, Query, description = "Page size"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses((status = 200, description = "A page of the caller's notes, newest first", body = ListReply)),
    security(("bearer" = []))
)]
async fn list_notes(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<ApiJson<ListReply>, ApiError> {
    let message = list_query(query.as_deref())?;
    let reply = client(&state.upstreams)
        .list_notes(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| {
            http_fields(
                s.into(),
                &[
                    ("tags", "tag"),
                    ("query", "q"),
                    ("page_size", "limit"),
                    ("page_token", "cursor"),
                ],
            )
        })?
        .into_inner();
    Ok(ApiJson(ListReply {
        items: reply
            .items
            .into_iter()
            .map(NoteSummaryReply::from)
            .collect(),
        next_cursor: Some(reply.next_page_token).filter(|t| !t.is_empty()),
        total: reply.total,
    }))
}

// ---------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------

#[utoipa::path(
    post, path = "/api/v1/notes/batch", tag = "notes",
    request_body = BatchCreateBody,
    responses((status = 201, description = "Every note created (all or none)", body = BatchCreateReply)),
    security(("bearer" = []))
)]
async fn batch_create(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    ApiJson(body): ApiJson<BatchCreateBody>,
) -> Result<(StatusCode, ApiJson<BatchCreateReply>), ApiError> {
    let message = pb::BatchCreateNotesRequest {
        items: body.items.into_iter().map(NoteBody::into_proto).collect(),
    };
    let reply = client(&state.upstreams)
        .batch_create_notes(request(&context, deadline, &headers, message)?)
        .await?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        ApiJson(BatchCreateReply {
            items: reply.notes.into_iter().map(NoteReply::from).collect(),
        }),
    ))
}

#[utoipa::path(
    post, path = "/api/v1/notes/batch-update", tag = "notes",
    request_body = BatchUpdateBody,
    responses((status = 200, description = "Every note changed (all or none)", body = BatchUpdateReply)),
    security(("bearer" = []))
)]
async fn batch_update(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    ApiJson(body): ApiJson<BatchUpdateBody>,
) -> Result<ApiJson<BatchUpdateReply>, ApiError> {
    let message = pb::BatchUpdateNotesRequest {
        note_ids: body.note_ids,
        status: body.status.map(|s| s.to_proto().into()),
        set_tags: body.set_tags.map(|tags| pb::TagList { tags }),
        add_tags: body.add_tags,
        remove_tags: body.remove_tags,
    };
    let reply = client(&state.upstreams)
        .batch_update_notes(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| http_fields(s.into(), &[("set_tags.tags", "set_tags")]))?
        .into_inner();
    Ok(ApiJson(BatchUpdateReply {
        items: reply
            .notes
            .into_iter()
            .map(NoteSummaryReply::from)
            .collect(),
    }))
}

#[utoipa::path(
    post, path = "/api/v1/notes/batch-delete", tag = "notes",
    request_body = BatchDeleteBody,
    responses((status = 200, description = "The notes deleted (all or none)", body = BatchDeleteReply)),
    security(("bearer" = []))
)]
async fn batch_delete(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    ApiJson(body): ApiJson<BatchDeleteBody>,
) -> Result<ApiJson<BatchDeleteReply>, ApiError> {
    let message = pb::BatchDeleteNotesRequest {
        note_ids: body.note_ids,
        allow_missing: body.allow_missing,
    };
    let reply = client(&state.upstreams)
        .batch_delete_notes(request(&context, deadline, &headers, message)?)
        .await?
        .into_inner();
    Ok(ApiJson(BatchDeleteReply {
        deleted_count: reply.deleted_count,
    }))
}

// ---------------------------------------------------------------------------
// Chapters and topics
// ---------------------------------------------------------------------------

#[utoipa::path(
    post, path = "/api/v1/notes/{id}/chapters", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    request_body = PartBody,
    responses((status = 201, description = "The new chapter and the note's new ETag", body = PartReply<ChapterReply>, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn create_chapter(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(note_id): Path<String>,
    ApiJson(body): ApiJson<PartBody>,
) -> Result<Response, ApiError> {
    let message = pb::CreateChapterRequest {
        note_id,
        chapter: Some(pb::Chapter {
            title: body.title,
            body: body.body,
            ..pb::Chapter::default()
        }),
        position: body.position,
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .create_chapter(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| http_fields(s.into(), CHAPTER_FIELDS))?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        [(header::ETAG, etag_header(&reply.note_etag)?)],
        ApiJson(PartReply {
            part: ChapterReply::from(reply.chapter.unwrap_or_default()),
            note_etag: reply.note_etag,
        }),
    )
        .into_response())
}

#[utoipa::path(
    patch, path = "/api/v1/notes/{id}/chapters/{chapter_id}", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("chapter_id" = String, Path, description = "The chapter id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    request_body = PartPatch,
    responses((status = 200, description = "The changed chapter and the note's new ETag", body = PartReply<ChapterReply>, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn update_chapter(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path((note_id, chapter_id)): Path<(String, String)>,
    ApiJson(patch): ApiJson<PartPatch>,
) -> Result<Response, ApiError> {
    let mut paths = Vec::new();
    let mut chapter = pb::Chapter {
        note_id,
        chapter_id,
        ..pb::Chapter::default()
    };
    if let Some(title) = patch.title {
        chapter.title = title;
        paths.push("title".to_owned());
    }
    if let Some(body) = patch.body {
        chapter.body = body;
        paths.push("body".to_owned());
    }
    let message = pb::UpdateChapterRequest {
        chapter: Some(chapter),
        update_mask: Some(prost_types::FieldMask { paths }),
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .update_chapter(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| http_fields(s.into(), CHAPTER_FIELDS))?
        .into_inner();
    Ok((
        [(header::ETAG, etag_header(&reply.note_etag)?)],
        ApiJson(PartReply {
            part: ChapterReply::from(reply.chapter.unwrap_or_default()),
            note_etag: reply.note_etag,
        }),
    )
        .into_response())
}

#[utoipa::path(
    delete, path = "/api/v1/notes/{id}/chapters/{chapter_id}", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("chapter_id" = String, Path, description = "The chapter id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    responses((status = 204, description = "The chapter and its topics are gone", headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn delete_chapter(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path((note_id, chapter_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let message = pb::DeleteChapterRequest {
        note_id,
        chapter_id,
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .delete_chapter(request(&context, deadline, &headers, message)?)
        .await?
        .into_inner();
    Ok((
        StatusCode::NO_CONTENT,
        [(header::ETAG, etag_header(&reply.note_etag)?)],
    )
        .into_response())
}

#[utoipa::path(
    post, path = "/api/v1/notes/{id}/chapters/reorder", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    request_body = ReorderChaptersBody,
    responses((status = 200, description = "The chapters' new order", body = ReorderChaptersReply, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn reorder_chapters(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path(note_id): Path<String>,
    ApiJson(body): ApiJson<ReorderChaptersBody>,
) -> Result<Response, ApiError> {
    let message = pb::ReorderChaptersRequest {
        note_id,
        chapter_ids: body.chapter_ids,
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .reorder_chapters(request(&context, deadline, &headers, message)?)
        .await?
        .into_inner();
    Ok((
        [(header::ETAG, etag_header(&reply.note_etag)?)],
        ApiJson(ReorderChaptersReply {
            chapter_ids: reply.chapter_ids,
            note_etag: reply.note_etag,
        }),
    )
        .into_response())
}

#[utoipa::path(
    post, path = "/api/v1/notes/{id}/chapters/{chapter_id}/topics", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("chapter_id" = String, Path, description = "The chapter id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    request_body = PartBody,
    responses((status = 201, description = "The new topic and the note's new ETag", body = PartReply<TopicReply>, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn create_topic(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path((note_id, chapter_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<PartBody>,
) -> Result<Response, ApiError> {
    let message = pb::CreateTopicRequest {
        note_id,
        chapter_id,
        topic: Some(pb::Topic {
            title: body.title,
            body: body.body,
            ..pb::Topic::default()
        }),
        position: body.position,
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .create_topic(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| http_fields(s.into(), TOPIC_FIELDS))?
        .into_inner();
    Ok((
        StatusCode::CREATED,
        [(header::ETAG, etag_header(&reply.note_etag)?)],
        ApiJson(PartReply {
            part: TopicReply::from(reply.topic.unwrap_or_default()),
            note_etag: reply.note_etag,
        }),
    )
        .into_response())
}

#[utoipa::path(
    patch, path = "/api/v1/notes/{id}/chapters/{chapter_id}/topics/{topic_id}", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("chapter_id" = String, Path, description = "The chapter id"), ("topic_id" = String, Path, description = "The topic id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    request_body = PartPatch,
    responses((status = 200, description = "The changed topic and the note's new ETag", body = PartReply<TopicReply>, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn update_topic(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path((note_id, chapter_id, topic_id)): Path<(String, String, String)>,
    ApiJson(patch): ApiJson<PartPatch>,
) -> Result<Response, ApiError> {
    let mut paths = Vec::new();
    let mut topic = pb::Topic {
        note_id,
        chapter_id,
        topic_id,
        ..pb::Topic::default()
    };
    if let Some(title) = patch.title {
        topic.title = title;
        paths.push("title".to_owned());
    }
    if let Some(body) = patch.body {
        topic.body = body;
        paths.push("body".to_owned());
    }
    let message = pb::UpdateTopicRequest {
        topic: Some(topic),
        update_mask: Some(prost_types::FieldMask { paths }),
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .update_topic(request(&context, deadline, &headers, message)?)
        .await
        .map_err(|s| http_fields(s.into(), TOPIC_FIELDS))?
        .into_inner();
    Ok((
        [(header::ETAG, etag_header(&reply.note_etag)?)],
        ApiJson(PartReply {
            part: TopicReply::from(reply.topic.unwrap_or_default()),
            note_etag: reply.note_etag,
        }),
    )
        .into_response())
}

#[utoipa::path(
    delete, path = "/api/v1/notes/{id}/chapters/{chapter_id}/topics/{topic_id}", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("chapter_id" = String, Path, description = "The chapter id"), ("topic_id" = String, Path, description = "The topic id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    responses((status = 204, description = "The topic is gone", headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn delete_topic(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path((note_id, chapter_id, topic_id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let message = pb::DeleteTopicRequest {
        note_id,
        chapter_id,
        topic_id,
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .delete_topic(request(&context, deadline, &headers, message)?)
        .await?
        .into_inner();
    Ok((
        StatusCode::NO_CONTENT,
        [(header::ETAG, etag_header(&reply.note_etag)?)],
    )
        .into_response())
}

#[utoipa::path(
    post, path = "/api/v1/notes/{id}/chapters/{chapter_id}/topics/reorder", tag = "notes",
    params(("id" = String, Path, description = "The note id"), ("chapter_id" = String, Path, description = "The chapter id"), ("If-Match" = Option<String>, Header, description = "The note's ETag: the write applies only to that version (412 otherwise)")),
    request_body = ReorderTopicsBody,
    responses((status = 200, description = "The topics' new order", body = ReorderTopicsReply, headers(("ETag" = String, description = "The note's version")))),
    security(("bearer" = []))
)]
async fn reorder_topics(
    State(state): State<AppState>,
    context: RequestContext,
    deadline: Deadline,
    _signed_in: SignedIn,
    headers: HeaderMap,
    Path((note_id, chapter_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<ReorderTopicsBody>,
) -> Result<Response, ApiError> {
    let message = pb::ReorderTopicsRequest {
        note_id,
        chapter_id,
        topic_ids: body.topic_ids,
        expected_note_etag: if_match(&headers)?,
    };
    let reply = client(&state.upstreams)
        .reorder_topics(request(&context, deadline, &headers, message)?)
        .await?
        .into_inner();
    Ok((
        [(header::ETAG, etag_header(&reply.note_etag)?)],
        ApiJson(ReorderTopicsReply {
            topic_ids: reply.topic_ids,
            note_etag: reply.note_etag,
        }),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: fail loudly")]

    use super::*;

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.parse().unwrap());
        headers
    }

    #[test]
    fn if_match_takes_one_strong_tag_or_star() {
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(if_match(&headers(header::IF_MATCH, "*")).unwrap(), None);
        assert_eq!(
            if_match(&headers(header::IF_MATCH, "\"7\"")).unwrap(),
            Some("7".to_owned())
        );
        // Weak tags go on as tags no note has: the write answers 412.
        assert_eq!(
            if_match(&headers(header::IF_MATCH, "W/\"7\"")).unwrap(),
            Some("W/\"7\"".to_owned())
        );
        for bad in ["7", "\"6\", \"7\""] {
            assert_eq!(
                if_match(&headers(header::IF_MATCH, bad))
                    .unwrap_err()
                    .code(),
                "BAD_REQUEST"
            );
        }
    }

    #[test]
    fn if_none_match_compares_weakly() {
        assert!(none_match_hits(
            &headers(header::IF_NONE_MATCH, "\"3\", W/\"7\""),
            "7"
        ));
        assert!(none_match_hits(&headers(header::IF_NONE_MATCH, "*"), "7"));
        assert!(!none_match_hits(
            &headers(header::IF_NONE_MATCH, "\"6\""),
            "7"
        ));
        assert!(!none_match_hits(&HeaderMap::new(), "7"));
    }

    #[test]
    fn service_field_paths_become_body_paths() {
        assert_eq!(rename_field("note.title", NOTE_FIELDS), "title");
        assert_eq!(rename_field("note.tags[3]", NOTE_FIELDS), "tags[3]");
        assert_eq!(rename_field("update_mask", NOTE_FIELDS), "");
        assert_eq!(
            rename_field("items[2].title", NOTE_FIELDS),
            "items[2].title"
        );
        assert_eq!(rename_field("notes.x", NOTE_FIELDS), "notes.x");
        assert_eq!(rename_field("tags[1]", &[("tags", "tag")]), "tag[1]");
        assert_eq!(
            rename_field("set_tags.tags[0]", &[("set_tags.tags", "set_tags")]),
            "set_tags[0]"
        );
    }

    #[test]
    fn list_queries_repeat_tags_and_refuse_unknown_parameters() {
        let message = list_query(Some(
            "status=published&tag=a&tag=b%20c&q=rust+async&limit=5&cursor=xyz",
        ))
        .unwrap();
        assert_eq!(message.status, i32::from(pb::NoteStatus::Published));
        assert_eq!(message.tags, ["a", "b c"]);
        assert_eq!(message.query, "rust async");
        assert_eq!((message.page_size, message.page_token.as_str()), (5, "xyz"));
        assert_eq!(list_query(None).unwrap(), pb::ListNotesRequest::default());
        let error = list_query(Some("status=nope&limit=0&sort=new")).unwrap_err();
        let fields: Vec<&str> = error
            .field_errors()
            .iter()
            .map(|e| e.field.as_str())
            .collect();
        assert_eq!(fields, ["status", "limit", "sort"]);
    }
}
