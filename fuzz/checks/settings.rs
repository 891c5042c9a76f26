//! The broker's settings: a TOML file, then flags, merged and validated by
//! the code `main.rs` runs (`broker::settings`). Checked: no panic, and a
//! configuration accepted once is accepted again from its own flags.
//!
//! Input: one selector byte, then either the TOML text or flags separated by
//! newlines.

use broker::settings::{Cli, FileConfig, Settings};
use clap::Parser;

pub fn check(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let no_flags = || Cli::parse_from(["broker"]);
    if sel & 1 == 0 {
        if let Ok(file) = FileConfig::parse(text) {
            let _ = Settings::resolve(no_flags(), file);
        }
    } else {
        let args = std::iter::once("broker").chain(text.split('\n'));
        if let Ok(cli) = Cli::try_parse_from(args) {
            if let Ok(s) = Settings::resolve(cli, FileConfig::default()) {
                // The same core settings from a file must be accepted too.
                let again = FileConfig {
                    broker: s.broker.clone(),
                    ..FileConfig::default()
                };
                assert!(Settings::resolve(no_flags(), again).is_ok(), "{s:?}");
            }
        }
    }
}
