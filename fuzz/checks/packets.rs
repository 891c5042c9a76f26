//! The packet decoder on whole client byte streams, MQTT 3.1.1 and 5 (the
//! CONNECT's protocol level picks), through `broker_core::internals::codec::decode_stream`,
//! the path every connection reads through. Checked: no panic; the same
//! packets whatever the read boundaries; every decoded packet re-encodes and
//! decodes back to itself; 3.1.1 packets survive `upgrade` and `downgrade`.
//!
//! Input: one control byte (read size, packet size limit), then the stream.

use broker_core::internals::codec::{decode_stream, downgrade, v3, v5, Encoder, Protocol};
use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder as _};

pub fn check(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    // A small limit sometimes, to reach the size checks.
    let max = if ctl & 0x80 != 0 {
        u32::from(ctl & 0x7f) + 4
    } else {
        1 << 20
    };
    let whole = decode_stream([stream], max);
    let step = usize::from(ctl & 0x0f) + 1;
    let pieces = decode_stream(stream.chunks(step), max);
    assert_eq!(whole.protocol, pieces.protocol);
    assert_eq!(
        whole.packets, pieces.packets,
        "read boundaries changed the packets"
    );
    assert_eq!(whole.refused, pieces.refused);

    for (p5, p3) in &whole.packets {
        match (whole.protocol, p3) {
            (Some(Protocol::V5), None) => round_trip_v5(p5),
            (Some(Protocol::V3), Some(p3)) => round_trip_v3(p5, p3),
            other => panic!("packet without a protocol: {other:?}"),
        }
    }
}

fn round_trip_v5(p: &v5::Packet) {
    let mut buf = BytesMut::new();
    Encoder::new(Protocol::V5)
        .encode(p.clone(), &mut buf)
        .unwrap_or_else(|e| panic!("decoded but does not encode: {e}: {p:?}"));
    let mut codec = v5::Codec::new(0, 0);
    let (back, _) = codec
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("own encoding does not decode: {e}: {p:?}"))
        .expect("a whole packet");
    assert_eq!(&back, p);
    assert!(buf.is_empty(), "bytes left after the re-encoded packet");
}

fn round_trip_v3(p5: &v5::Packet, p3: &v3::Packet) {
    let mut buf = BytesMut::new();
    v3::Codec::new(0)
        .encode(p3.clone(), &mut buf)
        .unwrap_or_else(|e| panic!("decoded but does not encode: {e}: {p3:?}"));
    let mut codec = v3::Codec::new(0);
    let (back, _) = codec
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("own encoding does not decode: {e}: {p3:?}"))
        .expect("a whole packet");
    assert_eq!(&back, p3);
    // Packets both directions have: what the broker would send back for
    // them through its 3.1.1 encoder is the client's packet again.
    if let Some(down) = downgrade(p5.clone()) {
        assert_eq!(&down, p3, "downgrade(upgrade(p)) differs");
        let mut out = BytesMut::new();
        Encoder::new(Protocol::V3)
            .encode(p5.clone(), &mut out)
            .unwrap_or_else(|e| panic!("3.1.1 encoder refused {p5:?}: {e}"));
        let (sent, _) = v3::Codec::new(0)
            .decode(&mut out)
            .expect("decodes")
            .expect("a whole packet");
        assert_eq!(&sent, p3);
    }
}
