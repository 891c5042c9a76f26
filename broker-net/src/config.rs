//! A listener's settings: one `[[listener]]` table of the binary's config.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// MQTT over TCP.
    #[default]
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Protocol {
    /// Whether it runs over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Protocol::Mqtts | Protocol::Wss)
    }

    /// Whether it runs over WebSocket.
    pub fn is_websocket(self) -> bool {
        matches!(self, Protocol::Ws | Protocol::Wss)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Mqtts => "mqtts",
            Protocol::Ws => "ws",
            Protocol::Wss => "wss",
        })
    }
}

/// The WebSocket path when none is set.
pub const DEFAULT_PATH: &str = "/mqtt";

/// One listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `HOST:PORT` to bind (port 0 picks a free one).
    pub bind: String,
    /// What it speaks (default `mqtt`).
    #[serde(default)]
    pub protocol: Protocol,
    /// PEM certificate chain, server certificate first (`mqtts`, `wss`).
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `client_ca`.
    #[serde(default)]
    pub require_certificate: bool,
    /// The client certificate's Common Name is the client's username
    /// (and stands for its password), as in Mosquitto.
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// The WebSocket path (`ws`, `wss`; default `/mqtt`).
    pub path: Option<String>,
    /// Connections open at once on this listener (the broker's own
    /// `max_connections` still applies across listeners).
    pub max_connections: Option<usize>,
    /// Admit clients no authentication vouches for. Default: true on a
    /// loopback address when no authentication is configured, else false
    /// (decided by the binary, which knows the authentication settings).
    pub allow_anonymous: Option<bool>,
}

impl ListenerConfig {
    /// A listener on `bind` speaking `protocol`, everything else default.
    pub fn new(bind: impl Into<String>, protocol: Protocol) -> ListenerConfig {
        ListenerConfig {
            bind: bind.into(),
            protocol,
            cert: None,
            key: None,
            client_ca: None,
            require_certificate: false,
            use_identity_as_username: false,
            path: None,
            max_connections: None,
            allow_anonymous: None,
        }
    }

    /// The WebSocket path.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_PATH)
    }

    /// Check that the settings fit together; the error says which does not.
    pub fn validate(&self) -> Result<(), String> {
        let what = format!("listener {} ({})", self.bind, self.protocol);
        if self.protocol.is_tls() {
            if self.cert.is_none() || self.key.is_none() {
                return Err(format!(
                    "{what}: `cert` and `key` are required for {}",
                    self.protocol
                ));
            }
        } else {
            for (set, key) in [
                (self.cert.is_some(), "cert"),
                (self.key.is_some(), "key"),
                (self.client_ca.is_some(), "client_ca"),
                (self.require_certificate, "require_certificate"),
                (self.use_identity_as_username, "use_identity_as_username"),
            ] {
                if set {
                    return Err(format!("{what}: `{key}` needs protocol mqtts or wss"));
                }
            }
        }
        if self.require_certificate && self.client_ca.is_none() {
            return Err(format!("{what}: `require_certificate` needs `client_ca`"));
        }
        if self.use_identity_as_username && !self.require_certificate {
            return Err(format!(
                "{what}: `use_identity_as_username` needs `require_certificate = true`"
            ));
        }
        if let Some(path) = &self.path {
            if !self.protocol.is_websocket() {
                return Err(format!("{what}: `path` needs protocol ws or wss"));
            }
            if !path.starts_with('/') {
                return Err(format!("{what}: `path` must start with `/`"));
            }
        }
        if self.max_connections == Some(0) {
            return Err(format!("{what}: `max_connections` must be at least 1"));
        }
        Ok(())
    }
}

/// Whether `bind` (`HOST:PORT`) is a loopback address (127.0.0.0/8, ::1,
/// `localhost`): only there are anonymous clients admitted by default.
pub fn is_loopback(bind: &str) -> bool {
    if let Ok(addr) = bind.parse::<SocketAddr>() {
        return addr.ip().is_loopback();
    }
    match bind.rsplit_once(':') {
        Some((host, _)) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback() {
        assert!(is_loopback("127.0.0.1:1883"));
        assert!(is_loopback("127.1.2.3:0"));
        assert!(is_loopback("[::1]:1883"));
        assert!(is_loopback("localhost:1883"));
        assert!(!is_loopback("0.0.0.0:1883"));
        assert!(!is_loopback("[::]:1883"));
        assert!(!is_loopback("192.168.1.2:1883"));
        assert!(!is_loopback("example.com:1883"));
    }

    #[test]
    fn settings_that_do_not_fit_are_refused() {
        let mut c = ListenerConfig::new("127.0.0.1:8883", Protocol::Mqtts);
        assert!(c.validate().unwrap_err().contains("`cert` and `key`"));
        c.cert = Some("c.pem".into());
        c.key = Some("k.pem".into());
        c.validate().unwrap();
        c.use_identity_as_username = true;
        assert!(c.validate().unwrap_err().contains("require_certificate"));
        c.require_certificate = true;
        assert!(c.validate().unwrap_err().contains("client_ca"));
        c.client_ca = Some("ca.pem".into());
        c.validate().unwrap();
        c.path = Some("/mqtt".into());
        assert!(c.validate().unwrap_err().contains("ws or wss"));

        let mut w = ListenerConfig::new("127.0.0.1:8080", Protocol::Ws);
        w.path = Some("mqtt".into());
        assert!(w.validate().unwrap_err().contains("start with"));
        w.cert = Some("c.pem".into());
        assert!(w.validate().unwrap_err().contains("mqtts or wss"));
    }
}
