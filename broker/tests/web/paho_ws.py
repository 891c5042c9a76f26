#!/usr/bin/env python3
"""paho-mqtt (2.x) over the broker's WebSocket listener.

    python paho_ws.py HOST PORT [PATH]     (PATH defaults to /mqtt)

Connects two clients with transport="websockets", subscribes at QoS 1,
publishes at QoS 0, 1 and 2 and checks that each message arrives (at QoS
min(published, 1)). Exit code 0 when every check passes; otherwise 1 with the
failing step.
"""

import os
import sys
import threading
import time

import paho.mqtt.client as mqtt

TIMEOUT_S = float(os.environ.get("WEB_TEST_TIMEOUT_MS", "20000")) / 1000


class Failure(Exception):
    pass


def client(host, port, path, client_id):
    """A connected client with its network loop running; raises on refusal."""
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
        transport="websockets",
    )
    c.ws_set_options(path=path)
    connected = threading.Event()
    result = {}

    def on_connect(_c, _userdata, _flags, reason_code, _props):
        result["rc"] = reason_code
        connected.set()

    c.on_connect = on_connect
    c.connect(host, port, keepalive=30)
    c.loop_start()
    if not connected.wait(TIMEOUT_S / 4):
        raise Failure(f"{client_id}: no CONNACK")
    if result["rc"].is_failure:
        raise Failure(f"{client_id}: connection refused: {result['rc']}")
    return c


def main():
    if len(sys.argv) < 3:
        print("usage: python paho_ws.py HOST PORT [PATH]", file=sys.stderr)
        return 2
    host, port = sys.argv[1], int(sys.argv[2])
    path = sys.argv[3] if len(sys.argv) > 3 else "/mqtt"
    run = f"{os.getpid()}-{int(time.time() * 1000)}"
    deadline = time.monotonic() + TIMEOUT_S
    step = "connect"
    clients = []
    try:
        sub = client(host, port, path, f"py-sub-{run}")
        clients.append(sub)
        pub = client(host, port, path, f"py-pub-{run}")
        clients.append(pub)
        print("[paho] connected two clients over websockets")

        step = "subscribe at QoS 1"
        got = []
        arrived = threading.Condition()

        def on_message(_c, _userdata, msg):
            with arrived:
                got.append((msg.topic, msg.payload.decode(), msg.qos))
                arrived.notify_all()

        subscribed = threading.Event()
        granted = []

        def on_subscribe(_c, _userdata, _mid, reason_codes, _props):
            granted.extend(rc.value for rc in reason_codes)
            subscribed.set()

        sub.on_message = on_message
        sub.on_subscribe = on_subscribe
        sub.subscribe(f"web/{run}/#", qos=1)
        if not subscribed.wait(max(0.0, deadline - time.monotonic())):
            raise Failure("no SUBACK")
        if granted != [1]:
            raise Failure(f"granted QoS {granted}, expected [1]")

        step = "publish at QoS 0, 1, 2 and receive"
        for qos in (0, 1, 2):
            info = pub.publish(f"web/{run}/q{qos}", f"hello at qos {qos}", qos=qos)
            # Returns once PUBACK / PUBCOMP came back (or, for QoS 0, once sent).
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise Failure(f"QoS {qos} publish not acknowledged")
        with arrived:
            arrived.wait_for(lambda: len(got) >= 3, timeout=max(0.0, deadline - time.monotonic()))
            received = sorted(got)
        want = [(f"web/{run}/q{q}", f"hello at qos {q}", min(q, 1)) for q in (0, 1, 2)]
        if received != want:
            raise Failure(f"received {received}, expected {want}")
        print("[paho] QoS 0, 1 and 2 publishes received")
    except Failure as e:
        print(f'FAIL at "{step}": {e}', file=sys.stderr)
        return 1
    except Exception as e:  # a refused socket, a handshake error: say where
        print(f'FAIL at "{step}": {type(e).__name__}: {e}', file=sys.stderr)
        return 1
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
    print("[paho] OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
