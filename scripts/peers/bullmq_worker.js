// The BullMQ worker of scripts/peers: one Worker on one queue, running the no-op
// processor (it returns the job's data, like taskmill.echo).
//
//     node bullmq_worker.js QUEUE REDIS_PORT [CONCURRENCY]
//
// Without CONCURRENCY the Worker keeps BullMQ's default (1). Prints "ready" once its
// connection is up; SIGTERM or SIGINT closes it (active jobs finish first).
'use strict';
const { Worker } = require('bullmq');

const [queueName, port, concurrency] = process.argv.slice(2);
const options = { connection: { host: '127.0.0.1', port: Number(port) } };
if (concurrency) options.concurrency = Number(concurrency);

const worker = new Worker(queueName, async (job) => job.data, options);
worker.on('failed', (job, err) => console.error(`job ${job && job.id} failed: ${err}`));
worker.on('error', (err) => console.error(`worker error: ${err}`));
worker.waitUntilReady().then(() => process.stdout.write('ready\n'));

let closing = false;
async function shutdown() {
  if (closing) process.exit(1);
  closing = true;
  await worker.close();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
