//! Bridges against a real Mosquitto (Debian's `mosquitto` package), both
//! brokers real processes on loopback: out with the remote restarted
//! mid-stream, in with our broker killed (-9) mid-stream, both ways without
//! loops on MQTT 3.1.1 and 5, and a remote that is not there.
//!
//! Mosquitto must be installed (`apt-get install mosquitto`; scripts/services.sh
//! and this file install it when apt-get can); a missing binary fails the
//! tests, saying so.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::BrokerProcess;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The Mosquitto binary: `MOSQUITTO_BIN`, the PATH, `/usr/sbin`, or
/// installed from Debian's package when apt-get can.
fn mosquitto_bin() -> PathBuf {
    fn runs(p: &Path) -> bool {
        Command::new(p)
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }
    let candidates = || -> Vec<PathBuf> {
        let mut c = Vec::new();
        if let Ok(p) = std::env::var("MOSQUITTO_BIN") {
            c.push(PathBuf::from(p));
        }
        c.push(PathBuf::from("mosquitto"));
        c.push(PathBuf::from("/usr/sbin/mosquitto"));
        c
    };
    if let Some(p) = candidates().into_iter().find(|p| runs(p)) {
        return p;
    }
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = candidates().into_iter().find(|p| runs(p)) {
        return p;
    }
    let sudo = if unsafe_is_root() { "" } else { "sudo -n " };
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "command -v apt-get >/dev/null && ({sudo}apt-get install -y -q mosquitto || \
             ({sudo}apt-get update -q && {sudo}apt-get install -y -q mosquitto))"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    candidates()
        .into_iter()
        .find(|p| runs(p))
        .unwrap_or_else(|| {
            panic!(
                "the bridge tests need Mosquitto and it is not installed (nor could it be): \
             run `sudo apt-get install mosquitto` (Debian's package), or set MOSQUITTO_BIN"
            )
        })
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A Mosquitto of its own: a port, a config and a persistence directory,
/// restartable on the same ones.
struct Mosquitto {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        Self::start_with(|port, _| format!("listener {port} 127.0.0.1\nallow_anonymous true\n"))
    }

    /// [`Mosquitto::start`] with the listener lines `listeners(port, dir)`
    /// gives instead of one anonymous plain listener on `port`.
    fn start_with(listeners: impl FnOnce(u16, &Path) -> String) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let listeners = listeners(port, dir.path());
        let user = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|_| "root".into());
        std::fs::write(
            dir.path().join("mosquitto.conf"),
            format!(
                "{listeners}user {user}\n\
                 persistence true\npersistence_location {}/\nautosave_interval 1\n\
                 max_queued_messages 100000\nlog_dest stderr\nlog_type error\nlog_type warning\n",
                dir.path().display()
            ),
        )
        .expect("mosquitto.conf");
        let mut m = Mosquitto {
            port,
            dir,
            child: None,
        };
        m.restart();
        m
    }

    fn restart(&mut self) {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (Mosquitto writes its persistence file), and wait.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Our broker with `bridge` (TOML) in its config, on SQLite in `dir`.
fn broker_with(dir: &Path, bridge: &str) -> BrokerProcess {
    let conf = dir.join("broker.toml");
    std::fs::write(&conf, bridge).expect("broker.toml");
    BrokerProcess::start(
        dir,
        &[
            "--config",
            conf.to_str().expect("utf-8 path"),
            "--storage",
            "sqlite://data/broker.db",
        ],
    )
}

fn wait_connected(b: &mut BrokerProcess, name: &str) {
    b.wait_for_line(
        &format!("bridge {name}: connected to"),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|seen| panic!("bridge {name} did not connect; log: {seen:#?}"));
}

/// A subscriber that survives its broker's restarts: a persistent 3.1.1
/// session, reconnected (to the port in `port`, which may change) whenever
/// the connection ends; every PUBLISH's (topic, payload) recorded in order.
struct Collector {
    got: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn start(port: Arc<AtomicU16>, id: &str, filter: &str) -> Collector {
        let got = Arc::new(Mutex::new(Vec::new()));
        let (id, filter, out) = (id.to_owned(), filter.to_owned(), got.clone());
        let task = tokio::spawn(async move {
            loop {
                let mut o = MqttOptions::new(&id, "127.0.0.1", port.load(Ordering::SeqCst));
                o.set_clean_session(false)
                    .set_keep_alive(Duration::from_secs(5))
                    .set_inflight(32);
                let (client, mut events) = AsyncClient::new(o, 100);
                let _ = client.subscribe(&filter, QoS::AtLeastOnce).await;
                while let Ok(e) = events.poll().await {
                    if let Event::Incoming(Incoming::Publish(p)) = e {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        out.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((p.topic.clone(), payload));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Collector { got, task }
    }

    fn snapshot(&self) -> Vec<(String, String)> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn len(&self) -> usize {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Wait until `done` holds for what was received, at most `within`.
    async fn wait(&self, within: Duration, done: impl Fn(&[(String, String)]) -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if done(&self.snapshot()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        done(&self.snapshot())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A QoS 1 publisher; `acked` counts the PUBACKs it got.
struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    qos: QoS,
}

impl Publisher {
    fn start(port: u16, id: &str) -> Publisher {
        Self::start_qos(port, id, QoS::AtLeastOnce)
    }

    /// A publisher at `qos`; `acked` counts PUBACKs and PUBCOMPs.
    fn start_qos(port: u16, id: &str, qos: QoS) -> Publisher {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(32);
        let (client, mut events) = AsyncClient::new(o, 100);
        let acked = Arc::new(AtomicUsize::new(0));
        let count = acked.clone();
        let task = tokio::spawn(async move {
            while let Ok(e) = events.poll().await {
                if let Event::Incoming(Incoming::PubAck(_) | Incoming::PubComp(_)) = e {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Publisher {
            client,
            acked,
            task,
            qos,
        }
    }

    async fn publish(&self, topic: &str, payload: String) {
        self.client
            .publish(topic, self.qos, false, payload)
            .await
            .expect("publish queued");
    }

    async fn wait_acked(&self, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        while self.acked.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.acked.load(Ordering::SeqCst)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a stream of numbered payloads looks like: distinct numbers,
/// duplicates, and whether first arrivals are in order.
struct Tally {
    distinct: usize,
    duplicates: usize,
    first_in_order: bool,
    missing: Vec<usize>,
}

fn tally(payloads: impl Iterator<Item = usize>, expected: usize) -> Tally {
    let mut seen = vec![0usize; expected];
    let mut firsts = Vec::new();
    let mut duplicates = 0;
    for n in payloads {
        if n >= expected {
            continue;
        }
        if seen[n] == 0 {
            firsts.push(n);
        } else {
            duplicates += 1;
        }
        seen[n] += 1;
    }
    Tally {
        distinct: firsts.len(),
        duplicates,
        first_in_order: firsts.windows(2).all(|w| w[0] < w[1]),
        missing: (0..expected).filter(|n| seen[*n] == 0).collect(),
    }
}

const MESSAGES: usize = 1000;
/// Published before the remote stops (out) or our broker is killed (in).
const FIRST: usize = 800;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_survives_a_remote_restart_in_order() {
    let started = Instant::now();
    let mut mosquitto = Mosquitto::start();
    let remote_port = Arc::new(AtomicU16::new(mosquitto.port));
    // The remote subscriber's persistent session exists before anything flows.
    let remote = Collector::start(remote_port.clone(), "remote-sub", "site1/#");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let dir = tempfile::tempdir().expect("dir");
    let mut broker = broker_with(
        dir.path(),
        &format!(
            "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{}\"\nclient_id = \"edge-1-bridge\"\n\
             [[bridge.topic]]\npattern = \"sensors/#\"\ndirection = \"out\"\nqos = 1\n\
             local_prefix = \"edge/\"\nremote_prefix = \"site1/\"\n",
            mosquitto.port
        ),
    );
    wait_connected(&mut broker, "cloud");

    let publisher = Publisher::start(broker.port, "local-pub");
    for i in 0..FIRST {
        publisher.publish("edge/sensors/1/t", i.to_string()).await;
    }
    // Mid-stream: once 300 are through, the remote goes away (SIGTERM: it
    // saves its sessions) while local messages keep coming, and comes back.
    assert!(
        remote
            .wait(Duration::from_secs(20), |got| got.len() >= 300)
            .await
    );
    let at_stop = remote.len();
    mosquitto.stop();
    for i in FIRST..MESSAGES {
        publisher.publish("edge/sensors/1/t", i.to_string()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    mosquitto.restart();
    let restarted = at_stop < FIRST;
    eprintln!("out: remote stopped with {at_stop} of {FIRST} published received");
    let acked = publisher
        .wait_acked(MESSAGES, Duration::from_secs(30))
        .await;
    assert_eq!(
        acked, MESSAGES,
        "the local broker acknowledged every publish"
    );
    assert!(restarted, "the remote restart happened mid-stream");
    let arrived = remote
        .wait(Duration::from_secs(40), |got| {
            tally(got.iter().filter_map(|(_, p)| p.parse().ok()), MESSAGES).distinct == MESSAGES
        })
        .await;
    let got = remote.snapshot();
    let t = tally(got.iter().filter_map(|(_, p)| p.parse().ok()), MESSAGES);
    eprintln!(
        "out: sent {MESSAGES}, acknowledged locally {acked}, received remotely {} ({} distinct, {} duplicates), {:.1} s",
        got.len(),
        t.distinct,
        t.duplicates,
        started.elapsed().as_secs_f64()
    );
    assert!(arrived, "missing at the remote: {:?}", t.missing);
    assert!(t.first_in_order, "first arrivals out of order");
    assert!(
        got.iter().all(|(topic, _)| topic == "site1/sensors/1/t"),
        "prefixes applied: {:?}",
        got.first()
    );
    // Duplicates can only be of what was in flight when the remote went away.
    assert!(t.duplicates <= 64, "{} duplicates", t.duplicates);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_survives_kill_9_of_the_local_broker() {
    let started = Instant::now();
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().expect("dir");
    let config = format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:{}\"\nprotocol_version = \"5\"\n\
         [[bridge.topic]]\npattern = \"cmd/#\"\ndirection = \"in\"\nqos = 1\n\
         local_prefix = \"edge/\"\nremote_prefix = \"site1/\"\n",
        mosquitto.port
    );
    let mut broker = broker_with(dir.path(), &config);
    let local_port = Arc::new(AtomicU16::new(broker.port));
    let local = Collector::start(local_port.clone(), "local-sub", "edge/cmd/#");
    wait_connected(&mut broker, "cloud");
    // The remote subscription is in place once a probe comes through.
    let probe = Publisher::start(mosquitto.port, "remote-probe");
    let mut through = false;
    for _ in 0..50 {
        probe.publish("site1/cmd/probe", "probe".into()).await;
        if local
            .wait(Duration::from_millis(200), |got| !got.is_empty())
            .await
        {
            through = true;
            break;
        }
    }
    assert!(through, "nothing came through the bridge");
    drop(probe);

    let publisher = Publisher::start(mosquitto.port, "remote-pub");
    let received =
        |got: &[(String, String)]| got.iter().filter(|(t, _)| t == "edge/cmd/run").count();
    for i in 0..FIRST {
        publisher.publish("site1/cmd/run", i.to_string()).await;
    }
    // Mid-stream: once 300 are through, our broker dies without a chance
    // to flush, while Mosquitto's publisher goes on.
    assert!(
        local
            .wait(Duration::from_secs(20), |got| received(got) >= 300)
            .await
    );
    let at_kill = received(&local.snapshot());
    broker.kill9();
    for i in FIRST..MESSAGES {
        publisher.publish("site1/cmd/run", i.to_string()).await;
    }
    broker = BrokerProcess::start(
        dir.path(),
        &[
            "--config",
            dir.path().join("broker.toml").to_str().expect("path"),
            "--storage",
            "sqlite://data/broker.db",
        ],
    );
    local_port.store(broker.port, Ordering::SeqCst);
    let killed = at_kill < FIRST;
    eprintln!("in: killed with {at_kill} of {FIRST} published received locally");
    let acked = publisher
        .wait_acked(MESSAGES, Duration::from_secs(30))
        .await;
    assert_eq!(acked, MESSAGES, "Mosquitto acknowledged every publish");
    assert!(killed, "the kill happened mid-stream");
    let runs = |got: &[(String, String)]| {
        tally(
            got.iter()
                .filter(|(t, _)| t == "edge/cmd/run")
                .filter_map(|(_, p)| p.parse().ok()),
            MESSAGES,
        )
    };
    let arrived = local
        .wait(Duration::from_secs(40), |got| {
            runs(got).distinct == MESSAGES
        })
        .await;
    let got = local.snapshot();
    let t = runs(&got);
    eprintln!(
        "in: sent {MESSAGES}, acknowledged by Mosquitto {acked}, received locally {} ({} distinct, {} duplicates), {:.1} s",
        got.iter().filter(|(t, _)| t == "edge/cmd/run").count(),
        t.distinct,
        t.duplicates,
        started.elapsed().as_secs_f64()
    );
    assert!(arrived, "lost: {:?}", t.missing);
    assert!(t.first_in_order, "first arrivals out of order");
    assert!(t.duplicates <= 128, "{} duplicates", t.duplicates);
    drop(broker);
}

/// Both ways on one pattern: each message arrives once on the other side
/// and never comes back.
async fn both_ways_without_loops(version: &str) {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().expect("dir");
    let mut broker = broker_with(
        dir.path(),
        &format!(
            "[[bridge]]\nname = \"peer\"\naddress = \"127.0.0.1:{}\"\nprotocol_version = \"{version}\"\n\
             [[bridge.topic]]\npattern = \"chat/#\"\ndirection = \"both\"\nqos = 1\n",
            mosquitto.port
        ),
    );
    wait_connected(&mut broker, "peer");
    let local = Collector::start(Arc::new(AtomicU16::new(broker.port)), "l-sub", "chat/#");
    let remote = Collector::start(Arc::new(AtomicU16::new(mosquitto.port)), "r-sub", "chat/#");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let lp = Publisher::start(broker.port, "l-pub");
    let rp = Publisher::start(mosquitto.port, "r-pub");
    const N: usize = 20;
    for i in 0..N {
        lp.publish("chat/local", i.to_string()).await;
        rp.publish("chat/remote", i.to_string()).await;
    }
    assert_eq!(lp.wait_acked(N, Duration::from_secs(10)).await, N);
    assert_eq!(rp.wait_acked(N, Duration::from_secs(10)).await, N);
    let all = |got: &[(String, String)]| got.len() >= 2 * N;
    assert!(local.wait(Duration::from_secs(15), all).await);
    assert!(remote.wait(Duration::from_secs(15), all).await);
    // A loop would keep delivering: watch for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (side, c) in [("local", &local), ("remote", &remote)] {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for m in c.snapshot() {
            *counts.entry(m).or_default() += 1;
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
        eprintln!(
            "both {version}, {side} subscriber: {} deliveries, {} distinct, not once: {}",
            c.len(),
            counts.len(),
            twice.len()
        );
        assert_eq!(counts.len(), 2 * N, "{side}: {counts:?}");
        assert!(
            twice.is_empty(),
            "{side}: delivered more than once: {twice:?}"
        );
    }
    // A graceful stop stops the bridge too, promptly.
    let stopping = Instant::now();
    assert!(broker.terminate().success(), "clean exit");
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ways_without_loops_mqtt_311() {
    both_ways_without_loops("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_ways_without_loops_mqtt_5() {
    both_ways_without_loops("5").await;
}

/// QoS 2 on the bridge's hops both ways: PUBREC, PUBREL, PUBCOMP toward
/// the remote, the local session holding the remote's ids inbound.
async fn qos2_both_ways(version: &str) {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().expect("dir");
    let mut broker = broker_with(
        dir.path(),
        &format!(
            "[[bridge]]\nname = \"q2\"\naddress = \"127.0.0.1:{}\"\nprotocol_version = \"{version}\"\n\
             [[bridge.topic]]\npattern = \"up/#\"\ndirection = \"out\"\nqos = 2\n\
             [[bridge.topic]]\npattern = \"down/#\"\ndirection = \"in\"\nqos = 2\n",
            mosquitto.port
        ),
    );
    wait_connected(&mut broker, "q2");
    let local = Collector::start(Arc::new(AtomicU16::new(broker.port)), "q2-l", "down/#");
    let remote = Collector::start(Arc::new(AtomicU16::new(mosquitto.port)), "q2-r", "up/#");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let lp = Publisher::start_qos(broker.port, "q2-lp", QoS::ExactlyOnce);
    let rp = Publisher::start_qos(mosquitto.port, "q2-rp", QoS::ExactlyOnce);
    const N: usize = 100;
    // One at a time: rumqttc's QoS 2 publisher reuses packet ids within
    // its window before their PUBCOMP, and brokers then take new messages
    // for resends (seen with Mosquitto and this broker alike).
    for i in 0..N {
        lp.publish("up/x", i.to_string()).await;
        rp.publish("down/x", i.to_string()).await;
        lp.wait_acked(i + 1, Duration::from_secs(5)).await;
        rp.wait_acked(i + 1, Duration::from_secs(5)).await;
    }
    assert_eq!(lp.wait_acked(N, Duration::from_secs(10)).await, N);
    assert_eq!(rp.wait_acked(N, Duration::from_secs(10)).await, N);
    for (side, c) in [("remote", &remote), ("local", &local)] {
        assert!(
            c.wait(Duration::from_secs(15), |got| got.len() >= N).await,
            "{side}: {} received, missing {:?}; {:#?}",
            c.len(),
            tally(c.snapshot().iter().filter_map(|(_, p)| p.parse().ok()), N).missing,
            broker
                .log()
                .into_iter()
                .filter(|l| !l.contains("relayed"))
                .collect::<Vec<_>>()
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (side, c) in [("remote", &remote), ("local", &local)] {
        let got = c.snapshot();
        let t = tally(got.iter().filter_map(|(_, p)| p.parse().ok()), N);
        eprintln!(
            "qos2 {version}, {side}: sent {N}, received {} ({} distinct, {} duplicates)",
            got.len(),
            t.distinct,
            t.duplicates
        );
        assert_eq!(
            (t.distinct, t.duplicates),
            (N, 0),
            "{side}: {:?}",
            t.missing
        );
        assert!(t.first_in_order, "{side}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_both_ways_mqtt_311() {
    qos2_both_ways("3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_both_ways_mqtt_5() {
    qos2_both_ways("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_remote_is_retried_with_backoff_while_serving() {
    let dir = tempfile::tempdir().expect("dir");
    let nobody = free_port();
    let mut broker = broker_with(
        dir.path(),
        &format!(
            "[[bridge]]\nname = \"void\"\naddress = \"127.0.0.1:{nobody}\"\n\
             [[bridge.topic]]\npattern = \"x/#\"\ndirection = \"both\"\nqos = 1\n"
        ),
    );
    let mut delays = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(12);
    while delays.len() < 3 && Instant::now() < deadline {
        if let Ok(rest) = broker.wait_for_line("bridge void: connection to", Duration::from_secs(8))
        {
            let secs: f64 = rest
                .rsplit_once("retry in ")
                .and_then(|(_, s)| s.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no delay in {rest:?}"));
            assert!(rest.contains("lost: cannot connect"), "{rest}");
            delays.push(secs);
        }
    }
    eprintln!("unreachable: retries after {delays:?} s");
    assert_eq!(delays.len(), 3, "{delays:?}");
    assert!(
        delays[1] > delays[0] && delays[2] > delays[1],
        "backoff grows: {delays:?}"
    );
    // Meanwhile the broker serves: a round trip through it.
    let (mut sub, _) = common::Mqtt::connect(broker.port, "bystander", true).await;
    sub.subscribe("y/1", rumqttc::QoS::AtLeastOnce).await;
    sub.client
        .publish("y/1", rumqttc::QoS::AtLeastOnce, false, "hello")
        .await
        .expect("publish");
    let got = sub
        .next_publish(Duration::from_secs(5))
        .await
        .expect("round trip");
    assert_eq!(&got.payload[..], b"hello");
}

#[test]
fn check_prints_each_bridge() {
    let dir = tempfile::tempdir().expect("dir");
    let conf = dir.path().join("broker.toml");
    std::fs::write(
        &conf,
        "storage = \"memory://\"\n\
         [[bridge]]\nname = \"cloud\"\naddress = \"127.0.0.1:1884\"\n\
         [[bridge.topic]]\npattern = \"a/#\"\n[[bridge.topic]]\npattern = \"b/#\"\ndirection = \"in\"\n",
    )
    .expect("config");
    let out = Command::new(common::BIN)
        .args(["check", "--config", conf.to_str().expect("path")])
        .current_dir(dir.path())
        .output()
        .expect("broker check runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("would bridge cloud to 127.0.0.1:1884: 2 topics"),
        "{stdout}"
    );
    std::fs::write(
        &conf,
        "[[bridge]]\nname = \"a\"\naddress = \"h:1\"\n[[bridge.topic]]\npattern = \"x\"\n\
         [[bridge]]\nname = \"a\"\naddress = \"h:2\"\n[[bridge.topic]]\npattern = \"y\"\n",
    )
    .expect("config");
    let out = Command::new(common::BIN)
        .args(["check", "--config", conf.to_str().expect("path")])
        .current_dir(dir.path())
        .output()
        .expect("broker check runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("used twice"), "{err}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files
/// in `dir`: (ca, cert, key).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "bridge test CA");
    let ca = p.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().expect("ip"))];
    let cert = p.signed_by(&key, &ca, &ca_key).expect("sign");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("PEM");
        path
    };
    (
        write("ca.pem", ca.pem()),
        write("server.pem", cert.pem()),
        write("server.key", key.serialize_pem()),
    )
}

/// Mosquitto with a TLS listener that wants a user and password
/// (`bridge-user` / `s3cret`), and a plain anonymous one on `plain` for the
/// test's own clients.
fn mosquitto_tls(plain: u16) -> (Mosquitto, PathBuf) {
    let mut ca = PathBuf::new();
    let m = Mosquitto::start_with(|port, dir| {
        let (ca_file, cert, key) = tls_files(dir);
        ca = ca_file.clone();
        let passwd = dir.join("passwd");
        let made = Command::new(mosquitto_bin().with_file_name("mosquitto_passwd"))
            .arg("-b")
            .arg("-c")
            .arg(&passwd)
            .args(["bridge-user", "s3cret"])
            .status();
        let made = match made {
            Ok(s) => s.success(),
            // Not beside the broker binary: from PATH.
            Err(_) => Command::new("mosquitto_passwd")
                .arg("-b")
                .arg("-c")
                .arg(&passwd)
                .args(["bridge-user", "s3cret"])
                .status()
                .is_ok_and(|s| s.success()),
        };
        assert!(
            made,
            "mosquitto_passwd (Debian's mosquitto package) could not write {}",
            passwd.display()
        );
        format!(
            "per_listener_settings true\n\
             listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             allow_anonymous false\npassword_file {}\n\
             listener {plain} 127.0.0.1\nallow_anonymous true\n",
            ca_file.display(),
            cert.display(),
            key.display(),
            passwd.display()
        )
    });
    (m, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_over_tls_with_credentials() {
    let plain = free_port();
    let (mosquitto, ca) = mosquitto_tls(plain);
    let remote = Collector::start(Arc::new(AtomicU16::new(plain)), "tls-r-sub", "site/#");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().expect("dir");
    let bridge = |password: &str| {
        format!(
            "[[bridge]]\nname = \"secure\"\naddress = \"127.0.0.1:{}\"\ntls = true\ncafile = \"{}\"\n\
             username = \"bridge-user\"\npassword = \"{password}\"\n\
             [[bridge.topic]]\npattern = \"#\"\ndirection = \"out\"\nqos = 1\n\
             local_prefix = \"sensors/\"\nremote_prefix = \"site/\"\n",
            mosquitto.port,
            ca.display()
        )
    };
    // A wrong password: refused by the remote, retried, nothing relayed.
    let mut broker = broker_with(dir.path(), &bridge("wrong"));
    let refused = broker
        .wait_for_line("bridge secure: connection to", Duration::from_secs(20))
        .unwrap_or_else(|seen| panic!("no retry line; log: {seen:#?}"));
    eprintln!("wrong password: {refused}");
    assert!(
        refused.contains("NotAuthorized") && refused.contains("retry in"),
        "{refused}"
    );
    drop(broker);
    // The right one, over TLS checked against the CA.
    let mut broker = broker_with(dir.path(), &bridge("s3cret"));
    wait_connected(&mut broker, "secure");
    let local = Publisher::start(broker.port, "tls-l-pub");
    const N: usize = 50;
    for i in 0..N {
        local.publish("sensors/t", i.to_string()).await;
    }
    assert_eq!(local.wait_acked(N, Duration::from_secs(10)).await, N);
    assert!(
        remote
            .wait(Duration::from_secs(15), |got| got.len() >= N)
            .await,
        "{} of {N} arrived over TLS",
        remote.len()
    );
    let got = remote.snapshot();
    let want: Vec<(String, String)> = (0..N)
        .map(|i| ("site/t".to_string(), i.to_string()))
        .collect();
    assert_eq!(got[..N], want[..], "in order, prefixes applied");
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mosquitto_bridge_with_the_bridge_bit_connects_here_without_loops() {
    // Mosquitto bridges into this broker, MQTT 3.1.1 with try_private (the
    // bridge bit, protocol level 0x84): accepted, and its own messages are
    // not sent back to it.
    let dir = tempfile::tempdir().expect("dir");
    let mut broker = BrokerProcess::start(dir.path(), &["--storage", "memory://"]);
    let ours = broker.port;
    let mosquitto = Mosquitto::start_with(|port, _| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\n\
             connection to-ours\naddress 127.0.0.1:{ours}\nbridge_protocol_version mqttv311\n\
             try_private true\ncleansession false\nclientid edge-mosquitto\n\
             topic chat/# both 1\n"
        )
    });
    let connected = broker
        .wait_for_line("client connected", Duration::from_secs(20))
        .unwrap_or_else(|seen| panic!("Mosquitto's bridge did not connect; log: {seen:#?}"));
    // The log's fields, colours taken out.
    let plain: String = connected
        .split('\u{1b}')
        .enumerate()
        .map(|(i, part)| match part.split_once('m') {
            Some((_, rest)) if i > 0 => rest,
            _ => part,
        })
        .collect();
    assert!(
        plain.contains("client=edge-mosquitto") && plain.contains("bridge=true"),
        "{plain}"
    );
    let local = Collector::start(Arc::new(AtomicU16::new(ours)), "o-sub", "chat/#");
    let remote = Collector::start(Arc::new(AtomicU16::new(mosquitto.port)), "m-sub", "chat/#");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let op = Publisher::start(ours, "o-pub");
    let mp = Publisher::start(mosquitto.port, "m-pub");
    const N: usize = 20;
    for i in 0..N {
        op.publish("chat/ours", i.to_string()).await;
        mp.publish("chat/mosquitto", i.to_string()).await;
    }
    assert_eq!(op.wait_acked(N, Duration::from_secs(10)).await, N);
    assert_eq!(mp.wait_acked(N, Duration::from_secs(10)).await, N);
    let all = |got: &[(String, String)]| got.len() >= 2 * N;
    assert!(
        local.wait(Duration::from_secs(15), all).await,
        "ours got {}",
        local.len()
    );
    assert!(
        remote.wait(Duration::from_secs(15), all).await,
        "Mosquitto got {}",
        remote.len()
    );
    // An echo would deliver Mosquitto's messages twice on its side.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (side, c) in [("ours", &local), ("Mosquitto", &remote)] {
        let mut counts: HashMap<(String, String), usize> = HashMap::new();
        for m in c.snapshot() {
            *counts.entry(m).or_default() += 1;
        }
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
        eprintln!(
            "Mosquitto bridging here, {side} subscriber: {} deliveries, {} distinct, not once: {}",
            c.len(),
            counts.len(),
            twice.len()
        );
        assert_eq!(counts.len(), 2 * N, "{side}: {counts:?}");
        assert!(
            twice.is_empty(),
            "{side}: delivered more than once: {twice:?}"
        );
    }
}
