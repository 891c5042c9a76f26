//! The payload every measured message carries.
//!
//! The load tool is both the publisher and the subscriber, in one process, so
//! a message can carry everything needed to check and time its own delivery:
//!
//! | bytes | field | meaning |
//! |---:|---|---|
//! | 0..4 | run tag | random per run (big endian `u32`); a message with another tag is not ours |
//! | 4..8 | stream | which publisher, and which of its topics, sent it (`u32`) |
//! | 8..16 | sequence | 0, 1, 2, ... per stream (`u64`) |
//! | 16..24 | sent at | nanoseconds since [`epoch`], taken when the PUBLISH is encoded (`u64`) |
//! | 24.. | padding | zeros up to `--payload` bytes |
//!
//! A *stream* is one publisher's messages to one topic. In every scenario but
//! `persistent --topic-per-subscriber` a publisher has exactly one topic, so a
//! stream is a publisher. MQTT promises order per publisher and topic, which
//! is why order is checked per (stream, subscriber).
//!
//! The smallest payload is therefore [`HEADER_LEN`] = 24 bytes; `--payload`
//! below that is refused.

use std::sync::OnceLock;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes taken by the header; the minimum `--payload`.
pub const HEADER_LEN: usize = 24;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The process-wide instant all payload timestamps count from. Publishers
/// and subscribers are in the same process, so their clocks agree exactly.
pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since [`epoch`].
pub fn now_ns() -> u64 {
    ns_since_epoch(Instant::now())
}

/// Nanoseconds from [`epoch`] to `t` (0 for instants before it).
pub fn ns_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The decoded header of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Run tag.
    pub run: u32,
    /// Stream id.
    pub stream: u32,
    /// Sequence number within the stream.
    pub seq: u64,
    /// Send time, ns since [`epoch`].
    pub sent_ns: u64,
}

/// Why a payload was not one of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadError {
    /// Shorter than [`HEADER_LEN`].
    TooShort(usize),
    /// Another run's tag.
    ForeignRun(u32),
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::TooShort(n) => write!(f, "payload of {n} bytes, shorter than the header"),
            PayloadError::ForeignRun(t) => write!(f, "payload of another run (tag {t:08x})"),
        }
    }
}

/// Builds payloads of one size with little allocation: bodies are split off
/// one growing buffer, so a batch of messages shares an allocation.
#[derive(Debug)]
pub struct PayloadWriter {
    run: u32,
    len: usize,
    buf: BytesMut,
}

impl PayloadWriter {
    /// Payloads of `len` bytes (at least [`HEADER_LEN`]) tagged with `run`.
    pub fn new(run: u32, len: usize) -> PayloadWriter {
        assert!(len >= HEADER_LEN, "payload shorter than its header");
        PayloadWriter {
            run,
            len,
            buf: BytesMut::new(),
        }
    }

    /// A payload for (`stream`, `seq`) stamped with the current time.
    pub fn make(&mut self, stream: u32, seq: u64) -> Bytes {
        self.make_at(stream, seq, now_ns())
    }

    /// A payload with an explicit timestamp.
    pub fn make_at(&mut self, stream: u32, seq: u64, sent_ns: u64) -> Bytes {
        if self.buf.capacity() < self.len {
            self.buf.reserve(self.len.max(64 * 1024));
        }
        self.buf.put_u32(self.run);
        self.buf.put_u32(stream);
        self.buf.put_u64(seq);
        self.buf.put_u64(sent_ns);
        self.buf.put_bytes(0, self.len - HEADER_LEN);
        self.buf.split().freeze()
    }
}

/// Read the header of a payload; `run` is the expected tag.
pub fn parse(payload: &[u8], run: u32) -> Result<Header, PayloadError> {
    let Some(h) = payload.get(..HEADER_LEN) else {
        return Err(PayloadError::TooShort(payload.len()));
    };
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let tag = u32_at(0);
    if tag != run {
        return Err(PayloadError::ForeignRun(tag));
    }
    Ok(Header {
        run: tag,
        stream: u32_at(4),
        seq: u64_at(8),
        sent_ns: u64_at(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let mut w = PayloadWriter::new(0xabcd_0123, 64);
        let p = w.make_at(7, 42, 123_456);
        assert_eq!(p.len(), 64);
        let h = parse(&p, 0xabcd_0123).expect("ours");
        assert_eq!(
            h,
            Header {
                run: 0xabcd_0123,
                stream: 7,
                seq: 42,
                sent_ns: 123_456
            }
        );
        assert!(p[HEADER_LEN..].iter().all(|b| *b == 0));
        let q = w.make_at(7, 43, 1);
        assert_eq!(parse(&q, 0xabcd_0123).map(|h| h.seq), Ok(43));
        assert_eq!(parse(&p, 1), Err(PayloadError::ForeignRun(0xabcd_0123)));
        assert_eq!(parse(&p[..10], 1), Err(PayloadError::TooShort(10)));
    }
}
