//! End-to-end tests of the WebSocket listeners with the clients people use:
//! MQTT.js from Node over `ws` and `wss`, paho-mqtt (Python) over
//! websockets, and the web chat (examples/web-chat) in headless Chromium.
//!
//! The scripts live in tests/web/. The tools they need are made ready here,
//! idempotently: `npm ci` in tests/web when node_modules is missing or older
//! than the lock file; a virtualenv `.venv-web` at the workspace root with
//! paho-mqtt 2.x; Chromium through apt-get when it is missing and the tests
//! run as root (`CHROMIUM_BIN` names another executable). A tool that is
//! missing and cannot be installed fails the test, saying how to install it.
//!
//! `WRITE_SCREENSHOT=1` makes `web_chat_in_browser` save its screenshot of
//! the chat as docs/web-chat.png; otherwise it goes to a temporary directory.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use common::BrokerProcess;

/// How long one script may run before it is killed (with its children).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the broker crate sits in the workspace")
        .to_path_buf()
}

/// What a script (or tool) printed, for failure messages.
struct Outcome {
    success: bool,
    timed_out: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Outcome {
    fn describe(&self, what: &str) -> String {
        let end = if self.timed_out {
            format!("killed after {:?} (timeout)", self.elapsed)
        } else {
            format!("failed after {:?}", self.elapsed)
        };
        format!(
            "{what} {end}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Run `cmd` to completion within `timeout`; on timeout its whole process
/// group (a browser the script started, say) is killed.
fn run(mut cmd: Command, timeout: Duration) -> std::io::Result<Outcome> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let mut bytes = Vec::new();
                let _ = p.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            timed_out = true;
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Outcome {
        success: status.is_some_and(|s| s.success()),
        timed_out,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: started.elapsed(),
    })
}

/// Run a tool that must be there; a missing one fails with `how`.
fn tool(cmd: Command, timeout: Duration, what: &str, how: &str) -> Outcome {
    match run(cmd, timeout) {
        Ok(o) => o,
        Err(e) => panic!("cannot run {what} ({e}); {how}"),
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Every test's tool setup at most once per run, one at a time.
fn once(cell: &'static OnceLock<Result<(), String>>, f: impl FnOnce() -> Result<(), String>) {
    static SETUP: Mutex<()> = Mutex::new(());
    let _guard = SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = cell.get_or_init(f) {
        panic!("{e}");
    }
}

/// node_modules in tests/web, as package-lock.json says (`npm ci`), when it
/// is missing or older than the lock file or package.json.
fn ensure_node_modules() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    once(&DONE, || {
        let dir = web_dir();
        let how = "install Node.js 18 or later with npm (Debian: apt-get install -y nodejs npm)";
        let node = tool(
            {
                let mut c = Command::new("node");
                c.arg("--version");
                c
            },
            Duration::from_secs(30),
            "node",
            how,
        );
        if !node.success {
            return Err(node.describe(&format!("node --version; {how}:")));
        }
        let installed = mtime(&dir.join("node_modules/.package-lock.json"));
        let lock = dir.join("package-lock.json");
        let newest_input = [mtime(&lock), mtime(&dir.join("package.json"))]
            .into_iter()
            .flatten()
            .max();
        if installed.is_some() && installed >= newest_input {
            return Ok(());
        }
        let verb = if lock.exists() { "ci" } else { "install" };
        let mut c = Command::new("npm");
        c.args([verb, "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .env("PUPPETEER_SKIP_DOWNLOAD", "1");
        let o = tool(c, Duration::from_secs(600), "npm", how);
        if !o.success {
            return Err(o.describe(&format!("npm {verb} in {}", dir.display())));
        }
        eprintln!("npm {verb} in {} took {:?}", dir.display(), o.elapsed);
        Ok(())
    });
}

/// The Chromium the browser test drives: `CHROMIUM_BIN`, or /usr/bin/chromium,
/// installed with apt-get when missing and running as root.
fn ensure_chromium() -> PathBuf {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let bin =
        PathBuf::from(std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    once(&DONE, || {
        if bin.exists() {
            return Ok(());
        }
        let how = format!(
            "install Chromium (Debian: apt-get install -y chromium) or set CHROMIUM_BIN to a \
             Chromium or Chrome executable; {} is missing",
            bin.display()
        );
        if !running_as_root() || std::env::var_os("CHROMIUM_BIN").is_some() {
            return Err(how);
        }
        let apt = |args: &[&str]| {
            let mut c = Command::new("apt-get");
            c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            tool(c, Duration::from_secs(900), "apt-get", &how)
        };
        let mut o = apt(&["install", "-y", "chromium"]);
        if !o.success {
            // The package lists may be stale or absent.
            apt(&["update"]);
            o = apt(&["install", "-y", "chromium"]);
        }
        if !o.success || !bin.exists() {
            return Err(o.describe(&format!("apt-get install -y chromium; {how}:")));
        }
        Ok(())
    });
    bin
}

/// A Python with paho-mqtt 2.x: the virtualenv `.venv-web` at the workspace
/// root, created and filled when it lacks it.
fn ensure_paho() -> PathBuf {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let venv = workspace_root().join(".venv-web");
    let python = venv.join("bin/python");
    once(&DONE, || {
        let how = "install Python 3 with venv and pip (Debian: apt-get install -y python3-venv), \
                   or create .venv-web yourself: python3 -m venv .venv-web && \
                   .venv-web/bin/pip install 'paho-mqtt==2.*'";
        let has_paho = || {
            let mut c = Command::new(&python);
            c.args([
                "-c",
                "import paho.mqtt, paho.mqtt.client; assert paho.mqtt.__version__.startswith('2.')",
            ]);
            run(c, Duration::from_secs(60)).is_ok_and(|o| o.success)
        };
        if has_paho() {
            return Ok(());
        }
        let mut c = Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        let o = tool(c, Duration::from_secs(300), "python3", how);
        if !o.success {
            return Err(o.describe(&format!("python3 -m venv {}; {how}:", venv.display())));
        }
        let mut c = Command::new(&python);
        c.args(["-m", "pip", "install", "-q", "paho-mqtt==2.*"]);
        let o = tool(c, Duration::from_secs(600), "pip", how);
        if !o.success || !has_paho() {
            return Err(o.describe(&format!("pip install paho-mqtt==2.*; {how}:")));
        }
        Ok(())
    });
    python
}

/// A self-signed certificate for 127.0.0.1 and localhost: (cert, key).
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut c = Command::new("openssl");
    c.args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-days",
        "2",
        "-keyout",
    ])
    .arg(&key)
    .arg("-out")
    .arg(&cert);
    let o = tool(
        c,
        Duration::from_secs(60),
        "openssl",
        "install OpenSSL (Debian: apt-get install -y openssl)",
    );
    assert!(o.success, "{}", o.describe("openssl req -x509"));
    (cert, key)
}

/// The broker binary with `config` (TOML) in `dir`, and the port of each
/// listener by protocol ("mqtt" is the one `BrokerProcess` adds).
fn start_broker(dir: &Path, config: &str) -> (BrokerProcess, HashMap<String, u16>) {
    let file = dir.join("broker.toml");
    std::fs::write(&file, config).expect("write the broker's config file");
    let file = file.to_str().expect("utf-8 temp path");
    let mut broker = BrokerProcess::start(dir, &["--config", file]);
    let mut ports = HashMap::from([("mqtt".to_string(), broker.port)]);
    let wanted = config.matches("[[listener]]").count() + 1;
    while ports.len() < wanted {
        let line = broker
            .wait_for_line("listening on ", Duration::from_secs(30))
            .unwrap_or_else(|seen| {
                panic!("the broker announced {ports:?}, not its {wanted} listeners; log: {seen:?}")
            });
        let mut words = line.split_whitespace();
        let port = words
            .next()
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in `listening on {line}`"));
        let protocol = words
            .next()
            .map_or("mqtt", |p| p.trim_matches(['(', ')']))
            .to_string();
        ports.insert(protocol, port);
    }
    (broker, ports)
}

/// Run a script from tests/web; fails the test with its output and the
/// broker's log unless it exits 0 having printed its `OK` line.
fn script(program: &Path, args: &[&str], env: &[(&str, &Path)], broker: &BrokerProcess) -> Outcome {
    let mut c = Command::new(program);
    c.args(args).current_dir(web_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    let o =
        run(c, SCRIPT_TIMEOUT).unwrap_or_else(|e| panic!("cannot run {} ({e})", program.display()));
    let what = format!("{} {}", program.display(), args.join(" "));
    // Exit code 0 and the script's last word: an early exit is no success.
    let finished = o.stdout.lines().any(|l| l.ends_with("] OK"));
    assert!(
        o.success && finished,
        "{}\n--- broker log ---\n{}",
        o.describe(&what),
        broker.log().join("\n")
    );
    println!("{what}: {:?}\n{}", o.elapsed, o.stdout.trim_end());
    o
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn mqttjs_over_ws() {
    ensure_node_modules();
    let dir = tempdir();
    let (broker, ports) = start_broker(
        dir.path(),
        "storage = \"memory://\"\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"ws\"\npath = \"/mqtt\"\n",
    );
    let url = format!("ws://127.0.0.1:{}/mqtt", ports["ws"]);
    script(Path::new("node"), &["mqttjs.js", &url], &[], &broker);
}

#[test]
fn mqttjs_over_wss() {
    ensure_node_modules();
    let dir = tempdir();
    let (cert, key) = self_signed(dir.path());
    let (broker, ports) = start_broker(
        dir.path(),
        &format!(
            "storage = \"memory://\"\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"wss\"\ncert = {:?}\nkey = {:?}\n",
            cert.to_str().expect("utf-8 temp path"),
            key.to_str().expect("utf-8 temp path"),
        ),
    );
    let url = format!("wss://127.0.0.1:{}/mqtt", ports["wss"]);
    // The client checks the listener's certificate against it (no
    // rejectUnauthorized: false).
    let ca = cert.to_str().expect("utf-8 temp path");
    script(Path::new("node"), &["mqttjs.js", &url, ca], &[], &broker);
}

#[test]
fn paho_over_websocket() {
    let python = ensure_paho();
    let dir = tempdir();
    let (broker, ports) = start_broker(
        dir.path(),
        "storage = \"memory://\"\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"ws\"\n",
    );
    let port = ports["ws"].to_string();
    script(
        &python,
        &["paho_ws.py", "127.0.0.1", &port, "/mqtt"],
        &[],
        &broker,
    );
}

#[test]
fn web_chat_in_browser() {
    ensure_node_modules();
    let chromium = ensure_chromium();
    let dir = tempdir();
    let db = dir.path().join("broker.db");
    let (broker, ports) = start_broker(
        dir.path(),
        &format!(
            "storage = \"sqlite://{}\"\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"ws\"\n",
            db.to_str().expect("utf-8 temp path")
        ),
    );
    let url = format!("ws://127.0.0.1:{}/mqtt", ports["ws"]);
    let shot = if std::env::var("WRITE_SCREENSHOT").is_ok_and(|v| v == "1") {
        workspace_root().join("docs/web-chat.png")
    } else {
        dir.path().join("web-chat.png")
    };
    let shot_arg = shot.to_str().expect("utf-8 path");
    script(
        Path::new("node"),
        &["chat-browser.js", &url, shot_arg],
        &[("CHROMIUM_BIN", &chromium)],
        &broker,
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 1000, "no screenshot at {}", shot.display());
    println!("screenshot: {} ({size} bytes)", shot.display());
}
