//! Password files in Mosquitto's format, one `user:hash` per line:
//!
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 (Mosquitto 2.0's
//!   `mosquitto_passwd`), salt 12 bytes, hash 64 bytes, standard base64
//!   with padding;
//! - `$6$SALT$HASH`: SHA-512 of the password then the salt (Mosquitto 1.x),
//!   same salt and hash sizes;
//! - `$argon2id$v=19$m=...,t=...,p=...$SALT$HASH`: an argon2id PHC string
//!   (`broker passwd --argon2`; Mosquitto 2.1 reads these too).
//!
//! Files made by `mosquitto_passwd` are read as they are, and the `$7$`
//! lines this module writes are read by Mosquitto. As Mosquitto does, blanks
//! around the user name and the hash are ignored; blank lines and lines
//! starting with `#` are skipped. Unlike Mosquitto, which drops a bad entry
//! with a log line, a bad line refuses the whole file: a typo must not
//! silently lock a user out or leave a stale password in force.
//!
//! Everything read is bounded ([`MAX_FILE`], line length, iteration counts,
//! argon2 memory and passes) so that a hostile or corrupt file cannot stall
//! logins or exhaust memory.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Largest password file read (bytes).
pub const MAX_FILE: u64 = 64 * 1024 * 1024;
/// Longest line (bytes); Mosquitto itself caps names and hashes at 65535.
const MAX_LINE: usize = 64 * 1024;
/// Longest password verified: longer ones are wrong without hashing, as in
/// MQTT (a CONNECT password holds at most 65535 bytes).
pub const MAX_PASSWORD: usize = 65_535;
/// Iteration counts above this are refused: a hostile file must not stall logins.
pub const MAX_ITERATIONS: u32 = 10_000_000;
/// Iterations of new `$7$` entries. Mosquitto 2.0's `mosquitto_passwd`
/// writes 101, which is far too cheap today; OWASP asks 210,000 for
/// PBKDF2-HMAC-SHA512, and Mosquitto 2.1 writes 210,000 too. Mosquitto
/// reads the count from each line, so the stronger count stays compatible
/// with Mosquitto 2.0. A login then costs about 0.1 s of one core, which
/// the hooks spend off the async workers.
pub const PBKDF2_ITERATIONS: u32 = 210_000;
/// Salt of `$6$`/`$7$` entries: Mosquitto writes, and requires, 12 bytes.
const SALT_LEN: usize = 12;
/// SHA-512 output: Mosquitto requires the full 64 bytes (a truncated hash
/// would accept many passwords).
const HASH_LEN: usize = 64;
/// Argon2 memory above this (KiB) is refused: 256 MiB.
const MAX_ARGON2_MEMORY_KIB: u32 = 256 * 1024;
/// Argon2 memory times passes above this (KiB) is refused: about a second
/// of one core. The defaults used for new entries cost 19 MiB x 2.
const MAX_ARGON2_WORK_KIB: u64 = 1024 * 1024;
/// Argon2 lanes above this are refused.
const MAX_ARGON2_LANES: u32 = 16;

/// How new entries are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    /// `$7$`, PBKDF2-HMAC-SHA512 with [`PBKDF2_ITERATIONS`]: readable by
    /// every Mosquitto 2, hence the default.
    #[default]
    Pbkdf2Sha512,
    /// argon2id (PHC string, the argon2 crate's defaults: 19 MiB, 2 passes,
    /// 1 lane): stronger against GPUs, but Mosquitto 2.0 cannot read it.
    Argon2id,
}

/// What [`PasswordFile::verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The password is right.
    Ok,
    /// The user exists and the password is wrong.
    Wrong,
    /// No such user.
    UnknownUser,
}

/// Why a password file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A line is not `user:hash` in a known format.
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
    /// A user name that cannot be written to the file and read back.
    #[error("invalid user name {0:?}: not empty, no `:`, line break or NUL, no leading `#`, no blanks at either end, at most 65535 bytes")]
    BadUser(String),
    /// Hashing failed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Argon2(String),
}

fn b64(s: &str, what: &str, len: usize) -> Result<Vec<u8>, String> {
    let bytes = STANDARD
        .decode(s)
        .map_err(|e| format!("bad base64 in the {what}: {e}"))?;
    if bytes.len() != len {
        return Err(format!(
            "the {what} is {} bytes, expected {len}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        if text.starts_with("$argon2") {
            return parse_argon2(text).map(|()| Hash::Argon2(text.to_string()));
        }
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations
                    .parse::<u32>()
                    .ok()
                    .filter(|_| iterations.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| format!("bad iteration count {iterations:?}"))?;
                if iterations == 0 || iterations > MAX_ITERATIONS {
                    return Err(format!(
                        "iteration count {iterations} out of 1..={MAX_ITERATIONS}"
                    ));
                }
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt: b64(salt, "salt", SALT_LEN)?,
                    hash: b64(hash, "hash", HASH_LEN)?,
                })
            }
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64(salt, "salt", SALT_LEN)?,
                hash: b64(hash, "hash", HASH_LEN)?,
            }),
            _ => Err("unknown hash format (expected $7$, $6$ or $argon2id$)".into()),
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                let mut out = [0u8; HASH_LEN];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out.ct_eq(hash.as_slice()).into()
            }
            Hash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                d.finalize().as_slice().ct_eq(hash).into()
            }
            // The argon2 crate compares in constant time; the parameters
            // come from the string, bounded when it was parsed.
            Hash::Argon2(phc) => PasswordHash::new(phc).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(password, &h)
                    .is_ok()
            }),
        }
    }

    fn new(password: &[u8], scheme: Scheme, iterations: u32) -> Result<Hash, PasswordError> {
        match scheme {
            Scheme::Pbkdf2Sha512 => {
                let mut salt = vec![0u8; SALT_LEN];
                rand::rng().fill_bytes(&mut salt);
                let mut hash = vec![0u8; HASH_LEN];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut hash);
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt,
                    hash,
                })
            }
            Scheme::Argon2id => {
                let mut bytes = [0u8; 16];
                rand::rng().fill_bytes(&mut bytes);
                let salt = SaltString::encode_b64(&bytes)
                    .map_err(|e| PasswordError::Hash(e.to_string()))?;
                let phc = argon2::Argon2::default()
                    .hash_password(password, &salt)
                    .map_err(|e| PasswordError::Hash(e.to_string()))?;
                Ok(Hash::Argon2(phc.to_string()))
            }
        }
    }

    fn encode(&self) -> String {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                format!(
                    "$7${iterations}${}${}",
                    STANDARD.encode(salt),
                    STANDARD.encode(hash)
                )
            }
            Hash::Sha512 { salt, hash } => {
                format!("$6${}${}", STANDARD.encode(salt), STANDARD.encode(hash))
            }
            Hash::Argon2(phc) => phc.clone(),
        }
    }
}

/// Check an argon2 PHC string: argon2id only, its cost bounded.
fn parse_argon2(text: &str) -> Result<(), String> {
    let hash = PasswordHash::new(text).map_err(|e| format!("bad argon2 hash: {e}"))?;
    if hash.algorithm != argon2::Algorithm::Argon2id.ident() {
        return Err(format!(
            "argon2 variant {} not supported (argon2id only)",
            hash.algorithm
        ));
    }
    if hash.hash.is_none() {
        return Err("argon2 string without a hash".into());
    }
    let params =
        argon2::Params::try_from(&hash).map_err(|e| format!("bad argon2 parameters: {e}"))?;
    let (m, t, p) = (params.m_cost(), params.t_cost(), params.p_cost());
    if m > MAX_ARGON2_MEMORY_KIB || u64::from(m) * u64::from(t) > MAX_ARGON2_WORK_KIB {
        return Err(format!(
            "argon2 cost m={m} t={t} too high (at most {MAX_ARGON2_MEMORY_KIB} KiB, m*t at most {MAX_ARGON2_WORK_KIB})"
        ));
    }
    if p > MAX_ARGON2_LANES {
        return Err(format!(
            "argon2 lanes p={p} too many (at most {MAX_ARGON2_LANES})"
        ));
    }
    Ok(())
}

/// A password file in memory: users and their hashes, sorted by user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, Hash>,
}

/// Check that `user` can be written as `user:hash` and read back (by us and
/// by Mosquitto, which trims blanks and skips `#` lines), as
/// [`PasswordFile::set`] requires; e.g. before prompting for a password.
pub fn check_user(user: &str) -> Result<(), PasswordError> {
    let bad = user.is_empty()
        || user.len() > 65_535
        || user.contains([':', '\n', '\r', '\0'])
        || user.starts_with('#')
        || user.trim() != user;
    if bad {
        return Err(PasswordError::BadUser(user.to_string()));
    }
    Ok(())
}

impl PasswordFile {
    /// Read `path` (at most [`MAX_FILE`] bytes).
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordError> {
        let text = crate::file::read_bounded(path, MAX_FILE).map_err(|e| match e {
            crate::file::ReadError::Io(source) => PasswordError::Io {
                path: path.to_owned(),
                source,
            },
            crate::file::ReadError::TooLarge => PasswordError::TooLarge {
                path: path.to_owned(),
            },
        })?;
        Self::parse(&text).map_err(|(line, what)| PasswordError::Line {
            path: path.to_owned(),
            line,
            what,
        })
    }

    /// Parse a file's text; the error is the line number (from 1) and what
    /// is wrong. A user listed twice is an error: which line wins would be
    /// a guess.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.len() > MAX_LINE {
                return Err((n, format!("line longer than {MAX_LINE} bytes")));
            }
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| (n, "expected user:hash".to_string()))?;
            let user = user.trim();
            if user.is_empty() {
                return Err((n, "empty user name".into()));
            }
            let hash = Hash::parse(hash.trim()).map_err(|e| (n, e))?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err((n, format!("user {user:?} is listed twice")));
            }
        }
        Ok(PasswordFile { users })
    }

    /// Check `user`'s password. The comparison is constant-time; the
    /// hashing costs what the entry says (about 0.1 s for a default `$7$`
    /// entry), so call it off the async workers. An unknown user costs as
    /// much as a wrong password.
    pub fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        match self.users.get(user) {
            None => {
                // As long as a wrong password: the answer's timing must not
                // tell which user names exist. Any entry's cost will do
                // (files are written with one scheme and cost).
                if let Some(h) = self.users.values().next() {
                    std::hint::black_box(h.verify(&password[..password.len().min(MAX_PASSWORD)]));
                }
                Verdict::UnknownUser
            }
            Some(_) if password.len() > MAX_PASSWORD => Verdict::Wrong,
            Some(h) if h.verify(password) => Verdict::Ok,
            Some(_) => Verdict::Wrong,
        }
    }

    /// Add `user` or change its password, hashed with `scheme`.
    pub fn set(
        &mut self,
        user: &str,
        password: &[u8],
        scheme: Scheme,
    ) -> Result<(), PasswordError> {
        self.set_with_iterations(user, password, scheme, PBKDF2_ITERATIONS)
    }

    /// [`set`](Self::set) with another PBKDF2 iteration count (tests: the
    /// hashing code is not optimised in their builds).
    fn set_with_iterations(
        &mut self,
        user: &str,
        password: &[u8],
        scheme: Scheme,
        iterations: u32,
    ) -> Result<(), PasswordError> {
        check_user(user)?;
        if password.len() > MAX_PASSWORD {
            return Err(PasswordError::Hash(format!(
                "password longer than {MAX_PASSWORD} bytes"
            )));
        }
        let hash = Hash::new(password, scheme, iterations)?;
        self.users.insert(user.to_string(), hash);
        Ok(())
    }

    /// Remove `user`; whether it was there.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// Whether `user` is in the file.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// The users, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// The file's text, one `user:hash` line per user, sorted.
    pub fn to_text(&self) -> String {
        self.users
            .iter()
            .map(|(u, h)| format!("{u}:{}\n", h.encode()))
            .collect()
    }

    /// Write to `path` atomically, so that a broker reloading it never sees
    /// half a file: a new temporary file beside it (mode 0600: the hashes
    /// are secrets), written, synced, renamed over `path`, and the
    /// directory synced so the rename survives a crash.
    pub fn save(&self, path: &Path) -> Result<(), PasswordError> {
        let io_error = |source| PasswordError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            ".{name}.{}.{:08x}.tmp",
            std::process::id(),
            rand::rng().next_u32()
        ));
        let mut options = std::fs::OpenOptions::new();
        // create_new: never write through a file or link already there.
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let written = (|| {
            let mut f = options.open(&tmp)?;
            f.write_all(self.to_text().as_bytes())?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_error(e));
        }
        #[cfg(unix)]
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha512_line(user: &str, password: &[u8], salt: &[u8]) -> String {
        let mut d = Sha512::new();
        d.update(password);
        d.update(salt);
        format!(
            "{user}:$6${}${}\n",
            STANDARD.encode(salt),
            STANDARD.encode(d.finalize())
        )
    }

    fn pbkdf2_line(user: &str, password: &[u8], iterations: u32) -> String {
        let salt = [7u8; SALT_LEN];
        let mut hash = [0u8; HASH_LEN];
        pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, iterations, &mut hash);
        format!(
            "{user}:$7${iterations}${}${}\n",
            STANDARD.encode(salt),
            STANDARD.encode(hash)
        )
    }

    impl PasswordFile {
        fn set_cheap(&mut self, user: &str, password: &[u8]) -> Result<(), PasswordError> {
            self.set_with_iterations(user, password, Scheme::Pbkdf2Sha512, 3)
        }
    }

    #[test]
    fn round_trip_both_schemes() {
        let mut f = PasswordFile::default();
        f.set("alice", b"s3cret", Scheme::Pbkdf2Sha512).unwrap();
        f.set("bob", b"pw", Scheme::Argon2id).unwrap();
        let back = PasswordFile::parse(&f.to_text()).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.verify("alice", b"s3cret"), Verdict::Ok);
        assert_eq!(back.verify("alice", b"nope"), Verdict::Wrong);
        assert_eq!(back.verify("bob", b"pw"), Verdict::Ok);
        assert_eq!(back.verify("bob", b"pW"), Verdict::Wrong);
        assert_eq!(back.verify("carol", b"pw"), Verdict::UnknownUser);
        assert!(f.to_text().contains("alice:$7$210000$"));
        assert!(f.to_text().contains("bob:$argon2id$v=19$"));
    }

    #[test]
    fn mosquitto_2_pbkdf2_lines() {
        // The exact shape mosquitto_passwd writes (101 iterations).
        let f = PasswordFile::parse(&pbkdf2_line("u", b"pw", 101)).unwrap();
        assert_eq!(f.verify("u", b"pw"), Verdict::Ok);
        assert_eq!(f.verify("u", b"pwx"), Verdict::Wrong);
        assert_eq!(f.verify("u", b""), Verdict::Wrong);
    }

    #[test]
    fn sha512_lines_of_mosquitto_1() {
        let f = PasswordFile::parse(&sha512_line("u", b"pw", b"0123456789ab")).unwrap();
        assert_eq!(f.verify("u", b"pw"), Verdict::Ok);
        assert_eq!(f.verify("u", b"px"), Verdict::Wrong);
    }

    #[test]
    fn comments_blanks_and_surrounding_spaces() {
        let text = format!(
            "# a comment\n\n   \n{}",
            pbkdf2_line(" u ", b"pw", 5)
                .replace(":$", ": $")
                .replace('\n', " \r\n")
        );
        let f = PasswordFile::parse(&text).unwrap();
        assert_eq!(f.users().collect::<Vec<_>>(), ["u"]);
        assert_eq!(f.verify("u", b"pw"), Verdict::Ok);
    }

    #[test]
    fn too_long_password_is_wrong() {
        let long = vec![b'a'; MAX_PASSWORD + 1];
        let f = PasswordFile::parse(&sha512_line("u", &long, b"0123456789ab")).unwrap();
        assert_eq!(f.verify("u", &long), Verdict::Wrong);
        assert_eq!(f.verify("u", &long[..MAX_PASSWORD]), Verdict::Wrong);
        let mut g = PasswordFile::default();
        assert!(g.set_cheap("u", &long).is_err());
    }

    #[test]
    fn bad_lines_are_named() {
        let err = |t: &str| PasswordFile::parse(t).unwrap_err();
        assert_eq!(err("# c\n\nu:plain\n").0, 3);
        assert_eq!(err("nocolon\n").0, 1);
        assert_eq!(err(":$6$AA==$AA==\n").0, 1);
        let good = pbkdf2_line("u", b"pw", 3);
        assert_eq!(err(&format!("{good}{good}")).0, 2, "a user twice");
        let line = format!("u:{}\n", "x".repeat(MAX_LINE));
        assert!(err(&line).1.contains("longer"));
    }

    #[test]
    fn hostile_hashes_are_refused() {
        let ok = pbkdf2_line("u", b"pw", 3);
        let salt = STANDARD.encode([1u8; SALT_LEN]);
        let hash = STANDARD.encode([1u8; HASH_LEN]);
        for bad in [
            format!("u:$7$10000001${salt}${hash}"),
            format!("u:$7$99999999999${salt}${hash}"),
            format!("u:$7$0${salt}${hash}"),
            format!("u:$7$+5${salt}${hash}"),
            format!("u:$7$-5${salt}${hash}"),
            // A truncated hash would accept one password in 256.
            format!("u:$7$3${salt}${}", STANDARD.encode([1u8])),
            format!("u:$6${salt}$"),
            format!("u:$7$3$${hash}"),
            format!("u:$7$3${salt}${hash}$"),
            format!("u:$7$3$not base64!${hash}"),
            format!("u:$5${salt}${hash}"),
            // Argon2 costs from the file are bounded, and only argon2id is read.
            "u:$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            "u:$argon2id$v=19$m=65536,t=100,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            "u:$argon2id$v=19$m=65536,t=1,p=64$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            "u:$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
            "u:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ".into(),
        ] {
            assert!(PasswordFile::parse(&bad).is_err(), "accepted {bad}");
        }
        assert!(PasswordFile::parse(&ok).is_ok());
        assert!(PasswordFile::parse(
            "u:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
        )
        .is_ok());
    }

    #[test]
    fn user_names_that_would_not_read_back() {
        let mut f = PasswordFile::default();
        for bad in ["", "a:b", "a\nb", "a\rb", "#a", " a", "a\t", "a\0"] {
            assert!(f.set_cheap(bad, b"x").is_err(), "accepted {bad:?}");
        }
        f.set_cheap("a#b", b"x").unwrap();
        f.set_cheap("élan vital", b"x").unwrap();
        let back = PasswordFile::parse(&f.to_text()).unwrap();
        assert_eq!(back.verify("a#b", b"x"), Verdict::Ok);
        assert_eq!(back.verify("élan vital", b"x"), Verdict::Ok);
    }

    #[test]
    fn edit_and_save_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut f = PasswordFile::default();
        f.set_cheap("alice", b"one").unwrap();
        f.set_cheap("bob", b"two").unwrap();
        f.save(&path).unwrap();
        f.set_cheap("alice", b"three").unwrap();
        assert!(f.remove("bob"));
        assert!(!f.remove("bob"));
        f.save(&path).unwrap();
        let back = PasswordFile::load(&path).unwrap();
        assert_eq!(back.verify("alice", b"three"), Verdict::Ok);
        assert_eq!(back.verify("alice", b"one"), Verdict::Wrong);
        assert_eq!(back.verify("bob", b"two"), Verdict::UnknownUser);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["passwd"], "no temporary file left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let e = PasswordFile::load(&path).unwrap_err();
        assert!(matches!(e, PasswordError::Io { .. }));
        assert!(
            std::error::Error::source(&e).is_some(),
            "keeps the io error"
        );
        std::fs::write(&path, "# ok\nu:$9$x\n").unwrap();
        let e = PasswordFile::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:2: ", path.display())), "{e}");
    }
}
