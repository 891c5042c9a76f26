//! The compiled `broker` binary: startup, a real client round trip, graceful
//! shutdown on SIGTERM, clear errors for bad settings, and `broker check`.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

use common::BIN;

/// Start the binary and wait for its `listening on ADDR` line. The caller waits for the child.
/// It runs in a temporary directory, where the default storage would go.
#[allow(clippy::zombie_processes)]
fn spawn(args: &[&str]) -> (Child, String, mpsc::Receiver<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("broker binary starts");
    let rx = common::stderr_lines(&mut child);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("broker prints `listening on`");
        if let Some((_, addr)) = line.split_once("listening on ") {
            return (child, addr.trim().to_string(), rx, dir);
        }
    }
}

/// Run the binary expecting it to fail; returns its stderr. It runs in a
/// temporary directory, where the default storage would go.
fn run_failing(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("broker binary runs");
    assert!(!out.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn serves_clients_and_stops_gracefully_on_sigterm() {
    let (mut child, addr, lines, _dir) = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--storage",
        "memory://",
        "--worker-threads",
        "1",
    ]);
    // The runtime has the one worker asked for. A new thread names itself
    // once it first runs, which on a loaded machine can be after the
    // broker's first log lines: look again for a while.
    let workers = || {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .expect("the broker's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("tokio-rt-worker"))
            .count()
    };
    let named = std::time::Instant::now() + Duration::from_secs(10);
    while workers() < 1 && std::time::Instant::now() < named {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(workers(), 1);
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");

    let mut opts = MqttOptions::new("bin-test", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut ev) = AsyncClient::new(opts, 10);
    client
        .subscribe("hello", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .publish("hello", QoS::AtLeastOnce, false, "world")
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Incoming::Publish(p))) = ev.poll().await {
                return p.payload;
            }
        }
    })
    .await
    .expect("message delivered through the binary");
    assert_eq!(&got[..], b"world");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "broker did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "graceful exit, got {exit:?}");
    let log: Vec<String> = lines.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:?}");
}

#[test]
fn bad_config_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("broker-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[broker]\nmax_inflihgt = 3\n").expect("write");
    let err = run_failing(&["--config", path.to_str().expect("utf-8 path")]);
    assert!(
        err.contains("invalid config file") && err.contains("max_inflihgt"),
        "{err}"
    );
    let err = run_failing(&["--config", "/nonexistent/broker.toml"]);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn address_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let err = run_failing(&["--listen", &addr]);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn storage_url_errors_name_the_feature() {
    if !cfg!(feature = "mongo") {
        let err = run_failing(&[
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "mongodb://127.0.0.1/x",
        ]);
        assert!(err.contains("`mongo` Cargo feature"), "{err}");
    }
    let err = run_failing(&["--listen", "127.0.0.1:0", "--storage", "ftp://x"]);
    assert!(err.contains("unknown storage URL scheme"), "{err}");
}

/// `broker check` in `dir`: its exit status, stdout and stderr.
fn check(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("check")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("broker check runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_says_what_it_would_listen_on_and_that_the_storage_opens() {
    let dir = tempfile::tempdir().expect("dir");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic read public/#\n").expect("acl");
    let conf = dir.path().join("broker.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [\"127.0.0.1:1883\"]\nstorage = \"sqlite://data/b.db\"\n\
             [[listener]]\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\n\
             [auth]\nacl_file = \"{}\"\n[http]\nbind = \"127.0.0.1:9090\"\n",
            acl.display()
        ),
    )
    .expect("config");
    let (ok, out, err) = check(dir.path(), &["--config", conf.to_str().expect("path")]);
    assert!(ok, "{out}{err}");
    for line in [
        "would listen on 127.0.0.1:1883 (mqtt): anonymous clients allowed",
        "would listen on 127.0.0.1:8080 (ws): path /mqtt, anonymous clients allowed",
        "would serve HTTP on 127.0.0.1:9090 (/metrics, /health, /ready, /api/v1/): no token (loopback only)",
        "ACL file:",
        "worker threads: one per CPU core",
        "storage sqlite://data/b.db: data/b.db does not exist yet; the broker creates it at start",
        "check passed",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "check created the storage's directory or file"
    );
    // A thread count that is set is reported as set.
    let threads = dir.path().join("threads.toml");
    std::fs::write(&threads, "storage = \"memory://\"\nworker_threads = 3\n").expect("config");
    let (ok, out, err) = check(dir.path(), &["--config", threads.to_str().expect("path")]);
    assert!(ok && out.contains("worker threads: 3"), "{out}{err}");
    // Nothing was bound: a broker on the same ports starts, and check on
    // its storage meanwhile says it is in use, without failing.
    let broker = common::BrokerProcess::start(dir.path(), &["--storage", "sqlite://data/b.db"]);
    let (ok, out, err) = check(dir.path(), &["--config", conf.to_str().expect("path")]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("in use by a running broker"), "{out}");
    drop(broker);
    // Stopped: the file it made opens.
    let (ok, out, err) = check(dir.path(), &["--config", conf.to_str().expect("path")]);
    assert!(
        ok && out.contains("storage sqlite://data/b.db: opens"),
        "{out}{err}"
    );
}

#[test]
fn check_refuses_bad_configs_saying_why() {
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("config");
        p.to_str().expect("path").to_owned()
    };
    for (text, says) in [
        ("[broker]\nmax_inflihgt = 3\n", "max_inflihgt"),
        (
            "[[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"mqtts\"\ncert = \"missing.pem\"\nkey = \"missing.key\"\n",
            "missing.pem",
        ),
        ("[[listener]]\nbind = \"0.0.0.0:1883\"\n", "allow_anonymous = true"),
        ("[auth]\npassword_file = \"nope\"\n", "password file"),
        ("[webhook]\nurl = \"ftp://x\"\n", "[webhook]"),
        ("storage = \"ftp://x\"\n", "unknown storage URL scheme"),
        ("[http]\nbind = \"0.0.0.0:8080\"\n", "set `token` in [http]"),
        ("[http]\nbind = \"127.0.0.1\"\n", "[http] bind"),
        ("worker_threads = 0\n", "worker_threads"),
    ] {
        let path = write("bad.toml", text);
        let (ok, out, err) = check(dir.path(), &["--config", &path]);
        assert!(!ok, "{text:?} passed: {out}");
        assert!(err.contains(says), "{text:?}: {says:?} not in: {err}");
    }
}

#[test]
fn version_names_the_git_revision() {
    let out = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("broker --version runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let revision = text
        .trim()
        .strip_prefix(concat!("broker ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version: {text:?}"));
    let checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.git");
    if checkout.exists() {
        assert!(
            revision.len() >= 7 && revision != "unknown",
            "a git checkout, yet the revision is {revision:?}"
        );
    }
}
