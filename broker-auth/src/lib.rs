//! Authentication and authorization from files, in Mosquitto's formats:
//!
//! - [`password`]: a password file (`user:$7$...` PBKDF2-SHA512 as
//!   `mosquitto_passwd` writes it, or argon2id), read, verified, edited;
//! - [`acl`]: an ACL file (`user`, `topic`, `pattern`), checked for reads and writes;
//! - [`FileAuth`]: both as the broker's authentication and authorization
//!   hooks, reloaded on demand (the binary reloads on SIGHUP).
//!
//! It knows the broker only through `broker-core`'s hooks; it knows nothing
//! of listeners, sockets or storage.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use std::sync::Arc;
//! let auth = Arc::new(broker_auth::FileAuth::load(
//!     Some(Path::new("/etc/broker/passwd")),
//!     Some(Path::new("/etc/broker/acl")),
//! )?);
//! let storage = broker_core::storage::Storage::from_backend(Arc::new(storage_memory::MemoryStore::new()));
//! let broker = broker_core::Broker::builder()
//!     .storage(storage)
//!     .authenticate(auth.clone())
//!     .authorize(auth.clone())
//!     .start()
//!     .await?;
//! auth.reload()?; // e.g. on SIGHUP
//! # Ok(()) }
//! ```

pub mod acl;
mod file;
pub mod password;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use broker_core::hooks::{
    Authenticate, Authorize, ClientInfo, ConnectInfo, Decision, HookError, Login, SubscribeDecision,
};
use broker_core::message::{Message, QoS};
use parking_lot::RwLock;

use acl::{Access, AclFile};
use password::{PasswordFile, Verdict};

/// Why a file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The password file.
    #[error("password file")]
    Password(#[from] password::PasswordError),
    /// The ACL file.
    #[error("ACL file")]
    Acl(#[from] acl::AclError),
}

struct Loaded<T> {
    path: PathBuf,
    current: RwLock<Arc<T>>,
}

/// The password file and the ACL file as hooks.
///
/// Authentication: a username from a verified client certificate is
/// accepted as it is; a client without a username is let in only on a
/// listener that allows anonymous clients; a username is checked against
/// the password file (unknown user or wrong password: CONNACK 0x04/0x86).
/// Without a password file, usernames are not verified: the client is let
/// in only where anonymous clients are.
///
/// Authorization (when an ACL file is loaded): publishes need `write`
/// access to the topic, subscriptions `read` access to the filter, and
/// each delivery `read` access to the message's topic, as in Mosquitto.
/// In-process clients of the application are not subject to the ACL.
pub struct FileAuth {
    passwords: Option<Loaded<PasswordFile>>,
    acl: Option<Loaded<AclFile>>,
}

impl FileAuth {
    /// Load the files given.
    pub fn load(
        password_file: Option<&Path>,
        acl_file: Option<&Path>,
    ) -> Result<FileAuth, AuthError> {
        Ok(FileAuth {
            passwords: match password_file {
                Some(p) => Some(Loaded {
                    path: p.to_owned(),
                    current: RwLock::new(Arc::new(PasswordFile::load(p)?)),
                }),
                None => None,
            },
            acl: match acl_file {
                Some(p) => Some(Loaded {
                    path: p.to_owned(),
                    current: RwLock::new(Arc::new(AclFile::load(p)?)),
                }),
                None => None,
            },
        })
    }

    /// Read both files again. A file that fails to load keeps its previous
    /// contents (and the error is returned); the other is still reloaded.
    pub fn reload(&self) -> Result<(), AuthError> {
        let mut first_error = None;
        if let Some(l) = &self.passwords {
            match PasswordFile::load(&l.path) {
                Ok(f) => *l.current.write() = Arc::new(f),
                Err(e) => first_error = Some(AuthError::from(e)),
            }
        }
        if let Some(l) = &self.acl {
            match AclFile::load(&l.path) {
                Ok(f) => *l.current.write() = Arc::new(f),
                Err(e) => {
                    first_error.get_or_insert(AuthError::from(e));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether a password file is loaded (authentication is configured).
    pub fn has_passwords(&self) -> bool {
        self.passwords.is_some()
    }

    fn acl(&self) -> Option<Arc<AclFile>> {
        self.acl.as_ref().map(|l| l.current.read().clone())
    }

    fn allowed(&self, client: &ClientInfo, topic: &str, access: Access) -> bool {
        match self.acl() {
            None => true,
            Some(_) if client.is_internal() => true,
            Some(acl) => acl.check(&client.client_id, client.identity.as_deref(), topic, access),
        }
    }
}

#[async_trait::async_trait]
impl Authenticate for FileAuth {
    async fn authenticate(&self, c: &ConnectInfo) -> Result<Login, HookError> {
        if c.username_from_certificate
            || c.protocol == broker_core::hooks::ProtocolVersion::Internal
        {
            return Ok(Login::allow());
        }
        let (Some(user), Some(passwords)) = (&c.username, &self.passwords) else {
            return Ok(if c.allow_anonymous {
                Login::allow()
            } else {
                Login::NotAuthorized
            });
        };
        let file = passwords.current.read().clone();
        let password = c.password.as_deref().unwrap_or_default();
        // Verification costs milliseconds by design: off the async workers.
        let user = user.clone();
        let password = password.to_vec();
        let verdict = tokio::task::spawn_blocking(move || file.verify(&user, &password))
            .await
            .map_err(|e| HookError::new("password verification failed").with_source(e))?;
        Ok(match verdict {
            Verdict::Ok => Login::allow(),
            Verdict::Wrong | Verdict::UnknownUser => Login::BadCredentials,
        })
    }
}

#[async_trait::async_trait]
impl Authorize for FileAuth {
    async fn authorize_publish(
        &self,
        client: &ClientInfo,
        message: &Message,
    ) -> Result<Decision, HookError> {
        Ok(if self.allowed(client, &message.topic, Access::Write) {
            Decision::Allow
        } else {
            Decision::Deny
        })
    }

    async fn authorize_subscribe(
        &self,
        client: &ClientInfo,
        filter: &str,
        qos: QoS,
    ) -> Result<SubscribeDecision, HookError> {
        let allowed = match self.acl() {
            None => true,
            Some(_) if client.is_internal() => true,
            Some(acl) => acl.check_subscribe(&client.client_id, client.identity.as_deref(), filter),
        };
        Ok(if allowed {
            SubscribeDecision::Allow(qos)
        } else {
            SubscribeDecision::Deny
        })
    }

    fn authorize_delivery(&self, recipient: &ClientInfo, message: &Message) -> Decision {
        if self.allowed(recipient, &message.topic, Access::Read) {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}
