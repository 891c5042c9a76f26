//! Settings: command-line flags win over the TOML file, which wins over defaults.

use std::path::PathBuf;

use anyhow::{bail, Context};
use broker_core::config::{BrokerConfig, OverflowPolicy, SysConfig};
use broker_net::{is_loopback, ListenerConfig, Protocol};
use clap::{Parser, Subcommand};
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";
/// Default storage URL: the embedded SQLite file when built in.
#[cfg(feature = "sqlite")]
pub const DEFAULT_STORAGE: &str = "sqlite://data/broker.db";
/// Default storage URL: the embedded SQLite file when built in.
#[cfg(not(feature = "sqlite"))]
pub const DEFAULT_STORAGE: &str = "memory://";

/// An MQTT broker with pluggable storage.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Something else than serving.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file (same settings as the flags; flags win).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address to listen on for MQTT over TCP; repeat for several.
    #[arg(long)]
    pub listen: Vec<String>,
    /// Storage URL: sqlite://PATH (default sqlite://data/broker.db), memory://.
    #[arg(long)]
    pub storage: Option<String>,
    /// Unacknowledged QoS 1/2 deliveries per session.
    #[arg(long)]
    pub max_inflight: Option<usize>,
    /// Messages a session may hold queued.
    #[arg(long)]
    pub max_queued_messages: Option<usize>,
    /// What to do when a session queue is full: drop-new or drop-oldest.
    #[arg(long)]
    pub overflow_policy: Option<OverflowPolicy>,
    /// Queue QoS 0 messages for offline persistent sessions.
    #[arg(long)]
    pub queue_qos0_offline: Option<bool>,
    /// Seconds a persistent session outlives its connection (default: forever).
    #[arg(long)]
    pub session_expiry_secs: Option<u64>,
    /// Largest packet accepted, in bytes.
    #[arg(long)]
    pub max_packet_size: Option<u32>,
    /// Seconds a new connection has to send CONNECT.
    #[arg(long)]
    pub connect_timeout_secs: Option<u64>,
}

/// The subcommands; without one the broker serves.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, update or delete a user of a password file (Mosquitto's format).
    Passwd {
        /// The password file (created if missing).
        file: PathBuf,
        /// The user name.
        user: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// Delete the user.
        #[arg(long, short = 'D')]
        delete: bool,
        /// Store an argon2id hash instead of Mosquitto's PBKDF2-SHA512 (`$7$`).
        #[arg(long)]
        argon2: bool,
    },
}

/// The `[auth]` table.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// A password file in Mosquitto's format (or made by `broker passwd`).
    pub password_file: Option<PathBuf>,
    /// An ACL file in Mosquitto's syntax.
    pub acl_file: Option<PathBuf>,
}

impl AuthSettings {
    /// Whether anything verifies who a client is.
    pub fn authenticates(&self) -> bool {
        self.password_file.is_some()
    }
}

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Listen addresses.
    pub listen: Option<Vec<String>>,
    /// Storage URL.
    pub storage: Option<String>,
    /// Core settings (`[broker]` table).
    pub broker: BrokerConfig,
    /// `$SYS` topics (`[sys]` table).
    pub sys: SysConfig,
    /// Listeners (`[[listener]]` tables), beside the plain `listen` addresses.
    pub listener: Vec<ListenerConfig>,
    /// Authentication and authorization (`[auth]` table).
    pub auth: AuthSettings,
}

impl FileConfig {
    /// The settings of a TOML file's text.
    pub fn parse(text: &str) -> anyhow::Result<FileConfig> {
        Ok(toml::from_str(text)?)
    }
}

/// Everything the binary runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every listener: the `--listen` (or `listen`) addresses as plain
    /// `mqtt` ones first, then the `[[listener]]` tables; `allow_anonymous`
    /// is always set (the safe default resolved).
    pub listeners: Vec<ListenerConfig>,
    /// Storage URL.
    pub storage: String,
    /// Core settings.
    pub broker: BrokerConfig,
    /// `$SYS` topics.
    pub sys: SysConfig,
    /// Authentication and authorization files.
    pub auth: AuthSettings,
}

impl Settings {
    /// Merge defaults, the file named by `--config`, and the flags.
    pub fn load(cli: Cli) -> anyhow::Result<Settings> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                FileConfig::parse(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        Settings::resolve(cli, file)
    }

    /// Merge `file` (already read) and the flags over the defaults, and check the result.
    pub fn resolve(cli: Cli, file: FileConfig) -> anyhow::Result<Settings> {
        let mut broker = file.broker;
        if let Some(v) = cli.max_inflight {
            broker.max_inflight = v;
        }
        if let Some(v) = cli.max_queued_messages {
            broker.max_queued_messages = v;
        }
        if let Some(v) = cli.overflow_policy {
            broker.overflow_policy = v;
        }
        if let Some(v) = cli.queue_qos0_offline {
            broker.queue_qos0_offline = v;
        }
        if let Some(v) = cli.session_expiry_secs {
            broker.session_expiry_secs = Some(v);
        }
        if let Some(v) = cli.max_packet_size {
            broker.max_packet_size = v;
        }
        if let Some(v) = cli.connect_timeout_secs {
            broker.connect_timeout_secs = v;
        }
        if let Err(e) = broker.validate() {
            bail!("{e}");
        }
        let listen = if !cli.listen.is_empty() {
            cli.listen
        } else {
            file.listen.unwrap_or_else(|| {
                if file.listener.is_empty() {
                    vec![DEFAULT_LISTEN.to_string()]
                } else {
                    Vec::new()
                }
            })
        };
        let mut listeners: Vec<ListenerConfig> = listen
            .into_iter()
            .map(|bind| ListenerConfig::new(bind, Protocol::Mqtt))
            .chain(file.listener)
            .collect();
        if listeners.is_empty() {
            bail!("no listen address configured");
        }
        for l in &mut listeners {
            if let Err(e) = l.validate() {
                bail!("{e}");
            }
            l.allow_anonymous = Some(allow_anonymous(l, &file.auth)?);
        }
        Ok(Settings {
            listeners,
            storage: cli
                .storage
                .or(file.storage)
                .unwrap_or_else(|| DEFAULT_STORAGE.to_string()),
            broker,
            sys: file.sys,
            auth: file.auth,
        })
    }
}

/// The safe default, as Mosquitto 2.0 has it: without authentication,
/// anonymous clients only on loopback; a listener reachable from elsewhere
/// with nothing to authenticate its clients does not start unless
/// `allow_anonymous = true` says that is meant. With a password file,
/// anonymous clients are refused unless `allow_anonymous = true`.
fn allow_anonymous(l: &ListenerConfig, auth: &AuthSettings) -> anyhow::Result<bool> {
    let by_certificate = l.require_certificate && l.use_identity_as_username;
    let loopback = is_loopback(&l.bind);
    match l.allow_anonymous {
        Some(v) => Ok(v),
        None if auth.authenticates() || by_certificate => Ok(false),
        None if loopback => Ok(true),
        None => bail!(
            "listener {} ({}) is not on a loopback address and no authentication is configured: \
             set `password_file` in [auth] (see `broker passwd`), or client certificates \
             (`require_certificate` and `use_identity_as_username`), or `allow_anonymous = true` \
             in its [[listener]] table to let anyone in",
            l.bind,
            l.protocol
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file() {
        let dir = std::env::temp_dir().join(format!("broker-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.toml");
        std::fs::write(
            &path,
            "listen = [\"127.0.0.1:1999\"]\nstorage = \"memory://\"\n[broker]\nmax_inflight = 7\nmax_queued_messages = 9\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "broker",
            "--config",
            path.to_str().unwrap(),
            "--max-inflight",
            "3",
        ]);
        let s = Settings::load(cli).unwrap();
        assert_eq!(s.listeners.len(), 1);
        assert_eq!(s.listeners[0].bind, "127.0.0.1:1999");
        assert_eq!(s.broker.max_inflight, 3);
        assert_eq!(s.broker.max_queued_messages, 9);
        assert!(s.sys.enabled, "[sys] is on by default");
    }

    #[test]
    fn sys_table() {
        let f = FileConfig::parse("[sys]\nbroker_id = \"b1\"\ninterval_secs = 0\n").unwrap();
        assert_eq!(f.sys.broker_id.as_deref(), Some("b1"));
        assert_eq!(f.sys.interval_secs, 0);
        assert!(FileConfig::parse("[sys]\nintervl = 1\n").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = std::env::temp_dir().join(format!("broker-settings-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.toml");
        std::fs::write(&path, "[broker]\nmax_infligt = 7\n").unwrap();
        let cli = Cli::parse_from(["broker", "--config", path.to_str().unwrap()]);
        let err = format!("{:#}", Settings::load(cli).unwrap_err());
        assert!(err.contains("max_infligt"), "{err}");
        let cli = Cli::parse_from(["broker", "--max-inflight", "0"]);
        let err = format!("{:#}", Settings::load(cli).unwrap_err());
        assert!(err.contains("max_inflight"), "{err}");
    }

    fn resolve(text: &str, args: &[&str]) -> anyhow::Result<Settings> {
        let cli = Cli::parse_from(std::iter::once("broker").chain(args.iter().copied()));
        Settings::resolve(cli, FileConfig::parse(text)?)
    }

    #[test]
    fn listener_tables_beside_listen_flags() {
        let text = "[[listener]]\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\n\
                    [[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"mqtts\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let s = resolve(text, &["--listen", "127.0.0.1:1883"]).unwrap();
        let got: Vec<_> = s
            .listeners
            .iter()
            .map(|l| (l.bind.as_str(), l.protocol))
            .collect();
        assert_eq!(
            got,
            [
                ("127.0.0.1:1883", Protocol::Mqtt),
                ("127.0.0.1:8080", Protocol::Ws),
                ("127.0.0.1:8883", Protocol::Mqtts)
            ]
        );
        // Tables alone: no default listener added.
        assert_eq!(resolve(text, &[]).unwrap().listeners.len(), 2);
        assert!(resolve(
            "[[listener]]\nbind = \"127.0.0.1:1\"\nprotocol = \"mqtts\"\n",
            &[]
        )
        .unwrap_err()
        .to_string()
        .contains("`cert` and `key`"));
        assert!(resolve(
            "[[listener]]\nbind = \"127.0.0.1:1\"\nprotcol = \"ws\"\n",
            &[]
        )
        .is_err());
    }

    #[test]
    fn anonymous_only_on_loopback_unless_said() {
        let public = "[[listener]]\nbind = \"0.0.0.0:1883\"\n";
        let err = resolve(public, &[]).unwrap_err().to_string();
        assert!(err.contains("allow_anonymous = true"), "{err}");
        assert!(resolve("", &["--listen", "0.0.0.0:1883"]).is_err());
        let said = "[[listener]]\nbind = \"0.0.0.0:1883\"\nallow_anonymous = true\n";
        assert_eq!(
            resolve(said, &[]).unwrap().listeners[0].allow_anonymous,
            Some(true)
        );
        let with_passwords = format!("{public}[auth]\npassword_file = \"p\"\n");
        assert_eq!(
            resolve(&with_passwords, &[]).unwrap().listeners[0].allow_anonymous,
            Some(false)
        );
        let loopback = resolve("", &[]).unwrap();
        assert_eq!(loopback.listeners[0].allow_anonymous, Some(true));
        let loopback_with_passwords = resolve("[auth]\npassword_file = \"p\"\n", &[]).unwrap();
        assert_eq!(
            loopback_with_passwords.listeners[0].allow_anonymous,
            Some(false)
        );
    }
}
