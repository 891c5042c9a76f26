#!/usr/bin/env node
// The web chat (examples/web-chat) in headless Chromium against the broker's
// WebSocket listener.
//
//   node chat-browser.js WS_URL SCREENSHOT_PNG
//
// A static HTTP server (node's http module) serves the chat page and MQTT.js's
// browser bundle. Bob opens the page (his persistent session subscribes) and
// closes it; Alice sends him 20 messages, each acknowledged by the broker;
// Bob opens the page again and must list all 20, in order, exactly once, with
// no duplicate arriving for a while after the 20th. Bob then answers and Alice
// sees the answer live. The screenshot is of Bob's page.
//
// Chromium: CHROMIUM_BIN, default /usr/bin/chromium (puppeteer-core downloads
// nothing). Exit code 0 when every check passes; otherwise 1 with the step.
'use strict';

const fs = require('fs');
const http = require('http');
const path = require('path');
const puppeteer = require('puppeteer-core');

const [wsUrl, screenshot] = process.argv.slice(2);
if (!wsUrl || !screenshot) {
  console.error('usage: node chat-browser.js ws://HOST:PORT/mqtt SCREENSHOT_PNG');
  process.exit(2);
}
const TIMEOUT_MS = Number(process.env.WEB_TEST_TIMEOUT_MS || 90000);
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const COUNT = 20;
const QUIET_MS = 2000; // how long to watch for duplicates after the 20th
const CHAT_DIR = path.resolve(__dirname, '../../../examples/web-chat');
const BUNDLE = path.join(__dirname, 'node_modules/mqtt/dist/mqtt.min.js');

let step = 'start';
let browser;
let server;
const pageLog = [];

function log(msg) {
  console.log(`[chat] ${msg}`);
}

async function fail(msg) {
  console.error(`FAIL at "${step}": ${msg}`);
  if (pageLog.length) console.error(`browser console:\n  ${pageLog.join('\n  ')}`);
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}

// The timer also keeps the process alive: the only ways out are OK or FAIL.
setTimeout(() => fail(`no result within ${TIMEOUT_MS} ms`), TIMEOUT_MS);
process.on('beforeExit', () => fail('the script ran out of work without finishing'));

// The chat directory, with /mqtt.min.js from node_modules.
function serve() {
  const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css' };
  server = http.createServer((req, res) => {
    const name = new URL(req.url, 'http://x').pathname.replace(/^\/+/, '') || 'index.html';
    const file = name === 'mqtt.min.js' ? BUNDLE : path.join(CHAT_DIR, path.basename(name));
    fs.readFile(file, (err, body) => {
      if (err) {
        res.writeHead(404).end('not found');
        return;
      }
      res.writeHead(200, { 'content-type': types[path.extname(file)] || 'application/octet-stream' });
      res.end(body);
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));
}

async function openChat(user, httpPort) {
  const page = await browser.newPage();
  await page.setViewport({ width: 720, height: 400 });
  page.on('console', (m) => pageLog.push(`${user}: ${m.text()}`));
  page.on('pageerror', (e) => pageLog.push(`${user}: page error: ${e.message}`));
  const url = `http://127.0.0.1:${httpPort}/index.html?user=${user}&broker=${encodeURIComponent(wsUrl)}`;
  await page.goto(url, { waitUntil: 'load' });
  await page
    .waitForSelector('#status.online', { timeout: 15000 })
    .catch(async () => fail(`${user}'s page did not get online: ${await page.$eval('#status', (e) => e.textContent)}`));
  return page;
}

const receivedOn = (page) =>
  page.$$eval('#messages li.received', (lis) =>
    lis.map((li) => ({ from: li.dataset.from, n: Number(li.dataset.n), text: li.lastChild.textContent })),
  );

async function main() {
  step = 'serve the page';
  const httpPort = await serve();

  step = 'launch Chromium';
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      ...(process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : []),
      '--disable-dev-shm-usage',
      '--disable-gpu',
    ],
  });
  log(`Chromium ${await browser.version()}`);

  step = 'bob connects, then closes his page';
  let bob = await openChat('bob', httpPort);
  await bob.close();
  log('bob subscribed and left');

  step = 'alice sends 20 messages to bob';
  const alice = await openChat('alice', httpPort);
  for (let i = 1; i <= COUNT; i++) {
    // chat.send resolves on the broker's PUBACK.
    const n = await alice.evaluate((i) => window.chat.send('bob', `message ${i} from alice`), i);
    if (n !== i) await fail(`send ${i} returned n = ${n}`);
  }
  log(`alice sent ${COUNT} messages, each acknowledged`);

  step = 'bob opens the page again';
  bob = await openChat('bob', httpPort);
  await bob
    .waitForFunction((count) => document.querySelectorAll('#messages li.received').length >= count, { timeout: 15000, polling: 100 }, COUNT)
    .catch(async () => fail(`bob lists ${(await receivedOn(bob)).length} of ${COUNT}: ${JSON.stringify(await receivedOn(bob))}`));
  await new Promise((r) => setTimeout(r, QUIET_MS));

  step = 'bob has every message, in order, exactly once';
  const got = await receivedOn(bob);
  const want = Array.from({ length: COUNT }, (_, k) => ({
    from: 'alice',
    n: k + 1,
    text: `message ${k + 1} from alice`,
  }));
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    await fail(`bob's list differs:\n  got  ${JSON.stringify(got)}\n  want ${JSON.stringify(want)}`);
  }
  log(`bob lists all ${COUNT}, in order, no duplicate within ${QUIET_MS} ms`);

  step = 'bob answers, alice sees it';
  await bob.type('#to', 'alice');
  await bob.type('#text', `got all ${COUNT}, thanks!`);
  await bob.click('#submit');
  // Alice's page is in the background now: poll on a timer, since
  // requestAnimationFrame (the default) does not run in a background page.
  await alice
    .waitForFunction(() => document.querySelectorAll('#messages li.received').length === 1, { timeout: 10000, polling: 100 })
    .catch(() => fail('alice did not receive the answer'));
  const [answer] = await receivedOn(alice);
  if (answer.from !== 'bob' || answer.text !== `got all ${COUNT}, thanks!`) {
    await fail(`alice got ${JSON.stringify(answer)}`);
  }
  await bob.waitForSelector('#messages li.sent');

  step = 'screenshot';
  fs.mkdirSync(path.dirname(path.resolve(screenshot)), { recursive: true });
  await bob.screenshot({ path: screenshot, fullPage: true });
  log(`screenshot of bob's page: ${screenshot}`);

  await browser.close();
  server.close();
  log('OK');
  process.exit(0);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
