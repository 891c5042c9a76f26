//! The binary's settings and storage URLs as a library: `main.rs` runs them,
//! and the fuzz targets (`fuzz/`) parse with exactly the same code.

pub mod check;
#[cfg(feature = "redis")]
pub mod cluster;
pub mod hooks;
pub mod http;
pub mod inspect;
pub mod memory;
pub mod migrate;
pub mod passwd;
pub mod serve;
pub mod settings;
pub mod storage_url;
