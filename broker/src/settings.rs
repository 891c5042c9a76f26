//! Settings: command-line flags win over the TOML file, which wins over defaults.

use std::path::PathBuf;

use anyhow::{bail, Context};
use broker_core::config::{BrokerConfig, OverflowPolicy, SysConfig};
use clap::Parser;
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
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Storage URL.
    pub storage: String,
    /// Core settings.
    pub broker: BrokerConfig,
    /// `$SYS` topics.
    pub sys: SysConfig,
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
            file.listen
                .unwrap_or_else(|| vec![DEFAULT_LISTEN.to_string()])
        };
        if listen.is_empty() {
            bail!("no listen address configured");
        }
        Ok(Settings {
            listen,
            storage: cli
                .storage
                .or(file.storage)
                .unwrap_or_else(|| DEFAULT_STORAGE.to_string()),
            broker,
            sys: file.sys,
        })
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
        assert_eq!(s.listen, vec!["127.0.0.1:1999"]);
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
}
