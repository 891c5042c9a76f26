//! ACL files in Mosquitto's syntax (its `acl_file`):
//!
//! ```text
//! # Lines before the first `user` line apply to anonymous clients.
//! topic read public/#
//!
//! user alice
//! # No access word means readwrite.
//! topic chat/alice/#
//! topic deny chat/alice/secret
//!
//! # Patterns apply to every client: %c is its client id, %u its username.
//! pattern write devices/%c/status
//! pattern read users/%u/inbox
//! ```
//!
//! Keywords: `topic [read|write|readwrite|deny] FILTER`, `user NAME` (the
//! rest of the line, trimmed; it starts that user's section) and
//! `pattern [read|write|readwrite|deny] FILTER`. A line starting with `#` is
//! a comment; there are no comments after a rule (`#` is a wildcard there).
//! A filter may contain spaces, as in Mosquitto.
//!
//! # Semantics
//! - A client's rules are its section's `topic` lines (the anonymous
//!   section if it has no username; none if its username has no section)
//!   and every `pattern` line. Nothing matching: denied.
//! - A `deny` rule that matches wins over every grant, whichever section or
//!   pattern it comes from. (Mosquitto checks the user's section before the
//!   patterns, so there a section's grant beats a pattern's deny; denying is
//!   the safer reading of a file that says both.)
//! - `%c` and `%u` are substituted in patterns only. A pattern with `%u`
//!   does not apply to a client without a username (as in Mosquitto).
//! - A client id or username containing `+`, `#` or `/` would widen a
//!   pattern (`devices/%c/#` for client `#`). Such a client gets no grant
//!   from any pattern (as in Mosquitto, which checks only `+` and `#`), and
//!   a `deny` pattern that uses the offending value denies it everything:
//!   a hostile name can neither gain access nor escape a deny. Its
//!   section's `topic` rules still apply (as in Mosquitto).
//! - Wildcards at the first level do not match topics starting with `$`
//!   (`#` does not grant `$SYS/...`), as in MQTT matching.
//!
//! # Subscriptions
//! Mosquitto 2 lets every SUBSCRIBE through its ACL file and filters each
//! message at delivery. Here [`AclFile::check_subscribe`] refuses at
//! SUBACK a filter that no read grant covers entirely (every topic the
//! filter can match must be readable by one grant): `sensors/#` is refused
//! when only `sensors/+/temp` is readable, and so is `#`. A filter covered
//! by a grant but touching a deny (`test/#` with `deny test/secret`) is
//! allowed, and the denied topics are filtered at delivery by
//! [`AclFile::check`] with [`Access::Read`]; a filter that a deny covers
//! entirely is refused. `$share/GROUP/` is stripped before checking.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use broker_core::topic;

/// Largest ACL file read (bytes).
pub const MAX_FILE: u64 = 16 * 1024 * 1024;
/// Longest line (bytes).
const MAX_LINE: usize = 64 * 1024;
/// Most levels in a rule's filter.
pub const MAX_LEVELS: usize = 128;

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
    /// Patterns only: whether the filter uses `%c` / `%u`.
    uses_client_id: bool,
    uses_username: bool,
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

/// An ACL file in memory. Checks allocate nothing: they run on the
/// delivery path, once per message and subscriber.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclFile {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

/// The client a check is for: what `%c` and `%u` stand for.
#[derive(Clone, Copy)]
struct Client<'a> {
    id: &'a str,
    username: Option<&'a str>,
}

/// How a pattern applies to one client.
enum Applies {
    /// Substitute and match.
    Yes,
    /// Not at all (`%u` without a username).
    No,
    /// A substituted value would widen the pattern.
    Hostile,
}

fn widens(value: &str) -> bool {
    value.contains(['+', '#', '/'])
}

impl Rule {
    fn applies(&self, c: Client<'_>) -> Applies {
        if self.uses_username {
            match c.username {
                None => return Applies::No,
                Some(u) if widens(u) => return Applies::Hostile,
                Some(_) => {}
            }
        }
        if self.uses_client_id && widens(c.id) {
            return Applies::Hostile;
        }
        Applies::Yes
    }
}

impl AclFile {
    /// Read `path` (at most [`MAX_FILE`] bytes).
    pub fn load(path: &Path) -> Result<AclFile, AclError> {
        let text = crate::file::read_bounded(path, MAX_FILE).map_err(|e| match e {
            crate::file::ReadError::Io(source) => AclError::Io {
                path: path.to_owned(),
                source,
            },
            crate::file::ReadError::TooLarge => AclError::TooLarge {
                path: path.to_owned(),
            },
        })?;
        Self::parse(&text).map_err(|(line, what)| AclError::Line {
            path: path.to_owned(),
            line,
            what,
        })
    }

    /// Parse a file's text; the error is the line number (from 1) and what
    /// is wrong.
    pub fn parse(text: &str) -> Result<AclFile, (usize, String)> {
        let mut acl = AclFile::default();
        let mut user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            if raw.len() > MAX_LINE {
                return Err((n, format!("line longer than {MAX_LINE} bytes")));
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
                "topic" => {
                    let mut rule = parse_rule(rest).map_err(|e| (n, e))?;
                    // `%c`/`%u` are literal in `topic` lines, as in Mosquitto.
                    rule.uses_client_id = false;
                    rule.uses_username = false;
                    match &user {
                        Some(u) => acl.users.entry(u.clone()).or_default().push(rule),
                        None => acl.anonymous.push(rule),
                    }
                }
                "pattern" => acl.patterns.push(parse_rule(rest).map_err(|e| (n, e))?),
                other => {
                    return Err((
                        n,
                        format!("unknown keyword `{other}` (expected user, topic or pattern)"),
                    ))
                }
            }
        }
        Ok(acl)
    }

    /// The client's own `topic` rules.
    fn own(&self, username: Option<&str>) -> &[Rule] {
        match username {
            Some(u) => self.users.get(u).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        }
    }

    /// Whether a rule of `grant`s chosen by `wanted` matches, by `test`
    /// (given the rule and the client, for substitution); `None` when a
    /// hostile substitution hit a deny pattern (deny everything).
    fn any(
        &self,
        c: Client<'_>,
        wanted: impl Fn(Grant) -> bool,
        test: impl Fn(&str, Client<'_>, bool) -> bool,
    ) -> Option<bool> {
        if self
            .own(c.username)
            .iter()
            .any(|r| wanted(r.grant) && test(&r.filter, c, false))
        {
            return Some(true);
        }
        let hostile = widens(c.id) || c.username.is_some_and(widens);
        let mut found = false;
        for p in self.patterns.iter().filter(|p| wanted(p.grant)) {
            match p.applies(c) {
                Applies::No => {}
                Applies::Hostile if p.grant == Grant::Deny => return None,
                Applies::Hostile => {}
                Applies::Yes if hostile && p.grant != Grant::Deny => {}
                Applies::Yes => found = found || test(&p.filter, c, true),
            }
        }
        Some(found)
    }

    /// May the client read or write `topic` (a valid topic name)?
    /// `username` is the name the client authenticated as (`None`:
    /// anonymous).
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        topic: &str,
        access: Access,
    ) -> bool {
        let c = Client {
            id: client_id,
            username,
        };
        let test =
            |filter: &str, c: Client<'_>, subst: bool| matches_topic(filter, topic, c, subst);
        match self.any(c, |g| g == Grant::Deny, test) {
            Some(false) => {}
            Some(true) | None => return false,
        }
        self.any(c, |g| g.allows(access), test) == Some(true)
    }

    /// May the client subscribe to `filter` (a valid topic filter, possibly
    /// `$share/GROUP/...`)? See the module documentation: a read grant must
    /// cover the filter entirely, and no deny may.
    pub fn check_subscribe(&self, client_id: &str, username: Option<&str>, filter: &str) -> bool {
        let filter = match topic::parse_shared(filter) {
            Ok(Some(shared)) => shared.filter,
            Ok(None) => filter,
            Err(_) => return false,
        };
        let c = Client {
            id: client_id,
            username,
        };
        let test = |acl: &str, c: Client<'_>, subst: bool| covers(acl, filter, c, subst);
        match self.any(c, |g| g == Grant::Deny, test) {
            Some(false) => {}
            Some(true) | None => return false,
        }
        self.any(c, |g| g.allows(Access::Read), test) == Some(true)
    }
}

fn parse_rule(rest: &str) -> Result<Rule, String> {
    let (first, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (grant, filter) = match first {
        "read" => (Grant::Read, tail.trim()),
        "write" => (Grant::Write, tail.trim()),
        "readwrite" => (Grant::ReadWrite, tail.trim()),
        "deny" => (Grant::Deny, tail.trim()),
        // Mosquitto would take `topic read` as the topic "read"; it is far
        // more likely a rule missing its filter.
        _ => (Grant::ReadWrite, rest),
    };
    if filter.is_empty() {
        return Err("missing topic filter".into());
    }
    // `%c`/`%u` fill part of a level at most (values with `/` never
    // apply), so the filter's shape is checked before substitution.
    topic::validate_filter(filter).map_err(|e| format!("invalid filter {filter:?}: {e}"))?;
    topic::check_levels(filter, MAX_LEVELS).map_err(|e| format!("filter {filter:?}: {e}"))?;
    Ok(Rule {
        grant,
        filter: filter.to_string(),
        uses_client_id: filter.contains("%c"),
        uses_username: filter.contains("%u"),
    })
}

/// Whether the rule's level `rule` equals the topic's level `level`, with
/// `%c` and `%u` substituted when `subst` (a pattern). The client's values
/// have been checked free of `/`, `+` and `#`.
fn level_eq(rule: &str, level: &str, c: Client<'_>, subst: bool) -> bool {
    if !subst || !rule.contains('%') {
        return rule == level;
    }
    let (mut rule, mut level) = (rule, level);
    loop {
        let Some(i) = rule.find('%') else {
            return rule == level;
        };
        let Some(after) = level.strip_prefix(&rule[..i]) else {
            return false;
        };
        let tail = &rule[i..];
        let (value, skip) = if tail.starts_with("%c") {
            (c.id, 2)
        } else if let (true, Some(u)) = (tail.starts_with("%u"), c.username) {
            (u, 2)
        } else {
            ("%", 1)
        };
        let Some(after) = after.strip_prefix(value) else {
            return false;
        };
        rule = &tail[skip..];
        level = after;
    }
}

/// MQTT matching of a rule's filter against a topic name, level by level
/// ([`topic::matches`] with substitution).
fn matches_topic(filter: &str, name: &str, c: Client<'_>, subst: bool) -> bool {
    topic::matches_by(filter, name, |fl, nl| level_eq(fl, nl, c, subst))
}

/// Whether every topic the subscription filter `sub` can match is matched
/// by the rule's filter `acl`.
fn covers(acl: &str, sub: &str, c: Client<'_>, subst: bool) -> bool {
    if sub.starts_with('$') && (acl.starts_with('+') || acl.starts_with('#')) {
        return false;
    }
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(x), Some(y)) if level_eq(x, y, c, subst) => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mosquitto's `aclfile.example`, as it ships.
    const MOSQUITTO_EXAMPLE: &str = "\
# This affects access control for clients with no username.
topic read $SYS/#

# This only affects clients with username \"roger\".
user roger
topic foo/bar

# This affects all clients.
pattern write $SYS/broker/connection/%c/state
";

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
pattern deny users/%u/inbox/secret
";

    #[test]
    fn mosquitto_example() {
        let acl = AclFile::parse(MOSQUITTO_EXAMPLE).unwrap();
        assert!(acl.check("c", None, "$SYS/broker/uptime", Access::Read));
        assert!(!acl.check("c", None, "$SYS/broker/uptime", Access::Write));
        assert!(!acl.check("c", Some("roger"), "$SYS/broker/uptime", Access::Read));
        assert!(acl.check("c", Some("roger"), "foo/bar", Access::Read));
        assert!(acl.check("c", Some("roger"), "foo/bar", Access::Write));
        assert!(!acl.check("c", Some("roger"), "foo/baz", Access::Read));
        assert!(!acl.check("c", None, "foo/bar", Access::Read));
        assert!(acl.check(
            "br1",
            Some("roger"),
            "$SYS/broker/connection/br1/state",
            Access::Write
        ));
        assert!(!acl.check(
            "br1",
            None,
            "$SYS/broker/connection/br2/state",
            Access::Write
        ));
        assert!(!acl.check("c", Some("stranger"), "foo/bar", Access::Read));
    }

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
        assert!(!acl.check("x", Some("alice"), "test/nosubscribe", Access::Write));
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
        assert!(!acl.check("x", Some("bob"), "sensors/k/l/temp", Access::Write));
    }

    #[test]
    fn deny_wins_wherever_it_comes_from() {
        let acl = AclFile::parse(
            "topic deny a/secret\ntopic readwrite a/#\nuser u\ntopic readwrite #\npattern deny #/%u\n",
        );
        // `#/%u` is not a valid filter.
        assert!(acl.is_err());
        let acl = AclFile::parse(
            "topic readwrite a/#\ntopic deny a/secret\nuser u\ntopic readwrite home/#\npattern deny home/%u/locked\n",
        )
        .unwrap();
        assert!(
            !acl.check("c", None, "a/secret", Access::Read),
            "order does not matter"
        );
        assert!(acl.check("c", None, "a/other", Access::Read));
        assert!(acl.check("c", Some("u"), "home/u/open", Access::Write));
        assert!(
            !acl.check("c", Some("u"), "home/u/locked", Access::Write),
            "a pattern's deny beats a section's grant"
        );
    }

    #[test]
    fn dollar_topics_need_a_dollar_rule() {
        let acl = AclFile::parse("topic read #\ntopic read +/x\n").unwrap();
        assert!(acl.check("c", None, "a/b", Access::Read));
        assert!(!acl.check("c", None, "$SYS/x", Access::Read));
        assert!(!acl.check("c", None, "$x/x", Access::Read));
        assert!(!acl.check_subscribe("c", None, "$SYS/#"));
        assert!(acl.check_subscribe("c", None, "a/#"));
    }

    #[test]
    fn subscriptions() {
        let acl = AclFile::parse(FILE).unwrap();
        assert!(acl.check_subscribe("x", Some("alice"), "test/ok"));
        assert!(acl.check_subscribe("x", Some("alice"), "test/#"));
        assert!(acl.check_subscribe("x", Some("alice"), "test/+"));
        assert!(!acl.check_subscribe("x", Some("alice"), "test/nosubscribe"));
        assert!(!acl.check_subscribe("x", Some("alice"), "#"));
        assert!(!acl.check_subscribe("x", Some("alice"), "+/ok"));
        assert!(acl.check_subscribe("x", None, "public/+"));
        assert!(
            acl.check_subscribe("x", None, "public"),
            "public/# matches public"
        );
        assert!(
            !acl.check_subscribe("x", Some("bob"), "sensors/+/temp"),
            "write only"
        );
        assert!(acl.check_subscribe("x", Some("alice"), "$share/g/test/x"));
        assert!(!acl.check_subscribe("x", Some("alice"), "$share/g"));
        assert!(acl.check_subscribe("d1", None, "devices/d1/#"));
        assert!(!acl.check_subscribe("d1", None, "devices/+/#"));
        assert!(acl.check_subscribe("x", Some("carol"), "users/carol/inbox"));
        assert!(!acl.check_subscribe("x", Some("carol"), "users/carol/inbox/secret"));
        let narrow = AclFile::parse("topic read sensors/+/temp\n").unwrap();
        assert!(narrow.check_subscribe("x", None, "sensors/+/temp"));
        assert!(narrow.check_subscribe("x", None, "sensors/k/temp"));
        assert!(!narrow.check_subscribe("x", None, "sensors/#"));
        assert!(!narrow.check_subscribe("x", None, "sensors/k/#"));
    }

    #[test]
    fn patterns() {
        let acl = AclFile::parse(FILE).unwrap();
        assert!(acl.check("d42", None, "devices/d42/state", Access::Write));
        assert!(acl.check("d42", None, "devices/d42", Access::Read));
        assert!(!acl.check("d42", None, "devices/d43/state", Access::Write));
        assert!(!acl.check("d4", None, "devices/d42/state", Access::Write));
        assert!(acl.check("x", Some("carol"), "users/carol/inbox", Access::Read));
        assert!(!acl.check("x", Some("carol"), "users/carol/inbox", Access::Write));
        assert!(!acl.check("x", Some("carol"), "users/carol/inbox/secret", Access::Read));
        assert!(!acl.check("x", Some("carol"), "users/dave/inbox", Access::Read));
        assert!(
            !acl.check("x", None, "users/%u/inbox", Access::Read),
            "%u needs a username"
        );
        assert!(!acl.check("x", None, "users//inbox", Access::Read));
        // `%c` and `%u` inside a level, and a lone `%` kept as it is.
        let acl = AclFile::parse("pattern readwrite a/dev-%c-%u/100%/%x\n").unwrap();
        assert!(acl.check("7", Some("u"), "a/dev-7-u/100%/%x", Access::Write));
        assert!(!acl.check("7", Some("u"), "a/dev-7-v/100%/%x", Access::Write));
        assert!(!acl.check("7", Some("u"), "a/dev-7-u/100/%x", Access::Write));
        // `topic` lines take `%c` literally.
        let acl = AclFile::parse("topic read a/%c\n").unwrap();
        assert!(acl.check("z", None, "a/%c", Access::Read));
        assert!(!acl.check("z", None, "a/z", Access::Read));
    }

    #[test]
    fn hostile_names_widen_nothing() {
        let acl = AclFile::parse(FILE).unwrap();
        for id in ["#", "+", "a/b", "d42/#", "x/+"] {
            assert!(
                !acl.check(id, None, "devices/a/b", Access::Write),
                "client id {id:?}"
            );
            assert!(!acl.check(id, None, &format!("devices/{id}"), Access::Write));
            assert!(!acl.check_subscribe(id, None, "devices/#"));
            assert!(!acl.check_subscribe(id, None, "devices/+/#"));
        }
        for user in ["+", "#", "carol/inbox", "a/b"] {
            assert!(!acl.check("x", Some(user), "users/z/inbox", Access::Read));
            assert!(!acl.check("x", Some(user), "users/a/b/inbox", Access::Read));
            assert!(!acl.check_subscribe("x", Some(user), "users/+/inbox"));
        }
        // A hostile name cannot slip out of a deny pattern: it is denied all.
        let acl = AclFile::parse("topic readwrite home/#\npattern deny home/%c/locked\n").unwrap();
        assert!(acl.check("me", None, "home/x/locked", Access::Write));
        assert!(!acl.check("me", None, "home/me/locked", Access::Write));
        assert!(!acl.check("a/b", None, "home/a/b/locked", Access::Write));
        assert!(!acl.check("a/b", None, "home/other", Access::Read));
        assert!(!acl.check_subscribe("+", None, "home/#"));
        // Its section's rules still apply; no pattern grants it anything,
        // even one not using the hostile value (as in Mosquitto).
        let acl = AclFile::parse(
            "topic readwrite home/#\npattern read dev/%c\npattern read inbox/%u\npattern deny home/%u\n",
        )
        .unwrap();
        assert!(acl.check("a/b", None, "home/x", Access::Write));
        assert!(!acl.check("a/b", None, "dev/a/b", Access::Read));
        assert!(!acl.check("#", None, "dev/x", Access::Read));
        assert!(acl.check("ok", Some("u"), "inbox/u", Access::Read));
        assert!(!acl.check("#", Some("u"), "inbox/u", Access::Read));
        assert!(!acl.check("x/y", Some("u"), "inbox/u", Access::Read));
        // A deny pattern with safe values still applies to a hostile client.
        let acl = AclFile::parse("user u\ntopic readwrite home/#\npattern deny home/%u\n").unwrap();
        assert!(acl.check("#", Some("u"), "home/v", Access::Read));
        assert!(!acl.check("#", Some("u"), "home/u", Access::Read));
    }

    #[test]
    fn filters_with_spaces_and_tabs() {
        let acl = AclFile::parse("user  bob smith \ntopic\twrite  my topic/x \n").unwrap();
        assert!(acl.check("c", Some("bob smith"), "my topic/x", Access::Write));
        assert!(!acl.check("c", Some("bob smith"), "my topic/x", Access::Read));
    }

    #[test]
    fn bad_lines_are_named() {
        let err = |t: &str| AclFile::parse(t).unwrap_err();
        assert_eq!(err("topic read a\nfoo bar\n").0, 2);
        assert_eq!(err("\n\nuser\n").0, 3);
        assert!(err("topic read\n").1.contains("missing"));
        assert!(err("topic\n").1.contains("missing"));
        assert!(err("topic read a/#/b\n").1.contains("invalid"));
        assert!(err("pattern write a/b#\n").1.contains("invalid"));
        assert!(err("topic read a/# # a comment\n").1.contains("invalid"));
        assert!(err(&format!("topic read {}\n", "a/".repeat(MAX_LEVELS)))
            .1
            .contains("levels"));
        assert!(err(&format!("topic read {}\n", "a".repeat(MAX_LINE + 1)))
            .1
            .contains("longer"));
        assert!(AclFile::parse(&format!("topic read {}a\n", "a/".repeat(MAX_LEVELS - 1))).is_ok());
    }

    #[test]
    fn empty_file_denies_all() {
        let acl = AclFile::parse("# nothing\n\n").unwrap();
        assert!(!acl.check("c", None, "a", Access::Read));
        assert!(!acl.check("c", Some("u"), "a", Access::Write));
        assert!(!acl.check_subscribe("c", None, "a"));
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        let e = AclFile::load(&path).unwrap_err();
        assert!(
            std::error::Error::source(&e).is_some(),
            "keeps the io error"
        );
        std::fs::write(&path, "user a\ntopic read\n").unwrap();
        let e = AclFile::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:2: ", path.display())), "{e}");
    }
}
