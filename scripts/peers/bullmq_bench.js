// One BullMQ measurement of scripts/peers/run.sh; prints one JSON line.
//
//     node bullmq_bench.js flow --tasks 10000 --port P [--concurrency C]
//     node bullmq_bench.js flows --jobs 1000 --port P [--concurrency C]
//
// flow: one FlowProducer parent with N no-op children; flows: that many flows of 10
// children, added at once. Starts a fresh worker process (bullmq_worker.js), waits until
// it is ready, adds the flows and times from the first add until every job (children
// and parents) is completed, polling the queue's counts every 20 ms as `taskmill
// bench` polls its job events; a parent runs only once its children are done, so that
// is when the last parent completed. Redis is the server run.sh started on port P
// (AOF on, fsync every second); it is flushed first. PEERS_RUN_DIR holds the worker's
// log and pid file, which run.sh's clean-up reads.
'use strict';
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { FlowProducer, Queue } = require('bullmq');
const IORedis = require('ioredis');

const POLL_MS = 20;
const TIMEOUT_MS = 600_000;

function parseArgs(argv) {
  const args = { scenario: argv[0], tasks: 10_000, jobs: 1_000, concurrency: null, port: null };
  for (let i = 1; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in args)) throw new Error(`unknown option ${argv[i]}`);
    args[key] = Number(argv[i + 1]);
  }
  if (!['flow', 'flows'].includes(args.scenario)) throw new Error('scenario: flow or flows');
  if (!args.port) throw new Error('--port is required');
  return args;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class WorkerProcess {
  constructor(queueName, port, concurrency, label) {
    const runDir = process.env.PEERS_RUN_DIR;
    this.pidFile = path.join(runDir, 'pids', `bullmq-${label}.pid`);
    this.logPath = path.join(runDir, `bullmq-worker-${label}.log`);
    const log = fs.openSync(this.logPath, 'w');
    const argv = [path.join(__dirname, 'bullmq_worker.js'), queueName, String(port)];
    if (concurrency) argv.push(String(concurrency));
    this.child = spawn(process.execPath, argv, { detached: true, stdio: ['ignore', 'pipe', log] });
    fs.writeFileSync(this.pidFile, String(this.child.pid));
    this.exited = new Promise((resolve) => this.child.on('exit', resolve));
  }

  ready() {
    return new Promise((resolve, reject) => {
      let out = '';
      this.child.stdout.on('data', (chunk) => {
        out += chunk;
        if (out.includes('ready')) resolve();
      });
      this.exited.then((code) => reject(new Error(`worker exited (${code}); see ${this.logPath}`)));
    });
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGTERM');
      let timer;
      const timeout = new Promise((resolve) => { timer = setTimeout(resolve, 30_000, 'timeout'); });
      const outcome = await Promise.race([this.exited, timeout]);
      clearTimeout(timer);
      if (outcome === 'timeout') {
        try { process.kill(-this.child.pid, 'SIGKILL'); } catch { /* gone */ }
        await this.exited;
      }
    }
    fs.rmSync(this.pidFile, { force: true });
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const connection = { host: '127.0.0.1', port: args.port };
  const [jobs, perJob] = args.scenario === 'flow' ? [1, args.tasks] : [args.jobs, 10];
  const queueName = `peers-${args.scenario}`;

  const redis = new IORedis(connection);
  await redis.flushdb();
  await redis.quit();

  const flows = new FlowProducer({ connection });
  const queue = new Queue(queueName, { connection });
  const worker = new WorkerProcess(queueName, args.port, args.concurrency, args.scenario);
  const stopOnSignal = async (signal) => {
    await worker.stop();
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  process.on('SIGTERM', stopOnSignal);
  process.on('SIGINT', stopOnSignal);
  let started, submitted, ended;
  try {
    await worker.ready();
    const flow = () => ({
      name: 'done',
      queueName,
      data: {},
      children: Array.from({ length: perJob }, (_, n) => ({ name: 'echo', queueName, data: { n } })),
    });
    started = performance.now();
    await Promise.all(Array.from({ length: jobs }, () => flows.add(flow())));
    submitted = performance.now();
    const total = jobs * (perJob + 1);
    const deadline = Date.now() + TIMEOUT_MS;
    for (;;) {
      const counts = await queue.getJobCounts('completed', 'failed');
      if (counts.completed === total) break;
      if (counts.failed > 0) throw new Error(`${counts.failed} jobs failed`);
      if (Date.now() > deadline) throw new Error(`only ${counts.completed} of ${total} jobs completed`);
      await sleep(POLL_MS);
    }
    ended = performance.now();
  } finally {
    await worker.stop();
    await flows.close();
    await queue.close();
  }
  const seconds = (ended - started) / 1000;
  console.log(JSON.stringify({
    system: 'bullmq',
    scenario: args.scenario,
    worker: `1 process, concurrency ${args.concurrency || 1}${args.concurrency ? '' : ' (default)'}`,
    concurrency: args.concurrency || 1,
    jobs,
    tasks: jobs * perJob,
    seconds,
    submit_seconds: (submitted - started) / 1000,
    tasks_per_s: (jobs * perJob) / seconds,
    jobs_per_s: jobs / seconds,
  }));
}

main().catch((err) => {
  console.error(`bullmq_bench: ${err.stack || err}`);
  process.exit(1);
});
