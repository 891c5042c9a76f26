//! Inputs the fuzz targets (`fuzz/`, run by `scripts/fuzz`) found, replayed
//! through the targets' own checks on every `cargo test`, plus the committed
//! seeds. Each case names what it found and where it was fixed.

#[path = "../../fuzz/checks/packets.rs"]
mod packets;
#[path = "../../fuzz/checks/topics.rs"]
mod topics;

use broker_core::internals::codec::{decode_stream, v3};
use bytes::BytesMut;
use tokio_util::codec::Encoder;

/// Every file of `fuzz/seeds/TARGET`.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| std::fs::read(f.expect("entry").path()).expect("read seed"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn packet_seeds_pass_the_packets_check() {
    for s in seeds("packets") {
        packets::check(&s);
    }
}

#[test]
fn topic_seeds_pass_the_topics_check() {
    for s in seeds("topics") {
        topics::check(&s);
    }
}

/// packets, crash-91b4ce16: an MQTT 3.1 CONNECT (`MQIsdp`, level 3) re-encoded
/// as `MQIsdp` with level 4, a combination no broker accepts. Fixed in
/// `vendor/rmqtt-codec/src/v3/encode.rs` (the level now follows the name).
#[test]
fn mqtt_3_1_connect_encodes_with_level_3() {
    let input = b"\x00\x10\x11\x00\x06MQIsdp\x03\x02\x00<\x00\x03old0\x03\x00\x01t\xe0\x00";
    packets::check(input);
    let decoded = decode_stream([&input[1..]], 1 << 20);
    let (_, Some(connect)) = &decoded.packets[0] else {
        panic!("not a 3.1.1 stream: {decoded:?}");
    };
    let mut buf = BytesMut::new();
    v3::Codec::new(0)
        .encode(connect.clone(), &mut buf)
        .expect("encodes");
    assert_eq!(&buf[4..11], b"MQIsdp\x03", "{buf:?}");
}
