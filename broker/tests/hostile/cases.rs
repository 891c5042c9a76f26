//! Hostile clients, written once and used twice: `broker/tests/hostile.rs`
//! asserts what this broker does, and the `hostile` tool of `benches` runs the
//! same cases against this broker and Mosquitto side by side.
//!
//! MQTT is spoken here byte by byte (no codec, no client library), because a
//! hostile client sends what no library would, and because the same bytes
//! must reach both brokers. Every case is bounded in count and in time.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------- the wire

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V3,
    V5,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V3 => "3.1.1",
            Version::V5 => "5",
        })
    }
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// The parts of a CONNECT the cases vary.
#[derive(Clone, Debug)]
pub struct Connect<'a> {
    pub version: Version,
    /// Protocol level byte; `None` for the version's own (4 or 5).
    pub level: Option<u8>,
    pub id: &'a str,
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval.
    pub session_expiry: Option<u32>,
    /// Topic and payload of a QoS 1 will.
    pub will: Option<(&'a str, &'a [u8])>,
}

impl<'a> Connect<'a> {
    pub fn new(version: Version, id: &'a str) -> Connect<'a> {
        Connect {
            version,
            level: None,
            id,
            clean: true,
            keep_alive: 0,
            session_expiry: None,
            will: None,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let v5 = self.version == Version::V5;
        let mut b = Vec::new();
        string(b"MQTT", &mut b);
        b.push(self.level.unwrap_or(if v5 { 5 } else { 4 }));
        let mut flags = if self.clean { 0x02 } else { 0 };
        if self.will.is_some() {
            flags |= 0x04 | 0x08; // will, QoS 1
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            let mut props = Vec::new();
            if let Some(e) = self.session_expiry {
                props.push(0x11);
                props.extend_from_slice(&e.to_be_bytes());
            }
            varint(props.len(), &mut b);
            b.extend_from_slice(&props);
        }
        string(self.id.as_bytes(), &mut b);
        if let Some((topic, payload)) = self.will {
            if v5 {
                b.push(0); // no will properties
            }
            string(topic.as_bytes(), &mut b);
            string(payload, &mut b);
        }
        frame(0x10, &b)
    }
}

pub fn subscribe(v: Version, pid: u16, filters: &[String], qos: u8) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    if v == Version::V5 {
        b.push(0);
    }
    for f in filters {
        string(f.as_bytes(), &mut b);
        b.push(qos);
    }
    frame(0x82, &b)
}

pub fn unsubscribe(v: Version, pid: u16, filters: &[String]) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    if v == Version::V5 {
        b.push(0);
    }
    for f in filters {
        string(f.as_bytes(), &mut b);
    }
    frame(0xA2, &b)
}

pub fn publish(v: Version, topic: &str, qos: u8, pid: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(topic.len() + payload.len() + 8);
    string(topic.as_bytes(), &mut b);
    if qos > 0 {
        b.extend_from_slice(&pid.to_be_bytes());
    }
    if v == Version::V5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &b)
}

pub fn puback(pid: u16) -> Vec<u8> {
    frame(0x40, &pid.to_be_bytes())
}

pub const PINGREQ: [u8; 2] = [0xC0, 0];
pub const DISCONNECT: [u8; 2] = [0xE0, 0];

/// A topic (or filter, with `last` = "#") of `levels` levels.
pub fn deep(levels: usize, last: &str) -> String {
    let mut s = "a/".repeat(levels - 1);
    s.push_str(last);
    s
}

/// One packet from the broker: its first byte and its body.
#[derive(Clone, Debug)]
pub struct Packet {
    pub first: u8,
    pub body: Vec<u8>,
}

/// What a client saw next: a packet, classified, or how the stream ended.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    Connack(u8),
    Suback(Vec<u8>),
    Unsuback(Vec<u8>),
    Puback(u8),
    Pubrec(u8),
    Publish(String),
    Pingresp,
    Disconnect(u8),
    Other(u8),
    /// The broker closed the connection (FIN).
    Closed,
    /// The connection was reset (RST): whatever the broker sent last may be lost.
    Reset,
    /// Nothing within the time allowed.
    Silent,
}

impl Seen {
    pub fn is_end(&self) -> bool {
        matches!(self, Seen::Closed | Seen::Reset)
    }
}

fn codes(c: &[u8]) -> String {
    let mut counts = BTreeMap::<u8, usize>::new();
    for &x in c {
        *counts.entry(x).or_default() += 1;
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(code, n)| {
            if *n == 1 {
                format!("0x{code:02X}")
            } else {
                format!("{n}x0x{code:02X}")
            }
        })
        .collect();
    parts.join("+")
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Seen::Connack(c) => write!(f, "CONNACK 0x{c:02X}"),
            Seen::Suback(c) => write!(f, "SUBACK {}", codes(c)),
            Seen::Unsuback(c) if c.is_empty() => write!(f, "UNSUBACK"),
            Seen::Unsuback(c) => write!(f, "UNSUBACK {}", codes(c)),
            Seen::Puback(c) => write!(f, "PUBACK 0x{c:02X}"),
            Seen::Pubrec(c) => write!(f, "PUBREC 0x{c:02X}"),
            Seen::Publish(t) if t.len() > 40 => write!(f, "PUBLISH ({} byte topic)", t.len()),
            Seen::Publish(t) => write!(f, "PUBLISH {t}"),
            Seen::Pingresp => write!(f, "PINGRESP"),
            Seen::Disconnect(c) => write!(f, "DISCONNECT 0x{c:02X}"),
            Seen::Other(k) => write!(f, "packet type {k}"),
            Seen::Closed => write!(f, "closed"),
            Seen::Reset => write!(f, "reset"),
            Seen::Silent => write!(f, "nothing"),
        }
    }
}

/// Skip a packet id and MQTT 5 properties, returning what follows.
fn after_props(v: Version, body: &[u8], skip: usize) -> &[u8] {
    let rest = body.get(skip..).unwrap_or(&[]);
    if v == Version::V3 {
        return rest;
    }
    let (len, used) = read_varint(rest).unwrap_or((0, rest.len()));
    rest.get(used + len..).unwrap_or(&[])
}

fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut n = 0usize;
    for (i, &x) in b.iter().enumerate().take(4) {
        n |= usize::from(x & 0x7F) << (7 * i);
        if x & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

pub fn classify(v: Version, p: &Packet) -> Seen {
    let b = &p.body;
    let reason = |at: usize| {
        if v == Version::V5 {
            b.get(at).copied().unwrap_or(0)
        } else {
            0
        }
    };
    match p.first >> 4 {
        2 => Seen::Connack(b.get(1).copied().unwrap_or(0xFF)),
        3 => {
            let len = b
                .get(..2)
                .map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
            let topic = b.get(2..2 + len).unwrap_or(&[]);
            Seen::Publish(String::from_utf8_lossy(topic).into_owned())
        }
        4 => Seen::Puback(reason(2)),
        5 => Seen::Pubrec(reason(2)),
        9 => Seen::Suback(after_props(v, b, 2).to_vec()),
        11 => Seen::Unsuback(after_props(v, b, 2).to_vec()),
        13 => Seen::Pingresp,
        14 => Seen::Disconnect(b.first().copied().unwrap_or(0)),
        k => Seen::Other(k),
    }
}

/// A raw connection.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub v: Version,
}

impl Conn {
    pub async fn open(addr: SocketAddr, v: Version) -> io::Result<Conn> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect"))??;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: Vec::new(),
            v,
        })
    }

    /// Open and send CONNECT; returns the connection and what came back.
    pub async fn connect(addr: SocketAddr, c: &Connect<'_>) -> io::Result<(Conn, Seen)> {
        let mut conn = Conn::open(addr, c.version).await?;
        let _ = conn.send(&c.bytes()).await;
        let seen = conn.seen(Duration::from_secs(10)).await;
        Ok((conn, seen))
    }

    pub async fn send(&mut self, b: &[u8]) -> io::Result<()> {
        self.stream.write_all(b).await
    }

    fn take_frame(&mut self) -> Option<Packet> {
        let (len, used) = read_varint(self.buf.get(1..)?)?;
        let total = 1 + used + len;
        if self.buf.len() < total {
            return None;
        }
        let first = self.buf[0];
        let body = self.buf[1 + used..total].to_vec();
        self.buf.drain(..total);
        Some(Packet { first, body })
    }

    /// The next packet, or how the stream ended (`Closed`, `Reset`, `Silent`).
    pub async fn next(&mut self, within: Duration) -> Result<Packet, Seen> {
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(p) = self.take_frame() {
                return Ok(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(Seen::Silent),
                Ok(Ok(0)) => return Err(Seen::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(Seen::Reset)
                }
                Ok(Err(_)) => return Err(Seen::Closed),
            }
        }
    }

    pub async fn seen(&mut self, within: Duration) -> Seen {
        match self.next(within).await {
            Ok(p) => classify(self.v, &p),
            Err(end) => end,
        }
    }

    /// The first packet other than acknowledgements of our publishes (or
    /// the end), within `within` in all.
    pub async fn seen_skipping_acks(&mut self, within: Duration) -> Seen {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.seen(left).await {
                Seen::Puback(_) | Seen::Pubrec(_) => {}
                other => return other,
            }
        }
    }

    /// Read until the broker ends the connection; returns the last packet
    /// seen before the end (or `None`), the end, and when it came.
    pub async fn until_end(&mut self, within: Duration) -> (Option<Seen>, Seen, Duration) {
        let start = Instant::now();
        let mut last = None;
        loop {
            let left = within.saturating_sub(start.elapsed());
            match self.next(left).await {
                Ok(p) => last = Some(classify(self.v, &p)),
                Err(end) => return (last, end, start.elapsed()),
            }
        }
    }
}

// ---------------------------------------------------------------- memory

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The peak RSS of a process over a span: VmHWM after resetting it (where
/// the kernel allows) and VmRSS sampled every 10 ms, whichever is higher.
pub struct PeakRss {
    pid: u32,
    pub baseline_kib: u64,
    hwm_reset: bool,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<u64>>,
}

impl PeakRss {
    pub fn start(pid: u32) -> PeakRss {
        let baseline_kib = status_kib(pid, "VmRSS").unwrap_or(0);
        // "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
        let hwm_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(status_kib(pid, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        PeakRss {
            pid,
            baseline_kib,
            hwm_reset,
            stop,
            sampler: Some(sampler),
        }
    }

    /// Peak RSS since `start`, in KiB.
    pub fn peak_kib(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let sampled = self.sampler.take().and_then(|s| s.join().ok()).unwrap_or(0);
        let hwm = if self.hwm_reset {
            status_kib(self.pid, "VmHWM").unwrap_or(0)
        } else {
            0
        };
        sampled.max(hwm)
    }

    /// Peak growth over the baseline, in KiB.
    pub fn growth_kib(&mut self) -> u64 {
        self.peak_kib().saturating_sub(self.baseline_kib)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------- bystander

static BYSTANDERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A well-behaved client's QoS 1 round trip through the broker (subscribe,
/// publish to itself, receive, acknowledge), within `within` in all. A
/// connection refused by a rate limit is retried until then.
pub async fn bystander(addr: SocketAddr, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let n = BYSTANDERS.fetch_add(1, Ordering::Relaxed);
    let id = format!("bystander-{}-{n}", std::process::id());
    let left = || within.saturating_sub(start.elapsed());
    let mut conn = loop {
        let attempt = Conn::open(addr, Version::V3).await;
        let mut c = match attempt {
            Ok(c) => c,
            Err(e) if left().is_zero() => return Err(format!("cannot connect: {e}")),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = c.send(&Connect::new(Version::V3, &id).bytes()).await;
        match c.seen(left()).await {
            Seen::Connack(0) => break c,
            other if left().is_zero() => return Err(format!("CONNECT answered with {other}")),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let topic = format!("bystander/{id}");
    let _ = conn
        .send(&subscribe(Version::V3, 1, std::slice::from_ref(&topic), 1))
        .await;
    match conn.seen(left()).await {
        Seen::Suback(c) if c == [1] => {}
        other => return Err(format!("SUBSCRIBE answered with {other}")),
    }
    let _ = conn
        .send(&publish(Version::V3, &topic, 1, 2, b"still there?"))
        .await;
    let (mut acked, mut received) = (false, false);
    while !(acked && received) {
        let p = match conn.next(left()).await {
            Ok(p) => p,
            Err(end) => return Err(format!("round trip incomplete: {end}")),
        };
        match classify(Version::V3, &p) {
            Seen::Puback(_) => acked = true,
            Seen::Publish(t) if t == topic => {
                received = true;
                if p.first & 0x06 != 0 {
                    let _ = conn
                        .send(&puback(u16::from_be_bytes([
                            p.body[2 + topic.len()],
                            p.body[3 + topic.len()],
                        ])))
                        .await;
                }
            }
            _ => {}
        }
    }
    let _ = conn.send(&DISCONNECT).await;
    Ok(start.elapsed())
}

// ---------------------------------------------------------------- the cases

/// Case 1: Topics and filters tens of thousands of levels deep.
#[derive(Debug)]
pub struct Deep {
    pub v: Version,
    pub subscribe_30k: Seen,
    pub subscribe_10k: Seen,
    pub unsubscribe_30k: Seen,
    pub publish_30k: Seen,
    pub will_30k: Seen,
}

impl Deep {
    pub fn summary(&self) -> String {
        format!(
            "{}: SUB 30k: {}; SUB 10k+leave: {}; UNSUB 30k: {}; PUB 30k: {}; will 30k: {}",
            self.v,
            self.subscribe_30k,
            self.subscribe_10k,
            self.unsubscribe_30k,
            self.publish_30k,
            self.will_30k
        )
    }
}

async fn one_packet(addr: SocketAddr, v: Version, id: &str, packet: &[u8]) -> Seen {
    match Conn::connect(addr, &Connect::new(v, id)).await {
        Ok((mut c, Seen::Connack(0))) => {
            let _ = c.send(packet).await;
            let seen = c.seen(Duration::from_secs(10)).await;
            let _ = c.send(&DISCONNECT).await;
            seen
        }
        Ok((_, other)) => other,
        Err(_) => Seen::Closed,
    }
}

pub async fn deep_topics(addr: SocketAddr, v: Version) -> Deep {
    let f30k = deep(30_000, "#");
    let f10k = deep(10_000, "#");
    let t30k = deep(30_000, "a");
    let subscribe_30k = one_packet(
        addr,
        v,
        "deep-sub30k",
        &subscribe(v, 1, std::slice::from_ref(&f30k), 1),
    )
    .await;
    // The 10,000-level filter may be accepted by a broker without a limit;
    // what matters then is that it can be removed on disconnect.
    let subscribe_10k = one_packet(addr, v, "deep-sub10k", &subscribe(v, 1, &[f10k], 1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unsubscribe_30k = one_packet(addr, v, "deep-unsub", &unsubscribe(v, 1, &[f30k])).await;
    let publish_30k = one_packet(addr, v, "deep-pub", &publish(v, &t30k, 1, 1, b"deep")).await;
    let mut will = Connect::new(v, "deep-will");
    will.will = Some((&t30k, b"deep will"));
    let will_30k = match Conn::connect(addr, &will).await {
        Ok((mut c, seen)) => {
            // Accepted: end it abruptly so the will is published.
            if seen == Seen::Connack(0) {
                drop(c);
            } else {
                let _ = c.send(&DISCONNECT).await;
            }
            seen
        }
        Err(_) => Seen::Closed,
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    Deep {
        v,
        subscribe_30k,
        subscribe_10k,
        unsubscribe_30k,
        publish_30k,
        will_30k,
    }
}

/// Case 2: A subscriber that stops reading while a publisher sends it far more
/// than any queue should hold.
#[derive(Clone, Debug)]
pub struct SlowSpec {
    pub qos: u8,
    pub payload: usize,
    pub total_bytes: usize,
    /// A persistent session (`clean_session=0`), discarded after the run.
    pub persistent: bool,
    pub max_time: Duration,
}

#[derive(Debug)]
pub struct Slow {
    pub spec: SlowSpec,
    pub published: usize,
    pub publisher_end: Option<Seen>,
    pub secs: f64,
    /// RSS before the case and at its peak, in KiB.
    pub baseline_kib: u64,
    pub peak_kib: u64,
    pub peak_growth_kib: u64,
    /// What an MQTT 5 publish to the topic got once the subscriber left.
    pub probe: Seen,
    /// RSS over the baseline once the slow subscriber's session is gone.
    pub after_leave_kib: u64,
}

impl Slow {
    pub fn summary(&self) -> String {
        format!(
            "QoS {} x {} B: {} published in {:.1} s{}; peak +{}; after it left: publish got {}, RSS +{}",
            self.spec.qos,
            self.spec.payload,
            self.published,
            self.secs,
            self.publisher_end
                .as_ref()
                .map(|e| format!(" (publisher saw {e})"))
                .unwrap_or_default(),
            mib(self.peak_growth_kib),
            self.probe,
            mib(self.after_leave_kib)
        )
    }
}

pub async fn slow_consumer(addr: SocketAddr, pid: u32, spec: SlowSpec) -> Slow {
    let v = Version::V3;
    let mut peak = PeakRss::start(pid);
    let mut sub = Connect::new(v, "slow-sub");
    sub.clean = !spec.persistent;
    let (mut reader, seen) = Conn::connect(addr, &sub)
        .await
        .expect("slow subscriber connects");
    assert_eq!(seen, Seen::Connack(0), "slow subscriber's CONNACK");
    reader
        .send(&subscribe(v, 1, &["slow/t".to_string()], spec.qos))
        .await
        .expect("subscribe");
    let suback = reader.seen(Duration::from_secs(10)).await;
    assert!(
        matches!(suback, Seen::Suback(_)),
        "slow subscriber: {suback}"
    );
    // From here on the subscriber reads nothing.

    let (mut p, seen) = Conn::connect(addr, &Connect::new(v, "slow-pub"))
        .await
        .expect("publisher connects");
    assert_eq!(seen, Seen::Connack(0), "publisher's CONNACK");
    let payload = vec![0x5Au8; spec.payload];
    let count = spec.total_bytes / spec.payload;
    let start = Instant::now();
    let mut published = 0;
    let mut publisher_end = None;
    // Batches of pipelined publishes; QoS 1 waits for a batch's PUBACKs.
    let batch = (256 * 1024 / spec.payload).clamp(1, 256);
    let mut pid_next = 1u16;
    'outer: while published < count && start.elapsed() < spec.max_time {
        let n = batch.min(count - published);
        let mut buf = Vec::with_capacity(n * (spec.payload + 16));
        for _ in 0..n {
            buf.extend_from_slice(&publish(v, "slow/t", spec.qos, pid_next, &payload));
            pid_next = pid_next.checked_add(1).unwrap_or(1);
        }
        if p.send(&buf).await.is_err() {
            publisher_end = Some(p.seen(Duration::from_secs(1)).await);
            break;
        }
        if spec.qos > 0 {
            let mut acks = 0;
            while acks < n {
                match p.seen(Duration::from_secs(10)).await {
                    Seen::Puback(_) => acks += 1,
                    other => {
                        publisher_end = Some(other);
                        break 'outer;
                    }
                }
            }
        }
        published += n;
    }
    if spec.qos == 0 {
        // A round trip on the publisher's connection: all its QoS 0 publishes were read.
        let _ = p.send(&PINGREQ).await;
        let _ = p.seen(Duration::from_secs(30)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = p.send(&DISCONNECT).await;
    drop(p);
    let peak_kib = peak.peak_kib();
    let peak_growth_kib = peak_kib.saturating_sub(peak.baseline_kib);

    // The slow subscriber leaves; a persistent session is then discarded
    // by connecting again with a clean session.
    drop(reader);
    if spec.persistent {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok((mut c, _)) = Conn::connect(addr, &Connect::new(v, "slow-sub")).await {
            let _ = c.send(&DISCONNECT).await;
        }
    }
    // Whether its subscription is gone: an MQTT 5 publish then finds no
    // subscriber (PUBACK 0x10).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probe = one_packet(
        addr,
        Version::V5,
        "slow-probe",
        &publish(Version::V5, "slow/t", 1, 1, b"?"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let after_leave_kib = loop {
        // Some traffic meanwhile: an allocator returns freed memory as it works.
        let _ = bystander(addr, Duration::from_secs(1)).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let growth = status_kib(pid, "VmRSS")
            .unwrap_or(0)
            .saturating_sub(peak.baseline_kib);
        if growth < 8 * 1024 || Instant::now() > deadline {
            break growth;
        }
    };
    Slow {
        spec,
        published,
        publisher_end,
        secs,
        baseline_kib: peak.baseline_kib,
        peak_kib,
        peak_growth_kib,
        probe,
        after_leave_kib,
    }
}

/// Case 3: One client subscribing to thousands of filters.
#[derive(Debug)]
pub struct Bomb {
    pub v: Version,
    pub asked: usize,
    /// Every SUBACK return code, in order.
    pub codes: Vec<u8>,
    /// How the client's connection ended early, if it did.
    pub end: Option<Seen>,
}

impl Bomb {
    pub fn granted(&self) -> usize {
        self.codes.iter().filter(|&&c| c < 0x80).count()
    }
    pub fn summary(&self) -> String {
        format!(
            "{}: {} filters: SUBACK {}{}",
            self.v,
            self.asked,
            codes(&self.codes),
            self.end
                .as_ref()
                .map(|e| format!(", then {e}"))
                .unwrap_or_default()
        )
    }
}

pub async fn subscription_bomb(addr: SocketAddr, v: Version, asked: usize) -> Bomb {
    let id = format!("bomb-{v}");
    let (mut c, seen) = Conn::connect(addr, &Connect::new(v, &id))
        .await
        .expect("bomb connects");
    assert_eq!(seen, Seen::Connack(0));
    let mut codes = Vec::new();
    let mut end = None;
    for (i, chunk) in (0..asked).collect::<Vec<_>>().chunks(100).enumerate() {
        let filters: Vec<String> = chunk.iter().map(|n| format!("bomb/{n}/+")).collect();
        let _ = c.send(&subscribe(v, i as u16 + 1, &filters, 1)).await;
        match c.seen(Duration::from_secs(10)).await {
            Seen::Suback(s) => codes.extend(s),
            other => {
                end = Some(other);
                break;
            }
        }
    }
    let _ = c.send(&DISCONNECT).await;
    Bomb {
        v,
        asked,
        codes,
        end,
    }
}

/// Case 4: Thousands of connections that never send CONNECT.
#[derive(Debug)]
pub struct Flood {
    pub opened: usize,
    pub asked: usize,
    /// Closed (or reset) by the broker within the case's wait.
    pub closed: usize,
    pub first_close: Option<Duration>,
    pub last_close: Option<Duration>,
    /// A bystander's round trip while all of them were open.
    pub during: Result<Duration, String>,
}

impl Flood {
    pub fn summary(&self) -> String {
        let s = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()));
        format!(
            "{} of {} opened; {} closed by the broker, {}..{} s after opening; bystander during: {}",
            self.opened,
            self.asked,
            self.closed,
            s(self.first_close),
            s(self.last_close),
            match &self.during {
                Ok(d) => format!("ok in {:.2} s", d.as_secs_f64()),
                Err(e) => e.clone(),
            }
        )
    }
}

pub async fn connection_flood(addr: SocketAddr, asked: usize, wait: Duration) -> Flood {
    let mut tasks = Vec::new();
    // Paced below the default connection rate limit: this is the connect
    // timeout's case, not the rate limit's.
    for chunk in 0..asked.div_ceil(100) {
        for _ in 0..100.min(asked - chunk * 100) {
            tasks.push(tokio::spawn(async move {
                let mut c = Conn::open(addr, Version::V3).await.ok()?;
                let opened = Instant::now();
                let (_, end, _) = c.until_end(wait).await;
                Some((end, opened.elapsed()))
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let during = bystander(addr, Duration::from_secs(5)).await;
    let mut flood = Flood {
        opened: 0,
        asked,
        closed: 0,
        first_close: None,
        last_close: None,
        during,
    };
    for t in tasks {
        if let Ok(Some((end, after))) = t.await {
            flood.opened += 1;
            if end.is_end() {
                flood.closed += 1;
                flood.first_close = Some(flood.first_close.map_or(after, |f| f.min(after)));
                flood.last_close = Some(flood.last_close.map_or(after, |l| l.max(after)));
            }
        }
    }
    flood
}

/// Case 5: A PUBLISH announcing 256 MB, then its body one byte every 100 ms.
pub async fn huge_announce(addr: SocketAddr, v: Version) -> (Seen, Duration) {
    let (mut c, seen) = Conn::connect(addr, &Connect::new(v, &format!("huge-{v}")))
        .await
        .expect("connects");
    assert_eq!(seen, Seen::Connack(0));
    let start = Instant::now();
    // 0x30 with the largest remaining length MQTT can express (256 MB - 1).
    let _ = c.send(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    while start.elapsed() < Duration::from_secs(8) {
        let _ = c.send(&[0x00]).await;
        match c.seen(Duration::from_millis(100)).await {
            Seen::Silent => {}
            seen => return (seen, start.elapsed()),
        }
    }
    (Seen::Silent, start.elapsed())
}

/// Case 6: A CONNECT sent one byte per second: what ends it, and when.
pub async fn trickled_connect(addr: SocketAddr, max: Duration) -> (Seen, Duration) {
    let mut c = Conn::open(addr, Version::V3).await.expect("tcp connect");
    let id = "trickle-".repeat(8);
    let bytes = Connect::new(Version::V3, &id).bytes();
    let start = Instant::now();
    for b in bytes {
        let _ = c.send(&[b]).await;
        match c.seen(Duration::from_secs(1)).await {
            Seen::Silent if start.elapsed() < max => {}
            seen => return (seen, start.elapsed()),
        }
    }
    (c.seen(Duration::from_secs(5)).await, start.elapsed())
}

/// Case 7: Connections that send CONNECT with a short keep alive, then nothing.
#[derive(Debug)]
pub struct HalfOpen {
    pub v: Version,
    pub keep_alive: u16,
    pub connected: usize,
    pub closed: usize,
    pub earliest: Duration,
    pub latest: Duration,
    /// What each saw before the end (e.g. DISCONNECT 0x8D), counted.
    pub last: BTreeMap<String, usize>,
}

impl HalfOpen {
    pub fn summary(&self) -> String {
        let last: Vec<String> = self.last.iter().map(|(k, n)| format!("{n}x {k}")).collect();
        format!(
            "{} keep alive {} s: {}/{} closed {:.1}..{:.1} s after CONNACK ({})",
            self.v,
            self.keep_alive,
            self.closed,
            self.connected,
            self.earliest.as_secs_f64(),
            self.latest.as_secs_f64(),
            last.join(", ")
        )
    }
}

pub async fn half_open(addr: SocketAddr, v: Version, keep_alive: u16, n: usize) -> HalfOpen {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let id = format!("half-{v}-{i}");
            let mut c = Connect::new(v, &id);
            c.keep_alive = keep_alive;
            let (mut conn, seen) = Conn::connect(addr, &c).await.ok()?;
            if seen != Seen::Connack(0) {
                return None;
            }
            let (last, end, after) = conn
                .until_end(Duration::from_secs(u64::from(keep_alive) * 3 + 5))
                .await;
            Some((last, end, after))
        }));
    }
    let mut r = HalfOpen {
        v,
        keep_alive,
        connected: 0,
        closed: 0,
        earliest: Duration::MAX,
        latest: Duration::ZERO,
        last: BTreeMap::new(),
    };
    for t in tasks {
        if let Ok(Some((last, end, after))) = t.await {
            r.connected += 1;
            if end.is_end() {
                r.closed += 1;
                r.earliest = r.earliest.min(after);
                r.latest = r.latest.max(after);
            }
            let what = match last {
                Some(p) => format!("{p}, {end}"),
                None => end.to_string(),
            };
            *r.last.entry(what).or_default() += 1;
        }
    }
    if r.closed == 0 {
        r.earliest = Duration::ZERO;
    }
    r
}

/// Case 8: Hundreds of connections with one client id in a short time.
#[derive(Debug)]
pub struct Storm {
    pub attempts: usize,
    /// Earlier connections the broker ended (all but the last should be).
    pub ended: usize,
    pub endings: BTreeMap<String, usize>,
    /// The last connection still works: it receives a message and answers a ping.
    pub survivor: Result<(), String>,
}

impl Storm {
    pub fn summary(&self) -> String {
        let e: Vec<String> = self
            .endings
            .iter()
            .map(|(k, n)| format!("{n}x {k}"))
            .collect();
        format!(
            "{} connects, {} of the earlier ended ({}); last one: {}",
            self.attempts,
            self.ended,
            e.join(", "),
            match &self.survivor {
                Ok(()) => "owns the session".to_string(),
                Err(e) => e.clone(),
            }
        )
    }
}

pub async fn takeover_storm(addr: SocketAddr, concurrent: usize, serial: usize) -> Storm {
    let v = Version::V5;
    let id = "storm";
    let mut c = Connect::new(v, id);
    c.clean = false;
    c.session_expiry = Some(300);
    let bytes = c.bytes();
    let watch = |mut conn: Conn| {
        tokio::spawn(async move {
            let (last, end, _) = conn.until_end(Duration::from_secs(15)).await;
            match last {
                Some(p) => format!("{p}, {end}"),
                None => end.to_string(),
            }
        })
    };
    let mut earlier = Vec::new();
    // A burst of simultaneous connects, in no particular order...
    let mut opened = Vec::new();
    for _ in 0..concurrent {
        if let Ok(mut conn) = Conn::open(addr, v).await {
            let _ = conn.send(&bytes).await;
            opened.push(conn);
        }
    }
    earlier.extend(opened.into_iter().map(watch));
    // ...then one after another, each waiting for its CONNACK.
    let mut last = None;
    for _ in 0..serial {
        match Conn::connect(addr, &c).await {
            Ok((conn, Seen::Connack(0))) => {
                if let Some(prev) = last.replace(conn) {
                    earlier.push(watch(prev));
                }
            }
            Ok((conn, _)) => earlier.push(watch(conn)),
            Err(_) => {}
        }
    }
    let attempts = concurrent + serial;
    let mut endings = BTreeMap::new();
    let mut ended = 0;
    for t in earlier {
        let what = t.await.unwrap_or_else(|_| "panicked".into());
        if what.ends_with("closed") || what.ends_with("reset") {
            ended += 1;
        }
        *endings.entry(what).or_default() += 1;
    }
    let survivor = match last {
        None => Err("no connect was accepted".into()),
        Some(mut s) => survivor_works(addr, &mut s).await,
    };
    Storm {
        attempts,
        ended,
        endings,
        survivor,
    }
}

async fn survivor_works(addr: SocketAddr, s: &mut Conn) -> Result<(), String> {
    let wait = Duration::from_secs(5);
    let _ = s.send(&PINGREQ).await;
    match s.seen(wait).await {
        Seen::Pingresp => {}
        other => return Err(format!("PINGREQ answered with {other}")),
    }
    let _ = s
        .send(&subscribe(s.v, 1, &["storm/t".to_string()], 1))
        .await;
    match s.seen(wait).await {
        Seen::Suback(_) => {}
        other => return Err(format!("SUBSCRIBE answered with {other}")),
    }
    let (mut p, seen) = Conn::connect(addr, &Connect::new(Version::V3, "storm-pub"))
        .await
        .map_err(|e| e.to_string())?;
    if seen != Seen::Connack(0) {
        return Err(format!("publisher: {seen}"));
    }
    let _ = p.send(&publish(Version::V3, "storm/t", 1, 1, b"hi")).await;
    match s.seen_skipping_acks(wait).await {
        Seen::Publish(t) if t == "storm/t" => Ok(()),
        other => Err(format!("expected the message, saw {other}")),
    }
}

/// Case 9: Random bytes from a seeded generator, before and after a CONNECT.
#[derive(Debug)]
pub struct Noise {
    pub connections: usize,
    /// Closed by the broker within the wait.
    pub closed: usize,
    pub endings: BTreeMap<String, usize>,
}

impl Noise {
    pub fn summary(&self) -> String {
        let e: Vec<String> = self
            .endings
            .iter()
            .map(|(k, n)| format!("{n}x {k}"))
            .collect();
        format!(
            "{} connections, {} closed by the broker ({})",
            self.connections,
            self.closed,
            e.join(", ")
        )
    }
}

pub async fn random_bytes(addr: SocketAddr, seed: u64, n: usize, wait: Duration) -> Noise {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tasks = Vec::new();
    for i in 0..n {
        let len = rng.random_range(1..4096usize);
        let mut noise = vec![0u8; len];
        rng.fill(&mut noise[..]);
        // Half start with a valid CONNECT (keep alive 2 s), half with noise.
        let after_connect = i % 2 == 1;
        let v = if i % 4 < 2 { Version::V3 } else { Version::V5 };
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr, v).await.ok()?;
            if after_connect {
                let id = format!("noise-{i}");
                let mut connect = Connect::new(v, &id);
                connect.keep_alive = 2;
                noise.splice(0..0, connect.bytes());
            }
            let _ = c.send(&noise).await;
            let (_, end, _) = c.until_end(wait).await;
            Some(if after_connect {
                format!("after CONNECT: {end}")
            } else {
                format!("before CONNECT: {end}")
            })
        }));
    }
    let mut r = Noise {
        connections: 0,
        closed: 0,
        endings: BTreeMap::new(),
    };
    for t in tasks {
        if let Ok(Some(what)) = t.await {
            r.connections += 1;
            if what.ends_with("closed") || what.ends_with("reset") {
                r.closed += 1;
            }
            *r.endings.entry(what).or_default() += 1;
        }
    }
    r
}

/// Case 10: Hundreds of clients with wills, their sockets dropped at once.
#[derive(Debug)]
pub struct Wills {
    pub clients: usize,
    pub connected: usize,
    /// Distinct wills the watcher received.
    pub received: usize,
    /// Wills received more than once.
    pub duplicates: usize,
    pub secs: f64,
}

impl Wills {
    pub fn summary(&self) -> String {
        format!(
            "{} clients dropped: {} wills received once, {} duplicated, in {:.1} s",
            self.connected, self.received, self.duplicates, self.secs
        )
    }
}

pub async fn wills(addr: SocketAddr, n: usize) -> Wills {
    let (mut watcher, seen) = Conn::connect(addr, &Connect::new(Version::V3, "will-watcher"))
        .await
        .expect("watcher connects");
    assert_eq!(seen, Seen::Connack(0));
    watcher
        .send(&subscribe(Version::V3, 1, &["will/#".to_string()], 1))
        .await
        .expect("subscribe");
    assert!(matches!(
        watcher.seen(Duration::from_secs(10)).await,
        Seen::Suback(_)
    ));

    let mut conns = Vec::new();
    for i in 0..n {
        let v = if i % 2 == 0 { Version::V3 } else { Version::V5 };
        let id = format!("willer-{i}");
        let topic = format!("will/{i}");
        let mut c = Connect::new(v, &id);
        c.will = Some((&topic, b"gone"));
        if let Ok((conn, Seen::Connack(0))) = Conn::connect(addr, &c).await {
            conns.push(conn);
        }
    }
    let connected = conns.len();
    let start = Instant::now();
    drop(conns);

    let mut counts: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut grace: Option<Instant> = None;
    loop {
        let until = grace.unwrap_or(deadline).min(deadline);
        let left = until.saturating_duration_since(Instant::now());
        let p = match watcher.next(left).await {
            Ok(p) => p,
            Err(_) => break,
        };
        if let Seen::Publish(topic) = classify(Version::V3, &p) {
            if p.first & 0x06 != 0 {
                let at = 2 + topic.len();
                let _ = watcher
                    .send(&puback(u16::from_be_bytes([p.body[at], p.body[at + 1]])))
                    .await;
            }
            *counts.entry(topic).or_default() += 1;
            if counts.len() == connected && grace.is_none() {
                // All arrived; a little longer to catch duplicates.
                grace = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }
    let _ = watcher.send(&DISCONNECT).await;
    Wills {
        clients: n,
        connected,
        received: counts.len(),
        duplicates: counts.values().filter(|&&c| c > 1).count(),
        secs: start.elapsed().as_secs_f64(),
    }
}

/// Case 11a: Connections past `max_connections`.
#[derive(Debug)]
pub struct ConnLimit {
    pub held: usize,
    pub extra: usize,
    /// Extra connections closed without a CONNACK within a second.
    pub refused: usize,
    pub extra_seen: BTreeMap<String, usize>,
    /// A connection after one of the held ones left was accepted.
    pub slot_reused: bool,
}

impl ConnLimit {
    pub fn summary(&self) -> String {
        let e: Vec<String> = self
            .extra_seen
            .iter()
            .map(|(k, n)| format!("{n}x {k}"))
            .collect();
        format!(
            "{} held; {} more: {} ({}); after one left: {}",
            self.held,
            self.extra,
            if self.refused == self.extra {
                "all refused"
            } else {
                "not all refused"
            },
            e.join(", "),
            if self.slot_reused {
                "accepted"
            } else {
                "refused"
            }
        )
    }
}

pub async fn connection_limit(addr: SocketAddr, hold: usize, extra: usize) -> ConnLimit {
    let mut held = Vec::new();
    for i in 0..hold {
        if let Ok((c, Seen::Connack(0))) =
            Conn::connect(addr, &Connect::new(Version::V3, &format!("held-{i}"))).await
        {
            held.push(c);
        }
    }
    let mut r = ConnLimit {
        held: held.len(),
        extra,
        refused: 0,
        extra_seen: BTreeMap::new(),
        slot_reused: false,
    };
    let mut extras = Vec::new();
    for i in 0..extra {
        let seen = match Conn::open(addr, Version::V3).await {
            Ok(mut c) => {
                let _ = c
                    .send(&Connect::new(Version::V3, &format!("extra-{i}")).bytes())
                    .await;
                let s = c.seen(Duration::from_secs(1)).await;
                extras.push(c);
                s
            }
            Err(_) => Seen::Reset,
        };
        if seen.is_end() {
            r.refused += 1;
        }
        *r.extra_seen.entry(seen.to_string()).or_default() += 1;
    }
    drop(extras);
    if let Some(mut c) = held.pop() {
        let _ = c.send(&DISCONNECT).await;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !r.slot_reused {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok((mut c, Seen::Connack(0))) =
            Conn::connect(addr, &Connect::new(Version::V3, "after-leave")).await
        {
            r.slot_reused = true;
            let _ = c.send(&DISCONNECT).await;
        }
    }
    for mut c in held {
        let _ = c.send(&DISCONNECT).await;
    }
    r
}

/// Case 11b: A burst of connections past `max_connection_rate`.
#[derive(Debug)]
pub struct RateLimit {
    pub burst: usize,
    pub accepted: usize,
    pub refused: usize,
    pub secs: f64,
    /// A connection a moment later was accepted.
    pub later_accepted: bool,
}

impl RateLimit {
    pub fn summary(&self) -> String {
        format!(
            "{} connects in {:.2} s: {} accepted, {} closed at once; 1.5 s later: {}",
            self.burst,
            self.secs,
            self.accepted,
            self.refused,
            if self.later_accepted {
                "accepted"
            } else {
                "refused"
            }
        )
    }
}

pub async fn connection_rate(addr: SocketAddr, burst: usize) -> RateLimit {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..burst {
        tasks.push(tokio::spawn(async move {
            let id = format!("rate-{i}");
            let c = Connect::new(Version::V3, &id);
            match Conn::connect(addr, &c).await {
                Ok((conn, seen)) => (seen, Some(conn)),
                Err(_) => (Seen::Reset, None),
            }
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            results.push(r);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let accepted = results
        .iter()
        .filter(|(s, _)| *s == Seen::Connack(0))
        .count();
    let refused = results.iter().filter(|(s, _)| s.is_end()).count();
    drop(results);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later_accepted = matches!(
        Conn::connect(addr, &Connect::new(Version::V3, "rate-later")).await,
        Ok((_, Seen::Connack(0)))
    );
    RateLimit {
        burst,
        accepted,
        refused,
        secs,
        later_accepted,
    }
}

/// Case 12a: An MQTT 5 client pipelining QoS 2 publishes past Receive Maximum
/// (never releasing them), and more bytes after that: what it reads.
pub async fn linger_receive_maximum(addr: SocketAddr, publishes: u16) -> Seen {
    let (mut c, seen) = Conn::connect(addr, &Connect::new(Version::V5, "greedy"))
        .await
        .expect("connects");
    assert_eq!(seen, Seen::Connack(0));
    let mut buf = Vec::new();
    for pid in 1..=publishes {
        buf.extend_from_slice(&publish(Version::V5, "greedy/t", 2, pid, &[0u8; 100]));
    }
    // Written in full before reading anything: the broker's reply waits in
    // our receive buffer, where a reset would destroy it.
    let _ = tokio::time::timeout(Duration::from_secs(5), c.send(&buf)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.seen_skipping_acks(Duration::from_secs(10)).await
}

/// Case 12b: A refused CONNECT followed at once by more pipelined packets.
#[derive(Clone, Copy, Debug)]
pub enum BadConnect {
    /// MQTT 3.1.1 framing with protocol level 9.
    ProtocolVersion,
    /// MQTT 3.1.1, empty client id, clean session 0.
    EmptyIdPersistent,
}

pub async fn linger_refused_connect(addr: SocketAddr, bad: BadConnect) -> Seen {
    let mut c = Conn::open(addr, Version::V3).await.expect("tcp connect");
    let mut connect = Connect::new(Version::V3, "");
    match bad {
        BadConnect::ProtocolVersion => {
            connect.id = "bad-version";
            connect.level = Some(9);
        }
        BadConnect::EmptyIdPersistent => connect.clean = false,
    }
    let mut buf = connect.bytes();
    for _ in 0..512 {
        buf.extend_from_slice(&publish(Version::V3, "pipelined", 0, 0, &[0u8; 128]));
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), c.send(&buf)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.seen(Duration::from_secs(10)).await
}
