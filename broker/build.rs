//! Puts the git revision the binary is built from into `broker --version`
//! (`BROKER_GIT_REVISION`; "unknown" outside a git checkout, e.g. a source
//! tarball).

use std::process::Command;

fn main() {
    let revision = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BROKER_GIT_REVISION={revision}");
    // A new commit or checkout changes HEAD (or the ref it points to).
    for path in ["../.git/HEAD", "../.git/index"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
