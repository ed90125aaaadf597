//! All of notes' SQL, as small named functions. Queries are checked at compile time against
//! the `notes` schema (offline data in `.sqlx/`; `./dev sqlx-prepare` refreshes it).
//!
//! Every query is scoped by `owner_id`, so another user's note is indistinguishable from a
//! missing one. Writes that change a note's chapters or topics first lock and version-bump
//! the note row ([`Store::lock_note`]): that checks ownership and the expected ETag, and
//! serialises concurrent structural writes to one note, so positions stay dense.

use chrono::{DateTime, Utc};
use platform::postgres::StatementSpan as _;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::{
    domain::{Body, NoteStatus, TAGS_MAX, Title},
    error::NotesError,
};

/// Chapters a note may have.
pub const CHAPTERS_MAX: i64 = 100;
/// Topics a chapter may have.
pub const TOPICS_MAX: i64 = 100;
/// Text a note may hold in all (titles and bodies of the note, its chapters and topics), so
/// a note with its chapters always fits one response.
pub const NOTE_CONTENT_MAX_BYTES: i64 = 8 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Store {
    db: PgPool,
}

/// A note row without its chapters.
#[derive(Debug, Clone)]
pub struct NoteRow {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub title: String,
    pub body: String,
    pub status: String,
    pub tags: Vec<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A note as lists show it: no body.
#[derive(Debug, Clone)]
pub struct SummaryRow {
    pub id: Uuid,
    pub title: String,
    pub status: String,
    pub tags: Vec<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct ChapterRow {
    pub id: Uuid,
    pub position: i32,
    pub title: String,
    pub body: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub topics: Vec<TopicRow>,
}

#[derive(Debug, Clone)]
pub struct TopicRow {
    pub id: Uuid,
    pub chapter_id: Uuid,
    pub position: i32,
    pub title: String,
    pub body: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A note with its chapters in order, each with its topics in order.
#[derive(Debug, Clone)]
pub struct NoteDetail {
    pub note: NoteRow,
    pub chapters: Vec<ChapterRow>,
}

/// A validated note to create.
#[derive(Debug, Clone)]
pub struct NewNote {
    pub id: Uuid,
    pub title: Title,
    pub body: Body,
    pub status: NoteStatus,
    pub tags: Vec<String>,
}

/// What a create returns beyond what was sent.
#[derive(Debug, Clone, Copy)]
pub struct Created {
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The fields a note update sets; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct NoteChanges {
    pub title: Option<Title>,
    pub body: Option<Body>,
    pub status: Option<NoteStatus>,
    pub tags: Option<Vec<String>>,
}

/// The list filters, validated and normalised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<NoteStatus>,
    /// Notes carrying all of these.
    pub tags: Vec<String>,
    /// Postgres websearch syntax.
    pub text: Option<String>,
}

/// Where a page starts: after this (created_at, id), newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

/// One page of a list and the number of notes matching the filters on all pages.
#[derive(Debug, Default)]
pub struct Page {
    pub items: Vec<SummaryRow>,
    pub total: i64,
}

/// A batch change of status and tags.
#[derive(Debug, Default)]
pub struct BatchChange {
    pub status: Option<NoteStatus>,
    /// Replaces the tags (exclusive with add/remove).
    pub set_tags: Option<Vec<String>>,
    pub add_tags: Vec<String>,
    pub remove_tags: Vec<String>,
}

/// Why a batch update changed nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchRefusal {
    /// These ids are not the caller's notes.
    Missing(Vec<Uuid>),
    /// These notes would have more than the allowed tags.
    TooManyTags(Vec<Uuid>),
}

/// One row of a list page query (every filter combination returns this shape).
#[derive(Debug)]
struct ListRow {
    id: Uuid,
    title: String,
    status: String,
    tags: Vec<String>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    total: i64,
    on_page: bool,
}

/// One row of the detail query: the note's columns (the body on the first row only), and a
/// chapter and a topic when there are.
#[derive(Debug)]
struct DetailRow {
    id: Uuid,
    owner_id: Uuid,
    title: String,
    body: Option<String>,
    status: String,
    tags: Vec<String>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    chapter_id: Option<Uuid>,
    chapter_position: Option<i32>,
    chapter_title: Option<String>,
    chapter_body: Option<String>,
    chapter_created_at: Option<DateTime<Utc>>,
    chapter_updated_at: Option<DateTime<Utc>>,
    topic_id: Option<Uuid>,
    topic_position: Option<i32>,
    topic_title: Option<String>,
    topic_body: Option<String>,
    topic_created_at: Option<DateTime<Utc>>,
    topic_updated_at: Option<DateTime<Utc>>,
}

/// The list page query for one combination of filters. The page and the total come from one
/// statement: the window count runs over every note matching the filters, and the keyset
/// condition only marks which rows are on the page (`on_page`), so rows before the cursor
/// still carry the total when the page is short or empty. Sorting `on_page` first, then
/// newest first, puts the page at the top; the caller drops the rest.
///
/// One static statement per filter combination (rather than `$n is null or …` in one) so
/// each gets its own plan and index: a generic plan of a catch-all query would use none of
/// the filter indexes. `$1` owner, `$2`/`$3` cursor (nullable), `$4` limit, filters from `$5`.
macro_rules! list_page {
    ($filters:tt, $($args:expr),* $(,)?) => {
        sqlx::query_as!(
            ListRow,
            r#"
            select id, title, status, tags, version, created_at, updated_at,
                   total as "total!", on_page as "on_page!"
            from (
                select n.id, n.title, n.status, n.tags, n.version, n.created_at, n.updated_at,
                       count(*) over () as total,
                       ($2::timestamptz is null or (n.created_at, n.id) < ($2, $3::uuid)) as on_page
                from notes n
                where n.owner_id = $1
            "# + $filters + r#"
            ) matched
            order by on_page desc, created_at desc, id desc
            limit $4
            "#,
            $($args),*
        )
    };
}

impl Store {
    pub fn new(db: PgPool) -> Self {
        Self { db }
    }

    pub async fn create_note(
        &self,
        owner_id: Uuid,
        note: &NewNote,
    ) -> Result<Created, sqlx::Error> {
        let row = sqlx::query!(
            r#"
            insert into notes (id, owner_id, title, body, status, tags)
            values ($1, $2, $3, $4, $5, $6)
            returning version, created_at, updated_at
            "#,
            note.id,
            owner_id,
            note.title.as_str(),
            note.body.as_str(),
            note.status.as_str(),
            &note.tags,
        )
        .fetch_one(&self.db)
        .statement("notes.create_note")
        .await?;
        Ok(Created {
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }

    /// Creates every note in one statement (so all or none), returning each note's stored
    /// fields in the order given. Tags travel flattened, with each note's 1-based slice.
    pub async fn create_notes(
        &self,
        owner_id: Uuid,
        notes: &[NewNote],
    ) -> Result<Vec<Created>, sqlx::Error> {
        let mut ids = Vec::with_capacity(notes.len());
        let mut titles = Vec::with_capacity(notes.len());
        let mut bodies = Vec::with_capacity(notes.len());
        let mut statuses = Vec::with_capacity(notes.len());
        let (mut tags, mut tags_from, mut tags_to) = (Vec::new(), Vec::new(), Vec::new());
        for note in notes {
            ids.push(note.id);
            titles.push(note.title.as_str());
            bodies.push(note.body.as_str());
            statuses.push(note.status.as_str());
            let from = i32::try_from(tags.len() + 1).unwrap_or(i32::MAX);
            tags.extend(note.tags.iter().map(String::as_str));
            tags_from.push(from);
            tags_to.push(i32::try_from(tags.len()).unwrap_or(i32::MAX));
        }
        let rows = sqlx::query!(
            r#"
            insert into notes (id, owner_id, title, body, status, tags)
            select item.id, $1, item.title, item.body, item.status,
                   -- An empty slice (from > to) is the empty array.
                   coalesce(($6::text[])[item.tags_from:item.tags_to], '{}')
            from unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $7::int4[], $8::int4[])
                as item(id, title, body, status, tags_from, tags_to)
            returning id, version, created_at, updated_at
            "#,
            owner_id,
            &ids,
            &titles[..] as &[&str],
            &bodies[..] as &[&str],
            &statuses[..] as &[&str],
            &tags[..] as &[&str],
            &tags_from,
            &tags_to,
        )
        .fetch_all(&self.db)
        .statement("notes.create_notes")
        .await?;
        let by_id: std::collections::HashMap<Uuid, Created> = rows
            .into_iter()
            .map(|r| {
                (
                    r.id,
                    Created {
                        version: r.version,
                        created_at: r.created_at,
                        updated_at: r.updated_at,
                    },
                )
            })
            .collect();
        ids.iter()
            .map(|id| {
                by_id
                    .get(id)
                    .copied()
                    .ok_or_else(|| sqlx::Error::Protocol("a created note was not returned".into()))
            })
            .collect()
    }

    /// The note with its chapters and topics, in one statement (so one consistent snapshot,
    /// and the ETag matches what is shown). The body is sent on the first row only.
    pub async fn note_detail(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
    ) -> Result<Option<NoteDetail>, sqlx::Error> {
        let rows = sqlx::query_as!(
            DetailRow,
            r#"
            select n.id, n.owner_id, n.title,
                   case when row_number() over (order by c.position, t.position) = 1
                        then n.body end as body,
                   n.status, n.tags, n.version, n.created_at, n.updated_at,
                   c.id as "chapter_id?", c.position as "chapter_position?",
                   c.title as "chapter_title?", c.body as "chapter_body?",
                   c.created_at as "chapter_created_at?", c.updated_at as "chapter_updated_at?",
                   t.id as "topic_id?", t.position as "topic_position?",
                   t.title as "topic_title?", t.body as "topic_body?",
                   t.created_at as "topic_created_at?", t.updated_at as "topic_updated_at?"
            from notes n
            left join chapters c on c.note_id = n.id
            left join topics t on t.chapter_id = c.id
            where n.id = $1 and n.owner_id = $2
            order by c.position, t.position
            "#,
            note_id,
            owner_id,
        )
        .fetch_all(&self.db)
        .statement("notes.note_detail")
        .await?;
        Ok(assemble_detail(rows))
    }

    /// Applies `changes` unless the expected version (ETag) differs or the note would pass
    /// its content limit; returns the new version.
    pub async fn update_note(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        changes: &NoteChanges,
        expected_version: Option<i64>,
    ) -> Result<i64, NotesError> {
        let row = sqlx::query!(
            r#"
            with target as (
                select id, version from notes where id = $1 and owner_id = $2 for update
            ), structure as (
                select coalesce(sum(octet_length(c.title) + octet_length(c.body)), 0)::int8
                     + coalesce((select sum(octet_length(t.title) + octet_length(t.body))
                                 from topics t join chapters tc on tc.id = t.chapter_id
                                 where tc.note_id = $1), 0)::int8 as bytes
                from chapters c where c.note_id = $1
            ), updated as (
                update notes n set
                    title = coalesce($3, n.title),
                    body = coalesce($4, n.body),
                    status = coalesce($5, n.status),
                    tags = coalesce($6, n.tags),
                    version = n.version + 1,
                    updated_at = now()
                from target, structure
                where n.id = target.id
                  and ($7::int8 is null or target.version = $7)
                  and octet_length(coalesce($3, n.title)) + octet_length(coalesce($4, n.body))
                      + structure.bytes <= $8
                returning n.version
            )
            select target.version as current_version, (select version from updated) as new_version
            from target
            "#,
            note_id,
            owner_id,
            changes.title.as_ref().map(Title::as_str),
            changes.body.as_ref().map(Body::as_str),
            changes.status.map(NoteStatus::as_str),
            changes.tags.as_deref(),
            expected_version,
            NOTE_CONTENT_MAX_BYTES,
        )
        .fetch_optional(&self.db)
        .statement("notes.update_note")
        .await?;
        let Some(row) = row else {
            return Err(NotesError::NoteNotFound);
        };
        match row.new_version {
            Some(version) => Ok(version),
            None if expected_version.is_some_and(|v| v != row.current_version) => {
                Err(NotesError::EtagMismatch)
            }
            None => Err(content_limit()),
        }
    }

    /// Deletes the note with its chapters and topics unless the expected version differs.
    pub async fn delete_note(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        expected_version: Option<i64>,
    ) -> Result<(), NotesError> {
        let row = sqlx::query!(
            r#"
            with target as (
                select id, version from notes where id = $1 and owner_id = $2 for update
            ), gone as (
                delete from notes n using target
                where n.id = target.id and ($3::int8 is null or target.version = $3)
                returning n.id
            )
            select exists (select 1 from gone) as "deleted!" from target
            "#,
            note_id,
            owner_id,
            expected_version,
        )
        .fetch_optional(&self.db)
        .statement("notes.delete_note")
        .await?;
        match row {
            None => Err(NotesError::NoteNotFound),
            Some(row) if row.deleted => Ok(()),
            Some(_) => Err(NotesError::EtagMismatch),
        }
    }

    /// One page of the caller's notes matching `filter`, newest first, starting after
    /// `cursor`, with the number of matching notes on all pages. One statement.
    pub async fn list_notes(
        &self,
        owner_id: Uuid,
        filter: &ListFilter,
        cursor: Option<Cursor>,
        limit: i64,
    ) -> Result<Page, sqlx::Error> {
        let (after_at, after_id) = (cursor.map(|c| c.created_at), cursor.map(|c| c.id));
        let status = filter.status.map(NoteStatus::as_str);
        let tags = filter.tags.as_slice();
        let text = filter.text.as_deref();
        let args = (owner_id, after_at, after_id, limit);
        let rows = match (status, !tags.is_empty(), text) {
            (None, false, None) => {
                list_page!("", args.0, args.1, args.2, args.3)
                    .fetch_all(&self.db)
                    .statement("notes.list_notes")
                    .await?
            }
            (Some(status), false, None) => {
                list_page!("and n.status = $5", args.0, args.1, args.2, args.3, status)
                    .fetch_all(&self.db)
                    .statement("notes.list_notes")
                    .await?
            }
            (None, true, None) => {
                list_page!("and n.tags @> $5", args.0, args.1, args.2, args.3, tags)
                    .fetch_all(&self.db)
                    .statement("notes.list_notes")
                    .await?
            }
            (None, false, Some(text)) => {
                list_page!(
                    "and n.search @@ websearch_to_tsquery('english', $5)",
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    text
                )
                .fetch_all(&self.db)
                .statement("notes.list_notes")
                .await?
            }
            (Some(status), true, None) => {
                list_page!(
                    "and n.status = $5 and n.tags @> $6",
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    status,
                    tags
                )
                .fetch_all(&self.db)
                .statement("notes.list_notes")
                .await?
            }
            (Some(status), false, Some(text)) => {
                list_page!(
                    "and n.status = $5 and n.search @@ websearch_to_tsquery('english', $6)",
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    status,
                    text
                )
                .fetch_all(&self.db)
                .statement("notes.list_notes")
                .await?
            }
            (None, true, Some(text)) => {
                list_page!(
                    "and n.tags @> $5 and n.search @@ websearch_to_tsquery('english', $6)",
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    tags,
                    text
                )
                .fetch_all(&self.db)
                .statement("notes.list_notes")
                .await?
            }
            (Some(status), true, Some(text)) => {
                list_page!(
                    "and n.status = $5 and n.tags @> $6 \
                 and n.search @@ websearch_to_tsquery('english', $7)",
                    args.0,
                    args.1,
                    args.2,
                    args.3,
                    status,
                    tags,
                    text
                )
                .fetch_all(&self.db)
                .statement("notes.list_notes")
                .await?
            }
        };
        let total = rows.first().map_or(0, |r| r.total);
        let items = rows
            .into_iter()
            .filter(|r| r.on_page)
            .map(|r| SummaryRow {
                id: r.id,
                title: r.title,
                status: r.status,
                tags: r.tags,
                version: r.version,
                created_at: r.created_at,
                updated_at: r.updated_at,
            })
            .collect();
        Ok(Page { items, total })
    }

    /// Sets status and changes tags of every note in `ids` (distinct) in one transaction,
    /// or refuses the whole batch.
    pub async fn update_notes(
        &self,
        owner_id: Uuid,
        ids: &[Uuid],
        change: &BatchChange,
    ) -> Result<Result<Vec<SummaryRow>, BatchRefusal>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        // Lock every row first and see what its tags would become: the limit is checked per
        // note, and the refusal names the notes that would pass it.
        let found = sqlx::query!(
            r#"
            select n.id,
                   cardinality(array(
                       select t from unnest(coalesce($3::text[], n.tags) || $4::text[])
                           with ordinality as u(t, o)
                       where t <> all($5::text[])
                       group by t
                   )) as "tag_count!"
            from notes n
            where n.owner_id = $1 and n.id = any($2)
            for update
            "#,
            owner_id,
            ids,
            change.set_tags.as_deref(),
            &change.add_tags,
            &change.remove_tags,
        )
        .fetch_all(&mut *tx)
        .statement("notes.update_notes")
        .await?;
        if found.len() != ids.len() {
            let present: std::collections::HashSet<Uuid> = found.iter().map(|r| r.id).collect();
            let missing = ids.iter().filter(|id| !present.contains(id)).copied();
            return Ok(Err(BatchRefusal::Missing(missing.collect())));
        }
        let limit = i32::try_from(TAGS_MAX).unwrap_or(i32::MAX);
        let over: std::collections::HashSet<Uuid> = found
            .iter()
            .filter(|r| r.tag_count > limit)
            .map(|r| r.id)
            .collect();
        if !over.is_empty() {
            let over = ids.iter().filter(|id| over.contains(id)).copied();
            return Ok(Err(BatchRefusal::TooManyTags(over.collect())));
        }
        let rows = sqlx::query_as!(
            SummaryRow,
            r#"
            update notes n set
                status = coalesce($6, n.status),
                -- Existing order kept, added ones appended, duplicates once.
                tags = array(
                    select t from unnest(coalesce($3::text[], n.tags) || $4::text[])
                        with ordinality as u(t, o)
                    where t <> all($5::text[])
                    group by t
                    order by min(o)
                ),
                version = n.version + 1,
                updated_at = now()
            where n.owner_id = $1 and n.id = any($2)
            returning n.id, n.title, n.status, n.tags, n.version, n.created_at, n.updated_at
            "#,
            owner_id,
            ids,
            change.set_tags.as_deref(),
            &change.add_tags,
            &change.remove_tags,
            change.status.map(NoteStatus::as_str),
        )
        .fetch_all(&mut *tx)
        .statement("notes.update_notes")
        .await?;
        tx.commit().await?;
        Ok(Ok(in_order(ids, rows, |r| r.id)))
    }

    /// Deletes the notes in `ids` in one transaction. Unless `allow_missing`, an id that is
    /// not one of the caller's notes refuses the whole batch (the missing ids are returned).
    pub async fn delete_notes(
        &self,
        owner_id: Uuid,
        ids: &[Uuid],
        allow_missing: bool,
    ) -> Result<Result<u64, Vec<Uuid>>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let deleted: Vec<Uuid> = sqlx::query_scalar!(
            "delete from notes where owner_id = $1 and id = any($2) returning id",
            owner_id,
            ids,
        )
        .fetch_all(&mut *tx)
        .statement("notes.delete_notes")
        .await?;
        if !allow_missing && deleted.len() != ids.len() {
            let deleted: std::collections::HashSet<Uuid> = deleted.into_iter().collect();
            let missing = ids.iter().filter(|id| !deleted.contains(id)).copied();
            // Dropping the transaction rolls it back.
            return Ok(Err(missing.collect()));
        }
        tx.commit().await?;
        Ok(Ok(u64::try_from(deleted.len()).unwrap_or(u64::MAX)))
    }

    /// Starts a write to a note's chapters or topics: locks the note (checking owner and
    /// expected version) and bumps its version and update time. Returns the new version.
    async fn lock_note(
        tx: &mut Transaction<'static, Postgres>,
        owner_id: Uuid,
        note_id: Uuid,
        expected_version: Option<i64>,
    ) -> Result<i64, NotesError> {
        let row = sqlx::query!(
            r#"
            with target as (
                select id, version from notes where id = $1 and owner_id = $2 for update
            ), bumped as (
                update notes n set version = n.version + 1, updated_at = now()
                from target
                where n.id = target.id and ($3::int8 is null or target.version = $3)
                returning n.version
            )
            select (select version from bumped) as new_version from target
            "#,
            note_id,
            owner_id,
            expected_version,
        )
        .fetch_optional(&mut **tx)
        .statement("notes.lock_note")
        .await?;
        match row {
            None => Err(NotesError::NoteNotFound),
            Some(row) => row.new_version.ok_or(NotesError::EtagMismatch),
        }
    }

    /// Refuses the write when the note's text would pass its limit.
    async fn check_content_size(
        tx: &mut Transaction<'static, Postgres>,
        note_id: Uuid,
    ) -> Result<(), NotesError> {
        let bytes = sqlx::query_scalar!(
            r#"
            select (octet_length(n.title) + octet_length(n.body))::int8
                 + coalesce((select sum(octet_length(c.title) + octet_length(c.body))
                             from chapters c where c.note_id = n.id), 0)::int8
                 + coalesce((select sum(octet_length(t.title) + octet_length(t.body))
                             from topics t join chapters c on c.id = t.chapter_id
                             where c.note_id = n.id), 0)::int8
                 as "bytes!"
            from notes n where n.id = $1
            "#,
            note_id,
        )
        .fetch_one(&mut **tx)
        .statement("notes.check_content_size")
        .await?;
        if bytes > NOTE_CONTENT_MAX_BYTES {
            return Err(content_limit());
        }
        Ok(())
    }

    /// Adds a chapter at `position` (clamped to the end; later chapters move down).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_chapter(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        chapter_id: Uuid,
        title: &Title,
        body: &Body,
        position: Option<i32>,
        expected_version: Option<i64>,
    ) -> Result<(ChapterRow, i64), NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let count = sqlx::query_scalar!(
            r#"select count(*) as "count!" from chapters where note_id = $1"#,
            note_id
        )
        .fetch_one(&mut *tx)
        .statement("notes.create_chapter")
        .await?;
        if count >= CHAPTERS_MAX {
            return Err(NotesError::LimitReached {
                reason: "CHAPTER_LIMIT_REACHED",
                message: format!("a note has at most {CHAPTERS_MAX} chapters"),
            });
        }
        let end = i32::try_from(count).unwrap_or(i32::MAX);
        let position = position.map_or(end, |p| p.min(end));
        let row = sqlx::query!(
            r#"
            with shifted as (
                update chapters set position = position + 1
                where note_id = $2 and position >= $3
            )
            insert into chapters (id, note_id, position, title, body)
            values ($1, $2, $3, $4, $5)
            returning created_at, updated_at
            "#,
            chapter_id,
            note_id,
            position,
            title.as_str(),
            body.as_str(),
        )
        .fetch_one(&mut *tx)
        .statement("notes.create_chapter")
        .await?;
        Self::check_content_size(&mut tx, note_id).await?;
        tx.commit().await?;
        Ok((
            ChapterRow {
                id: chapter_id,
                position,
                title: title.as_str().to_owned(),
                body: body.as_str().to_owned(),
                created_at: row.created_at,
                updated_at: row.updated_at,
                topics: Vec::new(),
            },
            version,
        ))
    }

    /// Changes a chapter's title and/or body; returns it with its topics.
    pub async fn update_chapter(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        chapter_id: Uuid,
        title: Option<&Title>,
        body: Option<&Body>,
        expected_version: Option<i64>,
    ) -> Result<(ChapterRow, i64), NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let row = sqlx::query!(
            r#"
            update chapters set
                title = coalesce($3, title),
                body = coalesce($4, body),
                updated_at = now()
            where id = $1 and note_id = $2
            returning position, title, body, created_at, updated_at
            "#,
            chapter_id,
            note_id,
            title.map(Title::as_str),
            body.map(Body::as_str),
        )
        .fetch_optional(&mut *tx)
        .statement("notes.update_chapter")
        .await?
        .ok_or(NotesError::ChapterNotFound)?;
        Self::check_content_size(&mut tx, note_id).await?;
        let topics = sqlx::query_as!(
            TopicRow,
            r#"
            select id, chapter_id, position, title, body, created_at, updated_at
            from topics where chapter_id = $1 order by position
            "#,
            chapter_id,
        )
        .fetch_all(&mut *tx)
        .statement("notes.update_chapter")
        .await?;
        tx.commit().await?;
        Ok((
            ChapterRow {
                id: chapter_id,
                position: row.position,
                title: row.title,
                body: row.body,
                created_at: row.created_at,
                updated_at: row.updated_at,
                topics,
            },
            version,
        ))
    }

    /// Deletes a chapter with its topics; later chapters move up. Returns the note's version.
    pub async fn delete_chapter(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        chapter_id: Uuid,
        expected_version: Option<i64>,
    ) -> Result<i64, NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let deleted = sqlx::query_scalar!(
            r#"
            with gone as (
                delete from chapters where id = $1 and note_id = $2 returning position
            ), shifted as (
                update chapters c set position = c.position - 1
                from gone
                where c.note_id = $2 and c.position > gone.position
            )
            select count(*) as "deleted!" from gone
            "#,
            chapter_id,
            note_id,
        )
        .fetch_one(&mut *tx)
        .statement("notes.delete_chapter")
        .await?;
        if deleted == 0 {
            return Err(NotesError::ChapterNotFound);
        }
        tx.commit().await?;
        Ok(version)
    }

    /// Puts the note's chapters in the order of `ids` (distinct), which must be exactly the
    /// note's chapters; `Ok(None)` when they are not (nothing changed).
    pub async fn reorder_chapters(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        ids: &[Uuid],
        expected_version: Option<i64>,
    ) -> Result<Option<i64>, NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let moved = sqlx::query_scalar!(
            r#"
            with current as (
                select count(*) as total,
                       count(*) filter (where id = any($2)) as listed
                from chapters where note_id = $1
            ), moved as (
                update chapters c set position = o.ord - 1
                from unnest($2::uuid[]) with ordinality as o(id, ord), current
                where c.id = o.id and c.note_id = $1
                  and current.total = cardinality($2) and current.listed = current.total
                returning c.id
            )
            select count(*) as "moved!" from moved
            "#,
            note_id,
            ids,
        )
        .fetch_one(&mut *tx)
        .statement("notes.reorder_chapters")
        .await?;
        if usize::try_from(moved).ok() != Some(ids.len()) {
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(version))
    }

    /// Adds a topic to a chapter of the note at `position` (clamped to the end).
    #[allow(clippy::too_many_arguments)]
    pub async fn create_topic(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        chapter_id: Uuid,
        topic_id: Uuid,
        title: &Title,
        body: &Body,
        position: Option<i32>,
        expected_version: Option<i64>,
    ) -> Result<(TopicRow, i64), NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let count = sqlx::query_scalar!(
            r#"
            select (select count(*) from topics t where t.chapter_id = c.id) as "count!"
            from chapters c where c.id = $1 and c.note_id = $2
            "#,
            chapter_id,
            note_id,
        )
        .fetch_optional(&mut *tx)
        .statement("notes.create_topic")
        .await?
        .ok_or(NotesError::ChapterNotFound)?;
        if count >= TOPICS_MAX {
            return Err(NotesError::LimitReached {
                reason: "TOPIC_LIMIT_REACHED",
                message: format!("a chapter has at most {TOPICS_MAX} topics"),
            });
        }
        let end = i32::try_from(count).unwrap_or(i32::MAX);
        let position = position.map_or(end, |p| p.min(end));
        let row = sqlx::query!(
            r#"
            with shifted as (
                update topics set position = position + 1
                where chapter_id = $2 and position >= $3
            )
            insert into topics (id, chapter_id, position, title, body)
            values ($1, $2, $3, $4, $5)
            returning created_at, updated_at
            "#,
            topic_id,
            chapter_id,
            position,
            title.as_str(),
            body.as_str(),
        )
        .fetch_one(&mut *tx)
        .statement("notes.create_topic")
        .await?;
        Self::check_content_size(&mut tx, note_id).await?;
        tx.commit().await?;
        Ok((
            TopicRow {
                id: topic_id,
                chapter_id,
                position,
                title: title.as_str().to_owned(),
                body: body.as_str().to_owned(),
                created_at: row.created_at,
                updated_at: row.updated_at,
            },
            version,
        ))
    }

    /// Changes a topic's title and/or body.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_topic(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        chapter_id: Uuid,
        topic_id: Uuid,
        title: Option<&Title>,
        body: Option<&Body>,
        expected_version: Option<i64>,
    ) -> Result<(TopicRow, i64), NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let topic = sqlx::query_as!(
            TopicRow,
            r#"
            update topics t set
                title = coalesce($4, t.title),
                body = coalesce($5, t.body),
                updated_at = now()
            from chapters c
            where t.id = $1 and t.chapter_id = $2 and c.id = t.chapter_id and c.note_id = $3
            returning t.id, t.chapter_id, t.position, t.title, t.body, t.created_at, t.updated_at
            "#,
            topic_id,
            chapter_id,
            note_id,
            title.map(Title::as_str),
            body.map(Body::as_str),
        )
        .fetch_optional(&mut *tx)
        .statement("notes.update_topic")
        .await?;
        let Some(topic) = topic else {
            return Err(Self::missing_topic(&mut tx, note_id, chapter_id).await?);
        };
        Self::check_content_size(&mut tx, note_id).await?;
        tx.commit().await?;
        Ok((topic, version))
    }

    /// Deletes a topic; later topics of its chapter move up.
    pub async fn delete_topic(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        chapter_id: Uuid,
        topic_id: Uuid,
        expected_version: Option<i64>,
    ) -> Result<i64, NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let deleted = sqlx::query_scalar!(
            r#"
            with gone as (
                delete from topics t using chapters c
                where t.id = $1 and t.chapter_id = $2 and c.id = t.chapter_id and c.note_id = $3
                returning t.position
            ), shifted as (
                update topics t set position = t.position - 1
                from gone
                where t.chapter_id = $2 and t.position > gone.position
            )
            select count(*) as "deleted!" from gone
            "#,
            topic_id,
            chapter_id,
            note_id,
        )
        .fetch_one(&mut *tx)
        .statement("notes.delete_topic")
        .await?;
        if deleted == 0 {
            return Err(Self::missing_topic(&mut tx, note_id, chapter_id).await?);
        }
        tx.commit().await?;
        Ok(version)
    }

    /// Puts a chapter's topics in the order of `ids` (distinct), which must be exactly the
    /// chapter's topics; `Ok(None)` when they are not (nothing changed).
    pub async fn reorder_topics(
        &self,
        owner_id: Uuid,
        note_id: Uuid,
        chapter_id: Uuid,
        ids: &[Uuid],
        expected_version: Option<i64>,
    ) -> Result<Option<i64>, NotesError> {
        let mut tx = self.db.begin().await?;
        let version = Self::lock_note(&mut tx, owner_id, note_id, expected_version).await?;
        let row = sqlx::query!(
            r#"
            with chapter as (
                select id from chapters where id = $1 and note_id = $2
            ), current as (
                select count(*) as total,
                       count(*) filter (where t.id = any($3)) as listed
                from topics t join chapter on chapter.id = t.chapter_id
            ), moved as (
                update topics t set position = o.ord - 1
                from unnest($3::uuid[]) with ordinality as o(id, ord), current, chapter
                where t.id = o.id and t.chapter_id = chapter.id
                  and current.total = cardinality($3) and current.listed = current.total
                returning t.id
            )
            select exists (select 1 from chapter) as "chapter_found!",
                   (select count(*) from moved) as "moved!"
            "#,
            chapter_id,
            note_id,
            ids,
        )
        .fetch_one(&mut *tx)
        .statement("notes.reorder_topics")
        .await?;
        if !row.chapter_found {
            return Err(NotesError::ChapterNotFound);
        }
        if usize::try_from(row.moved).ok() != Some(ids.len()) {
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(version))
    }

    /// Why a topic write found no topic: its chapter is not the note's, or the topic is not
    /// the chapter's.
    async fn missing_topic(
        tx: &mut Transaction<'static, Postgres>,
        note_id: Uuid,
        chapter_id: Uuid,
    ) -> Result<NotesError, sqlx::Error> {
        let chapter_found = sqlx::query_scalar!(
            r#"select exists (select 1 from chapters where id = $1 and note_id = $2) as "found!""#,
            chapter_id,
            note_id,
        )
        .fetch_one(&mut **tx)
        .statement("notes.missing_topic")
        .await?;
        Ok(if chapter_found {
            NotesError::TopicNotFound
        } else {
            NotesError::ChapterNotFound
        })
    }
}

fn content_limit() -> NotesError {
    NotesError::LimitReached {
        reason: "NOTE_TOO_LARGE",
        message: format!(
            "a note holds at most {} MiB of text with its chapters and topics",
            NOTE_CONTENT_MAX_BYTES / (1024 * 1024)
        ),
    }
}

/// `rows` in the order of `ids` (each id once).
fn in_order<T>(ids: &[Uuid], rows: Vec<T>, id: impl Fn(&T) -> Uuid) -> Vec<T> {
    let mut by_id: std::collections::HashMap<Uuid, T> =
        rows.into_iter().map(|r| (id(&r), r)).collect();
    ids.iter().filter_map(|i| by_id.remove(i)).collect()
}

/// Folds the detail query's rows (ordered by chapter, then topic) into a note.
fn assemble_detail(rows: Vec<DetailRow>) -> Option<NoteDetail> {
    let mut rows = rows.into_iter();
    let first = rows.next()?;
    let mut detail = NoteDetail {
        note: NoteRow {
            id: first.id,
            owner_id: first.owner_id,
            title: first.title.clone(),
            body: first.body.clone().unwrap_or_default(),
            status: first.status.clone(),
            tags: first.tags.clone(),
            version: first.version,
            created_at: first.created_at,
            updated_at: first.updated_at,
        },
        chapters: Vec::new(),
    };
    for row in std::iter::once(first).chain(rows) {
        let (
            Some(chapter_id),
            Some(position),
            Some(title),
            Some(body),
            Some(created_at),
            Some(updated_at),
        ) = (
            row.chapter_id,
            row.chapter_position,
            row.chapter_title,
            row.chapter_body,
            row.chapter_created_at,
            row.chapter_updated_at,
        )
        else {
            continue;
        };
        if detail.chapters.last().is_none_or(|c| c.id != chapter_id) {
            detail.chapters.push(ChapterRow {
                id: chapter_id,
                position,
                title,
                body,
                created_at,
                updated_at,
                topics: Vec::new(),
            });
        }
        if let (
            Some(id),
            Some(position),
            Some(title),
            Some(body),
            Some(created_at),
            Some(updated_at),
            Some(chapter),
        ) = (
            row.topic_id,
            row.topic_position,
            row.topic_title,
            row.topic_body,
            row.topic_created_at,
            row.topic_updated_at,
            detail.chapters.last_mut(),
        ) {
            chapter.topics.push(TopicRow {
                id,
                chapter_id,
                position,
                title,
                body,
                created_at,
                updated_at,
            });
        }
    }
    Some(detail)
}
