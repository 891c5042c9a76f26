//! Compatibility with Debian's Mosquitto both ways: a password file made by
//! `mosquitto_passwd` is read as it is, and Mosquitto accepts the `$7$`
//! lines we write (checked by connecting to a real `mosquitto`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker_auth::password::{PasswordFile, Scheme, Verdict};

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
        assert!(
            is_root(),
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

/// A running `mosquitto`, killed when dropped.
struct Mosquitto(std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start Debian's `mosquitto` on a free loopback port with `password_file`;
/// waits (at most 10 s) until it accepts connections.
fn start_mosquitto(dir: &Path, password_file: &Path) -> (Mosquitto, u16) {
    mosquitto_passwd(); // the same package
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let conf = dir.join("mosquitto.conf");
    // `user root` keeps it from dropping to the `mosquitto` user, who could
    // not read a 0600 file of ours, when the tests run as root.
    let user = if is_root() { "user root\n" } else { "" };
    std::fs::write(
        &conf,
        format!(
            "{user}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\nlog_dest stderr\n",
            password_file.display()
        ),
    )
    .expect("config");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto starts");
    let mut server = Mosquitto(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, port);
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("mosquitto exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Connect with MQTT 3.1.1 and return the CONNACK return code.
fn connack_code(port: u16, user: &str, password: &[u8]) -> u8 {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
        out.extend_from_slice(s);
    }
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.extend_from_slice(&[4, 0b1100_0010, 0, 30]); // 3.1.1, user+password+clean, keep alive 30 s
    string(&mut body, b"compat-test");
    string(&mut body, user.as_bytes());
    string(&mut body, password);
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&packet).expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack[..2], [0x20, 2], "a CONNACK");
    connack[3]
}

#[test]
fn mosquitto_accepts_a_file_we_write() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("passwd");
    let mut file = PasswordFile::default();
    file.set("alice", b"s3cret", Scheme::Pbkdf2Sha512)
        .expect("set");
    file.set(
        "bob",
        "pässwörd with spaces".as_bytes(),
        Scheme::Pbkdf2Sha512,
    )
    .expect("set");
    file.save(&path).expect("save");
    let (_server, port) = start_mosquitto(dir.path(), &path);
    assert_eq!(connack_code(port, "alice", b"s3cret"), 0, "accepted");
    assert_eq!(
        connack_code(port, "bob", "pässwörd with spaces".as_bytes()),
        0
    );
    assert_ne!(connack_code(port, "alice", b"s3cret!"), 0, "wrong password");
    assert_ne!(connack_code(port, "carol", b"s3cret"), 0, "unknown user");
}
