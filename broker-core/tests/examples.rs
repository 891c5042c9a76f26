//! The examples, run as their own processes and driven over TCP by a real
//! MQTT client (rumqttc): `examples/chat.rs` (offline messages in order, the
//! bot's answer, the log of publishes) and `examples/auth.rs` (logins and
//! topic rules).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, Incoming, MqttOptions,
    Outgoing, Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// How long a test waits for something that should happen promptly.
const WAIT: Duration = Duration::from_secs(15);
/// How long it waits to be sure something does not happen.
const QUIET: Duration = Duration::from_millis(500);

/// A running example; killed when dropped, a failed test included.
struct Example {
    child: Child,
    addr: SocketAddr,
    stdout: mpsc::UnboundedReceiver<String>,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Example {
    /// Build the example `name`, start it on a free port, and wait for its
    /// `listening on ADDR`.
    async fn start(name: &str) -> Example {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "-q", "-p", "broker-core", "--example", name])
            .current_dir(&root);
        // What cargo sets for this test binary is not for the build: a build
        // script that watches one of these (`ring`'s watches
        // `CARGO_MANIFEST_DIR`) would rebuild, and the next `cargo test` again.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k.starts_with("CARGO_BIN_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&k.as_ref())
            {
                cargo.env_remove(&key);
            }
        }
        let build = cargo.output().expect("cargo runs");
        assert!(
            build.status.success(),
            "cannot build the example {name}:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|t| if t.is_relative() { root.join(t) } else { t })
            .unwrap_or_else(|| root.join("target"));
        let binary = target.join("debug/examples").join(name);
        let mut child = Command::new(&binary)
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let (tx, mut stdout) = mpsc::unbounded_channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut example = Example {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout: mpsc::unbounded_channel().1,
        };
        let line = timeout(WAIT, async {
            loop {
                match stdout.recv().await {
                    Some(l) if l.starts_with("listening on ") => return l,
                    Some(_) => {}
                    None => panic!("{name} exited before listening"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} did not print `listening on ADDR` in time"));
        example.addr = line["listening on ".len()..]
            .parse()
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        example.stdout = stdout;
        example
    }

    /// Wait for a line of its output equal to `expected`.
    async fn expect_line(&mut self, expected: &str) {
        let mut seen = Vec::new();
        let found = timeout(WAIT, async {
            while let Some(l) = self.stdout.recv().await {
                if l == expected {
                    return true;
                }
                seen.push(l);
            }
            false
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "no line {expected:?} in the output; saw {seen:?}"
        );
    }
}

/// A rumqttc client whose event loop runs in a task; what the broker sends
/// arrives on `incoming`, and the error that ended the loop last.
struct Mqtt {
    client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<Result<Incoming, ConnectionError>>,
}

fn options(addr: SocketAddr, id: &str, clean: bool, login: Option<(&str, &str)>) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    o
}

fn run(options: MqttOptions) -> Mqtt {
    let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(options, 100);
    let (tx, incoming) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(i)) => {
                    if tx.send(Ok(i)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(Event::Outgoing(_)) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    Mqtt { client, incoming }
}

impl Mqtt {
    /// Connect and wait for a successful CONNACK; returns its session present flag.
    async fn connect(options: MqttOptions) -> (Mqtt, bool) {
        let id = options.client_id();
        let mut m = run(options);
        let present = match m.next(&id).await {
            Incoming::ConnAck(a) => a.session_present,
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        };
        (m, present)
    }

    /// The next packet from the broker.
    async fn next(&mut self, who: &str) -> Incoming {
        match timeout(WAIT, self.incoming.recv()).await {
            Ok(Some(Ok(i))) => i,
            Ok(Some(Err(e))) => panic!("{who}: connection failed: {e:?}"),
            Ok(None) => panic!("{who}: event loop ended"),
            Err(_) => panic!("{who}: nothing from the broker in {WAIT:?}"),
        }
    }

    /// The next PUBLISH, skipping acknowledgements and the like.
    async fn publish(&mut self, who: &str) -> Publish {
        loop {
            if let Incoming::Publish(p) = self.next(who).await {
                return p;
            }
        }
    }

    /// A PUBLISH within `QUIET`, if one comes.
    async fn maybe_publish(&mut self) -> Option<Publish> {
        timeout(QUIET, async {
            loop {
                match self.incoming.recv().await {
                    Some(Ok(Incoming::Publish(p))) => return Some(p),
                    Some(Ok(_)) => {}
                    _ => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Subscribe and wait for the SUBACK's return code.
    async fn subscribe(&mut self, who: &str, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        loop {
            if let Incoming::SubAck(a) = self.next(who).await {
                return a.return_codes[0];
            }
        }
    }

    /// Publish at QoS 1 and wait for its PUBACK.
    async fn publish_acked(&mut self, who: &str, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish queued");
        loop {
            if let Incoming::PubAck(_) = self.next(who).await {
                return;
            }
        }
    }

    /// Disconnect and wait until the event loop is done.
    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("disconnect queued");
        let closed = timeout(WAIT, async {
            while self.incoming.recv().await.is_some() {}
        })
        .await;
        assert!(closed.is_ok(), "the connection did not close");
    }
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_keeps_offline_messages_in_order_and_the_bot_answers() {
    let mut chat = Example::start("chat").await;
    let addr = chat.addr;

    // alice's device subscribes to her topic, then goes away.
    let (mut alice, _) = Mqtt::connect(options(addr, "alice", false, None)).await;
    assert_eq!(
        alice.subscribe("alice", "chat/alice").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    alice.disconnect().await;

    // bob writes to her while she is offline.
    let (mut bob, _) = Mqtt::connect(options(addr, "bob", true, None)).await;
    for n in 0..5 {
        bob.publish_acked("bob", "chat/alice", &format!("message {n}"))
            .await;
    }

    // She comes back to all of it, in order.
    let (mut alice, present) = Mqtt::connect(options(addr, "alice", false, None)).await;
    assert!(present, "alice's session was kept");
    for n in 0..5 {
        let p = alice.publish("alice").await;
        assert_eq!(
            (p.topic.as_str(), text(&p)),
            ("chat/alice", format!("message {n}"))
        );
    }
    assert!(
        alice.maybe_publish().await.is_none(),
        "nothing more, no duplicate"
    );

    // The bot answers on the asker's own topic.
    assert_eq!(
        bob.subscribe("bob", "chat/bob").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    bob.publish_acked("bob", "chat/bot/ask", "who is here?")
        .await;
    let answer = bob.publish("bob").await;
    assert_eq!(answer.topic, "chat/bob");
    assert!(
        text(&answer).contains("who is here?"),
        "answer: {:?}",
        text(&answer)
    );

    // Every publish of a client was logged.
    chat.expect_line("bob -> chat/alice: message 0").await;
    chat.expect_line("bob -> chat/bot/ask: who is here?").await;
    alice.disconnect().await;
    bob.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_checks_logins_and_topics() {
    let auth = Example::start("auth").await;
    let addr = auth.addr;

    // A wrong password is refused.
    let mut intruder = run(options(addr, "intruder", true, Some(("alice", "guess"))));
    match timeout(WAIT, intruder.incoming.recv()).await {
        Ok(Some(Err(ConnectionError::ConnectionRefused(code)))) => {
            assert_eq!(code, ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    // So is a client without a username.
    let mut anonymous = run(options(addr, "anonymous", true, None));
    match timeout(WAIT, anonymous.incoming.recv()).await {
        Ok(Some(Err(ConnectionError::ConnectionRefused(code)))) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }

    // Good logins work; `admin/` is off limits to subscriptions.
    let (mut alice, _) = Mqtt::connect(options(
        addr,
        "alice-1",
        true,
        Some(("alice", "wonderland")),
    ))
    .await;
    assert_eq!(
        alice.subscribe("alice", "admin/#").await,
        SubscribeReasonCode::Failure
    );
    assert_eq!(
        alice.subscribe("alice", "#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );

    // bob may publish under users/bob/ only: the forged one is acknowledged
    // (MQTT 3.1.1 has no refusal) and dropped.
    let (mut bob, _) = Mqtt::connect(options(addr, "bob-1", true, Some(("bob", "builder")))).await;
    bob.publish_acked("bob", "users/alice/status", "forged")
        .await;
    bob.publish_acked("bob", "users/bob/status", "online").await;

    // alice gets bob's allowed message and her own retained note, not bob's
    // note (private/bob/) nor the forged message.
    let mut got = Vec::new();
    while got.len() < 2 {
        let p = alice.publish("alice").await;
        got.push((p.topic.clone(), text(&p)));
    }
    if let Some(p) = alice.maybe_publish().await {
        got.push((p.topic.clone(), text(&p)));
    }
    got.sort();
    assert_eq!(
        got,
        [
            (
                "private/alice/notes".to_string(),
                "welcome, alice".to_string()
            ),
            ("users/bob/status".to_string(), "online".to_string()),
        ]
    );
    alice.disconnect().await;
    bob.disconnect().await;
}
