//! Validated inputs: an email, a password and a display name can only be built by `parse`,
//! so everything past the gRPC layer holds values that already passed the rules.

use std::{collections::HashSet, fmt, sync::LazyLock};

/// Why one request field was refused; becomes a `google.rpc.BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The request field path, e.g. `password` or `assignments[3].user_id`.
    pub field: String,
    /// Stable machine code, e.g. `PASSWORD_TOO_SHORT`.
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

/// An email address, trimmed and lower-cased, so uniqueness is case-insensitive by
/// construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    /// RFC 5321 caps a forward path at 256 octets including the angle brackets.
    pub const MAX_LEN: usize = 254;

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let email = raw.trim().to_lowercase();
        let invalid = || FieldViolation::new(field, "EMAIL_INVALID", "not a valid email address");
        if email.is_empty() {
            return Err(FieldViolation::new(field, "REQUIRED", "email is required"));
        }
        if email.len() > Self::MAX_LEN {
            return Err(FieldViolation::new(
                field,
                "EMAIL_TOO_LONG",
                format!("at most {} characters", Self::MAX_LEN),
            ));
        }
        let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
        let domain_ok = !domain.is_empty()
            && domain.contains('.')
            && !domain.starts_with(['.', '-'])
            && !domain.ends_with(['.', '-'])
            && !domain.contains("..")
            && domain
                .chars()
                .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.contains('@')
            && !local.chars().any(|c| c.is_whitespace() || c.is_control());
        if domain_ok && local_ok {
            Ok(Self(email))
        } else {
            Err(invalid())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password that meets the policy (OWASP ASVS 2.1): at least 8 characters, long
/// passphrases up to 1024 allowed, not one of the most common passwords. No composition
/// rules: they push people to predictable patterns without adding strength.
#[derive(Clone)]
pub struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

static COMMON_PASSWORDS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    include_str!("../data/common-passwords.txt")
        .lines()
        .filter(|l| !l.is_empty())
        .collect()
});

impl Password {
    pub const MIN_CHARS: usize = 8;
    /// Far above ASVS's 64 (and the 128), yet bounded so a request cannot make
    /// argon2 chew on megabytes.
    pub const MAX_CHARS: usize = 1024;

    /// Applies the policy to a new password.
    pub fn parse_new(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let chars = raw.chars().count();
        if chars < Self::MIN_CHARS {
            return Err(FieldViolation::new(
                field,
                "PASSWORD_TOO_SHORT",
                format!("at least {} characters", Self::MIN_CHARS),
            ));
        }
        if chars > Self::MAX_CHARS {
            return Err(FieldViolation::new(
                field,
                "PASSWORD_TOO_LONG",
                format!("at most {} characters", Self::MAX_CHARS),
            ));
        }
        if COMMON_PASSWORDS.contains(raw.to_lowercase().as_str()) {
            return Err(FieldViolation::new(
                field,
                "PASSWORD_TOO_COMMON",
                "this password is among the most common ones; choose another",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// A password presented for verification: only the bounds that keep hashing cheap apply,
    /// so a policy change never locks anyone out.
    pub fn parse_presented(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        if raw.is_empty() {
            return Err(FieldViolation::new(
                field,
                "REQUIRED",
                "password is required",
            ));
        }
        if raw.chars().count() > Self::MAX_CHARS {
            return Err(FieldViolation::new(
                field,
                "PASSWORD_TOO_LONG",
                format!("at most {} characters", Self::MAX_CHARS),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A display name: trimmed, 1 to 100 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_CHARS: usize = 100;

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, FieldViolation> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(FieldViolation::new(
                field,
                "REQUIRED",
                "display name is required",
            ));
        }
        if name.chars().count() > Self::MAX_CHARS {
            return Err(FieldViolation::new(
                field,
                "TOO_LONG",
                format!("at most {} characters", Self::MAX_CHARS),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(FieldViolation::new(
                field,
                "INVALID_CHARACTERS",
                "control characters are not allowed",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A short free-text label from a client (device name, user agent): trimmed, control
/// characters dropped, cut to `max` characters. Never refused: it is informational.
pub fn label(raw: &str, max: usize) -> String {
    raw.trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        let email = Email::parse("email", "  Alice.Smith@Example.COM ").map(|e| e.0);
        assert_eq!(email.as_deref(), Ok("alice.smith@example.com"));
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.com",
            "a@b",
            "a@.com",
            "a b@c.com",
            "a@b..com",
        ] {
            assert!(Email::parse("email", bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse("email", &long).is_err());
    }

    #[test]
    fn password_policy() {
        let code = |p: &str| Password::parse_new("password", p).err().map(|v| v.code);
        assert_eq!(code("short"), Some("PASSWORD_TOO_SHORT"));
        assert_eq!(code("password"), Some("PASSWORD_TOO_COMMON"));
        assert_eq!(code("Password1"), Some("PASSWORD_TOO_COMMON"));
        assert_eq!(code("correct horse battery staple"), None);
        // A 128-character passphrase is welcome; past the cap is refused.
        assert_eq!(code(&"x7".repeat(64)), None);
        assert_eq!(
            code(&"y".repeat(Password::MAX_CHARS + 1)),
            Some("PASSWORD_TOO_LONG")
        );
        // Length counts characters, not bytes.
        assert_eq!(code("ééééééé"), Some("PASSWORD_TOO_SHORT"));
    }

    #[test]
    fn passwords_do_not_print() {
        let password = Password::parse_new("password", "correct horse battery staple");
        assert!(!format!("{password:?}").contains("horse"));
    }

    #[test]
    fn display_names() {
        assert_eq!(
            DisplayName::parse("n", "  Ada ").map(|d| d.0).as_deref(),
            Ok("Ada")
        );
        assert!(DisplayName::parse("n", "   ").is_err());
        assert!(DisplayName::parse("n", "a\u{7}b").is_err());
        assert!(DisplayName::parse("n", &"a".repeat(101)).is_err());
    }

    #[test]
    fn labels_are_cleaned_not_refused() {
        assert_eq!(label("  Pixel\n8  ", 100), "Pixel8");
        assert_eq!(label("abcdef", 3), "abc");
    }
}
