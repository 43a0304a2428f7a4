//! Secrets in settings (tokens, passwords, credentials inside URLs) and how they are kept
//! out of logs, `{:?}` output and printed configs.
//!
//! Contract: [`Secret`] prints and serialises as `***` (or `""` when unset, so that an
//! operator can still see whether it is set); only [`Secret::expose`] gives the value, and
//! only the code that sends it to a backend or compares it calls that. URLs keep their
//! host and port visible and lose their password ([`redact_url`]).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a secret is replaced with wherever it would be shown.
pub const REDACTED: &str = "***";

/// A secret string from the settings. Empty means "not set".
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What is shown instead of the value.
    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            REDACTED
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

/// `url` with its password (if any) replaced by `***`; the user name, host, port and path
/// stay, since they are what an operator needs to see. Text that is not a URL is returned
/// whole only when it cannot hold a password (no `@`).
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        // Re-serialised only when it must change: parsing normalises (a trailing `/`).
        Ok(mut parsed) if parsed.password().is_some() => {
            // Fails only for URLs that cannot have credentials, which have no password.
            let _ = parsed.set_password(Some(REDACTED));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) if url.contains('@') => REDACTED.to_owned(),
        Err(_) => url.to_owned(),
    }
}

/// For `#[serde(serialize_with)]` on a URL field that may carry a password.
pub fn serialize_url<S: Serializer>(url: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

/// Each URL of a list through [`redact_url`] (for `serialize_with`).
pub fn serialize_urls<S: Serializer>(urls: &[String], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(|u| redact_url(u)))
}

/// Compares two byte strings in time that depends on their lengths only, not on where they
/// first differ, so that a client cannot find a token byte by byte by timing answers.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
    }

    #[test]
    fn urls_lose_their_password_only() {
        assert_eq!(redact_url("redis://:pw@127.0.0.1:6390"), "redis://:***@127.0.0.1:6390");
        assert_eq!(redact_url("redis://user:pw@host:6379/2"), "redis://user:***@host:6379/2");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("https://elastic:pw@es:9200/"), "https://elastic:***@es:9200/");
        assert_eq!(redact_url("not a url with pw@host"), "***");
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokem"));
        assert!(!constant_time_eq(b"token", b"token2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
