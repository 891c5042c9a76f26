//! ACL files in Mosquitto's syntax:
//!
//! ```text
//! # lines before the first `user` line apply to anonymous clients
//! topic read public/#
//! user alice
//! topic readwrite chat/alice/#      # `topic FILTER` alone is readwrite
//! topic deny chat/alice/secret
//! pattern write devices/%c/status   # every client; %c client id, %u username
//! ```
//!
//! A `deny` line that matches wins over every grant. A client's rules are
//! its section's `topic` lines (the anonymous section without a username)
//! and every `pattern` line. A substituted `%c` or `%u` holding `+`, `#` or
//! `/` would widen the pattern, so such a pattern grants that client
//! nothing (as Mosquitto does).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use broker_core::topic;

/// Largest ACL file read (bytes).
pub const MAX_FILE: u64 = 16 * 1024 * 1024;
const MAX_LINE: usize = 64 * 1024;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive messages (and subscribe).
    Read,
    /// Publish.
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Grant {
    fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Grant::ReadWrite, _) | (Grant::Read, Access::Read) | (Grant::Write, Access::Write)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    grant: Grant,
    filter: String,
}

/// Why an ACL file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A line is not understood.
    #[error("{path}:{line}: {what}")]
    Line {
        /// The file.
        path: PathBuf,
        /// Its line number, from 1.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// The file is larger than [`MAX_FILE`].
    #[error("{path}: larger than {MAX_FILE} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
}

/// An ACL file in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclFile {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl AclFile {
    /// Read `path`.
    pub fn load(path: &Path) -> Result<AclFile, AclError> {
        let io_error = |source| AclError::Io {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io_error)?.len();
        if size > MAX_FILE {
            return Err(AclError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io_error)?;
        Self::parse(&text).map_err(|(line, what)| AclError::Line {
            path: path.to_owned(),
            line,
            what,
        })
    }

    /// Parse a file's text; the error is the line number and what is wrong.
    pub fn parse(text: &str) -> Result<AclFile, (usize, String)> {
        let mut acl = AclFile::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            if raw.len() > MAX_LINE {
                return Err((n, "line too long".into()));
            }
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err((n, "`user` needs a name".into()));
                    }
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let rule = parse_rule(rest).map_err(|e| (n, e))?;
                    if word == "pattern" {
                        acl.patterns.push(rule);
                    } else if let Some(u) = &user {
                        acl.users.entry(u.clone()).or_default().push(rule);
                    } else {
                        acl.anonymous.push(rule);
                    }
                }
                other => {
                    return Err((
                        n,
                        format!("unknown keyword `{other}` (user, topic, pattern)"),
                    ))
                }
            }
        }
        Ok(acl)
    }

    /// The rules that apply to a client, patterns substituted.
    fn rules(&self, client_id: &str, username: Option<&str>) -> Vec<Rule> {
        let own = match username {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        };
        let mut rules = own.to_vec();
        for p in &self.patterns {
            if let Some(filter) = substitute(&p.filter, client_id, username) {
                rules.push(Rule {
                    grant: p.grant,
                    filter,
                });
            }
        }
        rules
    }

    /// May the client read or write `topic` (a topic name)?
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        topic: &str,
        access: Access,
    ) -> bool {
        let rules = self.rules(client_id, username);
        if rules
            .iter()
            .any(|r| r.grant == Grant::Deny && topic::matches(&r.filter, topic))
        {
            return false;
        }
        rules
            .iter()
            .any(|r| r.grant.allows(access) && topic::matches(&r.filter, topic))
    }

    /// May the client subscribe to `filter`? A read grant must cover every
    /// topic the filter can match, and no deny may cover the filter.
    /// Topics denied inside a granted filter are refused at delivery by
    /// [`AclFile::check`] with [`Access::Read`].
    pub fn check_subscribe(&self, client_id: &str, username: Option<&str>, filter: &str) -> bool {
        let filter = match topic::parse_shared(filter) {
            Ok(Some(shared)) => shared.filter,
            _ => filter,
        };
        let rules = self.rules(client_id, username);
        if rules
            .iter()
            .any(|r| r.grant == Grant::Deny && covers(&r.filter, filter))
        {
            return false;
        }
        rules
            .iter()
            .any(|r| r.grant.allows(Access::Read) && covers(&r.filter, filter))
    }
}

fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (grant, filter) = match first {
        "read" => (Grant::Read, tail.trim()),
        "write" => (Grant::Write, tail.trim()),
        "readwrite" => (Grant::ReadWrite, tail.trim()),
        "deny" => (Grant::Deny, tail.trim()),
        _ => (Grant::ReadWrite, rest),
    };
    if filter.is_empty() {
        return Err("missing topic filter".into());
    }
    // Patterns are checked once substituted; `%` is not a wildcard.
    topic::validate_filter(filter).map_err(|e| format!("invalid filter {filter:?}: {e}"))?;
    Ok(Rule {
        grant,
        filter: filter.to_string(),
    })
}

/// `%c` and `%u` replaced; `None` when a value would add levels or
/// wildcards, or `%u` is used by a client without a username.
fn substitute(pattern: &str, client_id: &str, username: Option<&str>) -> Option<String> {
    let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
    let mut out = pattern.to_string();
    if pattern.contains("%c") {
        if unsafe_value(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    if pattern.contains("%u") {
        let u = username?;
        if unsafe_value(u) {
            return None;
        }
        out = out.replace("%u", u);
    }
    Some(out)
}

/// Whether every topic `sub` can match is matched by `acl`.
fn covers(acl: &str, sub: &str) -> bool {
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous
topic read public/#
user alice
topic readwrite test/#
topic deny test/nosubscribe
topic chat/alice
user bob
topic write sensors/+/temp
pattern readwrite devices/%c/#
pattern read users/%u/inbox
";

    #[test]
    fn sections_grants_and_deny() {
        let acl = AclFile::parse(FILE).unwrap();
        assert!(acl.check("x", None, "public/news", Access::Read));
        assert!(!acl.check("x", None, "public/news", Access::Write));
        assert!(!acl.check("x", None, "test/a", Access::Read));
        assert!(acl.check("x", Some("alice"), "test/a", Access::Write));
        assert!(
            !acl.check("x", Some("alice"), "test/nosubscribe", Access::Read),
            "deny wins"
        );
        assert!(
            acl.check("x", Some("alice"), "chat/alice", Access::Write),
            "no access word: readwrite"
        );
        assert!(
            !acl.check("x", Some("alice"), "public/news", Access::Read),
            "anonymous rules are not alice's"
        );
        assert!(acl.check("x", Some("bob"), "sensors/k/temp", Access::Write));
        assert!(!acl.check("x", Some("bob"), "sensors/k/temp", Access::Read));
    }

    #[test]
    fn subscriptions() {
        let acl = AclFile::parse(FILE).unwrap();
        assert!(acl.check_subscribe("x", Some("alice"), "test/ok"));
        assert!(acl.check_subscribe("x", Some("alice"), "test/#"));
        assert!(!acl.check_subscribe("x", Some("alice"), "test/nosubscribe"));
        assert!(!acl.check_subscribe("x", Some("alice"), "#"));
        assert!(acl.check_subscribe("x", None, "public/+"));
        assert!(
            !acl.check_subscribe("x", Some("bob"), "sensors/+/temp"),
            "write only"
        );
        assert!(acl.check_subscribe("x", Some("alice"), "$share/g/test/x"));
    }

    #[test]
    fn patterns_and_hostile_names() {
        let acl = AclFile::parse(FILE).unwrap();
        assert!(acl.check("d42", None, "devices/d42/state", Access::Write));
        assert!(!acl.check("d42", None, "devices/d43/state", Access::Write));
        assert!(acl.check("x", Some("carol"), "users/carol/inbox", Access::Read));
        assert!(
            !acl.check("x", None, "users//inbox", Access::Read),
            "%u needs a username"
        );
        assert!(
            !acl.check("#", None, "devices/a/b", Access::Write),
            "a wildcard client id widens nothing"
        );
        assert!(!acl.check("a/b", None, "devices/a/b/c", Access::Write));
        assert!(!acl.check("x", Some("+"), "users/z/inbox", Access::Read));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(AclFile::parse("topic read a\nfoo bar\n").unwrap_err().0, 2);
        assert!(AclFile::parse("user\n").is_err());
        assert!(AclFile::parse("topic read\n").is_err());
        assert!(AclFile::parse("topic read a/#/b\n").is_err());
    }
}
