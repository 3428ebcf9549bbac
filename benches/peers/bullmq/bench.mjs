// BullMQ measured with the protocol of Stagecraft's Redis bench: no-op jobs that each make one
// Redis INCR, one worker process of concurrency 16, BullMQ's defaults otherwise. `make bench`
// runs it against the same redis-server, alternating with Stagecraft's own measures.
//
//   node bench.mjs URL fill N          queue N jobs (the queue emptied first)
//   node bench.mjs URL drain N C       one worker of concurrency C until N jobs completed
//   node bench.mjs URL pickup N RATE   N jobs added at RATE/s to an idle worker
//
// Prints one JSON line: {"rate":…, "rss_mb":…, "cpu_us":…} or {"p50_ms":…, "p99_ms":…}.
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

const [url, mode, countArg, optionArg] = process.argv.slice(2);
const address = new URL(url);
const connection = { host: address.hostname, port: Number(address.port) };
const count = Number(countArg);
const queueName = 'stagecraft-bench';

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.round((p / 100) * (sorted.length - 1)))];
}

async function fill() {
  const queue = new Queue(queueName, { connection });
  await queue.obliterate({ force: true });
  for (let first = 0; first < count; first += 1000) {
    const size = Math.min(1000, count - first);
    const jobs = Array.from({ length: size }, (_, k) => ({ name: 'noop', data: { n: first + k } }));
    await queue.addBulk(jobs);
  }
  await queue.close();
  return {};
}

async function drain(concurrency) {
  const counter = new IORedis(connection);
  let completed = 0;
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  const started = process.hrtime.bigint();
  const cpuBefore = process.cpuUsage();
  const worker = new Worker(queueName, async () => counter.incr('stagecraft-bench:incr'), {
    connection,
    concurrency,
  });
  worker.on('completed', () => {
    completed += 1;
    if (completed >= count) finish();
  });
  worker.on('failed', (job, error) => {
    console.error(`job ${job?.id} failed: ${error}`);
    process.exit(1);
  });
  await finished;
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  const rss_mb = process.memoryUsage().rss / 1048576;
  await worker.close();
  counter.disconnect();
  return { rate: count / seconds, rss_mb, cpu_us: cpu.user + cpu.system };
}

async function pickup(rate) {
  const queue = new Queue(queueName, { connection });
  await queue.obliterate({ force: true });
  const counter = new IORedis(connection);
  const latencies = [];
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  const worker = new Worker(
    queueName,
    async (job) => {
      latencies.push(performance.now() - job.data.added);
      if (latencies.length >= count) finish();
      return counter.incr('stagecraft-bench:incr');
    },
    { connection, concurrency: 16 },
  );
  await worker.waitUntilReady();
  // Let the idle worker reach its blocking wait before the first job.
  await new Promise((resolve) => setTimeout(resolve, 500));
  const interval = 1000 / rate;
  const start = performance.now();
  for (let n = 0; n < count; n += 1) {
    const due = start + n * interval;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    await queue.add('noop', { n, added: performance.now() });
  }
  await finished;
  await worker.close();
  await queue.close();
  counter.disconnect();
  latencies.sort((a, b) => a - b);
  return { p50_ms: percentile(latencies, 50), p99_ms: percentile(latencies, 99) };
}

const modes = { fill: () => fill(), drain: () => drain(Number(optionArg)), pickup: () => pickup(Number(optionArg)) };
if (!modes[mode]) {
  console.error('usage: node bench.mjs URL fill N | drain N CONCURRENCY | pickup N RATE');
  process.exit(2);
}
console.log(JSON.stringify(await modes[mode]()));
process.exit(0);
