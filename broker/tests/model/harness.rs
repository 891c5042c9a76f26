//! Runs a case against the real broker (in process, on 127.0.0.1:0, on a
//! real store) and the reference model side by side, and compares every
//! packet the clients receive with what the model says they must.
//!
//! Each operation is applied to both; then every connected client reads
//! exactly the packets the model predicts. Waits are for the broker's own
//! state (a disconnect has been noticed, the old broker let go of its
//! store), never a sleep: the model stays exact and the test fast.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::config::BrokerConfig;
use broker_core::server::Server;
use broker_core::storage::Storage;
use broker_core::Broker;
use storage_memory::MemoryStore;
use tokio::task::JoinHandle;

use super::client::{Raw, Rx, Tx};
use super::ops::{client_id, Case, Op, Proto, CLIENTS, FILTERS, TOPICS};
use super::reference::{Ack, DeliveryId, Dup, Expect, Model, Msg, PidRule};

/// How long a client waits for a packet the model says must come. Only a
/// broken broker makes it expire; override with `MODEL_WAIT_MS`.
fn wait() -> Duration {
    Duration::from_millis(
        std::env::var("MODEL_WAIT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000),
    )
}

/// How long the final check listens for packets the model does not expect.
const QUIET: Duration = Duration::from_millis(150);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Sqlite,
    #[allow(dead_code)]
    Redis,
}

/// The store, kept across restarts.
enum Store {
    Memory(Arc<MemoryStore>),
    Sqlite {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    },
    #[cfg(feature = "redis")]
    Redis {
        url: String,
    },
}

impl Store {
    fn new(backend: Backend) -> Store {
        match backend {
            Backend::Memory => Store::Memory(Arc::new(MemoryStore::new())),
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("model.db");
                Store::Sqlite { _dir: dir, path }
            }
            #[cfg(feature = "redis")]
            Backend::Redis => Store::Redis {
                url: crate::redis_url(),
            },
            #[cfg(not(feature = "redis"))]
            Backend::Redis => unreachable!("built without the redis feature"),
        }
    }

    /// Open the store: the same memory, file or key prefix every time.
    async fn open(&self) -> Result<Storage, String> {
        match self {
            Store::Memory(m) => Ok(m.storage()),
            Store::Sqlite { path, .. } => {
                // The stopped broker's store closes the file on its own
                // thread once its last write is done: retry while locked.
                let deadline = Instant::now() + wait();
                loop {
                    match storage_sqlite::SqliteStore::open(path, Default::default()) {
                        Ok(store) => return Ok(Arc::new(store).storage()),
                        Err(e) if e.to_string().contains("locked") && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(2)).await
                        }
                        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
                    }
                }
            }
            #[cfg(feature = "redis")]
            Store::Redis { url } => {
                let store = storage_redis::RedisStore::open(url, Default::default())
                    .await
                    .map_err(|e| format!("cannot open {url}: {e}"))?;
                Ok(Arc::new(store).storage())
            }
        }
    }

    /// Remove what the case left in a shared server.
    async fn clean_up(&self) {
        #[cfg(feature = "redis")]
        if let Store::Redis { url } = self {
            if let Ok(s) = storage_redis::RedisStore::open(url, Default::default()).await {
                let _ = s.clear().await;
            }
        }
    }
}

struct Running {
    addr: SocketAddr,
    broker: Broker,
    task: JoinHandle<()>,
}

/// A subscriber as the harness plays it.
#[derive(Default)]
struct Client {
    conn: Option<Raw>,
    /// Acknowledgements held back on this connection, with the delivery each is for.
    owed: VecDeque<(Tx<'static>, DeliveryId)>,
    /// Packet ids the client has seen and not yet released with PUBACK or
    /// PUBCOMP: the broker may not reuse them.
    pids: HashMap<u16, DeliveryId>,
    next_pid: u16,
}

pub struct Harness {
    config: BrokerConfig,
    store: Store,
    running: Option<Running>,
    publisher: Option<Raw>,
    publisher_pid: u16,
    clients: Vec<Client>,
    /// What happened, for the failure report.
    pub trace: Vec<String>,
}

fn payload(m: Msg) -> String {
    format!("m{m}")
}

impl Harness {
    pub async fn start(backend: Backend, case: &Case) -> Result<Harness, String> {
        let config = BrokerConfig {
            max_inflight: case.max_inflight,
            // Queues restored at a restart are read two entries at a time,
            // so that every case with a restart crosses pages.
            queue_page: 2,
            ..BrokerConfig::default()
        };
        let mut h = Harness {
            config,
            store: Store::new(backend),
            running: None,
            publisher: None,
            publisher_pid: 0,
            clients: (0..CLIENTS).map(|_| Client::default()).collect(),
            trace: Vec::new(),
        };
        h.boot().await?;
        Ok(h)
    }

    async fn boot(&mut self) -> Result<(), String> {
        let storage = self.store.open().await?;
        let broker = Broker::start(self.config.clone(), storage)
            .await
            .map_err(|e| format!("broker does not start: {e}"))?;
        let server = Server::bind(broker.clone(), "127.0.0.1:0")
            .await
            .map_err(|e| format!("bind: {e}"))?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        let task = tokio::spawn(server.run());
        self.running = Some(Running { addr, broker, task });
        let (publisher, _) =
            Raw::connect(addr, "publisher", Proto::V3 { clean: true }, wait()).await?;
        self.publisher = Some(publisher);
        Ok(())
    }

    fn addr(&self) -> SocketAddr {
        self.running.as_ref().expect("broker running").addr
    }

    fn broker(&self) -> &Broker {
        &self.running.as_ref().expect("broker running").broker
    }

    fn note(&mut self, s: String) {
        self.trace.push(s);
    }

    /// Apply one operation to the broker and the model, then read what the
    /// model says each connected client must now receive.
    pub async fn step(&mut self, m: &mut Model, op: &Op) -> Result<(), String> {
        self.note(format!("> {op:?}"));
        match *op {
            Op::Connect { c, proto } => {
                if self.clients[c].conn.is_some() {
                    self.barrier(c).await?;
                }
                let want_present = m.connect(c, proto);
                let (conn, present) = Raw::connect(self.addr(), &client_id(c), proto, wait())
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                // A takeover: the broker has closed the old connection by now.
                let old = self.clients[c].conn.replace(conn);
                drop(old);
                self.clients[c].owed.clear();
                if !present {
                    self.clients[c].pids.clear();
                }
                if present != want_present {
                    return Err(format!(
                        "CONNACK session present = {present}, the model says {want_present}"
                    ));
                }
            }
            Op::Disconnect { c, expiry_zero } => {
                if self.clients[c].conn.is_some() {
                    self.barrier(c).await?;
                    let conn = self.clients[c].conn.as_mut().expect("connected");
                    let expiry = (expiry_zero && conn.v5).then_some(0);
                    conn.send(Tx::Disconnect { expiry }).await?;
                    conn.shutdown().await;
                    m.disconnect(c, expiry_zero);
                    self.gone(c).await?;
                }
            }
            Op::DropSocket { c } => {
                if self.clients[c].conn.is_some() {
                    self.barrier(c).await?;
                    m.disconnect(c, false);
                    self.gone(c).await?;
                }
            }
            Op::Subscribe { c, filter, qos } => {
                if self.clients[c].conn.is_some() {
                    let want = m.subscribe(c, filter, qos);
                    let pid = self.client_pid(c);
                    let conn = self.clients[c].conn.as_mut().expect("connected");
                    conn.send(Tx::Subscribe {
                        pid,
                        filter: FILTERS[filter],
                        qos,
                    })
                    .await?;
                    // Nothing is owed before SUBACK: anything else is an extra packet.
                    match conn.recv(wait()).await? {
                        Rx::SubAck(granted) if granted == vec![Some(want)] => {}
                        other => {
                            return Err(format!("expected SUBACK granting {want}, got {other:?}"))
                        }
                    }
                }
            }
            Op::Unsubscribe { c, filter } => {
                if self.clients[c].conn.is_some() {
                    let existed = m.unsubscribe(c, filter);
                    let pid = self.client_pid(c);
                    let conn = self.clients[c].conn.as_mut().expect("connected");
                    conn.send(Tx::Unsubscribe {
                        pid,
                        filter: FILTERS[filter],
                    })
                    .await?;
                    match conn.recv(wait()).await? {
                        Rx::UnsubAck(None) => {}
                        Rx::UnsubAck(Some(e)) if e == existed => {}
                        other => {
                            return Err(format!(
                                "expected UNSUBACK (existed: {existed}), got {other:?}"
                            ))
                        }
                    }
                }
            }
            Op::Publish { topic, qos, retain } => {
                let msg = m.publish(topic, qos, retain);
                self.publish(msg, topic, qos, retain).await?;
            }
            Op::Hold { c } => m.hold(c),
            Op::AckOne { c } => {
                if let Some(a) = m.ack_one(c) {
                    self.send_acks(c, &[a]).await?;
                }
            }
            Op::AckAll { c } => {
                let acks = m.ack_all(c);
                self.send_acks(c, &acks).await?;
            }
            Op::Restart => {
                self.restart().await?;
                // Deliveries the model lets the broker drop: the client
                // gives up their packet ids.
                for (c, d) in m.restart() {
                    self.clients[c].pids.retain(|_, held| *held != d);
                }
            }
        }
        for c in 0..CLIENTS {
            if self.clients[c].conn.is_some() != m.online(c) {
                return Err(format!(
                    "harness and model disagree on whether c{c} is connected (harness bug)"
                ));
            }
            let expected = m.pump(c);
            self.receive(m, c, expected).await?;
        }
        Ok(())
    }

    fn client_pid(&mut self, c: usize) -> u16 {
        let cl = &mut self.clients[c];
        cl.next_pid = cl.next_pid % 60000 + 1;
        cl.next_pid
    }

    /// Send held-back acknowledgements the model released, oldest first.
    async fn send_acks(&mut self, c: usize, acks: &[Ack]) -> Result<(), String> {
        for a in acks {
            let (tx, d) = self.clients[c]
                .owed
                .pop_front()
                .ok_or("the model released an acknowledgement the harness does not hold")?;
            if d != a.delivery() {
                return Err(format!(
                    "harness holds an ack for delivery {d}, model for {a:?}"
                ));
            }
            self.send_ack(c, tx).await?;
        }
        Ok(())
    }

    async fn send_ack(&mut self, c: usize, tx: Tx<'static>) -> Result<(), String> {
        let cl = &mut self.clients[c];
        if let Tx::PubAck(p) | Tx::PubComp(p) = tx {
            cl.pids.remove(&p);
        }
        self.trace.push(format!("  c{c} sends {tx:?}"));
        let conn = cl
            .conn
            .as_mut()
            .ok_or("ack without a connection (harness bug)")?;
        conn.send(tx).await
    }

    /// Read the packets the model predicts for `c`, acknowledging each as
    /// the model's client does. PUBLISH packets must come in exactly the
    /// predicted order, PUBREL packets too; how the two interleave depends
    /// on timing and is not checked.
    async fn receive(
        &mut self,
        m: &mut Model,
        c: usize,
        expected: Vec<Expect>,
    ) -> Result<(), String> {
        let mut publishes: VecDeque<Expect> = expected
            .iter()
            .filter(|e| matches!(e, Expect::Publish { .. }))
            .cloned()
            .collect();
        let mut releases: VecDeque<Expect> = expected
            .iter()
            .filter(|e| matches!(e, Expect::PubRel { .. }))
            .cloned()
            .collect();
        let holding = m.holding(c);
        while !publishes.is_empty() || !releases.is_empty() {
            let conn = self.clients[c].conn.as_mut().expect("connected");
            let got = conn.recv(wait()).await.map_err(|e| {
                format!(
                    "c{c}: {e}; still expected PUBLISH {:?} and PUBREL {:?}",
                    publishes, releases
                )
            })?;
            self.trace.push(format!("  c{c} got {got:?}"));
            let (ack, delivery) = match got {
                Rx::Publish {
                    pid,
                    qos,
                    dup,
                    retain,
                    ref topic,
                    ref payload,
                } => {
                    let Some(want) = publishes.pop_front() else {
                        return Err(format!("c{c}: unexpected {got:?} (nothing more was due)"));
                    };
                    let Expect::Publish {
                        delivery,
                        msg,
                        topic: wt,
                        qos: wq,
                        retain: wr,
                        dup: wd,
                        pid: wp,
                    } = want
                    else {
                        unreachable!()
                    };
                    let same = *payload == self::payload(msg)
                        && topic == TOPICS[wt]
                        && qos == wq
                        && retain == wr;
                    let dup_ok = match wd {
                        Dup::Zero => !dup,
                        Dup::One => dup,
                        Dup::Either => true,
                    };
                    if !same || !dup_ok {
                        return Err(format!("c{c}: got {got:?}, the model expects {want:?}"));
                    }
                    match (qos, pid, wp) {
                        (0, None, _) => {}
                        (_, Some(p), PidRule::Same)
                            if self.clients[c].pids.get(&p) == Some(&delivery) => {}
                        (_, Some(p), PidRule::Fresh) => {
                            if let Some(other) = self.clients[c].pids.get(&p) {
                                return Err(format!(
                                    "c{c}: {got:?} reuses packet id {p}, still in use by delivery {other}"
                                ));
                            }
                        }
                        _ => return Err(format!("c{c}: got {got:?}, the model expects {want:?}")),
                    }
                    let Some(p) = pid else { continue };
                    self.clients[c].pids.insert(p, delivery);
                    if qos == 1 {
                        (Tx::PubAck(p), delivery)
                    } else {
                        (Tx::PubRec(p), delivery)
                    }
                }
                Rx::PubRel(p) => {
                    let Some(want) = releases.pop_front() else {
                        return Err(format!("c{c}: unexpected {got:?} (nothing more was due)"));
                    };
                    let Expect::PubRel { delivery, .. } = want else {
                        unreachable!()
                    };
                    if self.clients[c].pids.get(&p) != Some(&delivery) {
                        return Err(format!("c{c}: got {got:?}, the model expects {want:?}"));
                    }
                    (Tx::PubComp(p), delivery)
                }
                other => return Err(format!("c{c}: unexpected {other:?}")),
            };
            if holding {
                self.clients[c].owed.push_back((ack, delivery));
            } else {
                self.send_ack(c, ack).await?;
            }
        }
        Ok(())
    }

    /// PINGREQ, and nothing but PINGRESP back: the broker has processed
    /// every acknowledgement sent before, and had nothing more to send that
    /// it could already send.
    async fn barrier(&mut self, c: usize) -> Result<(), String> {
        let conn = self.clients[c].conn.as_mut().expect("connected");
        conn.send(Tx::PingReq).await?;
        match conn.recv(wait()).await? {
            Rx::PingResp => Ok(()),
            other => Err(format!("c{c}: unexpected {other:?} (nothing more was due)")),
        }
    }

    /// Close `c`'s socket and wait until the broker has detached the session.
    async fn gone(&mut self, c: usize) -> Result<(), String> {
        self.clients[c].conn = None;
        self.clients[c].owed.clear();
        let id = client_id(c);
        let deadline = Instant::now() + wait();
        loop {
            let online = self.broker().session(&id).is_some_and(|s| s.online);
            if !online {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{id}: the broker did not notice the disconnect within {:?}",
                    wait()
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn publish(
        &mut self,
        msg: Msg,
        topic: usize,
        qos: u8,
        retain: bool,
    ) -> Result<(), String> {
        self.publisher_pid = self.publisher_pid % 60000 + 1;
        let pid = self.publisher_pid;
        let p = self.publisher.as_mut().expect("publisher connected");
        p.send(Tx::Publish {
            topic: TOPICS[topic],
            payload: payload(msg),
            qos,
            pid,
            retain,
        })
        .await?;
        let expect = |want: Rx, got: Rx| {
            if got == want {
                Ok(())
            } else {
                Err(format!("publisher: expected {want:?}, got {got:?}"))
            }
        };
        match qos {
            // The broker handles a client's packets in order: PINGRESP means
            // the QoS 0 message has been routed.
            0 => {
                p.send(Tx::PingReq).await?;
                expect(Rx::PingResp, p.recv(wait()).await?)
            }
            1 => expect(Rx::PubAck(pid), p.recv(wait()).await?),
            _ => {
                expect(Rx::PubRec(pid), p.recv(wait()).await?)?;
                p.send(Tx::PubRel(pid)).await?;
                expect(Rx::PubComp(pid), p.recv(wait()).await?)
            }
        }
    }

    /// Shut the broker down gracefully and start a new one on the same store.
    async fn restart(&mut self) -> Result<(), String> {
        for c in 0..CLIENTS {
            if self.clients[c].conn.is_some() {
                self.barrier(c).await?;
            }
        }
        let Running { broker, task, .. } = self.running.take().expect("broker running");
        // The broker waits for its clients to close after it closed them,
        // so they read to the end while it shuts down.
        let stopping = tokio::spawn({
            let broker = broker.clone();
            async move { broker.shutdown().await }
        });
        for c in 0..CLIENTS {
            if let Some(mut conn) = self.clients[c].conn.take() {
                conn.expect_closed(wait())
                    .await
                    .map_err(|e| format!("c{c} at shutdown: {e}"))?;
            }
            self.clients[c].owed.clear();
        }
        if let Some(mut p) = self.publisher.take() {
            p.expect_closed(wait())
                .await
                .map_err(|e| format!("publisher at shutdown: {e}"))?;
        }
        stopping
            .await
            .map_err(|e| format!("shutdown failed: {e}"))?;
        let _ = tokio::time::timeout(wait(), task).await;
        // The old broker's tasks let go of the store (the SQLite file's lock,
        // its last writes) before the new one opens it.
        let weak = broker_core::internals::weak_state(&broker);
        drop(broker);
        let deadline = Instant::now() + wait();
        while weak.strong_count() > 0 || self.store_busy() {
            if Instant::now() > deadline {
                return Err("the stopped broker still holds its store".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.boot().await
    }

    /// Whether anything but the harness still holds the memory store (the
    /// old broker's group-commit task finishing its last batch).
    fn store_busy(&self) -> bool {
        match &self.store {
            Store::Memory(m) => Arc::strong_count(m) > 1,
            _ => false,
        }
    }

    /// Deliver everything that is owed: every client gives its held-back
    /// acknowledgements, every kept session reconnects and drains; then a
    /// restart, and nothing may come back (acknowledged means removed from
    /// the store); then nothing arrives that the model did not predict.
    pub async fn finish(&mut self, m: &mut Model) -> Result<(), String> {
        self.note("> finish: acknowledge and drain everything".into());
        for round in 0..2 {
            for c in 0..CLIENTS {
                self.step(m, &Op::AckAll { c }).await?;
                if m.offline_session(c) {
                    self.step(
                        m,
                        &Op::Connect {
                            c,
                            proto: Proto::V3 { clean: false },
                        },
                    )
                    .await?;
                }
            }
            for c in 0..CLIENTS {
                if m.queued(c) > 0 {
                    return Err(format!(
                        "model: c{c} still has {} queued after draining (model bug)",
                        m.queued(c)
                    ));
                }
            }
            if round == 0 {
                self.step(m, &Op::Restart).await?;
            }
        }
        for c in 0..CLIENTS {
            if let Some(conn) = self.clients[c].conn.as_mut() {
                if let Some(p) = conn.try_recv(QUIET).await? {
                    return Err(format!(
                        "c{c}: unexpected {p:?} after everything was delivered"
                    ));
                }
            }
        }
        Ok(())
    }

    pub async fn close(mut self) {
        for c in &mut self.clients {
            c.conn = None;
        }
        self.publisher = None;
        if let Some(Running { broker, task, .. }) = self.running.take() {
            broker.shutdown().await;
            let _ = tokio::time::timeout(wait(), task).await;
        }
        self.store.clean_up().await;
    }
}
