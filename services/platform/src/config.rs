//! Typed configuration read once from environment variables with a per-binary prefix.
//!
//! A binary builds its settings from an [`Env`]; every getter records what is wrong with a
//! variable instead of stopping at the first problem, and [`Env::finish`] reports them all at
//! once, each naming its variable. Secrets are wrapped in [`Secret`] so they never print.

use std::{
    cell::RefCell, collections::HashMap, fmt, net::SocketAddr, str::FromStr, time::Duration,
};

/// Exit status for a bad configuration (BSD `EX_USAGE`), so supervisors can tell it from a crash.
pub const EXIT_USAGE: u8 = 64;

/// One variable that is missing or cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The full variable name, prefix included, e.g. `AUTH_DATABASE_URL`.
    pub variable: String,
    pub problem: String,
}

/// Every problem found while reading a binary's configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.variable, p.problem)?;
        }
        Ok(())
    }
}

/// A value that must never reach a log line or a `Debug` dump.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A duration written with a unit: `250ms`, `5s`, `10m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let amount: u64 = digits
            .parse()
            .map_err(|_| format!("`{s}` is not a duration; write it like 250ms, 5s, 10m or 1h"))?;
        let duration = match unit {
            "ms" => Duration::from_millis(amount),
            "s" => Duration::from_secs(amount),
            "m" => Duration::from_secs(amount.saturating_mul(60)),
            "h" => Duration::from_secs(amount.saturating_mul(3600)),
            _ => {
                return Err(format!(
                    "`{s}` has no known unit; write it like 250ms, 5s, 10m or 1h"
                ));
            }
        };
        Ok(Self(duration))
    }
}

/// The variables of one binary: `AUTH_*`, `GATEWAY_*`, ...
///
/// Read-only after construction: tests build one from pairs instead of touching the
/// process environment.
#[derive(Debug)]
pub struct Env {
    prefix: String,
    vars: HashMap<String, String>,
    problems: RefCell<Vec<ConfigProblem>>,
}

impl Env {
    /// The process environment, seen through `prefix` (without the trailing underscore).
    pub fn from_process(prefix: &str) -> Self {
        Self::from_pairs(prefix, std::env::vars())
    }

    pub fn from_pairs<K, V>(prefix: &str, pairs: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            prefix: prefix.to_owned(),
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            problems: RefCell::new(Vec::new()),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of a prefixed variable: `name("DATABASE_URL")` → `AUTH_DATABASE_URL`.
    pub fn name(&self, name: &str) -> String {
        format!("{}_{}", self.prefix, name)
    }

    /// A variable that must be set and non-empty.
    pub fn required<T>(&self, name: &str) -> T
    where
        T: FromStr + Default,
        T::Err: fmt::Display,
    {
        let variable = self.name(name);
        match self.raw(&variable) {
            Some(value) => self.parse(&variable, value).unwrap_or_default(),
            None => {
                self.problem(&variable, "missing (required)".to_owned());
                T::default()
            }
        }
    }

    /// A variable with a default used when it is unset or empty.
    pub fn or<T>(&self, name: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let variable = self.name(name);
        self.unprefixed_or(&variable, default)
    }

    /// An optional variable: `None` when unset or empty.
    pub fn optional<T>(&self, name: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let variable = self.name(name);
        self.raw(&variable)
            .and_then(|value| self.parse(&variable, value))
    }

    /// A required secret from `<P>_<name>`, or from the file named by `<P>_<name>_FILE`
    /// (how orchestrators mount secrets); one trailing newline is dropped.
    pub fn secret(&self, name: &str) -> Secret {
        let variable = self.name(name);
        let file_variable = format!("{variable}_FILE");
        match (self.raw(&variable), self.raw(&file_variable)) {
            (Some(value), None) => Secret::new(value),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let value = text.strip_suffix('\n').unwrap_or(&text);
                    let value = value.strip_suffix('\r').unwrap_or(value);
                    if value.is_empty() {
                        self.problem(&file_variable, format!("`{path}` is empty"));
                    }
                    Secret::new(value)
                }
                Err(e) => {
                    self.problem(&file_variable, format!("cannot read `{path}`: {e}"));
                    Secret::default()
                }
            },
            (Some(_), Some(_)) => {
                self.problem(
                    &variable,
                    format!("set either it or {file_variable}, not both"),
                );
                Secret::default()
            }
            (None, None) => {
                self.problem(&variable, format!("missing (required; or {file_variable})"));
                Secret::default()
            }
        }
    }

    pub fn duration_or(&self, name: &str, default: Duration) -> Duration {
        self.or(name, HumanDuration(default)).0
    }

    pub fn addr_or(&self, name: &str, default: SocketAddr) -> SocketAddr {
        self.or(name, default)
    }

    /// A variable outside the prefix, for names set by a standard (`OTEL_*`).
    pub fn unprefixed_or<T>(&self, variable: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.raw(variable) {
            Some(value) => self.parse(variable, value).unwrap_or(default),
            None => default,
        }
    }

    pub fn unprefixed(&self, variable: &str) -> Option<String> {
        self.raw(variable).map(str::to_owned)
    }

    /// Records a problem found by a check across several variables.
    pub fn problem(&self, variable: &str, problem: String) {
        self.problems.borrow_mut().push(ConfigProblem {
            variable: variable.to_owned(),
            problem,
        });
    }

    /// Every problem recorded so far, or `Ok` when there was none.
    pub fn finish(self) -> Result<(), ConfigError> {
        let problems = self.problems.into_inner();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    fn raw(&self, variable: &str) -> Option<&str> {
        self.vars
            .get(variable)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn parse<T>(&self, variable: &str, value: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match value.parse() {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(variable, format!("cannot parse `{value}`: {e}"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_bad_variable_by_its_full_name() {
        let env = Env::from_pairs(
            "AUTH",
            [
                ("AUTH_DB_MAX_CONNECTIONS", "many"),
                ("AUTH_SHUTDOWN_GRACE_PERIOD", "10"),
            ],
        );
        let _: String = env.required("DATABASE_URL");
        let _: u32 = env.or("DB_MAX_CONNECTIONS", 10);
        let _ = env.duration_or("SHUTDOWN_GRACE_PERIOD", Duration::from_secs(1));
        let err = env.finish().err().map(|e| e.problems);
        let variables: Vec<_> = err
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.variable)
            .collect();
        assert_eq!(
            variables,
            [
                "AUTH_DATABASE_URL",
                "AUTH_DB_MAX_CONNECTIONS",
                "AUTH_SHUTDOWN_GRACE_PERIOD"
            ]
        );
    }

    #[test]
    fn defaults_apply_when_unset_or_empty() {
        let env = Env::from_pairs("GATEWAY", [("GATEWAY_READY_TIMEOUT", " ")]);
        assert_eq!(
            env.duration_or("READY_TIMEOUT", Duration::from_millis(500)),
            Duration::from_millis(500)
        );
        assert_eq!(env.or("MAX", 7u32), 7);
        assert!(env.finish().is_ok());
    }

    #[test]
    fn durations_need_a_unit() {
        let parse = |s: &str| s.parse::<HumanDuration>().map(|d| d.0);
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse("5").is_err());
        assert!(parse("5d").is_err());
        assert!(parse("s").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2");
    }
}
