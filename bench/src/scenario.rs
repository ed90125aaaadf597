//! The scenarios: which requests each worker sends, in what proportions, and the tokens
//! each worker's virtual user keeps between them.
//!
//! Every path is written here once. A route the target does not serve is not special: its
//! answers count as errors by status.

use std::time::{Duration, Instant};

use http::Method;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

use crate::http::{Answer, TransportError};

/// One kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Login,
    Refresh,
    Sessions,
    Profile,
    NotesList,
    Health,
    Jwks,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::Refresh => "refresh",
            Self::Sessions => "sessions",
            Self::Profile => "profile",
            Self::NotesList => "notes-list",
            Self::Health => "health",
            Self::Jwks => "jwks",
        }
    }

    pub fn method(self) -> Method {
        match self {
            Self::Login | Self::Refresh => Method::POST,
            _ => Method::GET,
        }
    }

    /// The path under the target's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Self::Login => "/api/v1/auth/login",
            Self::Refresh => "/api/v1/auth/refresh",
            Self::Sessions => "/api/v1/auth/sessions",
            Self::Profile => "/api/v1/auth/profile",
            Self::NotesList => "/api/v1/notes?limit=20",
            Self::Health => "/health",
            Self::Jwks => "/.well-known/jwks.json",
        }
    }

    /// Sent with the user's access token.
    pub fn needs_access_token(self) -> bool {
        matches!(self, Self::Sessions | Self::Profile | Self::NotesList)
    }

    /// Sent with the user's refresh token.
    pub fn needs_refresh_token(self) -> bool {
        self == Self::Refresh
    }
}

/// A named workload: each worker sends `cycle` in order, over and over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub summary: &'static str,
    /// The requests of one round; an op's share is how often it appears.
    pub cycle: &'static [Op],
}

/// A mobile client's session, without think time: log in, then mostly reads of the
/// profile and the notes list, a look at the sessions, and a token refresh, in the
/// proportions 1 : 3 : 3 : 1 : 1. Interleaved so no two logins are adjacent.
const MOBILE_SESSION: &[Op] = &[
    Op::Login,
    Op::Profile,
    Op::NotesList,
    Op::Profile,
    Op::Sessions,
    Op::NotesList,
    Op::Refresh,
    Op::Profile,
    Op::NotesList,
];

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "login",
        summary: "POST /api/v1/auth/login, each request as the next seeded user (argon2id bound)",
        cycle: &[Op::Login],
    },
    Scenario {
        name: "refresh",
        summary: "POST /api/v1/auth/refresh; each worker logs in once, then keeps rotating its token",
        cycle: &[Op::Refresh],
    },
    Scenario {
        name: "sessions",
        summary: "GET /api/v1/auth/sessions with the worker's access token",
        cycle: &[Op::Sessions],
    },
    Scenario {
        name: "profile",
        summary: "GET /api/v1/auth/profile with the worker's access token",
        cycle: &[Op::Profile],
    },
    Scenario {
        name: "notes-list",
        summary: "GET /api/v1/notes?limit=20 with the worker's access token",
        cycle: &[Op::NotesList],
    },
    Scenario {
        name: "health",
        summary: "GET /health: the HTTP path alone, no I/O behind it",
        cycle: &[Op::Health],
    },
    Scenario {
        name: "jwks",
        summary: "GET /.well-known/jwks.json: the published key set",
        cycle: &[Op::Jwks],
    },
    Scenario {
        name: "mobile-session",
        summary: "login, profile, notes-list, sessions, refresh weighted 1:3:3:1:1, no think time",
        cycle: MOBILE_SESSION,
    },
];

impl Scenario {
    pub fn find(name: &str) -> Option<&'static Self> {
        SCENARIOS.iter().find(|s| s.name == name)
    }

    /// Whether each worker logs in during set-up, before the clock starts.
    pub fn logs_in_first(&self) -> bool {
        self.cycle
            .iter()
            .any(|op| op.needs_access_token() || op.needs_refresh_token())
    }

    /// The distinct ops, in order of first appearance.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        for op in self.cycle {
            if !ops.contains(op) {
                ops.push(*op);
            }
        }
        ops
    }
}

/// The seeded accounts: `users` of them, emails from a pattern, one password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accounts {
    pub users: u64,
    /// Contains `{i}`, replaced by 0..users.
    pub email_pattern: String,
    pub password: String,
}

impl Accounts {
    pub const DEFAULT_PATTERN: &'static str = "user{i}@example.com";
    pub const DEFAULT_PASSWORD: &'static str = "correct horse battery staple";

    pub fn email(&self, index: u64) -> String {
        self.email_pattern.replace("{i}", &index.to_string())
    }
}

/// What one request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// A 2xx answer (with the tokens in it, for login and refresh).
    Ok,
    /// Any other status.
    Status(u16),
    /// No answer.
    Transport(TransportError),
    /// A 2xx login or refresh answer without the tokens.
    InvalidBody,
}

impl Outcome {
    pub fn is_ok(self) -> bool {
        self == Self::Ok
    }

    /// A stable name: `http_429`, `transport_timeout`, `invalid_body`.
    pub fn key(self) -> String {
        match self {
            Self::Ok => "ok".to_owned(),
            Self::Status(code) => format!("http_{code}"),
            Self::Transport(e) => format!("transport_{}", e.name()),
            Self::InvalidBody => "invalid_body".to_owned(),
        }
    }
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: &'static str,
    pub bearer: Option<String>,
    pub json: Option<Bytes>,
}

#[derive(Debug, Clone)]
struct Tokens {
    access: String,
    refresh: String,
    /// Renewed off the clock a minute before this.
    renew_at: Instant,
}

/// The login and refresh answer, as both the gateway and the reference return it.
#[derive(Debug, Deserialize)]
struct TokenReply {
    access_token: String,
    refresh_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Access tokens are renewed this long before they expire.
const RENEW_MARGIN: Duration = Duration::from_secs(60);
/// When the answer does not say (it should): the project's default lifetime.
const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(15 * 60);

/// One worker's user: which account it logs in as, and the tokens it holds.
#[derive(Debug)]
pub struct VirtualUser {
    worker: u64,
    workers: u64,
    logins: u64,
    tokens: Option<Tokens>,
}

impl VirtualUser {
    pub fn new(worker: usize, workers: usize) -> Self {
        Self {
            worker: worker as u64,
            workers: workers.max(1) as u64,
            logins: 0,
            tokens: None,
        }
    }

    /// The account of this worker's next login: worker `w` of `W` logs in as users
    /// `w, w + W, w + 2W, ...` (mod the user count), so concurrent logins never share an
    /// account and every account gets its turn.
    pub fn next_account(&self, accounts: &Accounts) -> u64 {
        self.worker
            .wrapping_add(self.logins.wrapping_mul(self.workers))
            % accounts.users.max(1)
    }

    /// Whether `op` needs a login first (none yet, the last was refused, or the access
    /// token is about to expire). That login is set-up, never recorded.
    pub fn needs_login(&self, op: Op, now: Instant) -> bool {
        if !(op.needs_access_token() || op.needs_refresh_token()) {
            return false;
        }
        match &self.tokens {
            None => true,
            Some(tokens) => op.needs_access_token() && now >= tokens.renew_at,
        }
    }

    /// The request for `op`. An op that needs a token this user does not have is sent
    /// without it, and its answer counts as whatever the target makes of it.
    pub fn call(&self, op: Op, accounts: &Accounts) -> Call {
        let json = match op {
            Op::Login => Some(
                serde_json::json!({
                    "email": accounts.email(self.next_account(accounts)),
                    "password": accounts.password,
                    "device_name": "loadgen",
                })
                .to_string(),
            ),
            Op::Refresh => Some(
                serde_json::json!({
                    "refresh_token": self.tokens.as_ref().map_or("", |t| t.refresh.as_str()),
                })
                .to_string(),
            ),
            _ => None,
        };
        Call {
            method: op.method(),
            path: op.path(),
            bearer: if op.needs_access_token() {
                self.tokens.as_ref().map(|t| t.access.clone())
            } else {
                None
            },
            json: json.map(Bytes::from),
        }
    }

    /// Takes in the answer to `op`: new tokens from a login or refresh; tokens dropped when
    /// the target refused them, so the next request logs in again.
    pub fn absorb(
        &mut self,
        op: Op,
        result: &Result<Answer, TransportError>,
        now: Instant,
    ) -> Outcome {
        let answer = match result {
            Ok(answer) => answer,
            Err(error) => return Outcome::Transport(*error),
        };
        let success = (200..300).contains(&answer.status);
        match op {
            Op::Login | Op::Refresh => {
                if op == Op::Login {
                    self.logins = self.logins.wrapping_add(1);
                }
                if !success {
                    if op == Op::Refresh {
                        // The refresh token is spent or revoked: log in again.
                        self.tokens = None;
                    }
                    return Outcome::Status(answer.status);
                }
                match serde_json::from_slice::<TokenReply>(&answer.body) {
                    Ok(reply) => {
                        let ttl = reply
                            .expires_in
                            .map_or(DEFAULT_ACCESS_TTL, Duration::from_secs);
                        self.tokens = Some(Tokens {
                            access: reply.access_token,
                            refresh: reply.refresh_token,
                            renew_at: now + ttl.saturating_sub(RENEW_MARGIN),
                        });
                        Outcome::Ok
                    }
                    Err(_) => {
                        self.tokens = None;
                        Outcome::InvalidBody
                    }
                }
            }
            _ if success => Outcome::Ok,
            _ => {
                if answer.status == 401 && op.needs_access_token() {
                    self.tokens = None;
                }
                Outcome::Status(answer.status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn accounts(users: u64) -> Accounts {
        Accounts {
            users,
            email_pattern: Accounts::DEFAULT_PATTERN.to_owned(),
            password: Accounts::DEFAULT_PASSWORD.to_owned(),
        }
    }

    fn answer(status: u16, body: &str) -> Result<Answer, TransportError> {
        Ok(Answer {
            status,
            body: Bytes::from(body.to_owned()),
        })
    }

    #[test]
    fn scenario_names_are_unique_and_found() {
        for scenario in SCENARIOS {
            assert_eq!(Scenario::find(scenario.name), Some(scenario));
            assert!(!scenario.cycle.is_empty());
        }
        let mut names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
        assert!(Scenario::find("nope").is_none());
    }

    #[test]
    fn the_mobile_session_mix_has_its_documented_weights() {
        let scenario = Scenario::find("mobile-session").unwrap();
        let count = |op| scenario.cycle.iter().filter(|o| **o == op).count();
        assert_eq!(
            [
                count(Op::Login),
                count(Op::Profile),
                count(Op::NotesList),
                count(Op::Sessions),
                count(Op::Refresh)
            ],
            [1, 3, 3, 1, 1]
        );
        assert!(scenario.logs_in_first());
        assert!(!Scenario::find("login").unwrap().logs_in_first());
        assert!(!Scenario::find("health").unwrap().logs_in_first());
    }

    #[test]
    fn concurrent_workers_log_in_as_different_accounts() {
        let accounts = accounts(10);
        let mut seen = Vec::new();
        for worker in 0..3 {
            let mut user = VirtualUser::new(worker, 3);
            for _ in 0..4 {
                seen.push(user.next_account(&accounts));
                user.absorb(Op::Login, &answer(401, ""), Instant::now());
            }
        }
        seen.sort_unstable();
        // Worker 0: 0 3 6 9; worker 1: 1 4 7 0; worker 2: 2 5 8 1.
        assert_eq!(seen, vec![0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(accounts.email(7), "user7@example.com");
    }

    #[test]
    fn tokens_follow_logins_and_refreshes() {
        let accounts = accounts(5);
        let now = Instant::now();
        let mut user = VirtualUser::new(0, 1);
        assert!(user.needs_login(Op::Profile, now));
        assert!(!user.needs_login(Op::Health, now));
        assert!(user.call(Op::Profile, &accounts).bearer.is_none());

        let outcome = user.absorb(
            Op::Login,
            &answer(
                200,
                r#"{"access_token":"a1","refresh_token":"r1","token_type":"Bearer","expires_in":900,"user_id":"u"}"#,
            ),
            now,
        );
        assert_eq!(outcome, Outcome::Ok);
        assert!(!user.needs_login(Op::Profile, now));
        assert!(user.needs_login(Op::Profile, now + Duration::from_secs(841)));
        assert_eq!(
            user.call(Op::Profile, &accounts).bearer.as_deref(),
            Some("a1")
        );
        let refresh = user.call(Op::Refresh, &accounts);
        assert_eq!(
            refresh.json.unwrap(),
            Bytes::from_static(br#"{"refresh_token":"r1"}"#)
        );

        // A rotation keeps the new pair.
        user.absorb(
            Op::Refresh,
            &answer(
                200,
                r#"{"access_token":"a2","refresh_token":"r2","expires_in":900}"#,
            ),
            now,
        );
        assert_eq!(
            user.call(Op::Sessions, &accounts).bearer.as_deref(),
            Some("a2")
        );

        // A refused refresh drops the tokens: the next request logs in again.
        assert_eq!(
            user.absorb(Op::Refresh, &answer(401, "{}"), now),
            Outcome::Status(401)
        );
        assert!(user.needs_login(Op::Refresh, now));

        // A 2xx without tokens is an error of its own.
        assert_eq!(
            user.absorb(Op::Login, &answer(200, "<html>"), now),
            Outcome::InvalidBody
        );
        // A route the target lacks is an error by status and keeps the tokens.
        user.absorb(
            Op::Login,
            &answer(200, r#"{"access_token":"a3","refresh_token":"r3"}"#),
            now,
        );
        assert_eq!(
            user.absorb(Op::Profile, &answer(404, ""), now),
            Outcome::Status(404)
        );
        assert!(!user.needs_login(Op::Profile, now));
        assert_eq!(
            user.absorb(Op::Profile, &Err(TransportError::Timeout), now),
            Outcome::Transport(TransportError::Timeout)
        );
        assert_eq!(Outcome::Status(429).key(), "http_429");
        assert_eq!(
            Outcome::Transport(TransportError::Closed).key(),
            "transport_closed"
        );
    }
}
