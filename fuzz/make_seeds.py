#!/usr/bin/env python3
"""Writes the committed seed corpus (fuzz/seeds/<target>/): a handful of valid
inputs per target, from which the fuzzer mutates. Rerun after changing it."""

import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(b)) + b


def pkt(first, body):
    return bytes([first]) + varint(len(body)) + body


def props(*items):
    body = b"".join(items)
    return varint(len(body)) + body


# MQTT 3.1.1 / 3.1
def connect3(cid, clean=True, will=None, user=None, level=4):
    name = b"MQTT" if level == 4 else b"MQIsdp"
    flags = (0x02 if clean else 0) | (0x04 | 0x08 if will else 0) | (0xC0 if user else 0)
    body = s(name) + bytes([level, flags]) + struct.pack(">H", 60) + s(cid)
    if will:
        body += s(will[0]) + s(will[1])
    if user:
        body += s(user[0]) + s(user[1])
    return pkt(0x10, body)


def publish3(topic, payload, qos=0, pid=1, retain=False, dup=False):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s(topic) + (struct.pack(">H", pid) if qos else b"") + payload
    return pkt(first, body)


def subscribe3(pid, *filters):
    return pkt(0x82, struct.pack(">H", pid) + b"".join(s(f) + bytes([q]) for f, q in filters))


def unsubscribe3(pid, *filters):
    return pkt(0xA2, struct.pack(">H", pid) + b"".join(s(f) for f in filters))


def ack(first, pid):
    return pkt(first, struct.pack(">H", pid))


# MQTT 5
def connect5(cid, clean=True, prop=props(), will=None):
    flags = (0x02 if clean else 0) | (0x04 | 0x10 if will else 0)
    body = s("MQTT") + bytes([5, flags]) + struct.pack(">H", 30) + prop + s(cid)
    if will:
        body += props(b"\x18" + struct.pack(">I", 5), b"\x01\x01") + s(will[0]) + s(will[1])
    return pkt(0x10, body)


def publish5(topic, payload, qos=0, pid=1, prop=props()):
    body = s(topic) + (struct.pack(">H", pid) if qos else b"") + prop + payload
    return pkt(0x30 | (qos << 1), body)


def subscribe5(pid, prop, *filters):
    return pkt(0x82, struct.pack(">H", pid) + prop + b"".join(s(f) + bytes([o]) for f, o in filters))


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# packets: a control byte (0x00: whole stream in 1-byte reads; 0x0f: 16-byte reads), then the stream.
v3 = [
    connect3("dev-1", clean=False, will=("dev/1/status", b"offline"), user=("u", "p"))
    + subscribe3(1, ("a/+/c", 1), ("#", 0), ("$share/g/jobs", 2))
    + publish3("a/b/c", b"hello", qos=1, pid=2)
    + publish3("a/b", b"x" * 200, qos=2, pid=3, retain=True)
    + ack(0x62, 3)
    + ack(0x40, 9)
    + unsubscribe3(4, "a/+/c")
    + pkt(0xC0, b"")
    + pkt(0xE0, b""),
    connect3("old", level=3) + publish3("t", b"", qos=0) + pkt(0xE0, b""),
    connect3("") + subscribe3(7, ("x/#", 2)) + ack(0x50, 5) + ack(0x70, 5),
]
v5 = [
    connect5(
        "dev-5",
        clean=False,
        prop=props(b"\x11" + struct.pack(">I", 3600), b"\x21\x00\x10", b"\x22\x00\x0a",
                   b"\x27" + struct.pack(">I", 65536), b"\x26" + s("k") + s("v")),
        will=("dev/5/status", b"gone"),
    )
    + subscribe5(1, props(b"\x0b\x07"), ("a/+", 0x01), ("b/#", 0x2E))
    + publish5("a/b", b"payload", qos=1, pid=2,
               prop=props(b"\x23\x00\x01", b"\x02" + struct.pack(">I", 60), b"\x03" + s("text/plain"),
                          b"\x08" + s("reply/here"), b"\x09" + s(b"\x01\x02")))
    + publish5("", b"again", qos=0, prop=props(b"\x23\x00\x01"))
    + pkt(0x40, struct.pack(">H", 4) + b"\x10" + props(b"\x1f" + s("why")))
    + pkt(0x62, struct.pack(">H", 5))
    + pkt(0xA2, struct.pack(">H", 6) + props() + s("a/+"))
    + pkt(0xC0, b"")
    + pkt(0xE0, b"\x04" + props(b"\x11" + struct.pack(">I", 10))),
    connect5("", clean=False, prop=props(b"\x15" + s("SCRAM"), b"\x16" + s(b"data")))
    + pkt(0xF0, b"\x18" + props(b"\x15" + s("SCRAM"), b"\x16" + s(b"more"))),
    connect5("q") + publish5("t/1", b"\xff\xfe", qos=2, pid=1, prop=props(b"\x01\x00")) + pkt(0xE0, b""),
]
for i, stream in enumerate(v3):
    write("packets", f"v3-{i}", b"\x00" + stream)
    write("packets", f"v3-{i}-chunks", b"\x0f" + stream)
for i, stream in enumerate(v5):
    write("packets", f"v5-{i}", b"\x00" + stream)
    write("packets", f"v5-{i}-chunks", b"\x0f" + stream)

# topics: opcode (low 3 bits: 0-2 insert, 3-4 remove, 5-6 match, 7 subscribers; bits 3-4: key;
# bit 7: deep), then a length byte and token bytes (a b + # "" $s c a+ #b NUL é $share).
def op(code, tokens, key=0, deep=None):
    out = bytes([code | (key << 3) | (0x80 if deep else 0), len(tokens)]) + bytes(tokens)
    if deep:
        out += struct.pack(">H", deep)
    return out

write("topics", "basic",
      op(0, [0, 2, 6]) + op(0, [0, 3], key=1) + op(0, [3], key=2) + op(5, [0, 1, 6]) + op(5, [5, 0])
      + op(3, [0, 2, 6]) + op(7, [0, 3]) + op(5, [0]))
write("topics", "deep",
      op(0, [0, 1], deep=5000) + op(0, [2], key=1, deep=3000) + op(0, [0, 3], key=2)
      + op(5, [0, 1], deep=5000) + op(7, [0, 1], deep=5000) + op(3, [0, 1], deep=5000) + op(5, [4], deep=16000))
write("topics", "shared", op(0, [11, 0, 1]) + op(5, [11, 0, 1]) + op(0, [4, 4]) + op(5, [4, 4]))

# settings: 0x00 then TOML, or 0x01 then flags, one per line.
toml = """listen = ["127.0.0.1:1883"]
storage = "sqlite://data/broker.db"

[broker]
max_packet_size = 1048576
connect_timeout_secs = 10
max_inflight = 32
max_queued_messages = 100000
overflow_policy = "drop-new"
queue_qos0_offline = false
session_expiry_secs = 86400
receive_maximum = 1024
max_session_expiry_secs = 604800
topic_alias_maximum = 10
maximum_qos = 2
retain_available = true
wildcard_subscriptions = true
shared_subscriptions = true
subscription_identifiers = true
max_keep_alive = 300
response_topic_prefix = "replies/"
"""
write("settings", "readme.toml", b"\x00" + toml.encode())
write("settings", "small.toml", b"\x00" + b'storage = "memory://"\n[broker]\nmax_inflight = 1\noverflow_policy = "drop-oldest"\n')
write("settings", "flags", b"\x01" + b"--listen\n127.0.0.1:1999\n--max-inflight\n64\n--overflow-policy\ndrop-oldest\n--session-expiry-secs\n60")

# storage_url: the URL.
for i, url in enumerate([
    "sqlite://data/broker.db",
    "sqlite:///var/lib/broker/broker.db?synchronous=full&max_size_mb=10",
    "sqlite://x.db?synchronous=normal",
    "memory://",
    "redis://127.0.0.1:6379/0?prefix=mqtt:",
    "mongodb://127.0.0.1:27017/mqtt?replicaSet=rs0",
]):
    write("storage_url", f"url-{i}", url.encode())
