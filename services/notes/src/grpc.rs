//! `notes.v1.NotesService`: translates between protobuf and the domain; holds no SQL.
//!
//! Every RPC authenticates the caller with [`platform::identity`] and acts on the caller's
//! own notes only. Reads go through the cache; writes invalidate the caller's cached details
//! and lists after they commit and before they answer.

use std::{collections::HashSet, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use platform::{
    grpc::TracedChannel,
    identity::{Caller, Identity},
    metrics::{PoolFigures, Pools},
};
use proto::{
    notes::v1::{self as pb, notes_service_server::NotesService},
    profile::v1::{
        GetEntitlementsRequest as ProfileEntitlementsRequest,
        profile_service_client::ProfileServiceClient,
    },
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use crate::{
    cache::{Lookup, NotesCache},
    domain::{self, Body, FieldViolation, NoteStatus, Title, Violations},
    error::NotesError,
    jobs::{Cancelled, JobRow, JobSpec, Kind, NotificationRow, Queue, Started, quota_day},
    notifications::Hub,
    store::{
        BatchChange, BatchRefusal, ChapterRow, Created, Cursor, ListFilter, NewNote, NoteChanges,
        NoteDetail, NoteRow, Store, SummaryRow, TopicRow,
    },
};

const PAGE_SIZE_DEFAULT: i64 = 20;
const PAGE_SIZE_MAX: i64 = 100;
const BATCH_CREATE_MAX: usize = 100;
const BATCH_IDS_MAX: usize = 500;

/// Everything the RPCs share.
#[derive(Debug, Clone)]
pub struct NotesApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    cache: NotesCache,
    identity: Identity,
    generation: Generation,
    operations: Operations,
}

/// What GetPoolStatus reports.
#[derive(Debug, Clone)]
pub struct Operations {
    pub pools: Pools,
    /// This replica's name.
    pub instance: String,
}

impl NotesApi {
    pub fn new(
        store: Store,
        cache: NotesCache,
        identity: Identity,
        generation: Generation,
        operations: Operations,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                cache,
                identity,
                generation,
                operations,
            }),
        }
    }
}

impl Inner {
    /// The signed-in user calling: every RPC here acts on a user's own data.
    async fn user(&self, metadata: &MetadataMap) -> Result<Uuid, NotesError> {
        match self.identity.authenticate(metadata).await {
            Ok(Caller::User { user_id, .. }) => Ok(user_id),
            Ok(Caller::Service { .. }) => Err(NotesError::UserTokenRequired),
            Err(status) => Err(NotesError::Identity(status)),
        }
    }

    async fn create_note(
        &self,
        request: Request<pb::CreateNoteRequest>,
    ) -> Result<pb::CreateNoteResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let note = request.into_inner().note.unwrap_or_default();
        let mut violations = Violations::default();
        let new = parse_new_note("note", note, &mut violations);
        let Some(new) = new.filter(|_| violations.is_empty()) else {
            return Err(NotesError::Invalid(violations.0));
        };
        let created = self.store.create_note(user, &new).await?;
        self.cache.invalidate(user).await;
        tracing::debug!(note_id = %new.id, "note created");
        Ok(pb::CreateNoteResponse {
            note: Some(created_note_message(user, new, created)),
        })
    }

    /// The note with its chapters: from the cache, or loaded and cached.
    async fn note(&self, user: Uuid, note_id: Uuid) -> Result<pb::Note, NotesError> {
        let fill = match self.cache.detail::<pb::Note>(user, note_id).await {
            Lookup::Hit(note) => return Ok(note),
            Lookup::Miss(fill) => Some(fill),
            Lookup::Bypass => None,
        };
        let detail = self
            .store
            .note_detail(user, note_id)
            .await?
            .ok_or(NotesError::NoteNotFound)?;
        let note = detail_message(detail);
        if let Some(fill) = fill {
            self.cache.fill(fill, &note).await;
        }
        Ok(note)
    }

    async fn get_note(
        &self,
        request: Request<pb::GetNoteRequest>,
    ) -> Result<pb::GetNoteResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let note_id = domain::id("note_id", &request.get_ref().note_id)?;
        Ok(pb::GetNoteResponse {
            note: Some(self.note(user, note_id).await?),
        })
    }

    async fn update_note(
        &self,
        request: Request<pb::UpdateNoteRequest>,
    ) -> Result<pb::UpdateNoteResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut note = body.note.unwrap_or_default();
        let note_id = domain::id("note.note_id", &note.note_id)?;
        let mut violations = Violations::default();
        let mut changes = NoteChanges::default();
        for path in mask_paths(body.update_mask.as_ref(), &mut violations) {
            match path.as_str() {
                "title" => {
                    changes.title = violations.check(Title::parse("note.title", &note.title))
                }
                "body" => {
                    let text = std::mem::take(&mut note.body);
                    changes.body = violations.check(Body::parse("note.body", text));
                }
                "status" => match NoteStatus::from_proto("note.status", note.status) {
                    Ok(Some(status)) => changes.status = Some(status),
                    Ok(None) => violations.push(FieldViolation::new(
                        "note.status",
                        "REQUIRED",
                        "a note's status is draft, published or archived",
                    )),
                    Err(violation) => violations.push(violation),
                },
                "tags" => changes.tags = domain::tags("note.tags", &note.tags, &mut violations),
                "note_id" | "owner_id" | "created_at" | "updated_at" | "etag" | "chapters" => {
                    violations.push(read_only(&path));
                }
                _ => violations.push(unknown_path(&path)),
            }
        }
        if !violations.is_empty() {
            return Err(NotesError::Invalid(violations.0));
        }
        let expected = domain::expected_version(body.expected_etag.as_deref());
        self.store
            .update_note(user, note_id, &changes, expected)
            .await?;
        self.cache.invalidate(user).await;
        // The response shows the note as it is now, with its chapters and new ETag.
        let detail = self
            .store
            .note_detail(user, note_id)
            .await?
            .ok_or(NotesError::NoteNotFound)?;
        Ok(pb::UpdateNoteResponse {
            note: Some(detail_message(detail)),
        })
    }

    async fn delete_note(
        &self,
        request: Request<pb::DeleteNoteRequest>,
    ) -> Result<pb::DeleteNoteResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let note_id = domain::id("note_id", &body.note_id)?;
        let expected = domain::expected_version(body.expected_etag.as_deref());
        match self.store.delete_note(user, note_id, expected).await {
            Ok(()) => self.cache.invalidate(user).await,
            Err(NotesError::NoteNotFound) if body.allow_missing => {}
            Err(e) => return Err(e),
        }
        Ok(pb::DeleteNoteResponse {})
    }

    async fn list_notes(
        &self,
        request: Request<pb::ListNotesRequest>,
    ) -> Result<pb::ListNotesResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let status = violations
            .check(NoteStatus::from_proto("status", body.status))
            .flatten();
        let tags = domain::tags("tags", &body.tags, &mut violations);
        let text = violations
            .check(domain::text_query("query", &body.query))
            .flatten();
        let page_size = match i64::from(body.page_size) {
            0 => PAGE_SIZE_DEFAULT,
            size if size < 0 => {
                violations.push(FieldViolation::new(
                    "page_size",
                    "INVALID_VALUE",
                    "must not be negative",
                ));
                PAGE_SIZE_DEFAULT
            }
            size => size.min(PAGE_SIZE_MAX),
        };
        let mut tags = tags.unwrap_or_default();
        // The same set of tags in any order is the same filter.
        tags.sort();
        let filter = ListFilter { status, tags, text };
        let fingerprint = filter_fingerprint(&filter);
        let cursor = if body.page_token.is_empty() {
            None
        } else {
            violations.check(decode_page_token(&body.page_token, &fingerprint))
        };
        if !violations.is_empty() {
            return Err(NotesError::Invalid(violations.0));
        }

        let page_key = format!("{fingerprint}|{page_size}|{}", body.page_token);
        let fill = match self
            .cache
            .list::<pb::ListNotesResponse>(user, page_key.as_bytes())
            .await
        {
            Lookup::Hit(page) => return Ok(page),
            Lookup::Miss(fill) => Some(fill),
            Lookup::Bypass => None,
        };
        // One more than a page: its presence says there is a next page.
        let mut page = self
            .store
            .list_notes(user, &filter, cursor, page_size + 1)
            .await?;
        let has_more = i64::try_from(page.items.len()).unwrap_or(i64::MAX) > page_size;
        page.items
            .truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
        let next_page_token = match page.items.last() {
            Some(last) if has_more => encode_page_token(last.created_at, last.id, &fingerprint),
            _ => String::new(),
        };
        let response = pb::ListNotesResponse {
            items: page.items.into_iter().map(summary_message).collect(),
            next_page_token,
            total: i32::try_from(page.total).unwrap_or(i32::MAX),
        };
        if let Some(fill) = fill {
            self.cache.fill(fill, &response).await;
        }
        Ok(response)
    }

    async fn batch_create_notes(
        &self,
        request: Request<pb::BatchCreateNotesRequest>,
    ) -> Result<pb::BatchCreateNotesResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let items = request.into_inner().items;
        if items.is_empty() || items.len() > BATCH_CREATE_MAX {
            return Err(FieldViolation::new(
                "items",
                if items.is_empty() {
                    "REQUIRED"
                } else {
                    "TOO_MANY"
                },
                format!("1 to {BATCH_CREATE_MAX} notes per batch"),
            )
            .into());
        }
        let mut violations = Violations::default();
        let parsed: Vec<Option<NewNote>> = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_new_note(&format!("items[{i}]"), item, &mut violations))
            .collect();
        if !violations.is_empty() {
            return Err(NotesError::Invalid(violations.0));
        }
        let notes: Vec<NewNote> = parsed.into_iter().flatten().collect();
        let created = self.store.create_notes(user, &notes).await?;
        self.cache.invalidate(user).await;
        Ok(pb::BatchCreateNotesResponse {
            notes: notes
                .into_iter()
                .zip(created)
                .map(|(note, created)| created_note_message(user, note, created))
                .collect(),
        })
    }

    async fn batch_update_notes(
        &self,
        request: Request<pb::BatchUpdateNotesRequest>,
    ) -> Result<pb::BatchUpdateNotesResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let ids = batch_ids(&body.note_ids, &mut violations);
        let status = match body.status.map(|s| NoteStatus::from_proto("status", s)) {
            None => None,
            Some(Ok(Some(status))) => Some(status),
            Some(Ok(None)) => {
                violations.push(FieldViolation::new(
                    "status",
                    "INVALID_VALUE",
                    "a note's status is draft, published or archived",
                ));
                None
            }
            Some(Err(violation)) => {
                violations.push(violation);
                None
            }
        };
        let set_tags = body
            .set_tags
            .as_ref()
            .map(|list| domain::tags("set_tags.tags", &list.tags, &mut violations));
        let add_tags = domain::tags("add_tags", &body.add_tags, &mut violations);
        let remove_tags = domain::tags("remove_tags", &body.remove_tags, &mut violations);
        if body.set_tags.is_some() && !(body.add_tags.is_empty() && body.remove_tags.is_empty()) {
            violations.push(FieldViolation::new(
                "set_tags",
                "CONFLICT",
                "set_tags replaces the tags: it cannot be combined with add_tags or remove_tags",
            ));
        }
        if body.status.is_none()
            && body.set_tags.is_none()
            && body.add_tags.is_empty()
            && body.remove_tags.is_empty()
        {
            violations.push(FieldViolation::new(
                "status",
                "REQUIRED",
                "nothing to change: give a status, set_tags, add_tags or remove_tags",
            ));
        }
        if !violations.is_empty() {
            return Err(NotesError::Invalid(violations.0));
        }
        let change = BatchChange {
            status,
            set_tags: set_tags.flatten(),
            add_tags: add_tags.unwrap_or_default(),
            remove_tags: remove_tags.unwrap_or_default(),
        };
        match self.store.update_notes(user, &ids, &change).await? {
            Ok(rows) => {
                self.cache.invalidate(user).await;
                Ok(pb::BatchUpdateNotesResponse {
                    notes: rows.into_iter().map(summary_message).collect(),
                })
            }
            Err(BatchRefusal::Missing(missing)) => Err(NotesError::UnknownNotes(name_ids(
                &ids,
                &missing,
                |field| FieldViolation::new(field, "NOT_FOUND", "not one of your notes"),
            ))),
            Err(BatchRefusal::TooManyTags(over)) => {
                Err(NotesError::Invalid(name_ids(&ids, &over, |field| {
                    FieldViolation::new(
                        field,
                        "TOO_MANY_TAGS",
                        format!("this note would have more than {} tags", domain::TAGS_MAX),
                    )
                })))
            }
        }
    }

    async fn batch_delete_notes(
        &self,
        request: Request<pb::BatchDeleteNotesRequest>,
    ) -> Result<pb::BatchDeleteNotesResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let ids = batch_ids(&body.note_ids, &mut violations);
        if !violations.is_empty() {
            return Err(NotesError::Invalid(violations.0));
        }
        match self
            .store
            .delete_notes(user, &ids, body.allow_missing)
            .await?
        {
            Ok(deleted) => {
                if deleted > 0 {
                    self.cache.invalidate(user).await;
                }
                Ok(pb::BatchDeleteNotesResponse {
                    deleted_count: i32::try_from(deleted).unwrap_or(i32::MAX),
                })
            }
            Err(missing) => Err(NotesError::UnknownNotes(name_ids(
                &ids,
                &missing,
                |field| FieldViolation::new(field, "NOT_FOUND", "not one of your notes"),
            ))),
        }
    }

    async fn create_chapter(
        &self,
        request: Request<pb::CreateChapterRequest>,
    ) -> Result<pb::CreateChapterResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let chapter = body.chapter.unwrap_or_default();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("note_id", &body.note_id));
        let title = violations.check(Title::parse("chapter.title", &chapter.title));
        let text = violations.check(Body::parse("chapter.body", chapter.body));
        let position = violations.check(position("position", body.position));
        let (Some(note_id), Some(title), Some(text), Some(position)) =
            (note_id, title, text, position)
        else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let (chapter, version) = self
            .store
            .create_chapter(
                user,
                note_id,
                Uuid::now_v7(),
                &title,
                &text,
                position,
                expected,
            )
            .await?;
        self.cache.invalidate(user).await;
        Ok(pb::CreateChapterResponse {
            chapter: Some(chapter_message(note_id, chapter)),
            note_etag: domain::etag(version),
        })
    }

    async fn update_chapter(
        &self,
        request: Request<pb::UpdateChapterRequest>,
    ) -> Result<pb::UpdateChapterResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let chapter = body.chapter.unwrap_or_default();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("chapter.note_id", &chapter.note_id));
        let chapter_id = violations.check(domain::id("chapter.chapter_id", &chapter.chapter_id));
        let (mut title, mut text) = (None, None);
        let mut chapter_body = Some(chapter.body);
        for path in mask_paths(body.update_mask.as_ref(), &mut violations) {
            match path.as_str() {
                "title" => title = violations.check(Title::parse("chapter.title", &chapter.title)),
                "body" => {
                    if let Some(raw) = chapter_body.take() {
                        text = violations.check(Body::parse("chapter.body", raw));
                    }
                }
                "position" => violations.push(FieldViolation::new(
                    "update_mask",
                    "READ_ONLY",
                    "`position` changes through ReorderChapters",
                )),
                "chapter_id" | "note_id" | "topics" | "created_at" | "updated_at" => {
                    violations.push(read_only(&path));
                }
                _ => violations.push(unknown_path(&path)),
            }
        }
        let (Some(note_id), Some(chapter_id), true) = (note_id, chapter_id, violations.is_empty())
        else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let (chapter, version) = self
            .store
            .update_chapter(
                user,
                note_id,
                chapter_id,
                title.as_ref(),
                text.as_ref(),
                expected,
            )
            .await?;
        self.cache.invalidate(user).await;
        Ok(pb::UpdateChapterResponse {
            chapter: Some(chapter_message(note_id, chapter)),
            note_etag: domain::etag(version),
        })
    }

    async fn delete_chapter(
        &self,
        request: Request<pb::DeleteChapterRequest>,
    ) -> Result<pb::DeleteChapterResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("note_id", &body.note_id));
        let chapter_id = violations.check(domain::id("chapter_id", &body.chapter_id));
        let (Some(note_id), Some(chapter_id)) = (note_id, chapter_id) else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let version = self
            .store
            .delete_chapter(user, note_id, chapter_id, expected)
            .await?;
        self.cache.invalidate(user).await;
        Ok(pb::DeleteChapterResponse {
            note_etag: domain::etag(version),
        })
    }

    async fn reorder_chapters(
        &self,
        request: Request<pb::ReorderChaptersRequest>,
    ) -> Result<pb::ReorderChaptersResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("note_id", &body.note_id));
        let ids = distinct_ids("chapter_ids", &body.chapter_ids, &mut violations);
        let Some(note_id) = note_id.filter(|_| violations.is_empty()) else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let version = self
            .store
            .reorder_chapters(user, note_id, &ids, expected)
            .await?
            .ok_or_else(|| {
                FieldViolation::new(
                    "chapter_ids",
                    "NOT_A_PERMUTATION",
                    "must list every chapter of the note, each once",
                )
            })?;
        self.cache.invalidate(user).await;
        Ok(pb::ReorderChaptersResponse {
            chapter_ids: ids.iter().map(Uuid::to_string).collect(),
            note_etag: domain::etag(version),
        })
    }

    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<pb::CreateTopicResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let topic = body.topic.unwrap_or_default();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("note_id", &body.note_id));
        let chapter_id = violations.check(domain::id("chapter_id", &body.chapter_id));
        let title = violations.check(Title::parse("topic.title", &topic.title));
        let text = violations.check(Body::parse("topic.body", topic.body));
        let position = violations.check(position("position", body.position));
        let (Some(note_id), Some(chapter_id), Some(title), Some(text), Some(position)) =
            (note_id, chapter_id, title, text, position)
        else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let (topic, version) = self
            .store
            .create_topic(
                user,
                note_id,
                chapter_id,
                Uuid::now_v7(),
                &title,
                &text,
                position,
                expected,
            )
            .await?;
        self.cache.invalidate(user).await;
        Ok(pb::CreateTopicResponse {
            topic: Some(topic_message(note_id, topic)),
            note_etag: domain::etag(version),
        })
    }

    async fn update_topic(
        &self,
        request: Request<pb::UpdateTopicRequest>,
    ) -> Result<pb::UpdateTopicResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let topic = body.topic.unwrap_or_default();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("topic.note_id", &topic.note_id));
        let chapter_id = violations.check(domain::id("topic.chapter_id", &topic.chapter_id));
        let topic_id = violations.check(domain::id("topic.topic_id", &topic.topic_id));
        let (mut title, mut text) = (None, None);
        let mut topic_body = Some(topic.body);
        for path in mask_paths(body.update_mask.as_ref(), &mut violations) {
            match path.as_str() {
                "title" => title = violations.check(Title::parse("topic.title", &topic.title)),
                "body" => {
                    if let Some(raw) = topic_body.take() {
                        text = violations.check(Body::parse("topic.body", raw));
                    }
                }
                "position" => violations.push(FieldViolation::new(
                    "update_mask",
                    "READ_ONLY",
                    "`position` changes through ReorderTopics",
                )),
                "topic_id" | "chapter_id" | "note_id" | "created_at" | "updated_at" => {
                    violations.push(read_only(&path));
                }
                _ => violations.push(unknown_path(&path)),
            }
        }
        let (Some(note_id), Some(chapter_id), Some(topic_id), true) =
            (note_id, chapter_id, topic_id, violations.is_empty())
        else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let (topic, version) = self
            .store
            .update_topic(
                user,
                note_id,
                chapter_id,
                topic_id,
                title.as_ref(),
                text.as_ref(),
                expected,
            )
            .await?;
        self.cache.invalidate(user).await;
        Ok(pb::UpdateTopicResponse {
            topic: Some(topic_message(note_id, topic)),
            note_etag: domain::etag(version),
        })
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<pb::DeleteTopicResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("note_id", &body.note_id));
        let chapter_id = violations.check(domain::id("chapter_id", &body.chapter_id));
        let topic_id = violations.check(domain::id("topic_id", &body.topic_id));
        let (Some(note_id), Some(chapter_id), Some(topic_id)) = (note_id, chapter_id, topic_id)
        else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let version = self
            .store
            .delete_topic(user, note_id, chapter_id, topic_id, expected)
            .await?;
        self.cache.invalidate(user).await;
        Ok(pb::DeleteTopicResponse {
            note_etag: domain::etag(version),
        })
    }

    async fn reorder_topics(
        &self,
        request: Request<pb::ReorderTopicsRequest>,
    ) -> Result<pb::ReorderTopicsResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let note_id = violations.check(domain::id("note_id", &body.note_id));
        let chapter_id = violations.check(domain::id("chapter_id", &body.chapter_id));
        let ids = distinct_ids("topic_ids", &body.topic_ids, &mut violations);
        let (Some(note_id), Some(chapter_id), true) = (note_id, chapter_id, violations.is_empty())
        else {
            return Err(NotesError::Invalid(violations.0));
        };
        let expected = domain::expected_version(body.expected_note_etag.as_deref());
        let version = self
            .store
            .reorder_topics(user, note_id, chapter_id, &ids, expected)
            .await?
            .ok_or_else(|| {
                FieldViolation::new(
                    "topic_ids",
                    "NOT_A_PERMUTATION",
                    "must list every topic of the chapter, each once",
                )
            })?;
        self.cache.invalidate(user).await;
        Ok(pb::ReorderTopicsResponse {
            topic_ids: ids.iter().map(Uuid::to_string).collect(),
            note_etag: domain::etag(version),
        })
    }
}

/// A note to create from the wire (title, body, status, tags; output-only fields ignored),
/// its violations named under `prefix` (`note`, `items[3]`).
fn parse_new_note(prefix: &str, note: pb::Note, violations: &mut Violations) -> Option<NewNote> {
    let title = violations.check(Title::parse(&format!("{prefix}.title"), &note.title));
    let body = violations.check(Body::parse(&format!("{prefix}.body"), note.body));
    let status = violations.check(NoteStatus::from_proto(
        &format!("{prefix}.status"),
        note.status,
    ));
    let tags = domain::tags(&format!("{prefix}.tags"), &note.tags, violations);
    Some(NewNote {
        id: Uuid::now_v7(),
        title: title?,
        body: body?,
        status: status?.unwrap_or(NoteStatus::Draft),
        tags: tags?,
    })
}

/// The paths of an update mask; none is a violation (a PATCH names what it changes).
fn mask_paths(mask: Option<&prost_types::FieldMask>, violations: &mut Violations) -> Vec<String> {
    let paths: Vec<String> = mask.map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        violations.push(FieldViolation::new(
            "update_mask",
            "REQUIRED",
            "name the fields to change",
        ));
    }
    paths
}

fn read_only(path: &str) -> FieldViolation {
    FieldViolation::new(
        "update_mask",
        "READ_ONLY",
        format!("`{path}` cannot be changed"),
    )
}

fn unknown_path(path: &str) -> FieldViolation {
    FieldViolation::new(
        "update_mask",
        "UNKNOWN_FIELD",
        format!("`{path}` is not a field that can be changed"),
    )
}

/// An insert position: unset = the end; negative is refused.
fn position(field: &str, position: Option<i32>) -> Result<Option<i32>, FieldViolation> {
    match position {
        Some(p) if p < 0 => Err(FieldViolation::new(
            field,
            "INVALID_VALUE",
            "must not be negative",
        )),
        other => Ok(other),
    }
}

/// Ids for a batch: 1 to 500, each a UUID, none twice.
fn batch_ids(raw: &[String], violations: &mut Violations) -> Vec<Uuid> {
    if raw.is_empty() || raw.len() > BATCH_IDS_MAX {
        violations.push(FieldViolation::new(
            "note_ids",
            if raw.is_empty() {
                "REQUIRED"
            } else {
                "TOO_MANY"
            },
            format!("1 to {BATCH_IDS_MAX} note ids per batch"),
        ));
        return Vec::new();
    }
    distinct_ids("note_ids", raw, violations)
}

/// Each entry a UUID, none twice; violations name the entry (`chapter_ids[3]`).
fn distinct_ids(field: &str, raw: &[String], violations: &mut Violations) -> Vec<Uuid> {
    let mut seen = HashSet::with_capacity(raw.len());
    let mut ids = Vec::with_capacity(raw.len());
    for (i, text) in raw.iter().enumerate() {
        let Some(id) = violations.check(domain::id(format!("{field}[{i}]"), text)) else {
            continue;
        };
        if seen.insert(id) {
            ids.push(id);
        } else {
            violations.push(FieldViolation::new(
                format!("{field}[{i}]"),
                "DUPLICATE",
                "listed more than once",
            ));
        }
    }
    ids
}

/// Violations naming each of `which` by its index in the request's `note_ids`.
fn name_ids(
    ids: &[Uuid],
    which: &[Uuid],
    violation: impl Fn(String) -> FieldViolation,
) -> Vec<FieldViolation> {
    let which: HashSet<&Uuid> = which.iter().collect();
    ids.iter()
        .enumerate()
        .filter(|(_, id)| which.contains(id))
        .map(|(i, _)| violation(format!("note_ids[{i}]")))
        .collect()
}

/// A short digest of a list's filters, carried in its page tokens: a token is refused with
/// other filters (its position means nothing there).
fn filter_fingerprint(filter: &ListFilter) -> String {
    use sha2::{Digest as _, Sha256};
    let mut digest = Sha256::new();
    digest.update(filter.status.map_or("", NoteStatus::as_str));
    for tag in &filter.tags {
        digest.update([0u8]);
        digest.update(tag);
    }
    digest.update([1u8]);
    digest.update(filter.text.as_deref().unwrap_or_default());
    digest.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Keyset page token: `<created_at micros>.<id>.<filter fingerprint>`, base64url. Opaque to
/// clients.
fn encode_page_token(created_at: DateTime<Utc>, id: Uuid, fingerprint: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}.{id}.{fingerprint}",
        created_at.timestamp_micros()
    ))
}

fn decode_page_token(token: &str, fingerprint: &str) -> Result<Cursor, FieldViolation> {
    let invalid = |message: &str| FieldViolation::new("page_token", "INVALID_PAGE_TOKEN", message);
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| invalid("not a page token of this list"))?;
    let mut parts = text.splitn(3, '.');
    let (Some(micros), Some(id), Some(filters)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("not a page token of this list"));
    };
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| invalid("not a page token of this list"))?;
    let id = Uuid::parse_str(id).map_err(|_| invalid("not a page token of this list"))?;
    if filters != fingerprint {
        return Err(invalid(
            "this page token belongs to a list with other filters",
        ));
    }
    Ok(Cursor { created_at, id })
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn status_of(stored: &str) -> i32 {
    NoteStatus::from_db(stored).to_proto().into()
}

fn created_note_message(owner: Uuid, note: NewNote, created: Created) -> pb::Note {
    pb::Note {
        note_id: note.id.to_string(),
        owner_id: owner.to_string(),
        title: note.title.as_str().to_owned(),
        body: note.body.into_string(),
        status: note.status.to_proto().into(),
        tags: note.tags,
        created_at: Some(timestamp(created.created_at)),
        updated_at: Some(timestamp(created.updated_at)),
        etag: domain::etag(created.version),
        chapters: Vec::new(),
    }
}

fn note_message(note: NoteRow, chapters: Vec<pb::Chapter>) -> pb::Note {
    pb::Note {
        note_id: note.id.to_string(),
        owner_id: note.owner_id.to_string(),
        title: note.title,
        body: note.body,
        status: status_of(&note.status),
        tags: note.tags,
        created_at: Some(timestamp(note.created_at)),
        updated_at: Some(timestamp(note.updated_at)),
        etag: domain::etag(note.version),
        chapters,
    }
}

fn detail_message(detail: NoteDetail) -> pb::Note {
    let note_id = detail.note.id;
    let chapters = detail
        .chapters
        .into_iter()
        .map(|c| chapter_message(note_id, c))
        .collect();
    note_message(detail.note, chapters)
}

fn summary_message(row: SummaryRow) -> pb::NoteSummary {
    pb::NoteSummary {
        note_id: row.id.to_string(),
        title: row.title,
        status: status_of(&row.status),
        tags: row.tags,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
        etag: domain::etag(row.version),
    }
}

fn chapter_message(note_id: Uuid, chapter: ChapterRow) -> pb::Chapter {
    pb::Chapter {
        chapter_id: chapter.id.to_string(),
        note_id: note_id.to_string(),
        title: chapter.title,
        body: chapter.body,
        position: chapter.position,
        topics: chapter
            .topics
            .into_iter()
            .map(|t| topic_message(note_id, t))
            .collect(),
        created_at: Some(timestamp(chapter.created_at)),
        updated_at: Some(timestamp(chapter.updated_at)),
    }
}

fn topic_message(note_id: Uuid, topic: TopicRow) -> pb::Topic {
    pb::Topic {
        topic_id: topic.id.to_string(),
        chapter_id: topic.chapter_id.to_string(),
        note_id: note_id.to_string(),
        title: topic.title,
        body: topic.body,
        position: topic.position,
        created_at: Some(timestamp(topic.created_at)),
        updated_at: Some(timestamp(topic.updated_at)),
    }
}

// ---------------------------------------------------------------------------
// Generation jobs and notifications
// ---------------------------------------------------------------------------

/// What the generation and notification RPCs need beyond notes.
#[derive(Debug, Clone)]
pub struct Generation {
    pub queue: Queue,
    pub hub: Hub,
    pub profile: ProfileServiceClient<TracedChannel>,
    pub heartbeat: Duration,
    /// Turns true when the server shuts down: notification streams end.
    pub stopped: watch::Receiver<bool>,
}

/// Deadline of the plan check against profile.
const PROFILE_TIMEOUT: Duration = Duration::from_secs(2);
const COUNT_MAX: i32 = 50;

/// The request's kind and options, validated, with defaults applied.
fn job_spec(kind: i32, options: Option<&pb::GenerationOptions>) -> Result<JobSpec, NotesError> {
    let mut violations = Violations::default();
    let options = options.cloned().unwrap_or_default();
    let kind = match pb::GenerationKind::try_from(kind) {
        Ok(pb::GenerationKind::Summary) => Some(Kind::Summary),
        Ok(pb::GenerationKind::Explanation) => Some(Kind::Explanation),
        Ok(pb::GenerationKind::Quiz) => Some(Kind::Quiz),
        _ => {
            violations.push(FieldViolation::new(
                "kind",
                "REQUIRED",
                "kind is summary, explanation or quiz",
            ));
            None
        }
    };
    let fields = [
        (
            "options.max_sentences",
            options.max_sentences,
            Kind::Summary,
            5,
        ),
        ("options.max_terms", options.max_terms, Kind::Explanation, 8),
        (
            "options.question_count",
            options.question_count,
            Kind::Quiz,
            5,
        ),
    ];
    let mut count = 0;
    for (field, value, owner, default) in fields {
        match (value, kind) {
            (Some(_), Some(kind)) if kind != owner => violations.push(FieldViolation::new(
                field,
                "NOT_FOR_KIND",
                format!("not an option of {}", kind.as_str()),
            )),
            (Some(value), Some(_)) if !(1..=COUNT_MAX).contains(&value) => violations.push(
                FieldViolation::new(field, "OUT_OF_RANGE", format!("1–{COUNT_MAX}")),
            ),
            (Some(value), Some(_)) => count = value,
            (None, Some(kind)) if kind == owner => count = default,
            _ => {}
        }
    }
    let language = match options.language.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(tag)
            if tag.len() <= 35
                && tag.split('-').all(|part| {
                    !part.is_empty()
                        && part.len() <= 8
                        && part.chars().all(|c| c.is_ascii_alphanumeric())
                }) =>
        {
            Some(tag.to_ascii_lowercase())
        }
        Some(_) => {
            violations.push(FieldViolation::new(
                "options.language",
                "INVALID_LANGUAGE",
                "a BCP 47 language tag, e.g. en or pt-BR",
            ));
            None
        }
    };
    match kind {
        Some(kind) if violations.is_empty() => Ok(JobSpec {
            kind,
            count,
            language,
        }),
        _ => Err(NotesError::Invalid(violations.0)),
    }
}

fn job_status(stored: &str) -> pb::JobStatus {
    match stored {
        "queued" => pb::JobStatus::Queued,
        "running" => pb::JobStatus::Running,
        "succeeded" => pb::JobStatus::Succeeded,
        "failed" => pb::JobStatus::Failed,
        "cancelled" => pb::JobStatus::Cancelled,
        _ => pb::JobStatus::Unspecified,
    }
}

fn job_status_filter(status: i32) -> Result<Option<&'static str>, FieldViolation> {
    match pb::JobStatus::try_from(status) {
        Ok(pb::JobStatus::Unspecified) => Ok(None),
        Ok(pb::JobStatus::Queued) => Ok(Some("queued")),
        Ok(pb::JobStatus::Running) => Ok(Some("running")),
        Ok(pb::JobStatus::Succeeded) => Ok(Some("succeeded")),
        Ok(pb::JobStatus::Failed) => Ok(Some("failed")),
        Ok(pb::JobStatus::Cancelled) => Ok(Some("cancelled")),
        Err(_) => Err(FieldViolation::new(
            "status",
            "INVALID_STATUS",
            "not a job status",
        )),
    }
}

fn job_message(job: JobRow) -> pb::Job {
    let spec = job.spec();
    let kind = match spec.as_ref().map(|s| s.kind) {
        Some(Kind::Summary) => pb::GenerationKind::Summary,
        Some(Kind::Explanation) => pb::GenerationKind::Explanation,
        Some(Kind::Quiz) => pb::GenerationKind::Quiz,
        None => pb::GenerationKind::Unspecified,
    };
    let options = spec.map(|spec| {
        let mut options = pb::GenerationOptions {
            language: spec.language,
            ..Default::default()
        };
        match spec.kind {
            Kind::Summary => options.max_sentences = Some(spec.count),
            Kind::Explanation => options.max_terms = Some(spec.count),
            Kind::Quiz => options.question_count = Some(spec.count),
        }
        options
    });
    let error = job.error_code.map(|code| pb::JobError {
        code,
        message: job.error_message.unwrap_or_default(),
    });
    pb::Job {
        job_id: job.id.to_string(),
        note_id: job.note_id.to_string(),
        kind: kind.into(),
        options,
        status: job_status(&job.status).into(),
        progress_percent: job.progress,
        message: job.message,
        result: job.result.as_ref().and_then(result_message),
        error,
        attempt: job.attempts,
        max_attempts: job.max_attempts,
        cancel_requested: job.cancel_requested,
        created_at: Some(timestamp(job.created_at)),
        started_at: job.started_at.map(timestamp),
        updated_at: Some(timestamp(job.updated_at)),
        finished_at: job.finished_at.map(timestamp),
    }
}

/// A stored result (see `jobs::result_json`) as its message.
fn result_message(result: &serde_json::Value) -> Option<pb::JobResult> {
    use pb::job_result::Content;
    let text = |value: &serde_json::Value, key: &str| {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let content = if let Some(summary) = result.get("summary") {
        Content::Summary(pb::SummaryResult {
            text: text(summary, "text"),
        })
    } else if let Some(explanation) = result.get("explanation") {
        let terms = explanation.get("terms")?.as_array()?;
        Content::Explanation(pb::ExplanationResult {
            terms: terms
                .iter()
                .map(|t| pb::TermExplanation {
                    term: text(t, "term"),
                    explanation: text(t, "explanation"),
                })
                .collect(),
        })
    } else {
        let questions = result.get("quiz")?.get("questions")?.as_array()?;
        Content::Quiz(pb::QuizResult {
            questions: questions
                .iter()
                .map(|q| pb::QuizQuestion {
                    prompt: text(q, "prompt"),
                    answer: text(q, "answer"),
                    choices: q
                        .get("choices")
                        .and_then(|c| c.as_array())
                        .map(|c| {
                            c.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
        })
    };
    Some(pb::JobResult {
        generator: text(result, "generator"),
        content: Some(content),
    })
}

fn notification_message(row: NotificationRow) -> pb::Notification {
    let kind = match row.kind.as_str() {
        "job_succeeded" => pb::NotificationKind::JobSucceeded,
        "job_failed" => pb::NotificationKind::JobFailed,
        "job_cancelled" => pb::NotificationKind::JobCancelled,
        _ => pb::NotificationKind::Unspecified,
    };
    pb::Notification {
        notification_id: row.id.to_string(),
        sequence: row.sequence,
        kind: kind.into(),
        title: row.title,
        body: row.body,
        job_id: row.job_id.map(|id| id.to_string()).unwrap_or_default(),
        note_id: row.note_id.map(|id| id.to_string()).unwrap_or_default(),
        created_at: Some(timestamp(row.created_at)),
        read_at: row.read_at.map(timestamp),
    }
}

/// Time until the next 00:00 UTC, when the daily quota resets.
fn until_midnight(now: DateTime<Utc>) -> (DateTime<Utc>, Duration) {
    let midnight = now
        .date_naive()
        .succ_opt()
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .map(|at| at.and_utc())
        .unwrap_or(now);
    (midnight, (midnight - now).to_std().unwrap_or_default())
}

fn page_size(requested: i32) -> i64 {
    match i64::from(requested) {
        size if size <= 0 => PAGE_SIZE_DEFAULT,
        size => size.min(PAGE_SIZE_MAX),
    }
}

/// Jobs page token: `j.<created_at micros>.<id>.<filters>`, base64url.
fn encode_job_token(job: &JobRow, filters: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "j.{}.{}.{filters}",
        job.created_at.timestamp_micros(),
        job.id
    ))
}

fn decode_job_token(token: &str, filters: &str) -> Result<(DateTime<Utc>, Uuid), FieldViolation> {
    let invalid = || {
        FieldViolation::new(
            "page_token",
            "INVALID_PAGE_TOKEN",
            "not a page token of this list",
        )
    };
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let mut parts = text.splitn(4, '.');
    let (Some("j"), Some(micros), Some(id), Some(rest)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    if rest != filters {
        return Err(invalid());
    }
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(invalid)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| invalid())?))
}

/// Notifications page token: `n.<sequence>.<unread flag>`, base64url.
fn decode_notification_token(token: &str, unread: bool) -> Result<i64, FieldViolation> {
    let invalid = || {
        FieldViolation::new(
            "page_token",
            "INVALID_PAGE_TOKEN",
            "not a page token of this list",
        )
    };
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(invalid)?;
    let mut parts = text.splitn(3, '.');
    let (Some("n"), Some(sequence), Some(flag)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    if flag != if unread { "u" } else { "a" } {
        return Err(invalid());
    }
    sequence.parse().map_err(|_| invalid())
}

fn encode_notification_token(sequence: i64, unread: bool) -> String {
    URL_SAFE_NO_PAD.encode(format!("n.{sequence}.{}", if unread { "u" } else { "a" }))
}

fn pool_status(figures: PoolFigures) -> pb::PoolStatus {
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    pb::PoolStatus {
        name: figures.name.to_owned(),
        max_size: count(figures.max_size),
        size: count(figures.size),
        idle: count(figures.idle),
        in_use: count(figures.in_use),
        waiters: count(figures.waiters),
    }
}

impl Inner {
    /// Pools and the job queue, for an admin or a service.
    async fn get_pool_status(
        &self,
        request: Request<pb::GetPoolStatusRequest>,
    ) -> Result<pb::GetPoolStatusResponse, NotesError> {
        match self.identity.authenticate(request.metadata()).await {
            Ok(caller) if caller.is_admin() || matches!(caller, Caller::Service { .. }) => {}
            Ok(_) => return Err(NotesError::OperatorRequired),
            Err(status) => return Err(NotesError::Identity(status)),
        }
        let (queue_depth, oldest_queued_job_age_seconds) =
            self.generation.queue.jobs.depth().await?;
        Ok(pb::GetPoolStatusResponse {
            instance: self.operations.instance.clone(),
            pools: self
                .operations
                .pools
                .figures()
                .into_iter()
                .map(pool_status)
                .collect(),
            queue_depth,
            oldest_queued_job_age_seconds,
        })
    }

    /// The caller's plan's daily limit, from profile with this service's token.
    async fn daily_limit(&self, user: Uuid) -> Result<i32, NotesError> {
        let mut request = Request::new(ProfileEntitlementsRequest {
            user_id: user.to_string(),
        });
        request.set_timeout(PROFILE_TIMEOUT);
        self.identity
            .authorize(&mut request)
            .await
            .map_err(|status| NotesError::ProfileUnavailable(status.message().to_owned()))?;
        let mut profile = self.generation.profile.clone();
        match tokio::time::timeout(PROFILE_TIMEOUT, profile.get_entitlements(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner().ai_daily_limit),
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "profile refused GetEntitlements: failing closed");
                Err(NotesError::ProfileUnavailable(status.message().to_owned()))
            }
            Err(_) => Err(NotesError::ProfileUnavailable("timed out".to_owned())),
        }
    }

    async fn start_generation(
        &self,
        request: Request<pb::StartGenerationRequest>,
    ) -> Result<pb::StartGenerationResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let note_id = domain::id("note_id", &body.note_id)?;
        let spec = job_spec(body.kind, body.options.as_ref())?;
        let jobs = &self.generation.queue.jobs;
        if let Some(job) = jobs
            .active_duplicate(user, note_id, &spec.dedupe_key())
            .await?
        {
            return Ok(pb::StartGenerationResponse {
                job: Some(job_message(job)),
                created: false,
            });
        }
        let daily_limit = self.daily_limit(user).await?;
        let now = Utc::now();
        let max_attempts = self.generation.queue.config.max_attempts;
        match jobs
            .start(
                user,
                note_id,
                &spec,
                daily_limit,
                max_attempts,
                quota_day(now),
            )
            .await?
        {
            Started::Created(job) => {
                self.generation.queue.wake();
                metrics::counter!("notes_jobs_started_total").increment(1);
                Ok(pb::StartGenerationResponse {
                    job: Some(job_message(job)),
                    created: true,
                })
            }
            Started::Existing(job) => Ok(pb::StartGenerationResponse {
                job: Some(job_message(job)),
                created: false,
            }),
            Started::QuotaExceeded => Err(NotesError::QuotaExceeded {
                daily_limit,
                retry_after: until_midnight(now).1,
            }),
        }
    }

    async fn get_generation_quota(
        &self,
        request: Request<pb::GetGenerationQuotaRequest>,
    ) -> Result<pb::GetGenerationQuotaResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let daily_limit = self.daily_limit(user).await?;
        let now = Utc::now();
        let used = self
            .generation
            .queue
            .jobs
            .quota_used(user, quota_day(now))
            .await?;
        Ok(pb::GetGenerationQuotaResponse {
            daily_limit,
            used,
            remaining: (daily_limit - used).max(0),
            resets_at: Some(timestamp(until_midnight(now).0)),
        })
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<pb::GetJobResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let job_id = domain::id("job_id", &request.get_ref().job_id)?;
        let job = self
            .generation
            .queue
            .jobs
            .get(user, job_id)
            .await?
            .ok_or(NotesError::JobNotFound)?;
        Ok(pb::GetJobResponse {
            job: Some(job_message(job)),
        })
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<pb::CancelJobResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let job_id = domain::id("job_id", &request.get_ref().job_id)?;
        match self.generation.queue.jobs.cancel(user, job_id).await? {
            Cancelled::Done(job, sequence) => {
                if let Some(sequence) = sequence {
                    self.generation.queue.publish(user, sequence).await;
                }
                Ok(pb::CancelJobResponse {
                    job: Some(job_message(*job)),
                })
            }
            Cancelled::Finished => Err(NotesError::JobFinished),
            Cancelled::NotFound => Err(NotesError::JobNotFound),
        }
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<pb::ListJobsResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let status = violations.check(job_status_filter(body.status)).flatten();
        let note_id = match body.note_id.as_str() {
            "" => None,
            raw => violations.check(domain::id("note_id", raw)),
        };
        let filters = format!(
            "{}-{}",
            status.unwrap_or(""),
            note_id
                .map(|id| id.simple().to_string())
                .unwrap_or_default()
        );
        let after = match body.page_token.as_str() {
            "" => None,
            token => violations.check(decode_job_token(token, &filters)),
        };
        if !violations.is_empty() {
            return Err(NotesError::Invalid(violations.0));
        }
        let size = page_size(body.page_size);
        let mut rows = self
            .generation
            .queue
            .jobs
            .list(user, status, note_id, after, size + 1)
            .await?;
        let more = rows.len() > usize::try_from(size).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some(last) if more => encode_job_token(last, &filters),
            _ => String::new(),
        };
        Ok(pb::ListJobsResponse {
            items: rows.into_iter().map(job_message).collect(),
            next_page_token,
        })
    }

    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Result<pb::ListNotificationsResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let before = match body.page_token.as_str() {
            "" => None,
            token => Some(decode_notification_token(token, body.unread_only)?),
        };
        let size = page_size(body.page_size);
        let jobs = &self.generation.queue.jobs;
        let mut rows = jobs
            .notifications(user, body.unread_only, before, size + 1)
            .await?;
        let more = rows.len() > usize::try_from(size).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some(last) if more => encode_notification_token(last.sequence, body.unread_only),
            _ => String::new(),
        };
        let unread_count = i32::try_from(jobs.unread_count(user).await?).unwrap_or(i32::MAX);
        Ok(pb::ListNotificationsResponse {
            items: rows.into_iter().map(notification_message).collect(),
            next_page_token,
            unread_count,
        })
    }

    async fn mark_notifications_read(
        &self,
        request: Request<pb::MarkNotificationsReadRequest>,
    ) -> Result<pb::MarkNotificationsReadResponse, NotesError> {
        let user = self.user(request.metadata()).await?;
        let body = request.into_inner();
        let jobs = &self.generation.queue.jobs;
        let marked = match (body.all, body.notification_ids.is_empty()) {
            (true, true) => jobs.mark_all_read(user).await?,
            (false, false) => {
                let mut violations = Violations::default();
                if body.notification_ids.len() > BATCH_IDS_MAX {
                    return Err(FieldViolation::new(
                        "notification_ids",
                        "TOO_MANY",
                        format!("at most {BATCH_IDS_MAX}"),
                    )
                    .into());
                }
                let ids = distinct_ids("notification_ids", &body.notification_ids, &mut violations);
                if !violations.is_empty() {
                    return Err(NotesError::Invalid(violations.0));
                }
                match jobs.mark_read(user, &ids).await? {
                    Ok(marked) => marked,
                    Err(missing) => {
                        return Err(NotesError::UnknownNotifications(
                            missing
                                .iter()
                                .filter_map(|id| ids.iter().position(|i| i == id))
                                .map(|index| {
                                    FieldViolation::new(
                                        format!("notification_ids[{index}]"),
                                        "NOT_FOUND",
                                        "no such notification",
                                    )
                                })
                                .collect(),
                        ));
                    }
                }
            }
            _ => {
                return Err(FieldViolation::new(
                    "notification_ids",
                    "ONE_OF",
                    "give either notification_ids or all",
                )
                .into());
            }
        };
        Ok(pb::MarkNotificationsReadResponse {
            marked_count: i32::try_from(marked).unwrap_or(i32::MAX),
        })
    }

    /// Replays from `after_sequence` (or from now), then follows the hub; heartbeats keep
    /// the stream alive. One task per stream, asleep until woken.
    async fn watch_notifications(
        &self,
        request: Request<pb::WatchNotificationsRequest>,
    ) -> Result<NotificationStream, NotesError> {
        let user = self.user(request.metadata()).await?;
        let after = request.into_inner().after_sequence;
        if after.is_some_and(|a| a < 0) {
            return Err(FieldViolation::new("after_sequence", "OUT_OF_RANGE", "at least 0").into());
        }
        // Subscribe before reading where to start, so nothing committed in between is missed.
        let mut subscription = self.generation.hub.subscribe(user);
        let jobs = self.generation.queue.jobs.clone();
        let mut cursor = match after {
            Some(after) => after,
            None => jobs.last_sequence(user).await?,
        };
        let (sender, receiver) = mpsc::channel(16);
        let heartbeat_every = self.generation.heartbeat;
        let mut stopped = self.generation.stopped.clone();
        tokio::spawn(async move {
            metrics::gauge!("notes_notification_streams").increment(1.0);
            let mut heartbeat = tokio::time::interval_at(
                tokio::time::Instant::now() + heartbeat_every,
                heartbeat_every,
            );
            'stream: loop {
                // Everything after the cursor, in sequence order.
                loop {
                    let rows = match jobs.notifications_after(user, cursor, 100).await {
                        Ok(rows) => rows,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read notifications for a stream");
                            let _ = sender
                                .send(Err(Status::unavailable(
                                    "notifications cannot be read; reconnect",
                                )))
                                .await;
                            break 'stream;
                        }
                    };
                    let full = rows.len() == 100;
                    for row in rows {
                        cursor = row.sequence;
                        let event = pb::WatchNotificationsResponse {
                            event: Some(pb::watch_notifications_response::Event::Notification(
                                notification_message(row),
                            )),
                        };
                        if sender.send(Ok(event)).await.is_err() {
                            break 'stream;
                        }
                    }
                    if !full {
                        break;
                    }
                }
                tokio::select! {
                    Ok(()) = subscription.user.changed() => {}
                    Ok(()) = subscription.everyone.changed() => {}
                    _ = heartbeat.tick() => {
                        let event = pb::WatchNotificationsResponse {
                            event: Some(pb::watch_notifications_response::Event::Heartbeat(
                                pb::Heartbeat { server_time: Some(timestamp(Utc::now())) },
                            )),
                        };
                        if sender.send(Ok(event)).await.is_err() {
                            break;
                        }
                    }
                    () = sender.closed() => break,
                    () = crate::jobs::stopped(&mut stopped) => break,
                }
            }
            metrics::gauge!("notes_notification_streams").decrement(1.0);
        });
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }
}

type NotificationStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WatchNotificationsResponse, Status>> + Send>,
>;

fn finish<T>(method: &'static str, result: Result<T, NotesError>) -> Result<Response<T>, Status> {
    match result {
        Ok(value) => Ok(Response::new(value)),
        Err(error) => {
            let status = Status::from(error);
            tracing::debug!(method, code = ?status.code(), "notes call refused");
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl NotesService for NotesApi {
    async fn create_note(
        &self,
        request: Request<pb::CreateNoteRequest>,
    ) -> Result<Response<pb::CreateNoteResponse>, Status> {
        finish("CreateNote", self.inner.create_note(request).await)
    }

    async fn get_note(
        &self,
        request: Request<pb::GetNoteRequest>,
    ) -> Result<Response<pb::GetNoteResponse>, Status> {
        finish("GetNote", self.inner.get_note(request).await)
    }

    async fn update_note(
        &self,
        request: Request<pb::UpdateNoteRequest>,
    ) -> Result<Response<pb::UpdateNoteResponse>, Status> {
        finish("UpdateNote", self.inner.update_note(request).await)
    }

    async fn delete_note(
        &self,
        request: Request<pb::DeleteNoteRequest>,
    ) -> Result<Response<pb::DeleteNoteResponse>, Status> {
        finish("DeleteNote", self.inner.delete_note(request).await)
    }

    async fn list_notes(
        &self,
        request: Request<pb::ListNotesRequest>,
    ) -> Result<Response<pb::ListNotesResponse>, Status> {
        finish("ListNotes", self.inner.list_notes(request).await)
    }

    async fn batch_create_notes(
        &self,
        request: Request<pb::BatchCreateNotesRequest>,
    ) -> Result<Response<pb::BatchCreateNotesResponse>, Status> {
        finish(
            "BatchCreateNotes",
            self.inner.batch_create_notes(request).await,
        )
    }

    async fn batch_update_notes(
        &self,
        request: Request<pb::BatchUpdateNotesRequest>,
    ) -> Result<Response<pb::BatchUpdateNotesResponse>, Status> {
        finish(
            "BatchUpdateNotes",
            self.inner.batch_update_notes(request).await,
        )
    }

    async fn batch_delete_notes(
        &self,
        request: Request<pb::BatchDeleteNotesRequest>,
    ) -> Result<Response<pb::BatchDeleteNotesResponse>, Status> {
        finish(
            "BatchDeleteNotes",
            self.inner.batch_delete_notes(request).await,
        )
    }

    async fn create_chapter(
        &self,
        request: Request<pb::CreateChapterRequest>,
    ) -> Result<Response<pb::CreateChapterResponse>, Status> {
        finish("CreateChapter", self.inner.create_chapter(request).await)
    }

    async fn update_chapter(
        &self,
        request: Request<pb::UpdateChapterRequest>,
    ) -> Result<Response<pb::UpdateChapterResponse>, Status> {
        finish("UpdateChapter", self.inner.update_chapter(request).await)
    }

    async fn delete_chapter(
        &self,
        request: Request<pb::DeleteChapterRequest>,
    ) -> Result<Response<pb::DeleteChapterResponse>, Status> {
        finish("DeleteChapter", self.inner.delete_chapter(request).await)
    }

    async fn reorder_chapters(
        &self,
        request: Request<pb::ReorderChaptersRequest>,
    ) -> Result<Response<pb::ReorderChaptersResponse>, Status> {
        finish(
            "ReorderChapters",
            self.inner.reorder_chapters(request).await,
        )
    }

    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        finish("CreateTopic", self.inner.create_topic(request).await)
    }

    async fn update_topic(
        &self,
        request: Request<pb::UpdateTopicRequest>,
    ) -> Result<Response<pb::UpdateTopicResponse>, Status> {
        finish("UpdateTopic", self.inner.update_topic(request).await)
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        finish("DeleteTopic", self.inner.delete_topic(request).await)
    }

    async fn reorder_topics(
        &self,
        request: Request<pb::ReorderTopicsRequest>,
    ) -> Result<Response<pb::ReorderTopicsResponse>, Status> {
        finish("ReorderTopics", self.inner.reorder_topics(request).await)
    }

    async fn start_generation(
        &self,
        request: Request<pb::StartGenerationRequest>,
    ) -> Result<Response<pb::StartGenerationResponse>, Status> {
        finish(
            "StartGeneration",
            self.inner.start_generation(request).await,
        )
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        finish("GetJob", self.inner.get_job(request).await)
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        finish("CancelJob", self.inner.cancel_job(request).await)
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        finish("ListJobs", self.inner.list_jobs(request).await)
    }

    async fn get_generation_quota(
        &self,
        request: Request<pb::GetGenerationQuotaRequest>,
    ) -> Result<Response<pb::GetGenerationQuotaResponse>, Status> {
        finish(
            "GetGenerationQuota",
            self.inner.get_generation_quota(request).await,
        )
    }

    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        finish(
            "ListNotifications",
            self.inner.list_notifications(request).await,
        )
    }

    async fn mark_notifications_read(
        &self,
        request: Request<pb::MarkNotificationsReadRequest>,
    ) -> Result<Response<pb::MarkNotificationsReadResponse>, Status> {
        finish(
            "MarkNotificationsRead",
            self.inner.mark_notifications_read(request).await,
        )
    }

    async fn watch_notifications(
        &self,
        request: Request<pb::WatchNotificationsRequest>,
    ) -> Result<Response<NotificationStream>, Status> {
        finish(
            "WatchNotifications",
            self.inner.watch_notifications(request).await,
        )
    }

    async fn get_pool_status(
        &self,
        request: Request<pb::GetPoolStatusRequest>,
    ) -> Result<Response<pb::GetPoolStatusResponse>, Status> {
        finish("GetPoolStatus", self.inner.get_pool_status(request).await)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: fail loudly")]

    use prost::Message as _;

    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_filters() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        let drafts = ListFilter {
            status: Some(NoteStatus::Draft),
            ..ListFilter::default()
        };
        let fingerprint = filter_fingerprint(&drafts);
        let token = encode_page_token(at, id, &fingerprint);
        assert_eq!(
            decode_page_token(&token, &fingerprint).unwrap(),
            Cursor { created_at: at, id }
        );
        let other = filter_fingerprint(&ListFilter::default());
        assert_ne!(fingerprint, other);
        assert_eq!(
            decode_page_token(&token, &other).unwrap_err().code,
            "INVALID_PAGE_TOKEN"
        );
        assert!(decode_page_token("nope", &fingerprint).is_err());
        assert!(decode_page_token(&URL_SAFE_NO_PAD.encode("12.x.y"), &fingerprint).is_err());
    }

    #[test]
    fn batch_ids_name_bad_and_repeated_entries() {
        let id = Uuid::now_v7().to_string();
        let mut violations = Violations::default();
        let ids = batch_ids(&[id.clone(), "x".to_owned(), id], &mut violations);
        assert_eq!(ids.len(), 1);
        let named: Vec<_> = violations
            .0
            .iter()
            .map(|v| (v.field.as_str(), v.code))
            .collect();
        assert_eq!(
            named,
            [("note_ids[1]", "INVALID_ID"), ("note_ids[2]", "DUPLICATE")]
        );
        let mut violations = Violations::default();
        batch_ids(&[], &mut violations);
        assert_eq!(violations.0[0].code, "REQUIRED");
    }

    #[test]
    fn a_new_note_names_every_bad_field_under_its_prefix() {
        let mut violations = Violations::default();
        let note = pb::Note {
            title: " ".to_owned(),
            status: 42,
            tags: vec!["ok".to_owned(), String::new()],
            ..pb::Note::default()
        };
        assert!(parse_new_note("items[2]", note, &mut violations).is_none());
        let fields: Vec<_> = violations.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["items[2].title", "items[2].status", "items[2].tags[1]"]
        );
    }

    #[test]
    fn cache_shapes_round_trip() {
        let response = pb::ListNotesResponse {
            total: 3,
            ..Default::default()
        };
        let bytes = response.encode_to_vec();
        assert_eq!(
            pb::ListNotesResponse::decode(bytes.as_slice()).unwrap(),
            response
        );
    }

    #[test]
    fn generation_options_get_defaults_and_refuse_other_kinds_fields() {
        let summary = job_spec(pb::GenerationKind::Summary.into(), None).unwrap();
        assert_eq!((summary.kind, summary.count), (Kind::Summary, 5));
        let quiz = pb::GenerationOptions {
            question_count: Some(7),
            language: Some("pt-BR".to_owned()),
            ..Default::default()
        };
        let spec = job_spec(pb::GenerationKind::Quiz.into(), Some(&quiz)).unwrap();
        assert_eq!(spec.count, 7);
        assert_eq!(spec.language.as_deref(), Some("pt-br"));
        // Identical requests share a key; different options do not.
        let same = job_spec(pb::GenerationKind::Quiz.into(), Some(&quiz)).unwrap();
        assert_eq!(spec.dedupe_key(), same.dedupe_key());
        assert_ne!(spec.dedupe_key(), summary.dedupe_key());
        // A stored job reads back as it was asked.
        let row_spec = JobSpec::from_stored(spec.kind.as_str(), &spec.options_json());
        assert_eq!(row_spec, Some(spec));

        let wrong = pb::GenerationOptions {
            max_terms: Some(3),
            max_sentences: Some(0),
            language: Some("not a tag!".to_owned()),
            ..Default::default()
        };
        let Err(NotesError::Invalid(violations)) =
            job_spec(pb::GenerationKind::Summary.into(), Some(&wrong))
        else {
            panic!("refused")
        };
        let fields: Vec<(&str, &str)> = violations
            .iter()
            .map(|v| (v.field.as_str(), v.code))
            .collect();
        assert_eq!(
            fields,
            [
                ("options.max_sentences", "OUT_OF_RANGE"),
                ("options.max_terms", "NOT_FOR_KIND"),
                ("options.language", "INVALID_LANGUAGE"),
            ]
        );
        assert!(job_spec(0, None).is_err(), "kind is required");
    }
}
