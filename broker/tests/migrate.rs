//! `broker migrate`, `broker sessions` and `broker retained` on the real
//! binary: an offline backlog of 10,000 QoS 1 messages (and 10 more that
//! every session shares) of 100 persistent sessions goes SQLite -> Redis ->
//! MongoDB -> SQLite, the second hop killed partway and run again; each
//! body is stored once at every hop; a broker on the last file delivers
//! every session its messages, complete and in order, and the retained
//! message. A storage a broker runs on is refused politely.
//!
//! The chain needs the Redis at `REDIS_URL` and the MongoDB-compatible
//! server at `MONGODB_URI` (scripts/test starts both, see
//! scripts/services.sh) and the binary built with them:
//! `cargo test -p broker --features redis,mongo --test migrate`.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run_failing, BrokerProcess, BIN};

/// Run `broker ARGS` in `cwd` to its end (at most `within`); its exit
/// status, stdout and stderr.
fn run(cwd: &Path, args: &[&str], within: Duration) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("broker binary runs");
    let mut pipes = (child.stdout.take(), child.stderr.take());
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut o) = pipes.0.take() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = pipes.1.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`broker {}` still running after {within:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    (status.success(), out, err)
}

/// A storage a broker runs on is refused by `migrate` (as source or
/// destination) and by `sessions`, saying so, before anything is written;
/// the same storage twice is refused too.
#[test]
fn refuses_a_storage_a_broker_runs_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path();
    // An offline storage to migrate from, made by a broker that then stopped.
    BrokerProcess::start(cwd, &["--storage", "sqlite://offline.db"]).terminate();
    let broker = BrokerProcess::start(cwd, &["--storage", "sqlite://live.db"]);
    // An offline one is read: no session, the broker's own retained id.
    let (ok, out, err) = run(
        cwd,
        &["sessions", "--storage", "sqlite://offline.db", "--json"],
        Duration::from_secs(30),
    );
    assert!(ok && out.trim() == "[]", "{out}{err}");
    let (ok, out, err) = run(
        cwd,
        &["retained", "--storage", "sqlite://offline.db"],
        Duration::from_secs(30),
    );
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("$SYS/broker/id qos=0 bytes=12 preview=")),
        "{out}{err}"
    );

    let err = run_failing(
        cwd,
        &[
            "migrate",
            "--from",
            "sqlite://live.db",
            "--to",
            "sqlite://copy.db",
        ],
    );
    assert!(
        err.contains("the source storage sqlite://live.db is in use: a broker is running on it")
            && err.contains("Stop that broker first, then run `broker migrate` again"),
        "{err}"
    );
    assert!(
        !cwd.join("copy.db").exists(),
        "the destination was created although the source was refused"
    );

    let err = run_failing(
        cwd,
        &[
            "migrate",
            "--from",
            "sqlite://offline.db",
            "--to",
            "sqlite://live.db",
        ],
    );
    assert!(
        err.contains(
            "the destination storage sqlite://live.db is in use: a broker is running on it"
        ),
        "{err}"
    );

    let err = run_failing(cwd, &["sessions", "--storage", "sqlite://live.db"]);
    assert!(err.contains("a broker is running on it"), "{err}");

    let err = run_failing(
        cwd,
        &[
            "migrate",
            "--from",
            "sqlite://offline.db",
            "--to",
            "sqlite://./offline.db",
        ],
    );
    assert!(err.contains("name the same storage"), "{err}");

    let err = run_failing(cwd, &["sessions", "--storage", "sqlite://missing.db"]);
    assert!(err.contains("there is no database at missing.db"), "{err}");
    assert!(!cwd.join("missing.db").exists());
    drop(broker);
}

#[cfg(not(all(feature = "redis", feature = "mongo")))]
#[test]
fn the_chain_needs_the_redis_and_mongo_features() {
    panic!(
        "the SQLite -> Redis -> MongoDB -> SQLite migration test needs the binary built with \
         both server backends: cargo test -p broker --features redis,mongo --test migrate \
         (with the services of scripts/services.sh running)"
    );
}

#[cfg(all(feature = "redis", feature = "mongo"))]
mod chain {
    use std::sync::mpsc;

    use rumqttc::{Event, Incoming, QoS};

    use super::*;
    use crate::common::{mongodb_url, redis_url, unique, with_param, Mqtt};

    const SESSIONS: usize = 100;
    const PER_SESSION: usize = 100;
    /// Every tenth round, one message to the topic every session subscribes to.
    const SHARED: usize = PER_SESSION / 10;

    /// The payloads session `i` is sent, in publish order.
    fn expected(i: usize) -> Vec<String> {
        let mut v = Vec::new();
        for round in 0..PER_SESSION {
            v.push(format!("{i}:{round}"));
            if round % 10 == 9 {
                v.push(format!("all:{round}"));
            }
        }
        v
    }

    /// The subscribers subscribe and leave; one publisher sends the
    /// backlog and the retained message and waits for every PUBACK.
    async fn make_backlog(port: u16) {
        for i in 0..SESSIONS {
            let (mut s, _) = Mqtt::connect(port, &format!("sub-{i}"), false).await;
            s.subscribe(&format!("t/{i}"), QoS::AtLeastOnce).await;
            s.subscribe("all", QoS::AtLeastOnce).await;
            s.disconnect().await;
        }
        let (mut publisher, _) = Mqtt::connect(port, "publisher", true).await;
        let client = publisher.client.clone();
        let sending = tokio::spawn(async move {
            for round in 0..PER_SESSION {
                for i in 0..SESSIONS {
                    client
                        .publish(
                            format!("t/{i}"),
                            QoS::AtLeastOnce,
                            false,
                            format!("{i}:{round}"),
                        )
                        .await
                        .expect("publish");
                }
                if round % 10 == 9 {
                    client
                        .publish("all", QoS::AtLeastOnce, false, format!("all:{round}"))
                        .await
                        .expect("publish");
                }
            }
            client
                .publish("keep/me", QoS::AtLeastOnce, true, "retained payload")
                .await
                .expect("retained publish");
        });
        let total = SESSIONS * PER_SESSION + SHARED + 1;
        let mut acked = 0;
        while acked < total {
            match tokio::time::timeout(Duration::from_secs(30), publisher.events.recv()).await {
                Ok(Some(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
                Ok(Some(_)) => {}
                other => panic!("publisher: {acked}/{total} acknowledged, then {other:?}"),
            }
        }
        sending.await.expect("publisher task");
        publisher.disconnect().await;
    }

    /// Session `i` comes back and gets its backlog.
    async fn drain(port: u16, i: usize) {
        let id = format!("sub-{i}");
        let (mut mqtt, present) = Mqtt::connect(port, &id, false).await;
        assert!(present, "{id}: the session did not survive the migrations");
        let want = expected(i);
        let mut got = Vec::with_capacity(want.len());
        while got.len() < want.len() {
            match mqtt.next_publish(Duration::from_secs(20)).await {
                Some(p) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
                None => break,
            }
        }
        assert_eq!(got, want, "{id}: backlog incomplete or out of order");
        mqtt.disconnect().await;
    }

    /// Bodies stored behind each backend's traits, by its own means.
    fn sqlite_bodies(path: &Path) -> i64 {
        let conn = rusqlite::Connection::open(path).expect("open the SQLite file");
        conn.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .expect("count bodies")
    }

    fn redis_bodies(prefix: &str) -> usize {
        let base = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        let client = redis::Client::open(base).expect("Redis URL");
        let mut conn = client.get_connection().expect("connect to Redis");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:msg:*"))
            .query(&mut conn)
            .expect("KEYS");
        keys.len()
    }

    async fn mongo_bodies(db: &str) -> u64 {
        let client = mongodb::Client::with_uri_str(mongodb_url(db))
            .await
            .expect("connect to MongoDB");
        client
            .database(db)
            .collection::<mongodb::bson::Document>("messages")
            .count_documents(mongodb::bson::doc! {})
            .await
            .expect("count bodies")
    }

    /// `broker migrate` to its end, checked and timed; its stderr (the
    /// progress report) is printed.
    fn hop(cwd: &Path, from: &str, to: &str) -> Duration {
        let started = Instant::now();
        let (ok, _, err) = run(
            cwd,
            &["migrate", "--from", from, "--to", to],
            Duration::from_secs(120),
        );
        let took = started.elapsed();
        eprintln!("--- broker migrate --from {from} --to {to}: {took:.1?}\n{err}");
        assert!(ok, "migration failed: {err}");
        assert!(err.contains("the destination matches the source"), "{err}");
        let counts = format!(
            "verify: {SESSIONS} sessions, {} subscriptions, {} queued messages",
            2 * SESSIONS,
            "11,000"
        );
        assert!(err.contains(&counts), "{err}");
        took
    }

    /// A `broker migrate` being watched.
    struct Running {
        child: std::process::Child,
        lines: mpsc::Receiver<String>,
        seen: Vec<String>,
    }

    impl Running {
        fn start(cwd: &Path, from: &str, to: &str) -> Running {
            let mut child = Command::new(BIN)
                .args(["migrate", "--from", from, "--to", to])
                .current_dir(cwd)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("broker binary runs");
            let lines = common::stderr_lines(&mut child);
            Running {
                child,
                lines,
                seen: Vec::new(),
            }
        }

        /// Wait for a line starting with `start`.
        fn wait_for(&mut self, start: &str) {
            loop {
                match self.lines.recv_timeout(Duration::from_secs(60)) {
                    Ok(line) => {
                        let found = line.starts_with(start);
                        self.seen.push(line);
                        if found {
                            return;
                        }
                    }
                    Err(_) => panic!("no line `{start}...`; saw {:?}", self.seen),
                }
            }
        }

        /// Whether it has ended.
        fn ended(&mut self) -> bool {
            self.child.try_wait().ok().flatten().is_some()
        }

        /// Its exit status (after `signal`, if given) and every line it printed.
        fn finish(mut self, signal: Option<&str>) -> (std::process::ExitStatus, String) {
            if let Some(signal) = signal {
                let pid = self.child.id().to_string();
                let sent = Command::new("kill").args([signal, &pid]).status();
                assert!(sent.is_ok_and(|s| s.success()), "kill {signal} {pid}");
            }
            let status = self.child.wait().expect("wait");
            self.seen.extend(self.lines.try_iter());
            // The reader thread may still hold the last lines.
            std::thread::sleep(Duration::from_millis(100));
            self.seen.extend(self.lines.try_iter());
            (status, self.seen.join("\n"))
        }
    }

    /// The number in `… (N queued messages of …): resuming`.
    fn resumed_entries(err: &str) -> u64 {
        err.lines()
            .find(|l| l.starts_with("the destination holds part of this migration"))
            .and_then(|l| l.split_once('('))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.replace(',', "").parse().ok())
            .unwrap_or_else(|| panic!("the run did not resume: {err}"))
    }

    /// In-process, with batches of a few entries: a source holding what
    /// MQTT traffic rarely leaves offline (an entry released by PUBREC,
    /// incoming QoS 2 ids, a body shared at different places of three
    /// queues, MQTT 5 properties) goes memory -> SQLite -> Redis -> MongoDB
    /// -> memory, each hop verified by the migration itself, and the last
    /// store holds each body once.
    #[test]
    fn states_and_shared_bodies_through_every_backend() {
        use std::sync::Arc;

        use broker::migrate::{migrate, Limits, Options, Progress, Stop};
        use broker_core::message::{Message, MessageProperties, QoS as Q};
        use broker_core::storage::{
            Delivery, PacketOp, PacketState, QueueTarget, SessionRecord, SubscriptionRecord,
        };
        use broker_core::subscription::SubscriptionOptions;
        use storage_memory::MemoryStore;

        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = unique("migrate-states");
        let db = unique("migrate_states").replace('-', "_");
        let urls = [
            format!("sqlite://{}/states.db", dir.path().display()),
            redis_url(&prefix),
            mongodb_url(&db),
        ];
        let options = Options {
            limits: Limits {
                page: 3,
                sessions_per_group: 2,
                batch_bytes: 100,
            },
            ..Options::default()
        };
        runtime.block_on(async {
            let source = Arc::new(MemoryStore::new());
            let s = source.storage();
            let body = |id: u64, topic: &str| {
                let mut m = Message::new(topic, format!("body {id}"), Q::ExactlyOnce, false);
                m.id = id;
                m.properties = MessageProperties {
                    content_type: Some("text/plain".into()),
                    user_properties: vec![("k".into(), format!("v{id}"))],
                    ..MessageProperties::default()
                };
                Arc::new(m)
            };
            let at = |client: &str, seq: u64| QueueTarget {
                client: client.into(),
                seq,
                delivery: Delivery {
                    subscription_ids: vec![seq as u32],
                    ..Delivery::new(Q::ExactlyOnce)
                },
            };
            let mut ops = Vec::new();
            for (n, client) in ["a", "b", "c"].into_iter().enumerate() {
                s.subscriptions
                    .save_session(&SessionRecord {
                        client_id: client.into(),
                        expiry_secs: Some(60 * (n as u32 + 1)),
                        disconnected_at_ms: Some(1_700_000_000_000 + n as u64),
                    })
                    .await
                    .expect("session");
                s.subscriptions
                    .add_subscriptions(
                        client,
                        &[SubscriptionRecord {
                            filter: format!("t/{client}/#"),
                            options: SubscriptionOptions::new(Q::ExactlyOnce),
                        }],
                    )
                    .await
                    .expect("subscription");
                for seq in 1..=7u64 {
                    let id = 10 * (n as u64 + 1) + seq;
                    ops.push(PacketOp::Enqueue {
                        message: body(id, &format!("t/{client}/{seq}")),
                        targets: vec![at(client, seq)],
                    });
                }
            }
            ops.push(PacketOp::Enqueue {
                message: body(99, "t/shared"),
                targets: vec![at("a", 8), at("b", 12), at("c", 20)],
            });
            for (client, seq, packet_id) in [("a", 1, 5), ("c", 7, 6)] {
                ops.push(PacketOp::SetState {
                    client: client.into(),
                    seq,
                    state: PacketState::Released { packet_id },
                });
            }
            ops.push(PacketOp::IncomingQos2Received {
                client: "b".into(),
                packet_id: 300,
            });
            s.packets.write(ops).await.expect("source queues");

            let mut from = s.clone();
            let mut opened = Vec::new();
            for url in &urls {
                let to = broker::storage_url::open_closable(url)
                    .await
                    .unwrap_or_else(|e| panic!("open {url}: {e:#}"));
                migrate(
                    &from,
                    &to.storage,
                    &options,
                    &Progress::quiet(),
                    &Stop::new(),
                )
                .await
                .unwrap_or_else(|e| panic!("migrate to {url}: {e:#}"));
                from = to.storage.clone();
                opened.push(to);
            }
            let last = Arc::new(MemoryStore::new());
            migrate(
                &from,
                &last.storage(),
                &options,
                &Progress::quiet(),
                &Stop::new(),
            )
            .await
            .expect("migrate to memory");
            assert_eq!(last.stored_bodies(), source.stored_bodies());
            assert_eq!(last.queued_packets(), 24);
            let a = last
                .storage()
                .packets
                .read_queue("a", None, 1)
                .await
                .expect("a");
            assert_eq!(a[0].state, PacketState::Released { packet_id: 5 });
            assert_eq!(
                last.storage().packets.incoming_qos2("b").await.expect("b"),
                [300]
            );
            drop(from);
            for o in opened {
                o.close().await;
            }
            let _ = storage_redis::RedisStore::destroy(&urls[1], Default::default()).await;
            if let Ok(client) = mongodb::Client::with_uri_str(mongodb_url(&db)).await {
                let _ = client.database(&db).drop().await;
            }
        });
    }

    #[test]
    fn backlog_goes_sqlite_redis_mongo_sqlite() {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let cwd = dir.path();
        let prefix = unique("migrate");
        let db = unique("migrate").replace('-', "_");
        // A short lease: the run after the kill need not wait long for it.
        let redis = with_param(&redis_url(&prefix), "lease_ms=3000");
        // Batches of 1,760 entries take the MongoDB-compatible test server
        // seconds, more on a loaded machine: past the default 10 s bound.
        let mongo = with_param(
            &with_param(&mongodb_url(&db), "lease_ms=3000"),
            "timeoutMS=60000",
        );
        let bodies = (SESSIONS * PER_SESSION + SHARED) as u64;
        let entries = (SESSIONS * (PER_SESSION + SHARED)) as u64;

        let started = Instant::now();
        let broker = BrokerProcess::start(cwd, &["--storage", "sqlite://source.db"]);
        runtime.block_on(make_backlog(broker.port));
        assert!(broker.terminate().success());
        eprintln!(
            "backlog of {bodies} messages made in {:.1?}",
            started.elapsed()
        );
        assert_eq!(sqlite_bodies(&cwd.join("source.db")) as u64, bodies);

        // What is stored, as the offline tools show it.
        let (ok, out, err) = run(
            cwd,
            &["sessions", "--storage", "sqlite://source.db"],
            Duration::from_secs(30),
        );
        assert!(ok, "{err}");
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("sub-")).collect();
        assert_eq!(lines.len(), SESSIONS, "{out}");
        let line = lines
            .iter()
            .find(|l| l.starts_with("sub-7 "))
            .expect("a line for sub-7");
        assert!(
            line.contains("expiry=never")
                && line.contains("subscriptions=2 [all qos1, t/7 qos1]")
                && line.contains(&format!("queued={}", PER_SESSION + SHARED))
                && line.contains("incoming_qos2=[]"),
            "{line}"
        );
        let (ok, out, err) = run(
            cwd,
            &[
                "sessions",
                "--storage",
                "sqlite://source.db",
                "--client",
                "sub-7",
                "--json",
            ],
            Duration::from_secs(30),
        );
        assert!(ok, "{err}");
        let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        let queued_bytes: u64 = expected(7).iter().map(|p| p.len() as u64).sum();
        assert_eq!(json[0]["client_id"], "sub-7", "{out}");
        assert_eq!(json[0]["queued"], PER_SESSION + SHARED, "{out}");
        assert_eq!(json[0]["queued_bytes"], queued_bytes, "{out}");
        assert_eq!(json[0]["subscriptions"][1]["filter"], "t/7", "{out}");
        assert_eq!(json.as_array().map(Vec::len), Some(1));
        let (ok, out, err) = run(
            cwd,
            &["retained", "--storage", "sqlite://source.db"],
            Duration::from_secs(30),
        );
        assert!(ok, "{err}");
        assert!(
            out.lines()
                .any(|l| l == "keep/me qos=1 bytes=16 preview=\"retained payload\""),
            "{out}"
        );
        assert!(out.contains("$SYS/broker/id qos=0"), "{out}");

        let mut times = Vec::new();
        times.push(("sqlite -> redis", hop(cwd, "sqlite://source.db", &redis)));
        assert_eq!(redis_bodies(&prefix) as u64, bodies, "bodies in Redis");

        // Stopped partway by SIGTERM (the first batches are in MongoDB),
        // then run again: it resumes where it stopped.
        let mut running = Running::start(cwd, &redis, &mongo);
        runtime.block_on(async {
            let client = mongodb::Client::with_uri_str(mongodb_url(&db))
                .await
                .expect("connect to MongoDB");
            let packets = client
                .database(&db)
                .collection::<mongodb::bson::Document>("packets");
            let deadline = Instant::now() + Duration::from_secs(60);
            while packets
                .count_documents(mongodb::bson::doc! {})
                .await
                .unwrap_or(0)
                == 0
            {
                assert!(
                    !running.ended(),
                    "the migration ended before it was interrupted"
                );
                assert!(Instant::now() < deadline, "no queue entry reached MongoDB");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let (status, stopped) = running.finish(Some("-TERM"));
        eprintln!("--- Redis -> MongoDB, stopped by SIGTERM ({status}):\n{stopped}");
        assert!(!status.success(), "{stopped}");
        assert!(
            stopped.contains("interrupted: the destination holds part"),
            "{stopped}"
        );
        let again = Instant::now();
        let (ok, _, err) = run(
            cwd,
            &["migrate", "--from", &redis, "--to", &mongo],
            Duration::from_secs(120),
        );
        times.push(("redis -> mongodb (resumed)", again.elapsed()));
        eprintln!("--- the same, run again: {:.1?}\n{err}", again.elapsed());
        assert!(ok, "resumed migration failed: {err}");
        let present = resumed_entries(&err);
        assert!(
            present > 0 && present < entries,
            "the stopped run copied {present} entries: not an interruption partway"
        );
        assert!(err.contains("the destination matches the source"), "{err}");
        assert_eq!(
            runtime.block_on(mongo_bodies(&db)),
            bodies,
            "bodies in MongoDB"
        );

        // Killed (`kill -9`) as soon as the queues are being copied, then
        // run again (after the source's lease expires).
        let mut running = Running::start(cwd, &mongo, "sqlite://last.db");
        running.wait_for("sessions: 100 sessions");
        let (_, killed) = running.finish(Some("-KILL"));
        eprintln!("--- MongoDB -> SQLite, killed:\n{killed}");
        assert!(!killed.contains("verify:"), "{killed}");
        times.push((
            "mongodb -> sqlite (after kill -9)",
            hop(cwd, &mongo, "sqlite://last.db"),
        ));
        assert_eq!(sqlite_bodies(&cwd.join("last.db")) as u64, bodies);
        eprintln!("hop times: {times:?}");

        let broker = BrokerProcess::start(cwd, &["--storage", "sqlite://last.db"]);
        let port = broker.port;
        runtime.block_on(async {
            let drains: Vec<_> = (0..SESSIONS)
                .map(|i| tokio::spawn(drain(port, i)))
                .collect();
            for d in drains {
                d.await.expect("drain task");
            }
            let (mut mqtt, _) = Mqtt::connect(port, "late", true).await;
            mqtt.subscribe("keep/#", QoS::AtLeastOnce).await;
            let p = mqtt
                .next_publish(Duration::from_secs(10))
                .await
                .expect("the retained message");
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                ("keep/me", &b"retained payload"[..])
            );
            assert!(p.retain);
            mqtt.disconnect().await;
        });
        drop(broker);
        eprintln!("whole test: {:.1?}", started.elapsed());

        runtime.block_on(async {
            let _ = storage_redis::RedisStore::destroy(&redis, Default::default()).await;
            if let Ok(client) = mongodb::Client::with_uri_str(mongodb_url(&db)).await {
                let _ = client.database(&db).drop().await;
            }
        });
    }
}
