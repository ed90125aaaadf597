//! Validated inputs: titles, bodies, tags, statuses and ids can only be built by their
//! parsers, so everything past the gRPC layer holds values that already passed the rules.
//! A refusal names the request field (`note.title`, `items[2].tags[0]`) with a stable code.

use std::fmt;

use uuid::Uuid;

/// Why one request field was refused; becomes a `google.rpc.BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field path, e.g. `note.title` or `items[2].tags[0]`.
    pub field: String,
    /// Stable machine code, e.g. `TOO_LONG`.
    pub code: &'static str,
    pub message: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

/// Collects violations across fields, so one answer names every bad field.
#[derive(Debug, Default)]
pub struct Violations(pub Vec<FieldViolation>);

impl Violations {
    /// The value, or `None` with the violation recorded.
    pub fn check<T>(&mut self, result: Result<T, FieldViolation>) -> Option<T> {
        result.map_err(|v| self.0.push(v)).ok()
    }

    pub fn push(&mut self, violation: FieldViolation) {
        self.0.push(violation);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Titles of notes, chapters and topics: 1–200 characters.
pub const TITLE_MAX_CHARS: usize = 200;
/// Markdown bodies of notes, chapters and topics: 1 MiB of UTF-8.
pub const BODY_MAX_BYTES: usize = 1024 * 1024;
pub const TAGS_MAX: usize = 20;
pub const TAG_MAX_CHARS: usize = 40;
/// Full-text queries of the list.
pub const QUERY_MAX_CHARS: usize = 200;

/// A note, chapter or topic title: trimmed, 1–200 characters, one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title(String);

impl Title {
    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldViolation> {
        let title = raw.trim();
        if title.is_empty() {
            return Err(FieldViolation::new(field, "REQUIRED", "must not be empty"));
        }
        if title.chars().count() > TITLE_MAX_CHARS {
            return Err(FieldViolation::new(
                field,
                "TOO_LONG",
                format!("at most {TITLE_MAX_CHARS} characters"),
            ));
        }
        if title.chars().any(char::is_control) {
            return Err(FieldViolation::new(
                field,
                "INVALID_CHARACTERS",
                "must be one line without control characters",
            ));
        }
        Ok(Self(title.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A markdown body: at most 1 MiB, kept as written (whitespace is meaningful in markdown).
/// NUL is refused: Postgres text cannot hold it.
#[derive(Clone, PartialEq, Eq)]
pub struct Body(String);

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Body({} bytes)", self.0.len())
    }
}

impl Body {
    pub fn parse(field: &str, raw: String) -> Result<Self, FieldViolation> {
        if raw.len() > BODY_MAX_BYTES {
            return Err(FieldViolation::new(
                field,
                "TOO_LONG",
                format!("at most {BODY_MAX_BYTES} bytes (1 MiB)"),
            ));
        }
        if raw.contains('\0') {
            return Err(FieldViolation::new(
                field,
                "INVALID_CHARACTERS",
                "must not contain NUL characters",
            ));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// One tag: trimmed, 1–40 characters, no control characters.
fn tag(field: &str, raw: &str) -> Result<String, FieldViolation> {
    let tag = raw.trim();
    if tag.is_empty() {
        return Err(FieldViolation::new(field, "REQUIRED", "must not be empty"));
    }
    if tag.chars().count() > TAG_MAX_CHARS {
        return Err(FieldViolation::new(
            field,
            "TOO_LONG",
            format!("at most {TAG_MAX_CHARS} characters"),
        ));
    }
    if tag.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "INVALID_CHARACTERS",
            "must not contain control characters",
        ));
    }
    Ok(tag.to_owned())
}

/// Tags, each valid, duplicates removed (first occurrence kept, order kept). Every bad tag
/// is named (`<field>[i]`); more than `TAGS_MAX` distinct tags names the list.
pub fn tags(field: &str, raw: &[String], violations: &mut Violations) -> Option<Vec<String>> {
    let before = violations.0.len();
    let mut tags: Vec<String> = Vec::with_capacity(raw.len().min(TAGS_MAX));
    for (i, raw_tag) in raw.iter().enumerate() {
        if let Some(tag) = violations.check(tag(&format!("{field}[{i}]"), raw_tag))
            && !tags.contains(&tag)
        {
            tags.push(tag);
        }
    }
    if tags.len() > TAGS_MAX {
        violations.push(FieldViolation::new(
            field,
            "TOO_MANY",
            format!("at most {TAGS_MAX} distinct tags"),
        ));
    }
    (violations.0.len() == before).then_some(tags)
}

/// A note's lifecycle state, stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoteStatus {
    Draft,
    Published,
    Archived,
}

impl NoteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Published => "published",
            Self::Archived => "archived",
        }
    }

    /// The stored name back; the schema allows no other.
    pub fn from_db(text: &str) -> Self {
        match text {
            "published" => Self::Published,
            "archived" => Self::Archived,
            _ => Self::Draft,
        }
    }

    /// A status from the wire: `None` for UNSPECIFIED, a violation for unknown numbers.
    pub fn from_proto(field: &str, value: i32) -> Result<Option<Self>, FieldViolation> {
        use proto::notes::v1::NoteStatus as Pb;
        match Pb::try_from(value) {
            Ok(Pb::Unspecified) => Ok(None),
            Ok(Pb::Draft) => Ok(Some(Self::Draft)),
            Ok(Pb::Published) => Ok(Some(Self::Published)),
            Ok(Pb::Archived) => Ok(Some(Self::Archived)),
            Err(_) => Err(FieldViolation::new(
                field,
                "INVALID_VALUE",
                "not a known note status",
            )),
        }
    }

    pub fn to_proto(self) -> proto::notes::v1::NoteStatus {
        use proto::notes::v1::NoteStatus as Pb;
        match self {
            Self::Draft => Pb::Draft,
            Self::Published => Pb::Published,
            Self::Archived => Pb::Archived,
        }
    }
}

/// A UUID request field, or a violation naming it.
pub fn id(field: impl Into<String>, text: &str) -> Result<Uuid, FieldViolation> {
    Uuid::parse_str(text).map_err(|_| FieldViolation::new(field, "INVALID_ID", "not a UUID"))
}

/// A full-text query (Postgres websearch syntax, which accepts any text): trimmed, at most
/// 200 characters; empty means no text filter.
pub fn text_query(field: &str, raw: &str) -> Result<Option<String>, FieldViolation> {
    let query = raw.trim();
    if query.is_empty() {
        return Ok(None);
    }
    if query.chars().count() > QUERY_MAX_CHARS {
        return Err(FieldViolation::new(
            field,
            "TOO_LONG",
            format!("at most {QUERY_MAX_CHARS} characters"),
        ));
    }
    if query.contains('\0') {
        return Err(FieldViolation::new(
            field,
            "INVALID_CHARACTERS",
            "must not contain NUL characters",
        ));
    }
    Ok(Some(query.to_owned()))
}

/// The ETag of a note: its version, bumped by every write to the note, its chapters or its
/// topics. Opaque to clients.
pub fn etag(version: i64) -> String {
    version.to_string()
}

/// The version an expected ETag (`If-Match`) names: `None` when none was given (the write is
/// unconditional). An ETag this service never issued names version 0, which no note has, so
/// it never matches.
pub fn expected_version(etag: Option<&str>) -> Option<i64> {
    etag.map(|etag| etag.trim().parse::<i64>().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: fail loudly")]

    use super::*;

    #[test]
    fn titles_are_trimmed_and_bounded_in_characters() {
        assert_eq!(Title::parse("t", "  Hello ").unwrap().as_str(), "Hello");
        assert_eq!(Title::parse("t", "   ").unwrap_err().code, "REQUIRED");
        assert!(Title::parse("t", &"é".repeat(200)).is_ok());
        assert_eq!(
            Title::parse("t", &"é".repeat(201)).unwrap_err().code,
            "TOO_LONG"
        );
        assert_eq!(
            Title::parse("t", "a\nb").unwrap_err().code,
            "INVALID_CHARACTERS"
        );
    }

    #[test]
    fn bodies_are_bounded_in_bytes_and_refuse_nul() {
        assert!(Body::parse("b", "x".repeat(BODY_MAX_BYTES)).is_ok());
        let too_long = Body::parse("b", "x".repeat(BODY_MAX_BYTES + 1)).unwrap_err();
        assert_eq!((too_long.field.as_str(), too_long.code), ("b", "TOO_LONG"));
        assert_eq!(
            Body::parse("b", "a\0b".to_owned()).unwrap_err().code,
            "INVALID_CHARACTERS"
        );
        assert_eq!(
            Body::parse("b", "  # kept \n".to_owned()).unwrap().as_str(),
            "  # kept \n"
        );
    }

    #[test]
    fn tags_are_deduplicated_and_each_bad_one_is_named() {
        let mut violations = Violations::default();
        let raw = ["work", " work ", "home"].map(str::to_owned);
        assert_eq!(
            tags("tags", &raw, &mut violations),
            Some(vec!["work".to_owned(), "home".to_owned()])
        );
        assert!(violations.is_empty());

        let raw = ["ok", "", &"x".repeat(41)].map(str::to_owned);
        assert_eq!(tags("note.tags", &raw, &mut violations), None);
        let named: Vec<_> = violations
            .0
            .iter()
            .map(|v| (v.field.as_str(), v.code))
            .collect();
        assert_eq!(
            named,
            [("note.tags[1]", "REQUIRED"), ("note.tags[2]", "TOO_LONG")]
        );

        let mut violations = Violations::default();
        let many: Vec<String> = (0..21).map(|i| format!("t{i}")).collect();
        assert_eq!(tags("tags", &many, &mut violations), None);
        assert_eq!(violations.0[0].code, "TOO_MANY");
        // Duplicates do not count against the limit.
        let mut violations = Violations::default();
        let repeated: Vec<String> = (0..40).map(|i| format!("t{}", i % 20)).collect();
        assert_eq!(tags("tags", &repeated, &mut violations).unwrap().len(), 20);
    }

    #[test]
    fn statuses_and_etags() {
        assert_eq!(NoteStatus::from_proto("s", 0), Ok(None));
        assert_eq!(
            NoteStatus::from_proto("s", 2),
            Ok(Some(NoteStatus::Published))
        );
        assert_eq!(
            NoteStatus::from_proto("s", 9).unwrap_err().code,
            "INVALID_VALUE"
        );
        assert_eq!(NoteStatus::from_db("archived"), NoteStatus::Archived);
        assert_eq!(expected_version(Some("7")), Some(7));
        assert_eq!(expected_version(Some("junk")), Some(0));
        assert_eq!(expected_version(None), None);
    }

    #[test]
    fn text_queries() {
        assert_eq!(text_query("q", "  "), Ok(None));
        assert_eq!(text_query("q", " rust "), Ok(Some("rust".to_owned())));
        assert_eq!(
            text_query("q", &"a".repeat(201)).unwrap_err().code,
            "TOO_LONG"
        );
    }
}
