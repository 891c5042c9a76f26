//! Extension points for the application embedding the broker: who may
//! connect ([`Authenticate`]), what a client may publish, subscribe to and
//! receive ([`Authorize`]), and MQTT 5 enhanced authentication
//! ([`EnhancedAuth`]). What happened is told through
//! [`events`](crate::events), not through hooks.
//!
//! # The contract every hook keeps
//! - The broker calls hooks only at its boundary (the link every client goes
//!   through: TCP connections, in-process clients, the `$SYS` publisher), so
//!   no kind of client bypasses them.
//! - An async hook may wait (a database, an HTTP call), but only its own
//!   client waits with it: other clients are served meanwhile. It is given
//!   `hook_timeout_ms` (default 5 s); past that, or if it returns an error
//!   or panics, the broker refuses what was asked (fails closed), counts it
//!   in `Stats::hook_failures` and logs it.
//! - [`Authorize::authorize_delivery`] is not async: it runs on the delivery
//!   hot path, in the recipient's connection task, once per message about
//!   to be sent (again when a message is resent after a reconnect). It must
//!   answer from memory in microseconds and never block. A panic there
//!   denies that delivery. It runs at delivery, not at routing, so a denied
//!   message is queued (and for a persistent session stored) until its turn
//!   comes, then dropped as if delivered.
//! - No decision is cached by the broker, except where a hook asks for it
//!   ([`Authorize::publish_cache`]): then a client's allowed publishes are
//!   remembered per topic for that long, on its connection only.
//!
//! # Example
//! Users `alice` and `bob` with passwords, each allowed to publish only
//! under `chat/<username>/`:
//! ```
//! use async_trait::async_trait;
//! use broker_core::hooks::{Authenticate, Authorize, ClientInfo, ConnectInfo, Decision, HookError, Login};
//! use broker_core::message::Message;
//!
//! struct Users;
//!
//! #[async_trait]
//! impl Authenticate for Users {
//!     async fn authenticate(&self, c: &ConnectInfo) -> Result<Login, HookError> {
//!         Ok(match (c.username.as_deref(), c.password.as_deref()) {
//!             (Some("alice"), Some(b"wonderland")) | (Some("bob"), Some(b"builder")) => Login::allow(),
//!             (Some(_), _) => Login::BadCredentials,
//!             (None, _) => Login::NotAuthorized,
//!         })
//!     }
//! }
//!
//! #[async_trait]
//! impl Authorize for Users {
//!     async fn authorize_publish(&self, client: &ClientInfo, message: &Message) -> Result<Decision, HookError> {
//!         let own = format!("chat/{}/", client.username.as_deref().unwrap_or(""));
//!         Ok(if message.topic.starts_with(&own) { Decision::Allow } else { Decision::Deny })
//!     }
//! }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::message::{Message, QoS};

/// The protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 and 3.1.1.
    V3,
    /// MQTT 5.0.
    V5,
    /// An in-process client of the embedding application.
    Internal,
}

/// What a client presented when connecting, for [`Authenticate`].
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    /// The client identifier (assigned by the broker if the client sent none).
    pub client_id: String,
    /// The User Name of CONNECT.
    pub username: Option<String>,
    /// The Password of CONNECT.
    pub password: Option<Bytes>,
    /// The peer's address (`None` for in-process clients).
    pub peer: Option<SocketAddr>,
    /// The name of the listener it came through (`PROTOCOL:ADDRESS`, or `internal`).
    pub listener: Arc<str>,
    /// Whether that listener admits clients no authentication vouches for
    /// (its `allow_anonymous`); what counts as anonymous is the hook's call.
    pub allow_anonymous: bool,
    /// `username` is the name of the client's verified TLS certificate
    /// (`use_identity_as_username`): the certificate stands for the password.
    pub username_from_certificate: bool,
    /// Its protocol.
    pub protocol: ProtocolVersion,
}

/// What [`Authenticate`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// Let the client in; authorization sees `identity` (by default its username).
    Allow {
        /// The name authorization hooks get in [`ClientInfo::identity`].
        identity: Option<String>,
    },
    /// Wrong username or password: CONNACK 0x04 (3.1.1) / 0x86 (MQTT 5).
    BadCredentials,
    /// Not allowed to connect: CONNACK 0x05 (3.1.1) / 0x87 (MQTT 5).
    NotAuthorized,
}

impl Login {
    /// Allow, with the username as identity.
    pub fn allow() -> Login {
        Login::Allow { identity: None }
    }
}

/// A client as authorization hooks and events see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client identifier.
    pub client_id: Arc<str>,
    /// The User Name it connected with.
    pub username: Option<String>,
    /// The identity [`Authenticate`] gave it (else its username).
    pub identity: Option<String>,
    /// The peer's address (`None` for in-process clients).
    pub peer: Option<SocketAddr>,
    /// The listener it came through.
    pub listener: Arc<str>,
    /// Its protocol.
    pub protocol: ProtocolVersion,
}

impl ClientInfo {
    /// Whether this is an in-process client of the application (or the broker's own `$SYS` publisher).
    pub fn is_internal(&self) -> bool {
        self.protocol == ProtocolVersion::Internal
    }
}

/// A publish or delivery decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refuse.
    Deny,
}

/// A subscription decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeDecision {
    /// Grant, at most at this QoS (the request's QoS grants it as asked).
    Allow(QoS),
    /// Refuse: SUBACK 0x80 (3.1.1) / 0x87 Not authorized (MQTT 5).
    Deny,
}

/// A hook could not decide (its database is down, ...). The broker then
/// refuses what was asked and logs this.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HookError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HookError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> HookError {
        HookError {
            message: message.into(),
            source: None,
        }
    }

    /// The error that caused it.
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> HookError {
        self.source = Some(Box::new(e));
        self
    }
}

/// Decides who may connect. Runs once per CONNECT (and per in-process
/// client), before the session is touched: a refused client changes nothing.
///
/// Contract: async, off the hot path; may take up to `hook_timeout_ms`.
/// Timeout, error or panic: the client is refused with CONNACK 0x03 (3.1.1)
/// / 0x88 Server unavailable (MQTT 5), so it retries later.
#[async_trait]
pub trait Authenticate: Send + Sync + 'static {
    /// Decide on one connecting client.
    async fn authenticate(&self, client: &ConnectInfo) -> Result<Login, HookError>;
}

/// Decides what an authenticated client may do. Every method has a default
/// that allows.
///
/// Publishes of the application itself ([`Broker::publish`](crate::Broker::publish))
/// and of the broker (`$SYS`) are trusted and not passed to
/// [`authorize_publish`](Authorize::authorize_publish); their deliveries do
/// pass [`authorize_delivery`](Authorize::authorize_delivery), so who may read
/// `$SYS` is decided here too.
#[async_trait]
pub trait Authorize: Send + Sync + 'static {
    /// May `client` publish `message` (its will included, checked at CONNECT)?
    ///
    /// Contract: async, on the publishing client's path only: its next
    /// packet waits, other clients do not. Deny: MQTT 5 PUBACK/PUBREC 0x87;
    /// MQTT 3.1.1, which has no way to say no, gets its PUBACK/PUBREC and the
    /// message is dropped (as Mosquitto does; closing would make the client
    /// resend it forever). A denied will refuses the CONNECT (0x05 / 0x87).
    async fn authorize_publish(
        &self,
        client: &ClientInfo,
        message: &Message,
    ) -> Result<Decision, HookError> {
        let _ = (client, message);
        Ok(Decision::Allow)
    }

    /// May `client` subscribe to `filter` at `qos`? It may also grant a lower QoS.
    ///
    /// Contract: async, on the subscribing client's path only. Deny: SUBACK
    /// 0x80 (3.1.1) / 0x87 (MQTT 5) for that filter; the others of the same
    /// SUBSCRIBE are decided on their own.
    async fn authorize_subscribe(
        &self,
        client: &ClientInfo,
        filter: &str,
        qos: QoS,
    ) -> Result<SubscribeDecision, HookError> {
        let _ = (client, filter);
        Ok(SubscribeDecision::Allow(qos))
    }

    /// May `message` be delivered to `recipient` (Mosca's `authorizeForward`)?
    ///
    /// Contract: synchronous, on the delivery hot path (see the module
    /// documentation): answer from memory, never block. Deny: that
    /// subscriber does not get the message (its queued copy is dropped as
    /// if delivered); the others do.
    fn authorize_delivery(&self, recipient: &ClientInfo, message: &Message) -> Decision {
        let _ = (recipient, message);
        Decision::Allow
    }

    /// How long a connection may remember that a topic was allowed by
    /// [`authorize_publish`](Authorize::authorize_publish) (32 topics per
    /// connection at most). `None` (the default) asks every time.
    fn publish_cache(&self) -> Option<Duration> {
        None
    }
}

/// What one step of an authentication exchange decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// The client is authenticated. The data, if any, goes back to it in
    /// CONNACK (or in AUTH 0x00 on re-authentication).
    Success(Option<Bytes>),
    /// Another round: this data goes to the client in AUTH 0x18 (Continue
    /// authentication), and its answer comes to the next [`AuthExchange::step`].
    Continue(Bytes),
    /// Refused: CONNACK 0x87 (Not authorized) when connecting, DISCONNECT 0x87
    /// on re-authentication.
    Failure,
}

/// MQTT 5 enhanced authentication (the AUTH packet, section 4.12): a
/// challenge/response exchange named by an authentication method.
///
/// The broker calls [`begin`](EnhancedAuth::begin) when a CONNECT carries an
/// Authentication Method, and again when the client re-authenticates (AUTH
/// 0x19) with that same method. Returning `None` refuses the method
/// (CONNACK 0x8C, Bad authentication method).
///
/// # Example
/// A method that lets in clients whose initial data is a known token:
/// ```
/// use async_trait::async_trait;
/// use broker_core::hooks::{AuthExchange, AuthStep, EnhancedAuth};
/// use bytes::Bytes;
///
/// struct Token(&'static [u8]);
/// struct Check(&'static [u8]);
///
/// impl EnhancedAuth for Token {
///     fn begin(&self, _client_id: &str, method: &str) -> Option<Box<dyn AuthExchange>> {
///         (method == "TOKEN").then(|| Box::new(Check(self.0)) as Box<dyn AuthExchange>)
///     }
/// }
///
/// #[async_trait]
/// impl AuthExchange for Check {
///     async fn step(&mut self, data: Option<Bytes>) -> AuthStep {
///         match data {
///             Some(d) if &d[..] == self.0 => AuthStep::Success(None),
///             _ => AuthStep::Failure,
///         }
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let auth = Token(b"s3cret");
/// let mut exchange = auth.begin("client-1", "TOKEN").expect("method supported");
/// assert_eq!(exchange.step(Some(Bytes::from_static(b"s3cret"))).await, AuthStep::Success(None));
/// assert!(auth.begin("client-1", "OTHER").is_none());
/// # });
/// ```
pub trait EnhancedAuth: Send + Sync + 'static {
    /// Start an exchange for `client_id` with `method`, or `None` if the
    /// method is not supported.
    fn begin(&self, client_id: &str, method: &str) -> Option<Box<dyn AuthExchange>>;
}

/// One authentication exchange in progress, for one connection.
#[async_trait]
pub trait AuthExchange: Send {
    /// Take the client's data (from CONNECT or AUTH; `None` if it sent none)
    /// and decide.
    async fn step(&mut self, data: Option<Bytes>) -> AuthStep;
}

/// Everything the embedding application plugs into the broker.
///
/// ```
/// use std::sync::Arc;
/// use async_trait::async_trait;
/// use broker_core::hooks::{Authenticate, ConnectInfo, HookError, Hooks, Login};
///
/// struct Anyone;
/// #[async_trait]
/// impl Authenticate for Anyone {
///     async fn authenticate(&self, _: &ConnectInfo) -> Result<Login, HookError> {
///         Ok(Login::allow())
///     }
/// }
/// let hooks = Hooks { authenticate: Some(Arc::new(Anyone)), ..Hooks::default() };
/// assert!(hooks.authorize.is_none());
/// ```
#[derive(Clone, Default)]
pub struct Hooks {
    /// Who may connect; without it, everyone may.
    pub authenticate: Option<Arc<dyn Authenticate>>,
    /// What clients may do; without it, everything.
    pub authorize: Option<Arc<dyn Authorize>>,
    /// MQTT 5 enhanced authentication; without it, a CONNECT naming an
    /// authentication method is refused with 0x8C.
    pub enhanced_auth: Option<Arc<dyn EnhancedAuth>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("authenticate", &self.authenticate.is_some())
            .field("authorize", &self.authorize.is_some())
            .field("enhanced_auth", &self.enhanced_auth.is_some())
            .finish()
    }
}

/// A shared hook is a hook: the application keeps a handle (to reload it,
/// say) and gives the broker a clone.
#[async_trait]
impl<T: Authenticate + ?Sized> Authenticate for Arc<T> {
    async fn authenticate(&self, client: &ConnectInfo) -> Result<Login, HookError> {
        (**self).authenticate(client).await
    }
}

#[async_trait]
impl<T: Authorize + ?Sized> Authorize for Arc<T> {
    async fn authorize_publish(
        &self,
        client: &ClientInfo,
        message: &Message,
    ) -> Result<Decision, HookError> {
        (**self).authorize_publish(client, message).await
    }

    async fn authorize_subscribe(
        &self,
        client: &ClientInfo,
        filter: &str,
        qos: QoS,
    ) -> Result<SubscribeDecision, HookError> {
        (**self).authorize_subscribe(client, filter, qos).await
    }

    fn authorize_delivery(&self, recipient: &ClientInfo, message: &Message) -> Decision {
        (**self).authorize_delivery(recipient, message)
    }

    fn publish_cache(&self) -> Option<Duration> {
        (**self).publish_cache()
    }
}
