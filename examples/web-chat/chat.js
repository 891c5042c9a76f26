// Mosca's web chat over MQTT on WebSocket.
//
// index.html?user=alice[&broker=ws://127.0.0.1:8080/mqtt]
//
// Each user has a persistent session (client id chat-<user>, clean: false)
// subscribed at QoS 1 to its own topic chat/<user>; a message to bob is a
// QoS 1 publish on chat/bob of {"from", "text", "n"}. Messages sent while bob
// is offline wait in his session and arrive when he opens the page again.
//
// Elements: #user, #status (class online/offline), form #send with #to,
// #text and #submit, and #messages, one <li class="received"> per message
// received (data-from, data-n) and <li class="sent"> per message sent.
// window.chat exposes {client, received, send(to, text)} for scripts.
'use strict';

const params = new URLSearchParams(location.search);
const user = params.get('user');
const broker = params.get('broker') || `ws://${location.hostname || '127.0.0.1'}:8080/mqtt`;
const $ = (id) => document.getElementById(id);
const messages = $('messages');
const status = $('status');

function show(cls, from, text, n) {
  const li = document.createElement('li');
  li.className = cls;
  li.dataset.from = from;
  li.dataset.n = n;
  const who = document.createElement('span');
  who.className = 'from';
  who.textContent = from;
  li.append(who, text);
  messages.append(li);
}

function setStatus(online, text) {
  status.className = online ? 'online' : 'offline';
  status.textContent = text;
  $('submit').disabled = !online;
}

if (!user) {
  setStatus(false, 'add ?user=NAME to the address');
  throw new Error('no ?user= in the address');
}
$('user').textContent = user;

const client = mqtt.connect(broker, {
  clientId: `chat-${user}`,
  clean: false, // a persistent session keeps messages sent while we are away
  protocolVersion: 4,
  reconnectPeriod: 1000,
});
let sent = 0;
const received = [];

client.on('connect', (connack) => {
  // The session keeps the subscription; subscribing again is harmless and
  // covers a session the broker has lost.
  client.subscribe(`chat/${user}`, { qos: 1 }, (err) => {
    if (err) setStatus(false, `subscribe failed: ${err.message}`);
    else setStatus(true, connack.sessionPresent ? 'online (session resumed)' : 'online');
  });
});
client.on('close', () => setStatus(false, 'offline'));
client.on('error', (e) => setStatus(false, `error: ${e.message}`));

client.on('message', (topic, payload) => {
  let m;
  try {
    m = JSON.parse(payload.toString());
  } catch {
    m = { from: '?', text: payload.toString(), n: null };
  }
  received.push(m);
  show('received', m.from, m.text, m.n);
});

// Publish at QoS 1; resolves once the broker has acknowledged (PUBACK).
function send(to, text) {
  const n = ++sent;
  const body = JSON.stringify({ from: user, text, n });
  return new Promise((resolve, reject) => {
    client.publish(`chat/${to}`, body, { qos: 1 }, (err) => {
      if (err) return reject(err);
      show('sent', `→ ${to}`, text, n);
      resolve(n);
    });
  });
}

$('send').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('text').value;
  send($('to').value.trim(), text).catch((err) => setStatus(false, `send failed: ${err.message}`));
  $('text').value = '';
  $('text').focus();
});

window.chat = { client, received, send };
