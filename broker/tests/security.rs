//! The binary with a password file and an ACL file: `broker passwd`, the
//! ACL's SUBACK codes for both protocol versions, wrong passwords, the
//! safe default for public listeners, reload on SIGHUP, and the HTTP hooks
//! and webhook against a Node.js service. Raw MQTT over TCP so that every
//! return code is seen as sent.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BrokerProcess, BIN};

/// `broker passwd FILE USER --password-stdin`.
fn passwd(file: &Path, user: &str, password: &str) {
    let mut child = Command::new(BIN)
        .args([
            "passwd",
            file.to_str().expect("path"),
            user,
            "--password-stdin",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("broker passwd runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("password written");
    let out = child.wait_with_output().expect("broker passwd ends");
    assert!(
        out.status.success(),
        "broker passwd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(kind: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![kind];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

/// Read one packet: its first byte and its body.
fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((first[0], body))
}

/// Connect with `level` 4 (3.1.1) or 5; returns the stream and the CONNACK return code.
fn connect(port: u16, level: u8, client: &str, login: Option<(&str, &str)>) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(level);
    body.push(0x02 | if login.is_some() { 0xC0 } else { 0 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    string(&mut body, client);
    if let Some((u, p)) = login {
        string(&mut body, u);
        string(&mut body, p);
    }
    s.write_all(&packet(0x10, body)).expect("CONNECT");
    let (kind, ack) = read_packet(&mut s).expect("CONNACK");
    assert_eq!(kind, 0x20, "CONNACK");
    (s, ack[1])
}

/// Subscribe to `filter` at QoS 1; the SUBACK's return code.
fn subscribe(s: &mut TcpStream, level: u8, filter: &str) -> u8 {
    let mut body = vec![0, 7];
    if level == 5 {
        body.push(0);
    }
    string(&mut body, filter);
    body.push(1);
    s.write_all(&packet(0x82, body)).expect("SUBSCRIBE");
    let (kind, ack) = read_packet(s).expect("SUBACK");
    assert_eq!(kind, 0x90, "SUBACK");
    *ack.last().expect("a return code")
}

fn config(dir: &Path, acl: &str) -> std::path::PathBuf {
    let passwords = dir.join("passwd");
    let acl_path = dir.join("acl");
    std::fs::write(&acl_path, acl).expect("acl");
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "storage = \"memory://\"\n[auth]\npassword_file = \"{}\"\nacl_file = \"{}\"\n",
            passwords.display(),
            acl_path.display()
        ),
    )
    .expect("config");
    path
}

const ACL: &str = "# anonymous clients\ntopic read public/#\n\nuser alice\ntopic readwrite test/#\ntopic deny test/nosubscribe\n";

#[test]
fn password_file_and_acl_with_return_codes_of_both_versions() {
    let dir = tempfile::tempdir().expect("dir");
    passwd(&dir.path().join("passwd"), "alice", "s3cret");
    let conf = config(dir.path(), ACL);
    let mut broker = BrokerProcess::start(dir.path(), &["--config", conf.to_str().expect("path")]);

    for level in [4u8, 5] {
        let (_, code) = connect(broker.port, level, "wrong", Some(("alice", "nope")));
        assert_eq!(
            code,
            if level == 4 { 0x04 } else { 0x86 },
            "wrong password, level {level}"
        );
        let (_, code) = connect(broker.port, level, "anon", None);
        assert_eq!(
            code,
            if level == 4 { 0x05 } else { 0x87 },
            "anonymous refused with a password file, level {level}"
        );

        let (mut s, code) = connect(
            broker.port,
            level,
            &format!("a{level}"),
            Some(("alice", "s3cret")),
        );
        assert_eq!(code, 0, "alice connects, level {level}");
        assert_eq!(subscribe(&mut s, level, "test/ok"), 1, "granted at QoS 1");
        let denied = subscribe(&mut s, level, "test/nosubscribe");
        assert_eq!(
            denied,
            if level == 4 { 0x80 } else { 0x87 },
            "ACL deny, level {level}"
        );
        assert_eq!(
            subscribe(&mut s, level, "other/topic"),
            if level == 4 { 0x80 } else { 0x87 },
            "not granted, level {level}"
        );
    }

    // SIGHUP reloads the password file: bob appears.
    passwd(&dir.path().join("passwd"), "bob", "pw");
    let (_, code) = connect(broker.port, 4, "bob1", Some(("bob", "pw")));
    assert_eq!(code, 0x04, "not before the reload");
    let pid = broker.pid().to_string();
    let status = Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    broker
        .wait_for_line("reloaded the [auth] files", Duration::from_secs(10))
        .expect("reload logged");
    let (_, code) = connect(broker.port, 4, "bob2", Some(("bob", "pw")));
    assert_eq!(code, 0, "after the reload");
    assert!(broker.terminate().success());
}

#[test]
fn public_listener_without_authentication_does_not_start() {
    let dir = tempfile::tempdir().expect("dir");
    let out = Command::new(BIN)
        .args(["--listen", "0.0.0.0:0", "--storage", "memory://"])
        .current_dir(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow_anonymous = true"), "{err}");
}

/// PUBLISH at QoS 1 (packet id 9); the PUBACK's reason code (0 for 3.1.1,
/// which has none).
fn publish_qos1(s: &mut TcpStream, level: u8, topic: &str) -> u8 {
    let mut body = Vec::new();
    string(&mut body, topic);
    body.extend_from_slice(&9u16.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(b"hello");
    s.write_all(&packet(0x32, body)).expect("PUBLISH");
    loop {
        let (kind, ack) = read_packet(s).expect("PUBACK");
        // Its own delivery may come first (the client subscribes to it).
        if kind & 0xF0 == 0x30 {
            continue;
        }
        assert_eq!(kind, 0x40, "PUBACK");
        return ack.get(2).copied().unwrap_or(0);
    }
}

/// The web service of `tests/web/auth-service.js` (Node.js, its own `http`
/// only), on a free port; killed when dropped.
struct NodeService {
    child: std::process::Child,
    port: u16,
}

impl NodeService {
    fn start() -> NodeService {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web/auth-service.js");
        let mut child = Command::new("node")
            .arg(&script)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `node {}` ({e}): install Node.js (apt-get install nodejs)",
                    script.display()
                )
            });
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("the service prints its port");
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the service: {line:?}"));
        NodeService { child, port }
    }

    /// The webhook events it received so far.
    fn log(&self) -> Vec<serde_json::Value> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("service");
        s.write_all(b"GET /log HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("answer");
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("GET /log: {e}: {text}"))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `[auth] http_*` and `[webhook]` through the binary, against a service an
/// application wrote in Node.js: its answers decide; when it is gone,
/// clients are refused with "server unavailable" (fail closed).
#[test]
fn http_authentication_authorization_and_webhook_with_a_node_service() {
    let mut service = NodeService::start();
    let base = format!("http://127.0.0.1:{}", service.port);
    let dir = tempfile::tempdir().expect("dir");
    let conf = dir.path().join("broker.toml");
    std::fs::write(
        &conf,
        format!(
            "storage = \"memory://\"\n[auth]\nhttp_authenticate = \"{base}/auth\"\n\
             http_authorize_publish = \"{base}/publish\"\nhttp_authorize_subscribe = \"{base}/subscribe\"\n\
             http_timeout_ms = 1000\nhttp_cache_ttl_secs = 0\n\
             [webhook]\nurl = \"{base}/events\"\nevents = [\"client_connected\", \"subscribed\", \"message_published\"]\n"
        ),
    )
    .expect("config");
    let broker = BrokerProcess::start(dir.path(), &["--config", conf.to_str().expect("path")]);

    for level in [4u8, 5] {
        let (_, code) = connect(broker.port, level, "w", Some(("alice", "nope")));
        assert_eq!(
            code,
            if level == 4 { 0x04 } else { 0x86 },
            "wrong password, level {level}"
        );
        let (_, code) = connect(broker.port, level, "anon", None);
        assert_eq!(
            code,
            if level == 4 { 0x04 } else { 0x86 },
            "no user, level {level}"
        );
        let id = format!("alice-{level}");
        let (mut s, code) = connect(broker.port, level, &id, Some(("alice", "wonderland")));
        assert_eq!(code, 0, "alice, level {level}");
        let refused = if level == 4 { 0x80 } else { 0x87 };
        assert_eq!(
            subscribe(&mut s, level, "#"),
            refused,
            "403 refuses, level {level}"
        );
        assert_eq!(subscribe(&mut s, level, "chat/#"), 1, "level {level}");
        assert_eq!(
            publish_qos1(&mut s, level, "chat/alice/room"),
            0,
            "own topic, level {level}"
        );
        if level == 5 {
            assert_eq!(
                publish_qos1(&mut s, level, "chat/bob/room"),
                0x87,
                "another's topic"
            );
        }
    }

    // The webhook told the service what happened, in order.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        // Not the broker's own `$SYS` publishes (no client).
        let events: Vec<serde_json::Value> = service
            .log()
            .into_iter()
            .filter(|e| e["client_id"].is_string())
            .collect();
        let published = events
            .iter()
            .filter(|e| e["event"] == "message_published")
            .count();
        if published == 2 {
            break events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "webhook events: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_owned(),
                e["client_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = ["alice-4", "alice-5"]
        .iter()
        .flat_map(|id| {
            ["client_connected", "subscribed", "message_published"]
                .map(|e| (e.to_owned(), id.to_string()))
        })
        .collect();
    assert_eq!(seen, want);
    assert_eq!(events[2]["topic"], "chat/alice/room");
    assert_eq!(events[2]["payload"], "hello");
    assert_eq!(events[0]["username"], "alice");

    // The service is gone: nobody is let in, and the broker says why.
    service.stop();
    let (_, code) = connect(broker.port, 5, "late", Some(("alice", "wonderland")));
    assert_eq!(code, 0x88, "server unavailable");
    let (_, code) = connect(broker.port, 4, "late", Some(("alice", "wonderland")));
    assert_eq!(code, 0x03, "server unavailable");
    assert!(broker.terminate().success());
}
