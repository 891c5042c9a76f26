//! One POST of JSON to the web service, bounded in time, size and number.
//!
//! # Contract
//! - [`Poster::post`] gives up after the configured timeout (waiting for a
//!   free slot included) and never reads more than [`MAX_ANSWER_BYTES`] of
//!   an answer.
//! - At most `max_in_flight` requests are outstanding at once; others wait
//!   for a slot within their timeout.
//! - Failures are typed by what the caller can do: [`CallError::Timeout`]
//!   and [`CallError::Transport`] may be retried, [`CallError::Status`] says
//!   what the service answered, [`CallError::Answer`] that it answered
//!   nonsense.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use tokio::sync::Semaphore;

/// The largest answer read from the service; a decision is a few bytes.
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why a call gave no answer to act on.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be sent or its answer not read.
    #[error("request failed")]
    Transport(#[source] reqwest::Error),
    /// The service answered with a status this call does not accept.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The answer was not what the protocol says.
    #[error("bad answer: {0}")]
    Answer(String),
}

impl CallError {
    /// Whether sending again later may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            CallError::Timeout(_) | CallError::Transport(_) => true,
            CallError::Status(s) => *s == 429 || *s >= 500,
            CallError::Answer(_) => false,
        }
    }
}

/// What the service answered: its status and (bounded) body.
pub(crate) struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A URL that does not parse or is not http(s).
    #[error("`{key}` = {url:?} is not an http:// or https:// URL")]
    Url {
        /// The setting.
        key: &'static str,
        /// Its value.
        url: String,
    },
    /// A header that HTTP does not allow.
    #[error("header {0:?} is not a valid HTTP header")]
    Header(String),
    /// An event name that does not exist.
    #[error("unknown event {0:?} in `events` (known: {known})", known = crate::webhook::EVENT_NAMES.join(", "))]
    Event(String),
    /// A zero where a positive number is needed.
    #[error("`{0}` must be at least 1")]
    Zero(&'static str),
    /// The HTTP client could not be built (TLS roots, ...).
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

pub(crate) fn check_url(key: &'static str, url: &str) -> Result<reqwest::Url, ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(u),
        _ => Err(ConfigError::Url {
            key,
            url: url.to_owned(),
        }),
    }
}

#[derive(Clone)]
pub(crate) struct Poster {
    client: reqwest::Client,
    timeout: Duration,
    slots: Arc<Semaphore>,
}

impl Poster {
    pub(crate) fn new(
        timeout: Duration,
        max_in_flight: usize,
        headers: &[(String, String)],
    ) -> Result<Poster, ConfigError> {
        if max_in_flight == 0 {
            return Err(ConfigError::Zero("max_in_flight"));
        }
        let mut map = HeaderMap::new();
        map.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in headers {
            let bad = || ConfigError::Header(name.clone());
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let mut v = HeaderValue::from_str(value).map_err(|_| bad())?;
            v.set_sensitive(true);
            map.insert(n, v);
        }
        let client = reqwest::Client::builder()
            .default_headers(map)
            .timeout(timeout)
            .pool_max_idle_per_host(max_in_flight)
            // The service is configured, not discovered: never follow it elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(ConfigError::Client)?;
        Ok(Poster {
            client,
            timeout,
            slots: Arc::new(Semaphore::new(max_in_flight)),
        })
    }

    /// POST `body` (JSON) to `url`; the whole call, waiting for a slot
    /// included, is bounded by the timeout.
    pub(crate) async fn post(&self, url: &reqwest::Url, body: Vec<u8>) -> Result<Reply, CallError> {
        let call = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| CallError::Answer("client closed".to_owned()))?;
            let mut response = self
                .client
                .post(url.clone())
                .body(body)
                .send()
                .await
                .map_err(CallError::Transport)?;
            let status = response.status().as_u16();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(CallError::Transport)? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(CallError::Answer(format!(
                        "answer longer than {MAX_ANSWER_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Reply { status, body })
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Err(CallError::Transport(e))) if e.is_timeout() => {
                Err(CallError::Timeout(self.timeout))
            }
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(self.timeout)),
        }
    }
}
