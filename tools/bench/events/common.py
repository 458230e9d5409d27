"""What every event-path scenario shares: constants, statistics, CPU and
memory readings, the quiet-machine wait, machine information.

Nothing here measures on its own: the scenarios (:mod:`.ingest`,
:mod:`.latency`, :mod:`.rss`, :mod:`.rpc`) use it, and
``python -m tools.bench events`` runs them (see :mod:`tools.bench.events`).
"""

import datetime
import os
import statistics
import subprocess
import threading
import time

SCENARIOS = ('ingest', 'latency', 'rss', 'rpc')
DEFAULT_N = {'ingest': 20000, 'rss': 100000, 'rpc': 200}
DEFAULT_JSON = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    'results',
    'events.json',
)

#: scrub_time of the scenarios where nothing must become due: 30 days.
NEVER = 30 * 86400
#: Product defaults ([listener] batch_size / prefetch), for the labels.
DEFAULT_BATCH = 100
DEFAULT_PREFETCH = 200
POOL_QUEUE = 'scrub-listener'
RPC_TOPIC = 'scrub-listener-api'

TARGETS = {
    'ingest_per_s': 1500,
    'latency_p99_s': 1.0,
    'rss_mib': 150,
    'rpc_p50_ms': 50,
}


def log(text=''):
    print(text, flush=True)


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def dist(values, scale=1.0):
    """{n, min, p50, p90, p99, max, mean} of values (times ``scale``)."""
    if not values:
        return {'n': 0}
    return {
        'n': len(values),
        'min': min(values) * scale,
        'p50': percentile(values, 50) * scale,
        'p90': percentile(values, 90) * scale,
        'p99': percentile(values, 99) * scale,
        'max': max(values) * scale,
        'mean': statistics.fmean(values) * scale,
    }


def fmt_dist(d, unit, digits=1):
    if not d.get('n'):
        return 'no samples'
    return (
        ', '.join(
            f'{k} {d[k]:.{digits}f}' for k in ('p50', 'p90', 'p99', 'max')
        )
        + f' {unit} (min {d["min"]:.{digits}f}, n={d["n"]})'
    )


def proc_status(pid):
    """{'VmRSS': KiB, 'VmHWM': KiB, ...} of a live process, or {}."""
    out = {}
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key in ('VmRSS', 'VmHWM', 'Threads'):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def process_cpu(pid):
    from tools.bench import measure

    return measure.process_cpu_seconds(pid)


def machine_busy():
    from tools.bench import measure

    return measure.machine_busy_seconds()


def quiet(args):
    """Wait for a quiet machine (bounded); {'waited_s', 'busy_cpus'}."""
    if not args.quiet_wait:
        return {'waited_s': 0.0, 'busy_cpus': None}
    from tools.bench import measure

    waited, busy = measure.wait_until_quiet(args.quiet_below, args.quiet_wait)
    if busy > args.quiet_below:
        log(
            f'  (machine still busy after {waited:.0f} s: {busy:.2f} CPUs; '
            'running anyway)'
        )
    return {'waited_s': waited, 'busy_cpus': busy}


def rabbitmq_version():
    try:
        out = subprocess.run(
            ['rabbitmqctl', 'version'],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return out.splitlines()[-1] if out else 'unknown'
    except (OSError, subprocess.SubprocessError) as exc:
        return f'unknown ({exc})'


def machine(queue_backend):
    from tools.bench import cli as bench_cli

    info = bench_cli.machine_info({'mysql', queue_backend})
    info['rabbitmq_version'] = rabbitmq_version()
    for dist_name in ('oslo.messaging', 'kombu'):
        try:
            from importlib import metadata

            info[f'{dist_name}_version'] = metadata.version(dist_name)
        except Exception:  # noqa: BLE001 - informational only
            pass
    with open('/proc/loadavg') as f:
        info['loadavg_at_start'] = f.read().split()[:3]
    return info


def as_datetime(value):
    # SQLite hands text() results back as strings.
    if isinstance(value, str):
        return datetime.datetime.fromisoformat(value)
    return value


def epoch(naive_utc):
    return naive_utc.replace(tzinfo=datetime.UTC).timestamp()


def _db_pids():
    from tools.bench import measure

    return measure.find_pids({'mariadbd', 'mysqld', 'postgres'})


def _broker_pids():
    from tools.bench import measure

    return measure.find_pids({'beam.smp'})


def _cpu_sum(pids):
    return sum(x for x in (process_cpu(p) for p in pids) if x is not None)


class CpuWindow:
    """CPU seconds of a process (None: none), the DB servers, RabbitMQ,
    and the whole machine; the rest (this bench's own polling, other
    sessions on the shared machine) as ``others_busy_cpus``."""

    def __init__(self, pid):
        self.pid = pid
        self.db_pids = _db_pids()
        self.broker_pids = _broker_pids()

    def _read(self):
        return (
            time.monotonic(),
            (process_cpu(self.pid) or 0.0) if self.pid else 0.0,
            _cpu_sum(self.db_pids),
            _cpu_sum(self.broker_pids),
            machine_busy(),
        )

    def __enter__(self):
        self.before = self._read()
        return self

    def stop(self):
        after = self._read()
        wall = max(after[0] - self.before[0], 1e-9)
        d = [a - b for a, b in zip(after, self.before, strict=True)]
        self.result = {
            'wall_s': d[0],
            'service_cpu_s': d[1],
            'db_server_cpu_s': d[2],
            'broker_cpu_s': d[3],
            'machine_busy_cpus': d[4] / wall,
        }
        rest = (d[4] - d[1] - d[2] - d[3]) / wall
        self.result['others_busy_cpus'] = max(0.0, rest)
        return self.result

    def __exit__(self, *exc):
        if not hasattr(self, 'result'):
            self.stop()


def verdict(met):
    return 'met' if met else 'MISSED'


def num(value, fmt='.0f'):
    return '-' if value is None else format(value, fmt)


def md_dist(d, fmt='.1f'):
    if not d or not d.get('n'):
        return '-', '-', '-', '-'
    return tuple(format(d[k], fmt) for k in ('p50', 'p90', 'p99', 'max'))


class Sampler:
    """A thread sampling ``(time, f())`` every ``interval`` seconds."""

    def __init__(self, func, interval):
        self._func = func
        self._interval = interval
        self._stop = threading.Event()
        self.samples = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), self._func()))
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
