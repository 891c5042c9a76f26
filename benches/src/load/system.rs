//! The operating system: the tool's open-files limit, and the broker's memory.

use anyhow::{bail, Context, Result};

/// Raise the soft RLIMIT_NOFILE to the hard limit, and fail when even that is
/// below `needed`. Returns the new soft limit.
pub fn raise_open_files(needed: u64) -> Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE
        .get()
        .context("reading the open-files limit")?;
    if soft < hard {
        rlimit::Resource::NOFILE
            .set(hard, hard)
            .context("raising the open-files limit")?;
    }
    if hard < needed {
        bail!(
            "the open-files limit is {hard} (hard), but {needed} are needed for this many connections; \
             raise it (ulimit -Hn, or LimitNOFILE= for a service) or ask for fewer connections"
        );
    }
    Ok(hard)
}

/// Resident set size of process `pid` in kB, from `/proc/PID/status` (VmRSS).
pub fn rss_kb(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  12345 kB\nVmData: 1 kB\n"),
            Some(12345)
        );
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(rss_kb(std::process::id()).expect("own RSS") > 0);
    }
}
