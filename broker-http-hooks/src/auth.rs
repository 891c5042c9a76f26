//! Authentication and authorization answered by a web service.
//!
//! # Contract
//! - Each configured URL gets a POST of JSON (see the crate documentation
//!   for the fields) and its answer decides: `200` with
//!   `{"result": "allow"}` or `{"result": "deny"}`, `204` allows, `401` and
//!   `403` deny. Anything else, or no answer within the timeout, is a
//!   [`HookError`]: the broker then refuses (fails closed).
//! - Decisions (allow and deny, never failures) are cached for the TTL, per
//!   client id, user, and what was asked; passwords are keyed by a salted
//!   digest, never kept.
//! - In-process clients of the application are not asked about.
//! - Deliveries are not asked about: that hook runs on the hot path and must
//!   answer from memory (combine with an ACL file for per-delivery rules).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use broker_core::hooks::{
    Authenticate, Authorize, ClientInfo, ConnectInfo, Decision, HookError, Login, ProtocolVersion,
    SubscribeDecision,
};
use broker_core::message::{Message, QoS};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::TtlCache;
use crate::client::{check_url, CallError, ConfigError, Poster, Reply};

/// Settings of [`HttpAuth`]: the binary's `[auth] http_*` keys.
#[derive(Debug, Clone)]
pub struct HttpAuthConfig {
    /// Where CONNECTs are decided (`http_authenticate`).
    pub authenticate: Option<String>,
    /// Where PUBLISHes (and wills) are decided (`http_authorize_publish`).
    pub authorize_publish: Option<String>,
    /// Where SUBSCRIBEs are decided, filter by filter (`http_authorize_subscribe`).
    pub authorize_subscribe: Option<String>,
    /// How long one call may take, waiting for a free slot included
    /// (`http_timeout_ms`, default 2 s; keep it below `hook_timeout_ms`).
    pub timeout: Duration,
    /// How long a decision is remembered (`http_cache_ttl_secs`, default
    /// 60 s; zero asks every time).
    pub cache_ttl: Duration,
    /// The bound of each of the three caches, in bytes of keys
    /// (`http_cache_max_bytes`, default 16 MiB).
    pub cache_max_bytes: usize,
    /// Calls outstanding at once (`http_max_in_flight`, default 64).
    pub max_in_flight: usize,
    /// Headers sent with every call, e.g. `Authorization` (`http_headers`).
    pub headers: Vec<(String, String)>,
}

impl Default for HttpAuthConfig {
    fn default() -> Self {
        HttpAuthConfig {
            authenticate: None,
            authorize_publish: None,
            authorize_subscribe: None,
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(60),
            cache_max_bytes: 16 << 20,
            max_in_flight: 64,
            headers: Vec::new(),
        }
    }
}

/// Counters of an [`HttpAuth`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpAuthStats {
    /// Calls made to the service.
    pub requests: u64,
    /// Calls that gave no decision (timeout, error, bad answer): refused.
    pub failures: u64,
    /// Decisions answered from the cache.
    pub cache_hits: u64,
    /// Decisions the cache did not have.
    pub cache_misses: u64,
    /// Decisions forgotten early because a cache was full.
    pub cache_evictions: u64,
}

/// The hooks of [`HttpAuthConfig`]: [`Authenticate`] when `authenticate`
/// is set (else everyone may connect, as far as this hook is concerned)
/// and [`Authorize`] for publishes and subscriptions whose URL is set.
pub struct HttpAuth {
    poster: Poster,
    authenticate: Option<reqwest::Url>,
    publish: Option<reqwest::Url>,
    subscribe: Option<reqwest::Url>,
    salt: [u8; 32],
    logins: TtlCache<String, Login>,
    publishes: TtlCache<String, Decision>,
    subscriptions: TtlCache<String, SubscribeDecision>,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl HttpAuth {
    /// Check the settings and build the HTTP client.
    pub fn new(config: &HttpAuthConfig) -> Result<HttpAuth, ConfigError> {
        let url = |key, u: &Option<String>| u.as_deref().map(|u| check_url(key, u)).transpose();
        if config.cache_max_bytes == 0 {
            return Err(ConfigError::Zero("http_cache_max_bytes"));
        }
        Ok(HttpAuth {
            poster: Poster::new(config.timeout, config.max_in_flight, &config.headers)?,
            authenticate: url("http_authenticate", &config.authenticate)?,
            publish: url("http_authorize_publish", &config.authorize_publish)?,
            subscribe: url("http_authorize_subscribe", &config.authorize_subscribe)?,
            salt: rand::random(),
            logins: TtlCache::new("authentication", config.cache_ttl, config.cache_max_bytes),
            publishes: TtlCache::new(
                "publish authorization",
                config.cache_ttl,
                config.cache_max_bytes,
            ),
            subscriptions: TtlCache::new(
                "subscribe authorization",
                config.cache_ttl,
                config.cache_max_bytes,
            ),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// Whether CONNECTs are decided by the service.
    pub fn authenticates(&self) -> bool {
        self.authenticate.is_some()
    }

    /// Whether publishes or subscriptions are decided by the service.
    pub fn authorizes(&self) -> bool {
        self.publish.is_some() || self.subscribe.is_some()
    }

    /// The counters so far.
    pub fn stats(&self) -> HttpAuthStats {
        let caches = [
            (
                self.logins.hits(),
                self.logins.misses(),
                self.logins.evictions(),
            ),
            (
                self.publishes.hits(),
                self.publishes.misses(),
                self.publishes.evictions(),
            ),
            (
                self.subscriptions.hits(),
                self.subscriptions.misses(),
                self.subscriptions.evictions(),
            ),
        ];
        HttpAuthStats {
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            cache_hits: caches.iter().map(|c| c.0).sum(),
            cache_misses: caches.iter().map(|c| c.1).sum(),
            cache_evictions: caches.iter().map(|c| c.2).sum(),
        }
    }

    /// POST and read the decision; a failure is counted and described.
    async fn ask(
        &self,
        what: &str,
        url: &reqwest::Url,
        body: &impl Serialize,
    ) -> Result<Answer, HookError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let fail = |e: CallError| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            HookError::new(format!("HTTP {what} at {url}: {e}")).with_source(e)
        };
        let body = serde_json::to_vec(body)
            .map_err(|e| fail(CallError::Answer(format!("cannot encode the request: {e}"))))?;
        let reply = self.poster.post(url, body).await.map_err(fail)?;
        decide(reply).map_err(fail)
    }

    fn password_digest(&self, password: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(password);
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(h.finalize())
    }
}

/// What the service decided.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    allow: bool,
    identity: Option<String>,
    qos: Option<u8>,
}

#[derive(Deserialize)]
struct AnswerBody {
    result: String,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    qos: Option<u8>,
}

fn decide(reply: Reply) -> Result<Answer, CallError> {
    let deny = Answer {
        allow: false,
        identity: None,
        qos: None,
    };
    match reply.status {
        200 => {
            let body: AnswerBody = serde_json::from_slice(&reply.body).map_err(|e| {
                CallError::Answer(format!(
                    "expected {{\"result\": \"allow\" | \"deny\"}}: {e}"
                ))
            })?;
            let allow = match body.result.as_str() {
                "allow" => true,
                "deny" => false,
                other => {
                    return Err(CallError::Answer(format!(
                        "result {other:?}: expected \"allow\" or \"deny\""
                    )))
                }
            };
            if body.qos.is_some_and(|q| q > 2) {
                return Err(CallError::Answer("qos must be 0, 1 or 2".to_owned()));
            }
            Ok(Answer {
                allow,
                identity: body.identity,
                qos: body.qos,
            })
        }
        204 => Ok(Answer {
            allow: true,
            ..deny
        }),
        401 | 403 => Ok(deny),
        other => Err(CallError::Status(other)),
    }
}

/// A cache key of several fields; each is length-prefixed, so no field's
/// content can make two different requests share a key.
fn key(fields: &[&str]) -> String {
    let mut k = String::with_capacity(fields.iter().map(|f| f.len() + 6).sum());
    for f in fields {
        k.push_str(&f.len().to_string());
        k.push(':');
        k.push_str(f);
    }
    k
}

fn protocol(p: ProtocolVersion) -> &'static str {
    match p {
        ProtocolVersion::V3 => "mqtt3",
        ProtocolVersion::V5 => "mqtt5",
        ProtocolVersion::Internal => "internal",
    }
}

#[derive(Serialize)]
struct AuthenticateRequest<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    password: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_base64: Option<String>,
    peer: Option<String>,
    listener: &'a str,
    protocol: &'static str,
    certificate: bool,
    allow_anonymous: bool,
}

#[derive(Serialize)]
struct ClientFields<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    identity: Option<&'a str>,
    peer: Option<String>,
    listener: &'a str,
    protocol: &'static str,
}

impl<'a> ClientFields<'a> {
    fn of(c: &'a ClientInfo) -> Self {
        ClientFields {
            client_id: &c.client_id,
            username: c.username.as_deref(),
            identity: c.identity.as_deref(),
            peer: c.peer.map(|p| p.to_string()),
            listener: &c.listener,
            protocol: protocol(c.protocol),
        }
    }
}

#[derive(Serialize)]
struct PublishRequest<'a> {
    #[serde(flatten)]
    client: ClientFields<'a>,
    topic: &'a str,
    qos: u8,
    retain: bool,
}

#[derive(Serialize)]
struct SubscribeRequest<'a> {
    #[serde(flatten)]
    client: ClientFields<'a>,
    filter: &'a str,
    qos: u8,
}

#[async_trait::async_trait]
impl Authenticate for HttpAuth {
    async fn authenticate(&self, c: &ConnectInfo) -> Result<Login, HookError> {
        let Some(url) = &self.authenticate else {
            return Ok(Login::allow());
        };
        if c.protocol == ProtocolVersion::Internal {
            return Ok(Login::allow());
        }
        let password = c.password.as_deref();
        let digest = password
            .map(|p| self.password_digest(p))
            .unwrap_or_default();
        let peer_ip = c.peer.map(|p| p.ip().to_string()).unwrap_or_default();
        let k = key(&[
            &c.client_id,
            c.username.as_deref().unwrap_or("\u{0}none"),
            if password.is_some() {
                &digest
            } else {
                "\u{0}none"
            },
            &c.listener,
            &peer_ip,
            if c.username_from_certificate {
                "cert"
            } else {
                ""
            },
            if c.allow_anonymous { "anon" } else { "" },
        ]);
        if let Some(login) = self.logins.get(&k) {
            return Ok(login);
        }
        let utf8 = password.and_then(|p| std::str::from_utf8(p).ok());
        let request = AuthenticateRequest {
            client_id: &c.client_id,
            username: c.username.as_deref(),
            password: utf8,
            password_base64: match (password, utf8) {
                (Some(p), None) => Some(base64::engine::general_purpose::STANDARD.encode(p)),
                _ => None,
            },
            peer: c.peer.map(|p| p.to_string()),
            listener: &c.listener,
            protocol: protocol(c.protocol),
            certificate: c.username_from_certificate,
            allow_anonymous: c.allow_anonymous,
        };
        let answer = self.ask("authenticate", url, &request).await?;
        let login = if answer.allow {
            Login::Allow {
                identity: answer.identity,
            }
        } else {
            Login::BadCredentials
        };
        self.logins.insert(k, login.clone());
        Ok(login)
    }
}

#[async_trait::async_trait]
impl Authorize for HttpAuth {
    async fn authorize_publish(
        &self,
        client: &ClientInfo,
        message: &Message,
    ) -> Result<Decision, HookError> {
        let Some(url) = &self.publish else {
            return Ok(Decision::Allow);
        };
        if client.is_internal() {
            return Ok(Decision::Allow);
        }
        let qos = message.qos as u8;
        let k = key(&[
            &client.client_id,
            client.identity.as_deref().unwrap_or("\u{0}none"),
            client.username.as_deref().unwrap_or("\u{0}none"),
            &message.topic,
            &qos.to_string(),
            if message.retain { "r" } else { "" },
        ]);
        if let Some(d) = self.publishes.get(&k) {
            return Ok(d);
        }
        let request = PublishRequest {
            client: ClientFields::of(client),
            topic: &message.topic,
            qos,
            retain: message.retain,
        };
        let answer = self.ask("authorize publish", url, &request).await?;
        let d = if answer.allow {
            Decision::Allow
        } else {
            Decision::Deny
        };
        self.publishes.insert(k, d);
        Ok(d)
    }

    async fn authorize_subscribe(
        &self,
        client: &ClientInfo,
        filter: &str,
        qos: QoS,
    ) -> Result<SubscribeDecision, HookError> {
        let Some(url) = &self.subscribe else {
            return Ok(SubscribeDecision::Allow(qos));
        };
        if client.is_internal() {
            return Ok(SubscribeDecision::Allow(qos));
        }
        let asked = qos as u8;
        let k = key(&[
            &client.client_id,
            client.identity.as_deref().unwrap_or("\u{0}none"),
            client.username.as_deref().unwrap_or("\u{0}none"),
            filter,
            &asked.to_string(),
        ]);
        if let Some(d) = self.subscriptions.get(&k) {
            return Ok(d);
        }
        let request = SubscribeRequest {
            client: ClientFields::of(client),
            filter,
            qos: asked,
        };
        let answer = self.ask("authorize subscribe", url, &request).await?;
        let d = if answer.allow {
            // `decide` refused a qos above 2, so from_u8 always answers.
            let granted = answer.qos.map_or(asked, |q| q.min(asked));
            SubscribeDecision::Allow(QoS::from_u8(granted).unwrap_or(qos))
        } else {
            SubscribeDecision::Deny
        };
        self.subscriptions.insert(k, d);
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_answer_decides() {
        let allow = decide(reply(200, r#"{"result":"allow","identity":"alice"}"#)).unwrap();
        assert!(allow.allow);
        assert_eq!(allow.identity.as_deref(), Some("alice"));
        assert!(!decide(reply(200, r#"{"result":"deny"}"#)).unwrap().allow);
        assert!(decide(reply(204, "")).unwrap().allow);
        assert!(!decide(reply(401, "")).unwrap().allow);
        assert!(!decide(reply(403, "nope")).unwrap().allow);
        assert_eq!(
            decide(reply(200, r#"{"result":"allow","qos":1}"#))
                .unwrap()
                .qos,
            Some(1)
        );
    }

    #[test]
    fn anything_else_is_a_failure() {
        for (status, body) in [
            (200, ""),
            (200, "allow"),
            (200, r#"{"result":"maybe"}"#),
            (200, r#"{"result":"allow","qos":3}"#),
            (500, ""),
            (404, ""),
            (302, ""),
        ] {
            assert!(decide(reply(status, body)).is_err(), "{status} {body:?}");
        }
    }

    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(key(&["a:b", "c"]), key(&["a", "b:c"]));
        assert_ne!(key(&["1:a", ""]), key(&["", "1:a"]));
        assert_eq!(key(&["ab", "c"]), "2:ab1:c");
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = HttpAuthConfig {
            authenticate: Some("ftp://x/".into()),
            ..HttpAuthConfig::default()
        };
        assert!(matches!(
            HttpAuth::new(&bad),
            Err(ConfigError::Url {
                key: "http_authenticate",
                ..
            })
        ));
        let bad = HttpAuthConfig {
            headers: vec![("Bad Header".into(), "x".into())],
            ..HttpAuthConfig::default()
        };
        assert!(matches!(HttpAuth::new(&bad), Err(ConfigError::Header(_))));
    }
}
