//! Authentication and authorization from files, in Mosquitto's formats:
//!
//! - [`password`]: a password file (`user:$7$...` PBKDF2-SHA512 as
//!   `mosquitto_passwd` writes it, or argon2id), read, verified, edited;
//! - [`acl`]: an ACL file (`user`, `topic`, `pattern`), checked for reads and writes.
//!
//! It knows the broker only through `broker-core`'s hooks; it knows nothing
//! of listeners, sockets or storage.

pub mod acl;
pub mod password;
