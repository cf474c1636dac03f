// AMQP checks with amqplib, the Node.js client RabbitMQ's JavaScript tutorials use:
// the same patterns as pika_checks.py, in a second client library and language.
//
// Each check does what one of RabbitMQ's six tutorials does (hello world, work queues,
// publish/subscribe, routing, topics, RPC), or publishes on a confirm channel, and
// prints "ok <name>" when the client saw what it would see against RabbitMQ.
// Publishers and consumers connect to different nodes. Every wait is bounded.
//
// usage: node amqplib_checks.js PUBLISH_HOST CONSUME_HOST PORT CHECK...
// (amqplib is found through NODE_PATH.)
'use strict';

const crypto = require('crypto');
const amqp = require('amqplib');

const [PUB, CON, PORT] = [process.argv[2], process.argv[3], Number(process.argv[4])];
const WAIT_MS = 20000;

function fail(text) {
  console.log(`FAIL ${text}`);
  process.exit(1);
}

async function connect(host) {
  return amqp.connect({ protocol: 'amqp', hostname: host, port: PORT, username: 'guest', password: 'guest' });
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Resolves with `promise`'s value, or rejects once `ms` passed.
function bounded(what, promise, ms = WAIT_MS) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

// Consumes from `queue` until `want` bodies arrived or WAIT_MS passed; the bodies in
// arrival order. With `ack`, each message is acknowledged after it is recorded.
async function drain(ch, queue, want, { ack = false, prefetch = 0 } = {}) {
  const got = [];
  if (prefetch) await ch.prefetch(prefetch);
  let done;
  const enough = new Promise((resolve) => {
    done = resolve;
  });
  const { consumerTag } = await ch.consume(
    queue,
    (msg) => {
      if (msg === null) return; // cancelled by the broker
      got.push(msg.content.toString());
      if (ack) ch.ack(msg);
      if (got.length >= want) done();
    },
    { noAck: !ack },
  );
  await Promise.race([enough, sleep(WAIT_MS)]);
  await ch.cancel(consumerTag);
  return got;
}

function expect(name, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    fail(`${name}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
  console.log(`ok ${name}`);
}

async function hello() {
  const c = await connect(CON);
  const ch = await c.createChannel();
  await ch.assertQueue('js-hello', { durable: false });
  const p = await connect(PUB);
  const pch = await p.createConfirmChannel();
  pch.sendToQueue('js-hello', Buffer.from('Hello from amqplib'));
  await bounded('confirm of the hello message', pch.waitForConfirms());
  await p.close();
  expect('hello', await drain(ch, 'js-hello', 1), ['Hello from amqplib']);
  await c.close();
}

async function workQueues() {
  const c = await connect(CON);
  const ch = await c.createChannel();
  await ch.assertQueue('js-tasks', { durable: true });
  const p = await connect(PUB);
  const pch = await p.createConfirmChannel();
  const tasks = [];
  for (let i = 0; i < 12; i++) tasks.push(`job ${i}${'#'.repeat(i % 4)}`);
  for (const t of tasks) pch.sendToQueue('js-tasks', Buffer.from(t), { persistent: true });
  await bounded('confirms of the tasks', pch.waitForConfirms());
  await p.close();
  // One unacknowledged message at a time, each acked by hand: all of them, in order.
  expect('work_queues', await drain(ch, 'js-tasks', tasks.length, { ack: true, prefetch: 1 }), tasks);
  await c.close();
}

async function publishSubscribe() {
  const c = await connect(CON);
  const ch = await c.createChannel();
  await ch.assertExchange('js-events', 'fanout', { durable: false });
  const queues = [];
  for (let i = 0; i < 2; i++) {
    const { queue } = await ch.assertQueue('', { exclusive: true });
    if (!queue.startsWith('amq.gen-')) fail(`publish_subscribe: server-named queue ${queue}`);
    await ch.bindQueue(queue, 'js-events', '');
    queues.push(queue);
  }
  const p = await connect(PUB);
  const pch = await p.createConfirmChannel();
  await pch.assertExchange('js-events', 'fanout', { durable: false });
  const events = ['event a', 'event b', 'event c', 'event d'];
  for (const e of events) pch.publish('js-events', 'ignored', Buffer.from(e));
  await bounded('confirms of the events', pch.waitForConfirms());
  await p.close();
  const got = [];
  for (const q of queues) got.push(await drain(ch, q, events.length));
  expect('publish_subscribe', got, [events, events]);
  await c.close();
}

async function routing() {
  const c = await connect(CON);
  const ch = await c.createChannel();
  await ch.assertExchange('js-direct', 'direct', { durable: false });
  const { queue } = await ch.assertQueue('', { exclusive: true });
  for (const key of ['blue', 'green']) await ch.bindQueue(queue, 'js-direct', key);
  const p = await connect(PUB);
  const pch = await p.createConfirmChannel();
  for (const key of ['red', 'green', 'yellow', 'blue', 'red']) pch.publish('js-direct', key, Buffer.from(`colour ${key}`));
  await bounded('confirms of the colours', pch.waitForConfirms());
  await p.close();
  expect('routing', await drain(ch, queue, 2), ['colour green', 'colour blue']);
  await c.close();
}

async function topics() {
  const c = await connect(CON);
  const ch = await c.createChannel();
  await ch.assertExchange('js-topic', 'topic', { durable: false });
  const { queue } = await ch.assertQueue('', { exclusive: true });
  for (const pattern of ['eu.*.rain', 'us.#']) await ch.bindQueue(queue, 'js-topic', pattern);
  const p = await connect(PUB);
  const pch = await p.createConfirmChannel();
  const keys = ['eu.paris.rain', 'eu.paris.sun', 'us', 'asia.tokyo.rain', 'us.ny.snow.heavy', 'eu.rain'];
  for (const key of keys) pch.publish('js-topic', key, Buffer.from(key));
  await bounded('confirms of the weather', pch.waitForConfirms());
  await p.close();
  expect('topics', await drain(ch, queue, 3), ['eu.paris.rain', 'us', 'us.ny.snow.heavy']);
  await c.close();
}

async function rpc() {
  // The server doubles a number and answers to reply_to with the request's correlation id.
  const server = await connect(CON);
  const sch = await server.createChannel();
  await sch.assertQueue('js-rpc', { durable: false });
  await sch.prefetch(1);
  await sch.consume('js-rpc', (msg) => {
    if (msg === null) return;
    const answer = String(Number(msg.content.toString()) * 2);
    sch.sendToQueue(msg.properties.replyTo, Buffer.from(answer), { correlationId: msg.properties.correlationId });
    sch.ack(msg);
  });
  const client = await connect(PUB);
  const cch = await client.createChannel();
  const { queue: replies } = await cch.assertQueue('', { exclusive: true });
  const answers = new Map();
  let answered;
  const gotAll = new Promise((resolve) => {
    answered = resolve;
  });
  await cch.consume(
    replies,
    (msg) => {
      if (msg === null) return;
      answers.set(msg.properties.correlationId, Number(msg.content.toString()));
      if (answers.size === 3) answered();
    },
    { noAck: true },
  );
  const asked = new Map();
  for (const n of [21, 50, 7]) {
    const id = crypto.randomUUID();
    asked.set(id, n * 2);
    cch.sendToQueue('js-rpc', Buffer.from(String(n)), { replyTo: replies, correlationId: id });
  }
  await Promise.race([gotAll, sleep(WAIT_MS)]);
  const got = [...asked.keys()].map((id) => answers.get(id));
  expect('rpc', got, [...asked.values()]);
  await client.close();
  await server.close();
}

async function confirms() {
  const c = await connect(PUB);
  const ch = await c.createConfirmChannel();
  await ch.assertQueue('js-confirmed', { durable: true });
  // Every publish's callback says it is stored; then a mandatory one no queue takes
  // comes back (basic.return) and is still confirmed, as RabbitMQ does.
  const acks = [];
  for (let i = 0; i < 50; i++) {
    acks.push(
      new Promise((resolve) => {
        ch.sendToQueue('js-confirmed', Buffer.from(`c${i}`), { persistent: true }, (err) => resolve(err ? 'nack' : 'ack'));
      }),
    );
  }
  const results = await bounded('50 confirms', Promise.all(acks));
  if (results.some((r) => r !== 'ack')) fail(`confirms: ${JSON.stringify(results)}`);
  const returned = new Promise((resolve) => ch.once('return', (msg) => resolve(msg.fields.replyCode)));
  ch.publish('', 'js-no-such-queue', Buffer.from('lost'), { mandatory: true });
  const code = await bounded('basic.return', returned);
  await bounded('confirm of the returned message', ch.waitForConfirms());
  const c2 = await connect(CON);
  const ch2 = await c2.createChannel();
  const got = await drain(ch2, 'js-confirmed', 50, { ack: true, prefetch: 10 });
  expect('confirms', [code, got.length, got[49]], [312, 50, 'c49']);
  await c2.close();
  await c.close();
}

// Many messages published at once on one confirm channel (several publish requests in
// flight on the broker): confirms come in delivery-tag order (each `basic.ack` above
// the one before, the last covering every message), and the queue has the messages
// in publish order.
async function pipelinedConfirms() {
  const N = 5000;
  const c = await connect(CON);
  const ch = await c.createChannel();
  await ch.assertExchange('js-pipelined', 'direct', { durable: true });
  await ch.assertQueue('js-pipelined-q', { durable: true });
  await ch.bindQueue('js-pipelined-q', 'js-pipelined', 'k');
  const p = await connect(PUB);
  const pch = await p.createConfirmChannel();
  const acks = [];
  pch.on('ack', (f) => acks.push(f.deliveryTag));
  pch.on('nack', (f) => fail(`pipelined_confirms: nack of ${f.deliveryTag}`));
  const body = 'x'.repeat(1000);
  for (let i = 0; i < N; i++) pch.publish('js-pipelined', 'k', Buffer.from(`${i} ${body}`), { persistent: true });
  await bounded('confirms of the pipelined messages', pch.waitForConfirms(), 60000);
  await p.close();
  const ordered = acks.every((t, i) => i === 0 || t > acks[i - 1]);
  if (!ordered || acks[acks.length - 1] !== N) fail(`pipelined_confirms: ack tags ${JSON.stringify(acks)}`);
  const got = (await drain(ch, 'js-pipelined-q', N, { ack: true, prefetch: 500 })).map((b) => Number(b.split(' ')[0]));
  const firstWrong = got.findIndex((v, i) => v !== i);
  expect('pipelined_confirms', [got.length, firstWrong, acks.length > 1], [N, -1, true]);
  await c.close();
}

// The exchange and queue of `remote_confirms`, declared first so that the test can
// find which node holds the exchange's primary and publish from another one.
async function remoteDeclare() {
  const c = await connect(CON);
  const ch = await c.createChannel();
  await ch.assertExchange('js-remote', 'direct', { durable: true });
  await ch.assertQueue('js-remote-q', { durable: true });
  await ch.bindQueue('js-remote-q', 'js-remote', 'k');
  console.log('ok remote_declare');
  await c.close();
}

// As `pipelined_confirms`, with the exchange's primary on neither the publisher's node
// nor the consumer's (the test picks PUB and CON so): confirms in delivery-tag order,
// each only once its messages are stored, the queue's messages in publish order.
async function remoteConfirms() {
  const N = 5000;
  const p = await connect(PUB);
  const pch = await p.createConfirmChannel();
  const acks = [];
  pch.on('ack', (f) => acks.push(f.deliveryTag));
  pch.on('nack', (f) => fail(`remote_confirms: nack of ${f.deliveryTag}`));
  const body = 'x'.repeat(1000);
  for (let i = 0; i < N; i++) pch.publish('js-remote', 'k', Buffer.from(`${i} ${body}`), { persistent: true });
  await bounded('confirms of the messages to the remote primary', pch.waitForConfirms(), 60000);
  await p.close();
  const ordered = acks.every((t, i) => i === 0 || t > acks[i - 1]);
  if (!ordered || acks[acks.length - 1] !== N) fail(`remote_confirms: ack tags ${JSON.stringify(acks)}`);
  const c = await connect(CON);
  const ch = await c.createChannel();
  const got = (await drain(ch, 'js-remote-q', N, { ack: true, prefetch: 500 })).map((b) => Number(b.split(' ')[0]));
  const firstWrong = got.findIndex((v, i) => v !== i);
  expect('remote_confirms', [got.length, firstWrong, acks.length > 1], [N, -1, true]);
  await c.close();
}

const CHECKS = {
  hello,
  work_queues: workQueues,
  publish_subscribe: publishSubscribe,
  routing,
  topics,
  rpc,
  confirms,
  pipelined_confirms: pipelinedConfirms,
  remote_declare: remoteDeclare,
  remote_confirms: remoteConfirms,
};

(async () => {
  for (const name of process.argv.slice(5)) {
    const check = CHECKS[name];
    if (!check) fail(`no check named ${name}`);
    await bounded(name, check(), 60000);
  }
  process.exit(0);
})().catch((e) => fail(e && e.stack ? e.stack : String(e)));
