//! The hooks the configuration asks for, put together: the `[auth]` files
//! ([`FileAuth`]) and the web service (`http_*`, [`HttpAuth`]).
//!
//! Who connects is decided by one of them (the settings refuse both). What a
//! client may do must be allowed by every one configured: an ACL file and
//! an authorizing service together grant only what both grant.

use std::sync::Arc;

use anyhow::Context;
use broker_auth::FileAuth;
use broker_core::hooks::{
    Authenticate, Authorize, ClientInfo, Decision, HookError, SubscribeDecision,
};
use broker_core::message::{Message, QoS};
use broker_http_hooks::HttpAuth;

use crate::settings::AuthSettings;

/// The hooks of one configuration, and handles to what can be reloaded.
#[derive(Default)]
pub struct Configured {
    /// Who may connect.
    pub authenticate: Option<Arc<dyn Authenticate>>,
    /// What clients may do.
    pub authorize: Option<Arc<dyn Authorize>>,
    /// The files, to reload on SIGHUP.
    pub files: Option<Arc<FileAuth>>,
    /// The HTTP hooks, for their statistics.
    pub http: Option<Arc<HttpAuth>>,
}

impl Configured {
    /// Load the files and build the HTTP client of `auth`.
    pub fn from_settings(auth: &AuthSettings) -> anyhow::Result<Configured> {
        let files = match (&auth.password_file, &auth.acl_file) {
            (None, None) => None,
            (passwords, acl) => Some(Arc::new(
                FileAuth::load(passwords.as_deref(), acl.as_deref())
                    .context("cannot load the [auth] files")?,
            )),
        };
        let http = match auth.http() {
            Some(c) => Some(Arc::new(
                HttpAuth::new(&c).context("invalid [auth] http_* settings")?,
            )),
            None => None,
        };
        let authenticate: Option<Arc<dyn Authenticate>> = match (&http, &files) {
            (Some(h), _) if h.authenticates() => Some(h.clone()),
            (_, Some(f)) => Some(f.clone()),
            _ => None,
        };
        let by_file = files.as_ref().map(|f| f.clone() as Arc<dyn Authorize>);
        let by_http = http
            .clone()
            .filter(|h| h.authorizes())
            .map(|h| h as Arc<dyn Authorize>);
        let authorize = match (by_file, by_http) {
            (Some(a), Some(b)) => Some(Arc::new(Both(a, b)) as Arc<dyn Authorize>),
            (a, b) => a.or(b),
        };
        Ok(Configured {
            authenticate,
            authorize,
            files,
            http,
        })
    }
}

/// Allows only what both allow; the first (the file, answered from memory)
/// is asked first, so a refusal there costs no HTTP call.
struct Both(Arc<dyn Authorize>, Arc<dyn Authorize>);

#[async_trait::async_trait]
impl Authorize for Both {
    async fn authorize_publish(
        &self,
        client: &ClientInfo,
        message: &Message,
    ) -> Result<Decision, HookError> {
        match self.0.authorize_publish(client, message).await? {
            Decision::Allow => self.1.authorize_publish(client, message).await,
            Decision::Deny => Ok(Decision::Deny),
        }
    }

    async fn authorize_subscribe(
        &self,
        client: &ClientInfo,
        filter: &str,
        qos: QoS,
    ) -> Result<SubscribeDecision, HookError> {
        match self.0.authorize_subscribe(client, filter, qos).await? {
            SubscribeDecision::Allow(q) => self.1.authorize_subscribe(client, filter, q).await,
            SubscribeDecision::Deny => Ok(SubscribeDecision::Deny),
        }
    }

    fn authorize_delivery(&self, recipient: &ClientInfo, message: &Message) -> Decision {
        match self.0.authorize_delivery(recipient, message) {
            Decision::Allow => self.1.authorize_delivery(recipient, message),
            Decision::Deny => Decision::Deny,
        }
    }

    fn publish_cache(&self) -> Option<std::time::Duration> {
        match (self.0.publish_cache(), self.1.publish_cache()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        }
    }
}
