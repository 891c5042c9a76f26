//! What a model case does: the operations, their strategy, and a printed
//! form that can be pasted back as a regression test.

use std::fmt;

use proptest::prelude::*;

/// Subscriber clients `c0`, `c1`, `c2`; the publisher is a fourth client.
pub const CLIENTS: usize = 3;
/// Topics published to.
pub const TOPICS: [&str; 2] = ["t/a", "t/b"];
/// Filters subscribed to: `t/+` overlaps both exact ones.
pub const FILTERS: [&str; 3] = ["t/a", "t/b", "t/+"];

pub fn client_id(c: usize) -> String {
    format!("c{c}")
}

/// How a client connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// MQTT 3.1.1; `clean: false` is a persistent session that never expires.
    V3 { clean: bool },
    /// MQTT 5 with a Session Expiry Interval (0: the session ends with the connection).
    V5 { clean_start: bool, expiry: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Connect client `c`; if it is connected already, this is a takeover.
    Connect {
        c: usize,
        proto: Proto,
    },
    /// DISCONNECT; an MQTT 5 client with `expiry_zero` also sets the session expiry to 0.
    Disconnect {
        c: usize,
        expiry_zero: bool,
    },
    /// Close the socket without DISCONNECT.
    DropSocket {
        c: usize,
    },
    Subscribe {
        c: usize,
        filter: usize,
        qos: u8,
    },
    Unsubscribe {
        c: usize,
        filter: usize,
    },
    /// The publisher (MQTT 3.1.1, clean session) publishes the next message.
    Publish {
        topic: usize,
        qos: u8,
        retain: bool,
    },
    /// Client `c` stops sending PUBACK, PUBREC and PUBCOMP.
    Hold {
        c: usize,
    },
    /// Client `c` sends the oldest acknowledgement it holds back.
    AckOne {
        c: usize,
    },
    /// Client `c` sends every acknowledgement it holds back and stops holding.
    AckAll {
        c: usize,
    },
    /// Graceful broker shutdown, then a new broker on the same storage.
    Restart,
}

/// One generated case.
#[derive(Clone, PartialEq, Eq)]
pub struct Case {
    /// The broker's in-flight window per session.
    pub max_inflight: usize,
    pub ops: Vec<Op>,
}

/// Printed as Rust that builds the same case (with `use Op::*; use Proto::*;`).
impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Case {{")?;
        writeln!(f, "    max_inflight: {},", self.max_inflight)?;
        writeln!(f, "    ops: vec![")?;
        for op in &self.ops {
            writeln!(f, "        {op:?},")?;
        }
        writeln!(f, "    ],")?;
        write!(f, "}}")
    }
}

fn proto() -> impl Strategy<Value = Proto> {
    prop_oneof![
        any::<bool>().prop_map(|clean| Proto::V3 { clean }),
        (
            any::<bool>(),
            prop_oneof![Just(0u32), Just(600), Just(u32::MAX)]
        )
            .prop_map(|(clean_start, expiry)| Proto::V5 {
                clean_start,
                expiry
            }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS;
    prop_oneof![
        // Persistent sessions are where the semantics live: weigh them up.
        4 => (c.clone(), proto()).prop_map(|(c, proto)| Op::Connect { c, proto }),
        2 => c.clone().prop_map(|c| Op::Connect { c, proto: Proto::V3 { clean: false } }),
        2 => (c.clone(), any::<bool>()).prop_map(|(c, expiry_zero)| Op::Disconnect { c, expiry_zero }),
        2 => c.clone().prop_map(|c| Op::DropSocket { c }),
        5 => (c.clone(), 0..FILTERS.len(), 0..3u8)
            .prop_map(|(c, filter, qos)| Op::Subscribe { c, filter, qos }),
        1 => (c.clone(), 0..FILTERS.len()).prop_map(|(c, filter)| Op::Unsubscribe { c, filter }),
        10 => (0..TOPICS.len(), 0..3u8, prop::bool::weighted(0.2))
            .prop_map(|(topic, qos, retain)| Op::Publish { topic, qos, retain }),
        2 => c.clone().prop_map(|c| Op::Hold { c }),
        2 => c.clone().prop_map(|c| Op::AckOne { c }),
        2 => c.clone().prop_map(|c| Op::AckAll { c }),
        1 => Just(Op::Restart),
    ]
}

pub fn case(max_len: usize) -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(1usize), Just(2), Just(3), Just(32)],
        prop::collection::vec(op(), 1..=max_len),
    )
        .prop_map(|(max_inflight, ops)| Case { max_inflight, ops })
}
