//! Authentication and topic authorization written in Rust: users from a
//! table in memory, each allowed to publish under `users/<username>/` only,
//! to subscribe to anything but `admin/`, and to read `private/<username>/`
//! but nobody else's.
//!
//! Run it (an optional argument gives another address, `127.0.0.1:0` for
//! any free port):
//!
//! ```sh
//! cargo run -p broker-core --example auth
//! ```
//!
//! and try it with Mosquitto's clients:
//!
//! ```sh
//! mosquitto_sub -u alice -P wonderland -t '#' -v &                  # gets private/alice/notes only
//! mosquitto_pub -u bob -P builder -t users/bob/status -m online     # delivered
//! mosquitto_pub -u bob -P builder -t users/alice/status -m forged   # acknowledged, dropped
//! mosquitto_pub -u bob -P wrong -t users/bob/status -m x            # refused: bad username or password
//! mosquitto_sub -u bob -P builder -t 'admin/#'                      # subscription refused
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use broker_core::hooks::{
    Authenticate, Authorize, ClientInfo, ConnectInfo, Decision, HookError, Login, SubscribeDecision,
};
use broker_core::message::{Message, QoS};
use broker_core::storage::Storage;
use broker_core::Broker;
use storage_memory::MemoryStore;

/// username -> password. A real application would keep salted hashes
/// (and compare them in constant time), or ask its user service.
struct Users(HashMap<&'static str, &'static str>);

#[async_trait]
impl Authenticate for Users {
    // Async and off the hot path: it could query a database. Past
    // `hook_timeout_ms`, or on an error, the client is refused (fails closed).
    async fn authenticate(&self, c: &ConnectInfo) -> Result<Login, HookError> {
        let Some(user) = c.username.as_deref() else {
            return Ok(Login::NotAuthorized); // CONNACK 0x05 / 0x87
        };
        let known = self.0.get(user).map(|p| p.as_bytes());
        Ok(match (known, c.password.as_deref()) {
            (Some(expected), Some(given)) if expected == given => Login::allow(),
            _ => Login::BadCredentials, // CONNACK 0x04 / 0x86
        })
    }
}

/// The topic rules; `ClientInfo::username` is the name authenticated above.
struct Topics;

#[async_trait]
impl Authorize for Topics {
    async fn authorize_publish(
        &self,
        client: &ClientInfo,
        message: &Message,
    ) -> Result<Decision, HookError> {
        let allowed = client
            .username
            .as_deref()
            .is_some_and(|u| under(&message.topic, &format!("users/{u}")));
        Ok(if allowed {
            Decision::Allow
        } else {
            Decision::Deny
        })
    }

    async fn authorize_subscribe(
        &self,
        _client: &ClientInfo,
        filter: &str,
        qos: QoS,
    ) -> Result<SubscribeDecision, HookError> {
        Ok(if under(filter, "admin") {
            SubscribeDecision::Deny
        } else {
            SubscribeDecision::Allow(qos)
        })
    }

    // Synchronous, once per delivery: answers from the topic alone. It is
    // also what keeps `admin/` from a subscriber of `#` or `+/x`, which the
    // subscribe check above lets through.
    fn authorize_delivery(&self, recipient: &ClientInfo, message: &Message) -> Decision {
        let mut levels = message.topic.split('/');
        let allowed = match (levels.next(), levels.next()) {
            (Some("private"), Some(owner)) => recipient.username.as_deref() == Some(owner),
            (Some("admin"), _) => recipient.is_internal(),
            _ => true,
        };
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

/// `topic` is `prefix` or below it.
fn under(topic: &str, prefix: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1883".into());
    let users = Users(HashMap::from([("alice", "wonderland"), ("bob", "builder")]));
    let broker = Broker::builder()
        .storage(Storage::from_backend(Arc::new(MemoryStore::new())))
        .authenticate(users)
        .authorize(Topics)
        .listen(addr)
        .start()
        .await?;

    // The application's own publishes are trusted (no publish check), but
    // their deliveries pass `authorize_delivery`: each user reads only
    // their own notes, whatever they subscribe to.
    for user in ["alice", "bob"] {
        let note = format!("welcome, {user}");
        let topic = format!("private/{user}/notes");
        broker
            .publish(Message::new(topic, note, QoS::AtLeastOnce, true))
            .await?;
    }

    for a in broker.local_addrs() {
        println!("listening on {a}");
    }
    tokio::signal::ctrl_c().await?;
    broker.shutdown().await;
    Ok(())
}
