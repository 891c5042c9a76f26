//! Password files in Mosquitto's format, one `user:hash` per line:
//!
//! - `$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 (Mosquitto 2.0's
//!   `mosquitto_passwd`), salt 12 bytes, hash 64 bytes, standard base64;
//! - `$6$SALT$HASH`: SHA-512 of the password then the salt (Mosquitto 1.x);
//! - `$argon2id$...`: an argon2id PHC string (`broker passwd --argon2`).
//!
//! Files made by `mosquitto_passwd` are read as they are, and the `$7$`
//! lines this module writes are read by Mosquitto.

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
/// Longest line.
const MAX_LINE: usize = 64 * 1024;
/// Iteration counts above this are refused: a hostile file must not stall logins.
const MAX_ITERATIONS: u32 = 10_000_000;
/// Iterations of new `$7$` entries. Mosquitto 2.0's `mosquitto_passwd`
/// writes 101; OWASP asks 210,000 for PBKDF2-SHA512. Mosquitto reads the
/// count from the line, so the stronger one stays compatible; a login
/// costs about 0.1 s of one core, off the async workers.
pub const PBKDF2_ITERATIONS: u32 = 210_000;
const SALT_LEN: usize = 12;

/// How new entries are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `$7$`, PBKDF2-HMAC-SHA512: readable by Mosquitto.
    Pbkdf2Sha512,
    /// argon2id (PHC string): not readable by Mosquitto.
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
    /// A user name with `:` or a line break, or empty.
    #[error("invalid user name {0:?}: not empty, no `:`, no line break")]
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

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        let b64 = |s: &str| STANDARD.decode(s).map_err(|e| format!("bad base64: {e}"));
        if text.starts_with("$argon2") {
            PasswordHash::new(text).map_err(|e| format!("bad argon2 hash: {e}"))?;
            return Ok(Hash::Argon2(text.to_string()));
        }
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations: u32 = iterations
                    .parse()
                    .map_err(|_| format!("bad iteration count {iterations:?}"))?;
                if iterations == 0 || iterations > MAX_ITERATIONS {
                    return Err(format!(
                        "iteration count {iterations} out of 1..={MAX_ITERATIONS}"
                    ));
                }
                let hash = b64(hash)?;
                if hash.is_empty() || hash.len() > 64 {
                    return Err("hash length out of range".into());
                }
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt: b64(salt)?,
                    hash,
                })
            }
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64(salt)?,
                hash: b64(hash)?,
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
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                out.ct_eq(hash).into()
            }
            Hash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                d.finalize().as_slice().ct_eq(hash).into()
            }
            Hash::Argon2(phc) => PasswordHash::new(phc).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(password, &h)
                    .is_ok()
            }),
        }
    }

    fn new(password: &[u8], scheme: Scheme) -> Result<Hash, PasswordError> {
        match scheme {
            Scheme::Pbkdf2Sha512 => {
                let mut salt = vec![0u8; SALT_LEN];
                rand::rng().fill_bytes(&mut salt);
                let mut hash = vec![0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, &salt, PBKDF2_ITERATIONS, &mut hash);
                Ok(Hash::Pbkdf2 {
                    iterations: PBKDF2_ITERATIONS,
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

/// A password file in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, Hash>,
}

fn check_user(user: &str) -> Result<(), PasswordError> {
    if user.is_empty() || user.contains([':', '\n', '\r']) {
        return Err(PasswordError::BadUser(user.to_string()));
    }
    Ok(())
}

impl PasswordFile {
    /// Read `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, PasswordError> {
        let io_error = |source| PasswordError::Io {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io_error)?.len();
        if size > MAX_FILE {
            return Err(PasswordError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(io_error)?;
        Self::parse(&text).map_err(|(line, what)| PasswordError::Line {
            path: path.to_owned(),
            line,
            what,
        })
    }

    /// Parse a file's text; the error is the line number and what is wrong.
    pub fn parse(text: &str) -> Result<PasswordFile, (usize, String)> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.len() > MAX_LINE {
                return Err((i + 1, "line too long".into()));
            }
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| (i + 1, "expected user:hash".to_string()))?;
            if user.is_empty() {
                return Err((i + 1, "empty user name".into()));
            }
            users.insert(user.to_string(), Hash::parse(hash).map_err(|e| (i + 1, e))?);
        }
        Ok(PasswordFile { users })
    }

    /// Check `user`'s password (in constant time for a given hash).
    pub fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        match self.users.get(user) {
            None => Verdict::UnknownUser,
            Some(_) if password.len() > 65_535 => Verdict::Wrong,
            Some(h) if h.verify(password) => Verdict::Ok,
            Some(_) => Verdict::Wrong,
        }
    }

    /// Add `user` or change its password.
    pub fn set(
        &mut self,
        user: &str,
        password: &[u8],
        scheme: Scheme,
    ) -> Result<(), PasswordError> {
        check_user(user)?;
        let hash = Hash::new(password, scheme)?;
        self.users.insert(user.to_string(), hash);
        Ok(())
    }

    /// Remove `user`; whether it was there.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// The users, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        self.users
            .iter()
            .map(|(u, h)| format!("{u}:{}\n", h.encode()))
            .collect()
    }

    /// Write to `path` atomically: a temporary file beside it (mode 0600),
    /// synced, then renamed over it.
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
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp).map_err(io_error)?;
        f.write_all(self.to_text().as_bytes()).map_err(io_error)?;
        f.sync_all().map_err(io_error)?;
        std::fs::rename(&tmp, path).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_schemes() {
        let mut f = PasswordFile::default();
        f.set("alice", b"s3cret", Scheme::Pbkdf2Sha512).unwrap();
        f.set("bob", b"pw", Scheme::Argon2id).unwrap();
        let back = PasswordFile::parse(&f.to_text()).unwrap();
        assert_eq!(back.verify("alice", b"s3cret"), Verdict::Ok);
        assert_eq!(back.verify("alice", b"nope"), Verdict::Wrong);
        assert_eq!(back.verify("bob", b"pw"), Verdict::Ok);
        assert_eq!(back.verify("carol", b"pw"), Verdict::UnknownUser);
        assert!(f.to_text().contains("alice:$7$210000$"));
    }

    #[test]
    fn sha512_lines_of_mosquitto_1() {
        let salt = b"0123456789ab";
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(salt);
        let line = format!(
            "u:$6${}${}\n",
            STANDARD.encode(salt),
            STANDARD.encode(d.finalize())
        );
        let f = PasswordFile::parse(&line).unwrap();
        assert_eq!(f.verify("u", b"pw"), Verdict::Ok);
        assert_eq!(f.verify("u", b"px"), Verdict::Wrong);
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(PasswordFile::parse("# c\n\nu:plain\n").unwrap_err().0, 3);
        assert!(PasswordFile::parse("u:$7$99999999999$AA==$AA==\n").is_err());
        assert!(PasswordFile::parse("nocolon\n").is_err());
        let mut f = PasswordFile::default();
        assert!(f.set("a:b", b"x", Scheme::Pbkdf2Sha512).is_err());
    }
}
