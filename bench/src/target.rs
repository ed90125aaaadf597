//! The target's base URL. Only plain `http://` on loopback: 127.0.0.0/8, `::1` or
//! `localhost` (whose every resolved address must be loopback too). A load generator
//! pointed anywhere else is a mistake at best.

use std::net::{IpAddr, SocketAddr};

/// Why a `--target` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("`{0}` is not a URL like http://127.0.0.1:8080")]
    Malformed(String),
    #[error("only http:// targets are supported (no TLS), not `{0}`")]
    Scheme(String),
    #[error("`{0}` is not a loopback host: only 127.0.0.0/8, [::1] and localhost may be targeted")]
    NotLoopback(String),
    #[error("`{0}` has a query or fragment; give the base URL only")]
    HasQuery(String),
    #[error("cannot resolve `{0}`: {1}")]
    Resolve(String, String),
}

/// A validated base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As the user wrote it, for reports.
    pub url: String,
    /// `host:port` for the `Host` header.
    pub authority: String,
    host: Host,
    port: u16,
    /// Path prefix without a trailing slash ("" for the root).
    pub base_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    Localhost,
}

impl Target {
    /// Checks `url` without any I/O: scheme, loopback host, no query.
    pub fn parse(url: &str) -> Result<Self, TargetError> {
        let malformed = || TargetError::Malformed(url.to_owned());
        let uri: http::Uri = url.trim().parse().map_err(|_| malformed())?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(TargetError::Scheme(other.to_owned())),
            None => return Err(malformed()),
        }
        let authority = uri.authority().ok_or_else(malformed)?;
        if authority.as_str().contains('@') {
            return Err(malformed());
        }
        let host_text = authority.host();
        let bare = host_text.trim_start_matches('[').trim_end_matches(']');
        let host = if bare.eq_ignore_ascii_case("localhost") {
            Host::Localhost
        } else {
            match bare.parse::<IpAddr>() {
                Ok(ip) if ip.is_loopback() => Host::Ip(ip),
                _ => return Err(TargetError::NotLoopback(host_text.to_owned())),
            }
        };
        if url.contains('?') || url.contains('#') {
            return Err(TargetError::HasQuery(url.to_owned()));
        }
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            url: url.trim().to_owned(),
            authority: authority.as_str().to_owned(),
            host,
            port,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The socket address to connect to; `localhost` is resolved and must be loopback only.
    pub async fn resolve(&self) -> Result<SocketAddr, TargetError> {
        match self.host {
            Host::Ip(ip) => Ok(SocketAddr::new(ip, self.port)),
            Host::Localhost => {
                let resolved: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", self.port))
                    .await
                    .map_err(|e| TargetError::Resolve("localhost".to_owned(), e.to_string()))?
                    .collect();
                if let Some(stray) = resolved.iter().find(|a| !a.ip().is_loopback()) {
                    return Err(TargetError::NotLoopback(format!(
                        "localhost ({})",
                        stray.ip()
                    )));
                }
                // Prefer IPv4: servers in this project listen on 127.0.0.1 by default.
                resolved
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or_else(|| resolved.first())
                    .copied()
                    .ok_or_else(|| {
                        TargetError::Resolve("localhost".to_owned(), "no address".to_owned())
                    })
            }
        }
    }

    /// The request target (path and query) for an API path such as `/api/v1/notes?limit=20`.
    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.base_path)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn loopback_targets_are_accepted() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.path("/health"), "/health");
        let t = Target::parse("http://127.3.2.1:58000/prefix/").unwrap();
        assert_eq!(t.path("/health"), "/prefix/health");
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!(t.authority, "[::1]:8080");
        let t = Target::parse("http://LOCALHOST").unwrap();
        assert_eq!(t.port, 80);
    }

    #[test]
    fn anything_else_is_refused() {
        for url in [
            "http://10.0.0.1:8080",
            "http://192.168.1.10",
            "http://0.0.0.0:8080",
            "http://example.com",
            "http://localhost.example.com",
            "http://[::ffff:127.0.0.1]:8080",
            "http://[::]:8080",
        ] {
            assert!(
                matches!(Target::parse(url), Err(TargetError::NotLoopback(_))),
                "{url}"
            );
        }
        assert!(matches!(
            Target::parse("https://127.0.0.1"),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::parse("127.0.0.1:8080"),
            Err(TargetError::Malformed(_) | TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::parse("http://user@127.0.0.1"),
            Err(TargetError::Malformed(_))
        ));
        assert!(matches!(
            Target::parse("http://127.0.0.1/?x=1"),
            Err(TargetError::HasQuery(_))
        ));
    }

    #[tokio::test]
    async fn addresses_resolve_to_loopback() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            t.resolve().await.unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        let t = Target::parse("http://localhost:8080").unwrap();
        assert!(t.resolve().await.unwrap().ip().is_loopback());
    }
}
