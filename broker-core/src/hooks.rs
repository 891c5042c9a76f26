//! Extension points for the application embedding the broker.
//!
//! [`Hooks`] is handed to [`Broker::start_with`](crate::broker::Broker::start_with).
//! Today it carries MQTT 5 enhanced authentication ([`EnhancedAuth`]); the
//! authentication and authorization hooks of later versions join it here.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

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
#[derive(Clone, Default)]
pub struct Hooks {
    /// MQTT 5 enhanced authentication; without it, a CONNECT naming an
    /// authentication method is refused with 0x8C.
    pub enhanced_auth: Option<Arc<dyn EnhancedAuth>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("enhanced_auth", &self.enhanced_auth.is_some())
            .finish()
    }
}
