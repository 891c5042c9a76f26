//! A SUBSCRIBE is effective at once. Real binary, two MQTT 5 clients on
//! plain blocking sockets, many rounds:
//! - a PUBLISH sent after the subscriber received its SUBACK always reaches
//!   it (the broker's promise, exact);
//! - a PUBLISH sent by another client right after the SUBSCRIBE left the
//!   subscriber, racing it on another socket, reaches it too, but for the
//!   rare round where two runtime workers read the two sockets at the same
//!   instant (docs/decisions.md, "Ordering between clients"). Before readers
//!   yielded to earlier-woken readers, a third of such rounds missed.
//!
//! The first is a promise and runs in the suite. The second is a timing
//! measurement: how often it misses depends on what else the machine runs
//! (a CI run with a busy database server beside it saw 45 of 300), so it is
//! not asserted in CI; `scripts/probe-subscribe-race` runs it on demand.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::BrokerProcess;

const ROUNDS: usize = 300;
/// Rounds of the racing case allowed to miss: measured at 0 to 5 of 300 on
/// an otherwise idle 2-core machine, 109 of 300 without the yield.
const RACE_MISSES_ALLOWED: usize = ROUNDS / 10;

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut p = vec![first];
    remaining_length(body.len(), &mut p);
    p.extend(body);
    p
}

fn connect(id: &str) -> Vec<u8> {
    let mut b = Vec::new();
    string("MQTT", &mut b);
    b.extend_from_slice(&[5, 0x02, 0, 60, 0]); // v5, clean start, keep alive 60, no properties
    string(id, &mut b);
    packet(0x10, b)
}

fn subscribe(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut b = packet_id.to_be_bytes().to_vec();
    b.push(0); // no properties
    string(filter, &mut b);
    b.push(1); // QoS 1
    packet(0x82, b)
}

fn publish_qos0(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    string(topic, &mut b);
    b.push(0);
    b.extend_from_slice(payload);
    packet(0x30, b)
}

/// Read whole packets until one of type `kind` (upper nibble) arrives;
/// returns its body, or None at the deadline.
fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, kind: u8, within: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    loop {
        // Whole packets in `buf` first.
        while let Some((len, header)) = frame(buf) {
            let first = buf[0];
            let body = buf[header..header + len].to_vec();
            buf.drain(..header + len);
            if first >> 4 == kind {
                return Some(body);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => panic!("broker closed the connection"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// (body length, header length) of the first whole packet in `buf`.
fn frame(buf: &[u8]) -> Option<(usize, usize)> {
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let b = *buf.get(i)?;
        len += usize::from(b & 0x7f) * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    (buf.len() >= i + len).then_some((len, i))
}

fn open(port: u16, id: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&connect(id)).expect("CONNECT");
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, 2, Duration::from_secs(10)).expect("CONNACK");
    (s, buf)
}

#[test]
#[ignore = "timing measurement, not a promise: scripts/probe-subscribe-race runs it"]
fn publish_after_subscribe_left_the_subscriber_is_delivered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = BrokerProcess::start(dir.path(), &["--storage", "memory://"]);
    let (mut b, mut b_buf) = open(broker.port, "race-subscriber");
    let (mut a, _) = open(broker.port, "race-publisher");
    let mut missed = Vec::new();
    for round in 0..ROUNDS {
        let topic = format!("race/{round}");
        b.write_all(&subscribe(round as u16 + 1, &topic))
            .expect("SUBSCRIBE");
        // The SUBSCRIBE has left B: A publishes at once.
        a.write_all(&publish_qos0(&topic, b"x")).expect("PUBLISH");
        if read_until(&mut b, &mut b_buf, 3, Duration::from_secs(2)).is_none() {
            missed.push(round);
        }
    }
    eprintln!(
        "racing PUBLISH missed the SUBSCRIBE in {} of {ROUNDS} rounds {missed:?}",
        missed.len()
    );
    assert!(
        missed.len() <= RACE_MISSES_ALLOWED,
        "{} of {ROUNDS} publishes sent after the SUBSCRIBE were not delivered (rounds {missed:?})",
        missed.len()
    );
}

#[test]
fn publish_after_suback_is_always_delivered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = BrokerProcess::start(dir.path(), &["--storage", "memory://"]);
    let (mut b, mut b_buf) = open(broker.port, "suback-subscriber");
    let (mut a, _) = open(broker.port, "suback-publisher");
    let mut missed = Vec::new();
    for round in 0..ROUNDS {
        let topic = format!("after-suback/{round}");
        b.write_all(&subscribe(round as u16 + 1, &topic))
            .expect("SUBSCRIBE");
        read_until(&mut b, &mut b_buf, 9, Duration::from_secs(10)).expect("SUBACK");
        a.write_all(&publish_qos0(&topic, b"x")).expect("PUBLISH");
        if read_until(&mut b, &mut b_buf, 3, Duration::from_secs(5)).is_none() {
            missed.push(round);
        }
    }
    assert!(
        missed.is_empty(),
        "{} of {ROUNDS} publishes sent after SUBACK were not delivered (rounds {missed:?})",
        missed.len()
    );
}
