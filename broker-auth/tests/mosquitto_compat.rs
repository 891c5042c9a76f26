//! A password file made by Debian's `mosquitto_passwd` is read as it is.

use std::process::Command;

use broker_auth::password::{PasswordFile, Verdict};

/// `mosquitto_passwd`, installed from Debian's packages when missing and
/// this runs as root; otherwise a failure that says how to install it.
fn mosquitto_passwd() -> &'static str {
    let found = || {
        Command::new("sh")
            .args(["-c", "command -v mosquitto_passwd"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !found() {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0"));
        assert!(
            root,
            "mosquitto_passwd is missing: install it with `apt-get install mosquitto`"
        );
        let ok = Command::new("sh")
            .args(["-c", "apt-get install -y -q mosquitto >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q mosquitto >/dev/null)"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok && found(),
            "cannot install mosquitto (apt-get install mosquitto)"
        );
    }
    "mosquitto_passwd"
}

#[test]
fn a_file_from_mosquitto_passwd_is_accepted() {
    let bin = mosquitto_passwd();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("passwd");
    for (i, (user, password)) in [("alice", "s3cret"), ("bob", "pässwörd with spaces")]
        .iter()
        .enumerate()
    {
        let mut cmd = Command::new(bin);
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        let status = cmd
            .arg(&path)
            .arg(user)
            .arg(password)
            .status()
            .expect("mosquitto_passwd runs");
        assert!(status.success(), "mosquitto_passwd failed");
    }
    let text = std::fs::read_to_string(&path).expect("file");
    assert!(text.contains("alice:$7$"), "Mosquitto 2 writes $7$: {text}");
    let file = PasswordFile::load(&path).expect("read as it is");
    assert_eq!(file.verify("alice", b"s3cret"), Verdict::Ok);
    assert_eq!(file.verify("alice", b"s3cret "), Verdict::Wrong);
    assert_eq!(
        file.verify("bob", "pässwörd with spaces".as_bytes()),
        Verdict::Ok
    );
    assert_eq!(file.verify("carol", b"x"), Verdict::UnknownUser);
}
