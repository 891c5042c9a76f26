// The web service of an application written in Node.js, with nothing but
// Node's own `http`: it decides who connects, what they publish and
// subscribe to, and keeps the broker's webhook events (GET /log returns
// them). The broker's [auth] http_* and [webhook] settings point here.
const http = require('http');

const users = { alice: 'wonderland', bob: 'builder' };
const log = [];

const server = http.createServer((req, res) => {
  let body = '';
  req.on('data', (chunk) => {
    body += chunk;
    if (body.length > 1e6) req.destroy();
  });
  req.on('end', () => {
    const answer = (status, value) => {
      res.writeHead(status, { 'Content-Type': 'application/json' });
      res.end(value === undefined ? '' : JSON.stringify(value));
    };
    if (req.method === 'GET' && req.url === '/log') return answer(200, log);
    let q;
    try {
      q = JSON.parse(body);
    } catch (e) {
      return answer(400, { error: 'not JSON' });
    }
    const decide = (yes) => answer(200, { result: yes ? 'allow' : 'deny' });
    switch (req.url) {
      case '/auth':
        return decide(q.username in users && users[q.username] === q.password);
      case '/publish': // each user publishes under chat/<user>/ only
        return decide(q.topic.startsWith(`chat/${q.username}/`));
      case '/subscribe':
        return q.filter === '#' ? answer(403) : decide(true);
      case '/events':
        log.push(...q);
        return answer(204);
      default:
        return answer(404, {});
    }
  });
});

server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
