//! Compatibility with Debian's Mosquitto both ways: a password file made by
//! `mosquitto_passwd` is read as it is, and Mosquitto accepts the `$7$`
//! lines we write (checked by connecting to a real `mosquitto`).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker_auth::acl::{Access, AclFile};
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

/// Start Debian's `mosquitto` on a free loopback port with these
/// configuration lines; waits (at most 10 s) until it accepts connections.
fn start_mosquitto(dir: &Path, settings: &str) -> (Mosquitto, u16) {
    mosquitto_passwd(); // the same package
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let conf = dir.join("mosquitto.conf");
    // `user root` keeps it from dropping to the `mosquitto` user, who could
    // not read our 0600 files, when the tests run as root.
    let user = if is_root() { "user root\n" } else { "" };
    std::fs::write(
        &conf,
        format!("{user}listener {port} 127.0.0.1\npersistence false\n{settings}"),
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

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
    out.extend_from_slice(s);
}

/// A packet of `kind` (first byte) with a body under 128 bytes.
fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = u8::try_from(body.len()).ok().filter(|l| *l < 128);
    let mut p = vec![kind, len.expect("one-byte remaining length")];
    p.extend_from_slice(body);
    p
}

/// Read one packet: its first byte and body (bodies under 128 bytes), or
/// `None` once nothing arrives within the read timeout.
fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
        Err(e) => panic!("read: {e}"),
    }
    assert!(head[1] < 128, "short packets only");
    let mut body = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut body).expect("packet body");
    Some((head[0], body))
}

/// Connect with MQTT 3.1.1; the CONNACK return code and the connection.
fn connect(
    port: u16,
    client_id: &str,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> (u8, TcpStream) {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    let flags =
        0b10 | if user.is_some() { 0x80 } else { 0 } | if password.is_some() { 0x40 } else { 0 };
    body.extend_from_slice(&[4, flags, 0, 30]); // 3.1.1, clean session, keep alive 30 s
    string(&mut body, client_id.as_bytes());
    if let Some(u) = user {
        string(&mut body, u.as_bytes());
    }
    if let Some(p) = password {
        string(&mut body, p);
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&packet(0x10, &body)).expect("CONNECT");
    let (kind, ack) = read_packet(&mut s).expect("CONNACK");
    assert_eq!((kind, ack.len()), (0x20, 2), "a CONNACK");
    (ack[1], s)
}

fn connack_code(port: u16, user: &str, password: &[u8]) -> u8 {
    connect(port, "compat-test", Some(user), Some(password)).0
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
    let (_server, port) = start_mosquitto(
        dir.path(),
        &format!("allow_anonymous false\npassword_file {}\n", path.display()),
    );
    assert_eq!(connack_code(port, "alice", b"s3cret"), 0, "accepted");
    assert_eq!(
        connack_code(port, "bob", "pässwörd with spaces".as_bytes()),
        0
    );
    assert_ne!(connack_code(port, "alice", b"s3cret!"), 0, "wrong password");
    assert_ne!(connack_code(port, "carol", b"s3cret"), 0, "unknown user");
}

/// What Mosquitto delivers to each subscriber of `#` is what
/// [`AclFile::check`] allows it to read, for rules on which the two agree
/// (the module documentation of `acl` lists where they differ).
#[test]
fn mosquitto_delivers_what_our_acl_allows() {
    const ACL: &str = "\
# anonymous clients
topic read public/#
pattern read devices/%c/#

user alice
topic readwrite test/#
topic deny test/secret
pattern read users/%u/inbox

user admin
topic write #
";
    let dir = tempfile::tempdir().expect("dir");
    let acl_path = dir.path().join("acl");
    std::fs::write(&acl_path, ACL).expect("acl");
    let acl = AclFile::load(&acl_path).expect("our reading");
    let (_server, port) = start_mosquitto(
        dir.path(),
        &format!("allow_anonymous true\nacl_file {}\n", acl_path.display()),
    );
    let subscribers: [(&str, Option<&str>); 5] = [
        ("c1", None),
        ("c2", Some("alice")),
        ("c3", Some("bob")),
        ("+", None),
        ("#", Some("alice")),
    ];
    let topics = [
        "public/a",
        "public",
        "test/a",
        "test/secret",
        "test/secret/deeper",
        "devices/c1/x",
        "devices/c2/x",
        "devices/c1",
        "devices/+/x",
        "users/alice/inbox",
        "users/bob/inbox",
        "users/alice/inbox/x",
        "other",
    ];
    let mut connections = Vec::new();
    for (id, user) in subscribers {
        let (code, mut s) = connect(port, id, user, None);
        assert_eq!(code, 0, "{id} connects");
        let mut body = vec![0, 1];
        string(&mut body, b"#");
        body.push(0);
        s.write_all(&packet(0x82, &body)).expect("SUBSCRIBE");
        let (kind, _) = read_packet(&mut s).expect("SUBACK");
        assert_eq!(kind, 0x90);
        connections.push(s);
    }
    let (code, mut publisher) = connect(port, "pub", Some("admin"), None);
    assert_eq!(code, 0);
    for t in topics.iter().filter(|t| !t.contains('+')) {
        let mut body = Vec::new();
        string(&mut body, t.as_bytes());
        publisher.write_all(&packet(0x30, &body)).expect("PUBLISH");
    }
    for ((id, user), s) in subscribers.iter().zip(&mut connections) {
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
        let mut got = Vec::new();
        while let Some((kind, body)) = read_packet(s) {
            assert_eq!(kind & 0xf0, 0x30, "a PUBLISH");
            let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            got.push(String::from_utf8(body[2..2 + len].to_vec()).expect("utf-8"));
        }
        let expected: Vec<&str> = topics
            .iter()
            .copied()
            .filter(|t| !t.contains('+') && acl.check(id, *user, t, Access::Read))
            .collect();
        assert_eq!(got, expected, "deliveries to {id} ({user:?})");
    }
}
