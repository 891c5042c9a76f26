#!/usr/bin/env node
// MQTT.js from Node against the broker's WebSocket listener (ws:// or wss://).
//
//   node mqttjs.js URL [CA_PEM]
//
// URL is ws://HOST:PORT/mqtt or wss://HOST:PORT/mqtt; for wss, CA_PEM is the
// certificate that signed the listener's (the self-signed certificate itself).
// Checks: CONNECT, SUBSCRIBE at QoS 1, PUBLISH at QoS 0, 1 and 2 received
// (delivered at QoS min(published, 1)), and a persistent session (clean:
// false) that receives on reconnect a message published while it was away.
// Exit code 0 when every check passes; otherwise 1 with the failing step.
'use strict';

const fs = require('fs');
const mqtt = require('mqtt');

const [url, caPath] = process.argv.slice(2);
if (!url) {
  console.error('usage: node mqttjs.js ws://HOST:PORT/mqtt [CA_PEM]');
  process.exit(2);
}
const TIMEOUT_MS = Number(process.env.WEB_TEST_TIMEOUT_MS || 20000);
const run = `${process.pid}-${Date.now()}`;
let step = 'start';
const clients = [];

function log(msg) {
  console.log(`[mqttjs ${url.split(':')[0]}] ${msg}`);
}

function fail(msg) {
  console.error(`FAIL at "${step}": ${msg}`);
  for (const c of clients) c.end(true);
  process.exit(1);
}

// The timer also keeps the process alive: the only ways out are OK or FAIL.
setTimeout(() => fail(`no result within ${TIMEOUT_MS} ms`), TIMEOUT_MS);
process.on('beforeExit', () => fail('the script ran out of work without finishing'));

function options(clientId, clean) {
  const o = {
    clientId,
    clean,
    protocolVersion: 4,
    reconnectPeriod: 0, // a dropped connection is a failure, not a retry
    connectTimeout: 5000,
  };
  if (caPath) o.ca = fs.readFileSync(caPath);
  return o;
}

// A client and its CONNACK; rejects when the connection fails or closes
// first (a refused WebSocket upgrade only closes it).
function open(clientId, clean) {
  const client = mqtt.connect(url, options(clientId, clean));
  clients.push(client);
  const connack = new Promise((resolve, reject) => {
    client.once('connect', resolve);
    client.once('error', (e) => reject(new Error(`${clientId}: ${e.message}`)));
    client.once('close', () => reject(new Error(`${clientId}: connection closed before CONNACK`)));
  });
  return { client, connack };
}

async function connect(clientId, clean) {
  const { client, connack } = open(clientId, clean);
  await connack;
  client.on('error', (e) => fail(`${clientId}: ${e.message}`));
  return client;
}

// Resolves with the next `count` messages on `client` (topic, payload as a
// Buffer, qos).
function collect(client, count, within = 5000) {
  return new Promise((resolve, reject) => {
    const got = [];
    const timer = setTimeout(
      () => reject(new Error(`received ${got.length} of ${count} messages: ${JSON.stringify(got)}`)),
      within,
    );
    client.on('message', function onMessage(topic, payload, packet) {
      got.push({ topic, payload, qos: packet.qos });
      if (got.length === count) {
        clearTimeout(timer);
        client.removeListener('message', onMessage);
        resolve(got);
      }
    });
  });
}

const text = (msgs) => msgs.map((m) => ({ ...m, payload: m.payload.toString() }));

function expectEqual(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) fail(`${what}: expected ${e}, got ${a}`);
}

async function main() {
  step = 'connect';
  const sub = await connect(`js-sub-${run}`, true);
  const pub = await connect(`js-pub-${run}`, true);
  log('connected two clients');

  step = 'subscribe at QoS 1';
  const granted = await sub.subscribeAsync(`web/${run}/#`, { qos: 1 });
  expectEqual(granted.map((g) => g.qos), [1], 'granted QoS');

  step = 'publish at QoS 0, 1, 2 and receive';
  const arriving = collect(sub, 3);
  for (const qos of [0, 1, 2]) {
    // publishAsync resolves on the broker's acknowledgement (PUBACK, PUBCOMP)
    // for QoS 1 and 2, once written for QoS 0.
    await pub.publishAsync(`web/${run}/q${qos}`, `hello at qos ${qos}`, { qos });
  }
  const got = text(await arriving).sort((x, y) => x.topic.localeCompare(y.topic));
  expectEqual(
    got,
    [0, 1, 2].map((qos) => ({
      topic: `web/${run}/q${qos}`,
      payload: `hello at qos ${qos}`,
      qos: Math.min(qos, 1),
    })),
    'messages received',
  );
  log('QoS 0, 1 and 2 publishes received');

  step = 'binary payload';
  const bytes = Buffer.from([0, 1, 2, 0xfe, 0xff, 0x80, 0x7f]);
  const binary = collect(sub, 1);
  await pub.publishAsync(`web/${run}/bin`, bytes, { qos: 1 });
  const [b] = await binary;
  if (!b.payload.equals(bytes)) fail(`binary payload changed on the way: ${b.payload.toString('hex')}`);

  step = 'persistent session: first connection';
  const id = `js-persist-${run}`;
  let persist = await connect(id, false);
  await persist.subscribeAsync(`inbox/${run}`, { qos: 1 });
  await persist.endAsync();

  step = 'persistent session: publish while offline';
  await pub.publishAsync(`inbox/${run}`, 'while you were away', { qos: 1 });

  step = 'persistent session: reconnect';
  // Listening before CONNACK: the queued message may follow it at once.
  const { client: again, connack: connected } = open(id, false);
  const offline = collect(again, 1);
  const connack = await connected;
  if (!connack.sessionPresent) fail('CONNACK of the reconnect has session present = 0');
  expectEqual(
    text(await offline),
    [{ topic: `inbox/${run}`, payload: 'while you were away', qos: 1 }],
    'offline message',
  );
  log('persistent session received its offline message on reconnect');

  step = 'persistent session: clean up';
  await again.endAsync();
  persist = await connect(id, true); // clean: true discards the session
  await persist.endAsync();
  await sub.endAsync();
  await pub.endAsync();
  log('OK');
  process.exit(0);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
