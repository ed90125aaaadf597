//! Validated inputs: every field a caller may write is checked here, and a refusal names the
//! field with a stable code, so the gateway can answer 400 with `errors[]`.

use uuid::Uuid;

/// Why one request field was refused; becomes a `google.rpc.BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field path, e.g. `display_name` or `plan.features[2]`.
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

fn has_control(text: &str, allow_newlines: bool) -> bool {
    text.chars()
        .any(|c| c.is_control() && !(allow_newlines && (c == '\n' || c == '\t')))
}

/// A trimmed single-line text of `min..=max` characters.
fn line(field: &str, raw: &str, min: usize, max: usize) -> Result<String, FieldViolation> {
    let text = raw.trim();
    let chars = text.chars().count();
    if chars < min {
        return Err(FieldViolation::new(field, "REQUIRED", "must not be empty"));
    }
    if chars > max {
        return Err(FieldViolation::new(
            field,
            "TOO_LONG",
            format!("at most {max} characters"),
        ));
    }
    if has_control(text, false) {
        return Err(FieldViolation::new(
            field,
            "INVALID_CHARACTERS",
            "must not contain control characters",
        ));
    }
    Ok(text.to_owned())
}

pub const DISPLAY_NAME_MAX: usize = 100;
pub const BIO_MAX: usize = 1000;
pub const AVATAR_URL_MAX: usize = 2048;
pub const LOCALE_MAX: usize = 35;
pub const CATALOG_NAME_MAX: usize = 100;
pub const PLAN_NAME_MAX: usize = 100;
pub const PLAN_DESCRIPTION_MAX: usize = 1000;
pub const PLAN_FEATURES_MAX: usize = 50;

pub fn display_name(field: &str, raw: &str) -> Result<String, FieldViolation> {
    line(field, raw, 1, DISPLAY_NAME_MAX)
}

/// Free text of up to 1,000 characters; line breaks allowed, surrounding blanks trimmed.
pub fn bio(field: &str, raw: &str) -> Result<String, FieldViolation> {
    let text = raw.trim();
    if text.chars().count() > BIO_MAX {
        return Err(FieldViolation::new(
            field,
            "TOO_LONG",
            format!("at most {BIO_MAX} characters"),
        ));
    }
    if has_control(text, true) {
        return Err(FieldViolation::new(
            field,
            "INVALID_CHARACTERS",
            "must not contain control characters",
        ));
    }
    Ok(text.to_owned())
}

/// An `https://` URL with a host, no blanks, at most 2,048 characters; empty clears it.
pub fn https_url(field: &str, raw: &str) -> Result<String, FieldViolation> {
    let url = raw.trim();
    if url.is_empty() {
        return Ok(String::new());
    }
    if url.len() > AVATAR_URL_MAX {
        return Err(FieldViolation::new(
            field,
            "TOO_LONG",
            format!("at most {AVATAR_URL_MAX} characters"),
        ));
    }
    let host = url
        .strip_prefix("https://")
        .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or_default());
    let valid = host.is_some_and(|host| {
        !host.is_empty()
            && !host.starts_with(['.', '-', ':'])
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    }) && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(url.to_owned())
    } else {
        Err(FieldViolation::new(
            field,
            "INVALID_URL",
            "must be an https:// URL",
        ))
    }
}

/// A BCP 47 language tag such as `en`, `en-US` or `zh-Hant-TW` (shape only: a 2–3 letter
/// language, then subtags of 1–8 letters or digits); empty clears it.
pub fn locale(field: &str, raw: &str) -> Result<String, FieldViolation> {
    let tag = raw.trim();
    if tag.is_empty() {
        return Ok(String::new());
    }
    let mut parts = tag.split('-');
    let language_ok = parts
        .next()
        .is_some_and(|l| (2..=3).contains(&l.len()) && l.chars().all(|c| c.is_ascii_alphabetic()));
    let rest_ok =
        parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
    if tag.len() <= LOCALE_MAX && language_ok && rest_ok {
        Ok(tag.to_owned())
    } else {
        Err(FieldViolation::new(
            field,
            "INVALID_LOCALE",
            "must be a BCP 47 language tag such as en or en-US",
        ))
    }
}

/// A UUID in a request field.
pub fn id(field: &str, raw: &str) -> Result<Uuid, FieldViolation> {
    Uuid::parse_str(raw.trim()).map_err(|_| FieldViolation::new(field, "INVALID_ID", "not a UUID"))
}

pub fn catalog_name(field: &str, raw: &str) -> Result<String, FieldViolation> {
    line(field, raw, 1, CATALOG_NAME_MAX)
}

/// A plan slug: 1–40 characters of `[a-z0-9_-]`.
pub fn plan_slug(field: &str, raw: &str) -> Result<String, FieldViolation> {
    let ok = (1..=40).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(FieldViolation::new(
            field,
            "INVALID_SLUG",
            "1 to 40 characters of a-z, 0-9, _ and -",
        ))
    }
}

pub fn plan_name(field: &str, raw: &str) -> Result<String, FieldViolation> {
    line(field, raw, 1, PLAN_NAME_MAX)
}

pub fn plan_description(field: &str, raw: &str) -> Result<String, FieldViolation> {
    let text = raw.trim();
    if text.chars().count() > PLAN_DESCRIPTION_MAX {
        return Err(FieldViolation::new(
            field,
            "TOO_LONG",
            format!("at most {PLAN_DESCRIPTION_MAX} characters"),
        ));
    }
    Ok(text.to_owned())
}

/// Feature keys: at most 50, each 1–64 characters of `[a-z0-9_:.-]`; duplicates dropped,
/// order kept.
pub fn features(field: &str, raw: &[String], violations: &mut Violations) -> Vec<String> {
    if raw.len() > PLAN_FEATURES_MAX {
        violations.push(FieldViolation::new(
            field,
            "TOO_MANY",
            format!("at most {PLAN_FEATURES_MAX} features"),
        ));
        return Vec::new();
    }
    let mut features: Vec<String> = Vec::with_capacity(raw.len());
    for (i, feature) in raw.iter().enumerate() {
        let ok = (1..=64).contains(&feature.len())
            && feature.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b':' | b'.' | b'-')
            });
        if !ok {
            violations.push(FieldViolation::new(
                format!("{field}[{i}]"),
                "INVALID_FEATURE",
                "1 to 64 characters of a-z, 0-9, _, :, . and -",
            ));
        } else if !features.contains(feature) {
            features.push(feature.clone());
        }
    }
    features
}

pub fn non_negative(field: &str, value: i32) -> Result<i32, FieldViolation> {
    if value < 0 {
        Err(FieldViolation::new(
            field,
            "OUT_OF_RANGE",
            "must not be negative",
        ))
    } else {
        Ok(value)
    }
}

/// The paths of a field mask, checked against what may be written: `editable` paths are
/// returned; `read_only` ones and anything else are violations naming the path (relative to
/// `mask_field`, as the request spells it).
pub fn mask_paths<'a>(
    paths: &'a [String],
    editable: &[&str],
    read_only: &[&str],
    violations: &mut Violations,
) -> Vec<&'a str> {
    let mut accepted = Vec::with_capacity(paths.len());
    for path in paths {
        let path = path.as_str();
        if editable.contains(&path) {
            if !accepted.contains(&path) {
                accepted.push(path);
            }
        } else if read_only.contains(&path) {
            violations.push(FieldViolation::new(
                path,
                "READ_ONLY",
                "this field cannot be changed here",
            ));
        } else {
            violations.push(FieldViolation::new(path, "UNKNOWN_FIELD", "no such field"));
        }
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_with_a_host() {
        assert_eq!(
            https_url("avatar_url", " https://cdn.example.com/a.png "),
            Ok("https://cdn.example.com/a.png".to_owned())
        );
        assert_eq!(https_url("avatar_url", ""), Ok(String::new()));
        for bad in [
            "http://example.com/a.png",
            "https://",
            "https:///a",
            "https://exa mple.com",
            "javascript:alert(1)",
        ] {
            assert_eq!(
                https_url("avatar_url", bad).map_err(|v| v.code),
                Err("INVALID_URL"),
                "{bad}"
            );
        }
    }

    #[test]
    fn locales_are_language_tags() {
        for good in ["en", "en-US", "zh-Hant-TW", "es-419"] {
            assert!(locale("locale", good).is_ok(), "{good}");
        }
        for bad in ["e", "english", "en_US", "en-", "en-toolongsubtag"] {
            assert!(locale("locale", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_trimmed_bounded_single_lines() {
        assert_eq!(
            display_name("display_name", "  Ada  "),
            Ok("Ada".to_owned())
        );
        assert_eq!(
            display_name("display_name", "   ").map_err(|v| v.code),
            Err("REQUIRED")
        );
        assert_eq!(
            display_name("display_name", &"x".repeat(101)).map_err(|v| v.code),
            Err("TOO_LONG")
        );
        assert_eq!(
            display_name("display_name", "a\u{7}b").map_err(|v| v.code),
            Err("INVALID_CHARACTERS")
        );
        assert!(bio("bio", "line one\nline two").is_ok());
    }

    #[test]
    fn masks_name_unknown_and_read_only_paths() {
        let mut violations = Violations::default();
        let paths = ["bio", "email", "nope", "bio"].map(str::to_owned);
        let accepted = mask_paths(&paths, &["bio"], &["email"], &mut violations);
        assert_eq!(accepted, ["bio"]);
        let named: Vec<_> = violations
            .0
            .iter()
            .map(|v| (v.field.as_str(), v.code))
            .collect();
        assert_eq!(named, [("email", "READ_ONLY"), ("nope", "UNKNOWN_FIELD")]);
    }

    #[test]
    fn features_are_checked_one_by_one() {
        let mut violations = Violations::default();
        let raw = ["ai_generation", "Bad Key", "ai_generation"].map(str::to_owned);
        let features = features("plan.features", &raw, &mut violations);
        assert_eq!(features, ["ai_generation"]);
        assert_eq!(violations.0[0].field, "plan.features[1]");
    }
}
