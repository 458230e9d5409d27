"""Event-path benchmarks of the always-on service.

``python -m tools.bench events [--scenario ingest|latency|rss|rpc|all]``

Every scenario runs the real service, ``scrub-listener --config-file F``
(no ``--sweep-once``), as a child process in its own process group, on a
fresh world: a Glance 33.0.0 database on MariaDB (real ``glance-manage
db_sync``, :mod:`tools.harness`), a file store, a RabbitMQ vhost, and the
due-queue on SQLite under ``state_path`` (default) or a fresh database
(``--queue-backend mysql|postgresql``).  Images are written as glance-api
33 leaves them (:mod:`tools.glance_rows`); notifications are published as
glance-api 33 publishes them (exchange ``glance``, topic, non-durable,
routing key ``notifications.info``, oslo envelope 2.0, the payload seen on
the wire: see /work/shared/NOTES.md).  Everything made is removed at the
end, and every child process is killed, even on Ctrl-C / SIGTERM.

ingest
    N ``image.delete`` notifications are pre-loaded into the pool queue
    ``[listener] pool`` (declared here exactly as oslo.messaging declares
    it), then the service is started with a huge ``scrub_time`` (nothing
    becomes due, the start-up sweep finds nothing) and the committed
    due-queue is polled (``COUNT(*)``, autocommit) until it holds N rows.
    Rate = rows committed after the first poll that saw any / time from
    that poll to the poll that saw N (start-up is not counted).  The same
    messages are then consumed, from the same queue, by reference
    consumers in a child process: raw kombu consume+ack, a do-nothing
    oslo.messaging notification listener (plain, and batch), timed in the
    child from the first to the last message.  Several ``[listener]
    batch_size``/``prefetch`` pairs are tried (``--configs``).  Verified:
    exactly N rows, one per image, ``due_at = deleted_at (Glance DB) +
    scrub_time``, broker queue empty (all acked), service exit 0 on
    SIGTERM, no error in its log.
latency
    The service runs with ``scrub_time`` = 2 s.  Active images (with data)
    are deleted at a steady rate (``--rate`` per second for
    ``--duration`` s): each deletion is the Glance rows update glance-api
    makes under ``delayed_delete``, then the notification.  A
    ``sitecustomize.py`` put first on the service's ``PYTHONPATH`` wraps
    glance_store's filesystem ``Store.delete`` and logs ``time.time()``
    per path when the delete returned (the product is unchanged).
    Latency = gone - due, due = ``deleted_at`` as stored in the Glance DB
    + ``scrub_time`` (the service's own definition of due).  Verified:
    every image ``deleted``, every file gone, each deleted once.
rss
    /proc/PID/status of the service: idle with an empty queue; while it
    consumes a backlog of N (default 100,000) notifications (VmRSS
    sampled every 0.2 s, and VmHWM); and after a restart with the N
    entries queued (not due) and an empty broker queue.  For contrast, the
    service consumes the same backlog once more with the bound removed
    (``[oslo_messaging_rabbit] rabbit_qos_prefetch_count = 0``,
    oslo.messaging's own default: unlimited).
rpc
    The service runs (``scrub_time`` huge, nothing scrubbed) with N
    pending_delete images queued through their notifications.  An
    oslo.messaging RPC client in this process (reply queue warmed up by a
    first ``status()``) times ``status()`` (the transport alone) and then
    ``restore(image_id)`` for each image in turn, each a real restore
    (image, locations back to active, data checked in the store).  Then
    the whole ``scrub-listener-manage restore ID`` process (over RPC), and
    ``--direct``, for a few images.  Verified: every reply names its image,
    every restored image is active with its location active and its file
    present, its queue entry gone, a repeated restore is refused with
    ``NotPendingDelete`` (typed, across the wire).

Results are printed, and appended to ``--json`` (default
``tools/bench/results/events.json``); ``--report FILE`` prints the
Markdown tables of such a file (for docs/performance-events.md).
Exit status 0 only when every run was verified.
"""

import argparse
import contextlib
import datetime
import gzip
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import warnings

import kombu
import sqlalchemy as sa
from sqlalchemy import pool as sa_pool

from tools import glance_rows
from tools import harness

SCENARIOS = ('ingest', 'latency', 'rss', 'rpc')
DEFAULT_N = {'ingest': 20000, 'rss': 100000, 'rpc': 200}
DEFAULT_JSON = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'results', 'events.json'
)

#: scrub_time of the scenarios where nothing must become due: 30 days.
NEVER = 30 * 86400
#: Product defaults ([listener] batch_size / prefetch), for the labels.
DEFAULT_BATCH = 100
DEFAULT_PREFETCH = 200
POOL_QUEUE = 'scrub-listener'
RPC_TOPIC = 'scrub-listener-api'
EXCHANGE = 'glance'
ROUTING_KEY = 'notifications.info'
STARTED = 'scrub-listener started on '

TARGETS = {
    'ingest_per_s': 1500,
    'latency_p99_s': 1.0,
    'rss_mib': 150,
    'rpc_p50_ms': 50,
}

# --------------------------------------------------------------- arguments


def _scenarios(text):
    names = [s.strip() for s in text.split(',') if s.strip()]
    if names == ['all']:
        return list(SCENARIOS)
    bad = set(names) - set(SCENARIOS)
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f'choose from {", ".join(SCENARIOS)} or all (comma-separated)'
        )
    return names


def _configs(text):
    pairs = []
    for item in text.split(','):
        batch, _, prefetch = item.strip().partition(':')
        pairs.append((int(batch), int(prefetch or 2 * int(batch))))
    return pairs


def add_arguments(parser):
    parser.add_argument(
        '--scenario',
        type=_scenarios,
        default=list(SCENARIOS),
        metavar='ingest|latency|rss|rpc|all',
        help='scenario(s) to run, comma-separated (default: all)',
    )
    parser.add_argument(
        '-n',
        type=int,
        default=None,
        help='messages (ingest, rss) or restores (rpc); default ingest '
        f'{DEFAULT_N["ingest"]:,}, rss {DEFAULT_N["rss"]:,}, rpc '
        f'{DEFAULT_N["rpc"]}',
    )
    parser.add_argument(
        '--queue-backend',
        default='sqlite',
        choices=harness.BACKENDS,
        help="the service's due-queue: SQLite under state_path (default) "
        'or a fresh database on the mysql/postgresql server',
    )
    parser.add_argument(
        '--configs',
        type=_configs,
        default=[(100, 200), (250, 500), (500, 1000), (1000, 2000)],
        metavar='BATCH:PREFETCH,...',
        help='ingest: [listener] batch_size:prefetch pairs to try '
        '(default: 100:200 (the product default),250:500,500:1000,'
        '1000:2000)',
    )
    parser.add_argument(
        '--repeat',
        type=int,
        default=1,
        help='ingest: repetitions of the whole sequence, every other one '
        'in reverse order; medians are reported (default: %(default)s)',
    )
    parser.add_argument(
        '--prefill',
        type=int,
        default=0,
        metavar='K',
        help='ingest: K not-due entries already in the due-queue when the '
        'service starts (a long scrub_time keeps many queued)',
    )
    parser.add_argument(
        '--no-reference',
        dest='reference',
        action='store_false',
        help='ingest: skip the raw kombu and do-nothing oslo.messaging '
        'consumers',
    )
    parser.add_argument(
        '--rate',
        type=float,
        default=50.0,
        help='latency: deletions per second (default: %(default)s)',
    )
    parser.add_argument(
        '--duration',
        type=float,
        default=20.0,
        help='latency: seconds of deletions (default: %(default)s)',
    )
    parser.add_argument(
        '--scrub-time',
        type=int,
        default=2,
        help='latency: scrub_time in seconds (default: %(default)s)',
    )
    parser.add_argument(
        '--pool',
        type=int,
        default=8,
        help='scrub_pool_size of the service (default: %(default)s)',
    )
    parser.add_argument(
        '--wakeup-time',
        type=int,
        default=300,
        help="latency: glance-scrubber's wakeup_time the measured latency "
        'is contrasted with (computed; default: %(default)s)',
    )
    parser.add_argument(
        '--manage-runs',
        type=int,
        default=5,
        help='rpc: scrub-listener-manage restore processes to time, over '
        'RPC and --direct each (default: %(default)s)',
    )
    parser.add_argument(
        '--no-rss-contrast',
        dest='rss_contrast',
        action='store_false',
        help='rss: skip the run of the service with the prefetch bound '
        'removed (rabbit_qos_prefetch_count = 0) on the same backlog',
    )
    parser.add_argument(
        '--profile',
        metavar='DIR',
        help='record the service with py-spy (CPU samples, all threads, '
        'raw format) into DIR during the first ingest run, the latency '
        'run and the RPC restores, and print where the CPU goes; those '
        'timings are flagged',
    )
    parser.add_argument(
        '--quiet-below',
        type=float,
        default=0.5,
        metavar='CPUS',
        help='before each timed part, wait until the (shared) machine keeps '
        'fewer than this many CPUs busy (default: %(default)s)',
    )
    parser.add_argument(
        '--quiet-wait',
        type=float,
        default=120,
        metavar='SECONDS',
        help='wait at most this long for that, then run anyway and record '
        'it; 0: do not wait (default: %(default)s)',
    )
    parser.add_argument(
        '--json',
        default=DEFAULT_JSON,
        help='append the results to this JSON file (default: '
        'tools/bench/results/events.json); "" for none',
    )
    parser.add_argument(
        '--keep-logs',
        metavar='DIR',
        help='copy the service logs of every run into DIR',
    )
    parser.add_argument(
        '--report',
        metavar='JSON',
        help='print Markdown tables from a results file and exit',
    )


def add_parser(subparsers):
    """Register ``events`` on the subparsers of tools/bench/cli.py."""
    parser = subparsers.add_parser(
        'events',
        help='event path of the running service: ingest, latency, RSS, RPC',
        description=__doc__.split('\n\n', 1)[0],
    )
    add_arguments(parser)
    return parser


# ------------------------------------------------------------------ helpers


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


def bin_path(name):
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else shutil.which(name) or name


# -------------------------------------------------------------- messaging


def glance_message(image_id, deleted_at=None, size=1):
    """The decoded ``image.delete`` message glance-api 33.0.0 sends.

    Shape from the message seen on RabbitMQ (NOTES.md): no locations,
    ``deleted_at`` to the second (send time), status pending_delete.
    """
    now = datetime.datetime.now(datetime.UTC)
    stamp = (deleted_at or now).strftime('%Y-%m-%dT%H:%M:%SZ')
    return {
        'message_id': str(uuid.uuid4()),
        'publisher_id': 'image.localhost',
        'event_type': 'image.delete',
        'priority': 'INFO',
        'payload': {
            'id': image_id,
            'name': 'bench',
            'status': 'pending_delete',
            'created_at': stamp,
            'updated_at': stamp,
            'min_disk': 0,
            'min_ram': 0,
            'protected': False,
            'checksum': 'd41d8cd98f00b204e9800998ecf8427e',
            'owner': None,
            'disk_format': 'raw',
            'container_format': 'bare',
            'size': size,
            'virtual_size': size,
            'is_public': False,
            'visibility': 'shared',
            'properties': {},
            'tags': [],
            'deleted': True,
            'deleted_at': stamp,
        },
        'timestamp': now.strftime('%Y-%m-%d %H:%M:%S.%f'),
        '_unique_id': uuid.uuid4().hex,
    }


def envelope(message):
    return {'oslo.version': '2.0', 'oslo.message': json.dumps(message)}


def glance_exchange():
    # As oslo.messaging declares the control exchange: topic,
    # non-durable, not auto-deleted (anything else: PRECONDITION_FAILED).
    return kombu.Exchange(
        EXCHANGE, type='topic', durable=False, auto_delete=False
    )


class Broker:
    """kombu connection to the world's vhost: publish, declare, depth."""

    def __init__(self, transport_url):
        self.url = harness.amqp_url(transport_url)
        self.connection = kombu.Connection(self.url)
        self.channel = self.connection.channel()
        self.producer = kombu.Producer(
            self.channel, exchange=glance_exchange()
        )
        glance_exchange()(self.channel).declare()

    def declare_pool_queue(self, name=POOL_QUEUE):
        """The listener's pool queue, as oslo.messaging declares it.

        (impl_rabbit declare_topic_consumer: durable and auto_delete from
        amqp_durable_queues / amqp_auto_delete, both False by default,
        no arguments.)
        """
        kombu.Queue(
            name,
            glance_exchange(),
            routing_key=ROUTING_KEY,
            durable=False,
            auto_delete=False,
        )(self.channel).declare()

    def publish(self, message):
        # As oslo.messaging's notify_send: the envelope dict, JSON.
        self.producer.publish(
            envelope(message), routing_key=ROUTING_KEY, serializer='json'
        )

    def publish_all(self, messages, name=POOL_QUEUE, timeout=300):
        """Publish (an iterable), then wait until the queue holds them
        all; return (count, seconds)."""
        started = time.monotonic()
        before = self.depth(name)
        count = 0
        for message in messages:
            self.publish(message)
            count += 1
        want = before + count
        deadline = time.monotonic() + timeout
        while self.depth(name) < want:
            if time.monotonic() > deadline:
                raise harness.HarnessError(
                    f'queue {name} holds {self.depth(name)} messages, '
                    f'want {want}'
                )
            time.sleep(0.1)
        return count, time.monotonic() - started

    def depth(self, name=POOL_QUEUE):
        """Messages ready in queue ``name`` (not those unacked)."""
        _, messages, _ = self.channel.queue_declare(name, passive=True)
        return messages

    def purge(self, name=POOL_QUEUE):
        self.channel.queue_purge(name)

    def close(self):
        with contextlib.suppress(Exception):
            self.connection.release()


# ------------------------------------------------------------------ world


class World:
    """Glance DB, store, due-queue DB, vhost, config files, processes."""

    def __init__(self, queue_backend='sqlite', keep_logs=None):
        self.queue_backend = queue_backend
        self.keep_logs = keep_logs
        self.workdir = None
        self.glance_url = None
        self.queue_url = None
        self.vhost = None
        self.transport_url = None
        self.broker = None
        self.services = []
        self.created = {}
        self._glance_engine = None
        self._queue_engine = None

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    @property
    def store_dir(self):
        return self.path('images')

    def setup(self):
        self.workdir = tempfile.mkdtemp(prefix=harness.NAME_PREFIX + 'events_')
        try:
            for sub in ('images', 'state', 'logs', 'hooks'):
                os.makedirs(self.path(sub))
            self.glance_url = harness.create_glance_database('mysql')
            if self.queue_backend != 'sqlite':
                self.queue_url = harness.create_empty_database(
                    self.queue_backend
                )
            self.vhost, self.transport_url = harness.create_vhost()
            self.broker = Broker(self.transport_url)
            # What to look for after the run: all of it must be gone.
            self.created = {
                'vhost': self.vhost,
                'databases': [
                    sa.engine.make_url(url).database
                    for url in (self.glance_url, self.queue_url)
                    if url
                ],
                'workdir': self.workdir,
            }
        except BaseException:
            self.cleanup()
            raise
        return self

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.cleanup()

    def cleanup(self):
        for svc in self.services:
            svc.kill()
            if self.keep_logs and os.path.exists(svc.log_path):
                os.makedirs(self.keep_logs, exist_ok=True)
                shutil.copyfile(
                    svc.log_path,
                    os.path.join(
                        self.keep_logs, os.path.basename(svc.log_path)
                    ),
                )
        self.services = []
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        for engine in (self._glance_engine, self._queue_engine):
            if engine is not None:
                engine.dispose()
        self._glance_engine = self._queue_engine = None
        if self.vhost:
            with contextlib.suppress(harness.HarnessError):
                harness.delete_vhost(self.vhost)
            self.vhost = None
        for attr in ('glance_url', 'queue_url'):
            url = getattr(self, attr)
            if url:
                harness.drop_database(url)
                setattr(self, attr, None)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # -- databases ---------------------------------------------------------

    @property
    def glance(self):
        if self._glance_engine is None:
            self._glance_engine = sa.create_engine(
                self.glance_url, poolclass=sa_pool.NullPool
            )
        return self._glance_engine

    @property
    def sqlite_queue_path(self):
        return self.path('state', 'scrub-queue.sqlite')

    @property
    def queue(self):
        """Autocommit engine on the due-queue: each poll sees commits."""
        if self._queue_engine is None:
            if self.queue_url:
                url = self.queue_url
            else:
                # read-only: never creates the file before the service.
                url = (
                    f'sqlite:///file:{self.sqlite_queue_path}?mode=ro&uri=true'
                )
            self._queue_engine = sa.create_engine(
                url, isolation_level='AUTOCOMMIT'
            )
        return self._queue_engine

    def queue_count(self):
        try:
            with self.queue.connect() as conn:
                return conn.execute(
                    sa.text('SELECT COUNT(*) FROM scrub_queue')
                ).scalar()
        except sa.exc.DBAPIError:
            return 0  # the service has not created it yet

    def queue_rows(self):
        with self.queue.connect() as conn:
            return conn.execute(
                sa.text(
                    'SELECT image_id, location_id, deleted_at, due_at, '
                    'attempts, last_error FROM scrub_queue'
                )
            ).all()

    def reset_queue(self):
        """Empty due-queue for the next run (the service recreates it)."""
        if self._queue_engine is not None:
            self._queue_engine.dispose()
            self._queue_engine = None
        if self.queue_url:
            harness.fetch_all(
                self.queue_url, 'DROP TABLE IF EXISTS scrub_queue'
            )
        else:
            for suffix in ('', '-journal', '-wal', '-shm'):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.sqlite_queue_path + suffix)

    def pending_images(self, count, size, active=False):
        """``count`` pending_delete images (rows as glance-api writes them,
        data files); with ``active`` made live again (to delete later)."""
        ids = glance_rows.bulk_pending_images(
            self.glance, self.store_dir, count, size
        )
        if active:
            with self.glance.begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE images SET status = 'active', deleted = 0, "
                        'deleted_at = NULL'
                    )
                )
                conn.execute(
                    sa.text(
                        "UPDATE image_locations SET status = 'active', "
                        'deleted = 0, deleted_at = NULL'
                    )
                )
        return ids

    def glance_rows(self, ids=None):
        """{id: (status, deleted, deleted_at, location status)}."""
        with self.glance.connect() as conn:
            rows = conn.execute(
                sa.text(
                    'SELECT i.id, i.status, i.deleted, i.deleted_at, '
                    'l.status AS loc_status FROM images i JOIN '
                    'image_locations l ON l.image_id = i.id'
                )
            ).all()
        out = {
            r.id: (r.status, bool(r.deleted), r.deleted_at, r.loc_status)
            for r in rows
        }
        if ids is not None:
            out = {i: out.get(i) for i in ids}
        return out

    # -- service -----------------------------------------------------------

    def config(
        self,
        name,
        scrub_time=NEVER,
        wakeup_time=3600,
        pool_size=8,
        batch_size=None,
        prefetch=None,
        extra=None,
    ):
        sections = {
            'DEFAULT': {
                'transport_url': self.transport_url,
                'scrub_time': scrub_time,
                'wakeup_time': wakeup_time,
                'scrub_pool_size': pool_size,
                'enabled_backends': {'fs': 'file'},
                'state_path': self.path('state'),
                'debug': False,
                'use_stderr': True,
            },
            'database': {'connection': self.glance_url},
            'glance_store': {'default_backend': 'fs'},
            'fs': {'filesystem_store_datadir': self.store_dir},
            'scrub_queue': {'connection': self.queue_url},
            'listener': {'batch_size': batch_size, 'prefetch': prefetch},
            'rpc': {'timeout': 30},
            'service': {'graceful_shutdown_timeout': 30},
        }
        for section, options in (extra or {}).items():
            sections.setdefault(section, {}).update(options)
        return harness.write_config(self.path(f'{name}.conf'), sections)

    def service(self, name, config, env=None):
        svc = ServiceProcess(
            config, self.path('logs', f'{name}.log'), env, self.workdir
        )
        self.services.append(svc)
        return svc


class ServiceProcess:
    """``scrub-listener --config-file F``, its own process group."""

    def __init__(self, config, log_path, env=None, cwd=None):
        self.config = config
        self.log_path = log_path
        self.env = env or {}
        self.cwd = cwd
        self.proc = None
        self._log = None
        self.spawned_at = None
        self.started_at = None

    def start(self, timeout=90):
        env = dict(os.environ, PYTHONWARNINGS='ignore', **self.env)
        self._log = open(self.log_path, 'ab')
        self.spawned_at = time.time()
        self.proc = subprocess.Popen(
            [bin_path('scrub-listener'), '--config-file', self.config],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        return self

    def wait_started(self, timeout=90):
        deadline = time.monotonic() + timeout
        while STARTED not in self.log():
            if self.proc.poll() is not None:
                raise harness.HarnessError(
                    f'scrub-listener exited with {self.proc.returncode} '
                    f'during start:\n{self.log_tail()}'
                )
            if time.monotonic() > deadline:
                raise harness.HarnessError(
                    f'scrub-listener not started within {timeout} s:\n'
                    f'{self.log_tail()}'
                )
            time.sleep(0.05)
        self.started_at = time.time()
        return self.started_at - self.spawned_at

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except FileNotFoundError:
            return ''

    def log_tail(self, lines=25):
        return '\n'.join(self.log().splitlines()[-lines:])

    def problems_in_log(self, expected=()):
        """Log lines that say something went wrong.

        ``expected``: words of an error record we caused on purpose; every
        line of that record (same time, pid, level and logger prefix) is
        left out.
        """
        bad = ('ERROR', 'CRITICAL', 'Traceback', 'Dropping malformed')
        lines = [
            line
            for line in self.log().splitlines()
            if any(word in line for word in bad)
        ]
        prefixes = set()
        for line in lines:
            if expected and all(word in line for word in expected):
                prefixes.add(line.split(' [', 1)[0])
        return [
            line
            for line in lines
            if not any(line.startswith(prefix) for prefix in prefixes)
        ]

    def stop(self, timeout=60):
        """SIGTERM and wait; return (exit code, seconds) (None: killed)."""
        if not self.alive():
            return (self.proc.returncode if self.proc else None), 0.0
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        self._close_log()
        return rc, time.monotonic() - started

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._close_log()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None


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


class Profiler:
    """py-spy attached to a running pid (CPU samples, raw format)."""

    def __init__(self, directory, name, pid):
        self.path = None
        self.proc = None
        if not directory:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f'events-{name}.pyspy.txt')
        self.proc = subprocess.Popen(
            [
                bin_path('py-spy'),
                'record',
                '--pid',
                str(pid),
                '--rate',
                '100',
                '--threads',
                '--nonblocking',
                '--format',
                'raw',
                '--output',
                self.path,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached before the timed part starts

    def stop(self):
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.path


def profile_summary(path, top=12):
    """Lines: CPU samples by thread, by our function and by leaf."""
    if not path or not os.path.exists(path):
        return ['(no profile recorded)']
    by_thread, by_ours, by_leaf = {}, {}, {}
    total = 0
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt') as f:
        for line in f:
            stack, _, count = line.rstrip('\n').rpartition(' ')
            if not stack or not count.isdigit():
                continue
            count = int(count)
            frames = stack.split(';')
            # "thread (TID): NAME" (no name: the main thread); numbered
            # names (oslo.messaging's executor threads) are pooled.
            name = frames[0].partition('): ')[2] or 'main'
            thread = re.sub(r'\d+', 'N', name)
            frames = frames[1:]
            total += count
            by_thread[thread] = by_thread.get(thread, 0) + count
            ours = [f for f in frames if 'scrub_listener/' in f]
            theirs = [f for f in frames if 'oslo_messaging/' in f]
            if ours:
                key = _short_frame(ours[-1])
            elif theirs:
                key = '(no scrub_listener frame) ' + _short_frame(theirs[-1])
            else:
                key = '(no scrub_listener or oslo_messaging frame)'
            by_ours[key] = by_ours.get(key, 0) + count
            if frames:
                leaf = _short_frame(frames[-1])
                by_leaf[leaf] = by_leaf.get(leaf, 0) + count
    if not total:
        return ['(empty profile)']
    lines = [f'py-spy: {total} CPU samples at 100 Hz ({path})']
    for title, table in (
        ('by thread', by_thread),
        ('by deepest scrub_listener frame (file:function)', by_ours),
        ('by leaf function (self time)', by_leaf),
    ):
        lines.append(f'  {title}:')
        for key, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f'    {count / total:6.1%}  {key}')
    return lines


def _short_frame(frame):
    func, _, where = frame.partition(' (')
    where = where.rstrip(')')
    path = where.rsplit(':', 1)[0]
    for marker in ('site-packages/', 'lib/python3', '/work/main/'):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f'{path}:{func}'


def profile_top(path, top=8):
    """[(share, 'file:function')] by deepest scrub_listener frame."""
    lines = profile_summary(path, top)
    out = []
    section = None
    for line in lines:
        if line.startswith('  by '):
            section = line
        elif section and 'scrub_listener frame' in section:
            share, _, key = line.strip().partition('  ')
            out.append((share, key))
    return out


# --------------------------------------------------- reference consumers

#: Run as ``python -c CONSUMER SPEC_JSON`` (nothing from this repo is
#: imported): consume ``n`` messages from the pool queue, then print one
#: JSON line of timings.  Its own clock, from the first message handled
#: to the last; ``ready`` is when it started consuming.
CONSUMER = textwrap.dedent(
    """\
    import json
    import resource
    import socket
    import sys
    import threading
    import time

    spec = json.loads(sys.argv[1])
    n = spec['n']
    state = {'count': 0, 'first': None, 'first_count': 0, 'last': None}
    lock = threading.Lock()
    done = threading.Event()


    def seen(k=1):
        now = time.time()
        with lock:
            state['count'] += k
            if state['first'] is None:
                state['first'] = now
                state['first_count'] = state['count']
            state['last'] = now
            if state['count'] >= n:
                done.set()


    started = time.time()
    if spec['kind'] == 'kombu':
        import kombu

        conn = kombu.Connection(spec['amqp_url'])
        channel = conn.channel()
        if spec['prefetch']:
            channel.basic_qos(0, spec['prefetch'], False)

        def on_message(message):
            message.ack()
            seen()

        consumer = kombu.Consumer(
            channel,
            [kombu.Queue(spec['queue'], no_declare=True)],
            on_message=on_message,
        )
        consumer.consume()
        ready = time.time()
        deadline = ready + spec['timeout']
        while not done.is_set() and time.time() < deadline:
            try:
                conn.drain_events(timeout=1)
            except socket.timeout:
                pass
        consumer.cancel()
        conn.release()
    else:
        import oslo_messaging
        from oslo_config import cfg
        from oslo_messaging import opts

        for group, group_opts in opts.list_opts():
            if group == 'oslo_messaging_rabbit':
                cfg.CONF.register_opts(group_opts, group=group)
        cfg.CONF.set_override(
            'rabbit_qos_prefetch_count',
            spec['prefetch'],
            group='oslo_messaging_rabbit',
        )
        transport = oslo_messaging.get_notification_transport(
            cfg.CONF, url=spec['transport_url']
        )
        targets = [
            oslo_messaging.Target(topic='notifications', exchange='glance')
        ]
        if spec['kind'] == 'oslo-batch':

            class Endpoint:
                def info(self, messages):
                    seen(len(messages))

            listener = oslo_messaging.get_batch_notification_listener(
                transport,
                targets,
                [Endpoint()],
                pool=spec['queue'],
                batch_size=spec['batch_size'],
                batch_timeout=spec['batch_timeout'],
            )
        else:

            class Endpoint:
                def info(self, ctxt, publisher_id, event_type, payload,
                         metadata):
                    seen()

            listener = oslo_messaging.get_notification_listener(
                transport, targets, [Endpoint()], pool=spec['queue']
            )
        listener.start()
        ready = time.time()
        done.wait(spec['timeout'])
        listener.stop()
        listener.wait()
        transport.cleanup()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: that one survives exec() and starts at the
    # RSS of the parent that forked us.
    with open('/proc/self/status') as f:
        hwm = [int(line.split()[1]) for line in f
               if line.startswith('VmHWM:')][0]
    print(json.dumps({
        'count': state['count'],
        'started': started,
        'ready': ready,
        'first': state['first'],
        'first_count': state['first_count'],
        'last': state['last'],
        'cpu': usage.ru_utime + usage.ru_stime,
        'maxrss_kib': hwm,
    }))
    """
)


def run_consumer(world, kind, n, prefetch, batch_size=100, timeout=600):
    """Run one reference consumer on the pool queue; its JSON dict."""
    spec = {
        'kind': kind,
        'n': n,
        'queue': POOL_QUEUE,
        'prefetch': prefetch,
        'batch_size': batch_size,
        'batch_timeout': 0.2,
        'timeout': timeout,
        'amqp_url': harness.amqp_url(world.transport_url),
        'transport_url': world.transport_url,
    }
    proc = subprocess.run(
        [sys.executable, '-c', CONSUMER, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        cwd=world.workdir,
        env=dict(os.environ, PYTHONWARNINGS='ignore'),
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise harness.HarnessError(
            f'{kind} consumer failed (exit {proc.returncode}):\n'
            f'{proc.stderr[-3000:]}'
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ latency hook

#: sitecustomize.py for the service of the latency scenario: wraps
#: glance_store's filesystem Store.delete (on import) and appends
#: "<time.time()> <path>" to $BENCH_GONE_LOG when a delete returned.
GONE_HOOK = textwrap.dedent(
    '''\
    """Bench hook (tools/bench/events.py): when did each file go?"""
    import functools
    import importlib.abc
    import importlib.util
    import os
    import sys
    import time

    TARGET = 'glance_store._drivers.filesystem'


    def _patch(module):
        original = module.Store.delete
        path = os.environ['BENCH_GONE_LOG']

        @functools.wraps(original)
        def delete(self, location, *args, **kwargs):
            result = original(self, location, *args, **kwargs)
            line = f'{time.time():.6f} {location.store_location.path}\\n'
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            return result

        module.Store.delete = delete


    class _Loader(importlib.abc.Loader):
        def __init__(self, wrapped):
            self._wrapped = wrapped

        def create_module(self, spec):
            return self._wrapped.create_module(spec)

        def exec_module(self, module):
            self._wrapped.exec_module(module)
            _patch(module)


    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec


    sys.meta_path.insert(0, _Finder())
    '''
)


def gone_hook_env(world):
    directory = world.path('hooks')
    with open(os.path.join(directory, 'sitecustomize.py'), 'w') as f:
        f.write(GONE_HOOK)
    path = os.environ.get('PYTHONPATH')
    return {
        'PYTHONPATH': directory + (os.pathsep + path if path else ''),
        'BENCH_GONE_LOG': world.path('logs', 'gone.log'),
    }


def read_gone_log(path):
    """[(time, path)] of the deletes that returned."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        when, _, where = line.partition(' ')
        out.append((float(when), where))
    return out


# ------------------------------------------------------------- scenarios


def _as_datetime(value):
    # SQLite hands text() results back as strings.
    if isinstance(value, str):
        return datetime.datetime.fromisoformat(value)
    return value


def _epoch(naive_utc):
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


def _messages(ids):
    for image_id in ids:
        yield glance_message(image_id)


def _check_queue_rows(world, ids, scrub_time, deleted_at, prefilled=0):
    """Problems with the due-queue rows of an ingest (empty: good)."""
    problems = []
    rows = world.queue_rows()
    if len(rows) != len(ids) + prefilled:
        problems.append(
            f'{len(rows)} queue rows, want {len(ids)} + {prefilled} prefilled'
        )
    wanted = set(ids)
    rows = [r for r in rows if r.image_id in wanted]
    got = [r.image_id for r in rows]
    if len(got) != len(ids) or set(got) != wanted:
        problems.append(
            f'{len(rows)} queue rows for {len(set(got) & set(ids))} of '
            f'{len(ids)} images ({len(set(got) - set(ids))} unknown)'
        )
    delay = datetime.timedelta(seconds=scrub_time)
    wrong = 0
    for r in rows:
        when = _as_datetime(r.deleted_at)
        if (
            r.location_id != 0
            or when != deleted_at.get(r.image_id)
            or _as_datetime(r.due_at) - when != delay
            or r.attempts
        ):
            wrong += 1
    if wrong:
        problems.append(
            f'{wrong} queue rows with a wrong deletion or due time '
            '(want deleted_at from the Glance DB + scrub_time)'
        )
    return problems


def _prefill(world, count):
    """``count`` not-due entries (images unknown to Glance, due in 60
    days) put in the due-queue with the product's own code."""
    from scrub_listener import db
    from scrub_listener import glance_db
    from scrub_listener import queue

    url = world.queue_url or f'sqlite:///{world.sqlite_queue_path}'
    engine = db.create_engine(url, 'bench')
    try:
        due_queue = queue.DueQueue(engine)
        due_queue.create_schema()
        later = glance_db.utcnow() + datetime.timedelta(days=60)
        for start in range(0, count, 5000):
            due_queue.enqueue(
                [
                    (glance_db.Deletion(str(uuid.uuid4()), None, later), later)
                    for _ in range(min(5000, count - start))
                ]
            )
    finally:
        engine.dispose()


def _ingest_service(world, args, ids, deleted_at, batch, prefetch, profile):
    n = len(ids)
    prefill = args.prefill
    label = f'service batch_size={batch} prefetch={prefetch}'
    if prefill:
        label += f' ({prefill:,} queued before)'
    world.reset_queue()
    if prefill:
        _prefill(world, prefill)
    _, pub_s = world.broker.publish_all(_messages(ids))
    name = f'ingest-b{batch}-p{prefetch}'
    config = world.config(
        name, batch_size=batch, prefetch=prefetch, pool_size=args.pool
    )
    svc = world.service(name, config)
    calm = quiet(args)
    svc.start()
    profiler = Profiler(args.profile if profile else None, 'ingest', svc.pid)
    samples = []
    rss_peak = 0
    started_line = None
    problems = []
    deadline = time.monotonic() + max(120.0, n / 100.0)
    interval = 0.05 if world.queue_url else 0.1
    cpu = CpuWindow(svc.pid)
    with cpu:
        while True:
            now = time.time()
            count = world.queue_count() - prefill
            samples.append((now, count))
            if started_line is None and STARTED in svc.log():
                started_line = now
            rss_peak = max(rss_peak, proc_status(svc.pid).get('VmRSS', 0))
            if count >= n:
                break
            if not svc.alive():
                problems.append(f'service exited ({svc.proc.returncode})')
                break
            if time.monotonic() > deadline:
                problems.append(f'only {count} of {n} rows after the timeout')
                break
            time.sleep(interval)
        window = cpu.stop()
    status = proc_status(svc.pid)
    profile_path = profiler.stop()
    time.sleep(0.5)  # the last batch's acks follow its commit
    rc, stop_s = svc.stop()
    if rc != 0:
        problems.append(f'service exit code {rc} on SIGTERM')
    depth = world.broker.depth()
    if depth:
        problems.append(f'{depth} messages left in the broker queue')
        world.broker.purge()
    problems += _check_queue_rows(world, ids, NEVER, deleted_at, prefill)
    problems += [f'log: {line}' for line in svc.problems_in_log()[:3]]
    done_at = samples[-1][0]
    first = next(((t, c) for t, c in samples if c > 0), None)
    rate = None
    if first and done_at > first[0]:
        rate = (samples[-1][1] - first[1]) / (done_at - first[0])
    run = {
        'consumer': 'scrub-listener',
        'label': label,
        'batch_size': batch,
        'prefetch': prefetch,
        'default': (batch, prefetch) == (DEFAULT_BATCH, DEFAULT_PREFETCH),
        'prefilled': prefill,
        'n': n,
        'rate': rate,
        'rate_from_start_line': n / (done_at - started_line)
        if started_line and done_at > started_line
        else None,
        'seconds_from_spawn': done_at - svc.spawned_at,
        'first_rows_at_s': first[0] - svc.spawned_at if first else None,
        'publish_s': pub_s,
        'vmhwm_mib': status.get('VmHWM', 0) / 1024,
        'vmrss_mib': status.get('VmRSS', 0) / 1024,
        'rss_sampled_peak_mib': rss_peak / 1024,
        'threads': status.get('Threads'),
        'stop_s': stop_s,
        'exit_code': rc,
        'profiled': bool(profile_path),
        'profile': profile_path,
        'quiet': calm,
        **window,
        'problems': problems,
        'verified': not problems,
    }
    line = (
        f'  {label:38} '
        + (f'{rate:7.0f}/s' if rate else '      -  ')
        + f'  (from start line {run["rate_from_start_line"] or 0:6.0f}/s, '
        f'from spawn {run["seconds_from_spawn"]:5.1f} s)  '
        f'VmHWM {run["vmhwm_mib"]:5.1f} MiB  service CPU '
        f'{window["service_cpu_s"]:5.1f} s  DB CPU '
        f'{window["db_server_cpu_s"]:5.1f} s  RabbitMQ CPU '
        f'{window["broker_cpu_s"]:5.1f} s  others '
        f'{window["others_busy_cpus"]:.2f} CPUs  '
    )
    line += 'verified' if not problems else 'FAILED: ' + '; '.join(problems)
    if profile_path:
        line += ' (under py-spy)'
    log(line)
    if profile_path:
        for text in profile_summary(profile_path):
            log('    ' + text)
    return run


def _ingest_reference(world, args, ids, kind, prefetch, batch):
    n = len(ids)
    _, pub_s = world.broker.publish_all(_messages(ids))
    calm = quiet(args)
    with CpuWindow(None) as cpu:
        out = run_consumer(world, kind, n, prefetch, batch)
        window = cpu.stop()
    problems = []
    if out['count'] != n:
        problems.append(f'consumed {out["count"]} of {n}')
    depth = world.broker.depth()
    if depth:
        problems.append(f'{depth} messages left in the broker queue')
        world.broker.purge()
    rate = None
    if out['first'] and out['last'] > out['first']:
        rate = (out['count'] - out['first_count']) / (
            out['last'] - out['first']
        )
    label = {
        'kombu': 'raw kombu consume+ack',
        'oslo-plain': 'oslo.messaging listener, does nothing',
        'oslo-batch': 'oslo.messaging batch listener, does nothing',
    }[kind]
    label += f' (prefetch {prefetch or "unlimited"}'
    label += f', batch {batch})' if kind == 'oslo-batch' else ')'
    run = {
        'consumer': kind,
        'label': label,
        'prefetch': prefetch,
        'batch_size': batch if kind == 'oslo-batch' else None,
        'n': n,
        'rate': rate,
        'rate_from_ready': out['count'] / (out['last'] - out['ready'])
        if out['last']
        else None,
        'cpu_s': out['cpu'],
        'maxrss_mib': out['maxrss_kib'] / 1024,
        'publish_s': pub_s,
        'quiet': calm,
        # over the whole child process, start-up included
        'broker_cpu_s': window['broker_cpu_s'],
        'db_server_cpu_s': window['db_server_cpu_s'],
        'machine_busy_cpus': window['machine_busy_cpus'],
        'problems': problems,
        'verified': not problems,
    }
    log(
        f'  {label:58} '
        + (f'{rate:7.0f}/s' if rate else '      -  ')
        + f'  CPU {out["cpu"]:5.1f} s  RabbitMQ CPU '
        f'{window["broker_cpu_s"]:5.1f} s  maxrss '
        f'{run["maxrss_mib"]:5.1f} MiB  '
        + ('verified' if not problems else 'FAILED: ' + '; '.join(problems))
    )
    return run


def scenario_ingest(args):
    n = args.n or DEFAULT_N['ingest']
    result = {'scenario': 'ingest', 'n': n, 'repeat': args.repeat, 'runs': []}
    log(
        f'## ingest: {n:,} image.delete notifications from RabbitMQ into '
        f'the committed due-queue ({args.queue_backend}), '
        f'{args.repeat} repetition(s)'
    )
    with World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        started = time.monotonic()
        ids = world.pending_images(n, size=1)
        deleted_at = {i: row[2] for i, row in world.glance_rows().items()}
        world.broker.declare_pool_queue()
        log(f'  setup {time.monotonic() - started:.1f} s')
        references = []
        if args.reference:
            references = [
                ('kombu', 0, None),
                ('oslo-plain', 0, None),
                ('oslo-batch', DEFAULT_PREFETCH, DEFAULT_BATCH),
            ]
        for rep in range(args.repeat):
            steps = [('ref', *r) for r in references] + [
                ('svc', b, p) for b, p in args.configs
            ]
            if rep % 2:
                # why: drift (page cache, the shared machine's load) then
                # hits every consumer alike
                steps.reverse()
            for step in steps:
                if step[0] == 'ref':
                    run = _ingest_reference(world, args, ids, *step[1:])
                else:
                    run = _ingest_service(
                        world, args, ids, deleted_at, *step[1:], False
                    )
                run['rep'] = rep
                result['runs'].append(run)
        if args.profile:
            # one more run of the first pair, under py-spy, not ranked
            run = _ingest_service(
                world, args, ids, deleted_at, *args.configs[0], True
            )
            run['rep'] = None
            result['runs'].append(run)
    result['verified'] = all(r['verified'] for r in result['runs'])
    result['summary'] = _ingest_summary(result['runs'])
    if args.repeat > 1:
        log('  median [min..max] over the repetitions:')
        for row in result['summary']:
            log(
                f'  {row["label"]:66} {_num(row["rate"][0]):>6}/s '
                f'[{_num(row["rate"][1])}..{_num(row["rate"][2])}]'
            )
    mine = [
        r
        for r in result['summary']
        if r['consumer'] == 'scrub-listener' and r['rate'][0]
    ]
    if mine:
        best = max(mine, key=lambda r: r['rate'][0])
        default = next((r for r in mine if r['default']), None)
        result['best'] = {k: best[k] for k in ('batch_size', 'prefetch')}
        result['best_rate'] = best['rate'][0]
        result['default_rate'] = default['rate'][0] if default else None
        result['target'] = TARGETS['ingest_per_s']
        log(
            f'  => best {best["rate"][0]:.0f}/s (batch_size '
            f'{best["batch_size"]}, prefetch {best["prefetch"]}); default '
            + (f'{default["rate"][0]:.0f}/s' if default else 'not run')
            + f'; target {TARGETS["ingest_per_s"]:,}/s: '
            + _verdict(best['rate'][0] >= TARGETS['ingest_per_s'])
        )
    return result


def _ingest_summary(runs):
    """One row per consumer/config: median, min, max of the rates
    (verified runs, profiled ones left out)."""
    rows = {}
    for run in runs:
        if not run['verified'] or not run['rate'] or run.get('profiled'):
            continue
        row = rows.setdefault(
            run['label'],
            {
                'label': run['label'],
                'consumer': run['consumer'],
                'batch_size': run.get('batch_size'),
                'prefetch': run.get('prefetch'),
                'default': run.get('default', False),
                'prefilled': run.get('prefilled', 0),
                'rates': [],
                'cpu': [],
                'broker': [],
                'rss': [],
            },
        )
        row['rates'].append(run['rate'])
        row['cpu'].append(run.get('service_cpu_s', run.get('cpu_s')))
        row['broker'].append(run.get('broker_cpu_s'))
        row['rss'].append(run.get('vmhwm_mib', run.get('maxrss_mib')))
    out = []
    for row in rows.values():
        rates = row.pop('rates')
        row['reps'] = len(rates)
        row['rate'] = (statistics.median(rates), min(rates), max(rates))
        row['cpu_s'] = statistics.median(row.pop('cpu'))
        broker = [b for b in row.pop('broker') if b is not None]
        row['broker_cpu_s'] = statistics.median(broker) if broker else None
        row['rss_mib'] = max(row.pop('rss'))
        out.append(row)
    return out


def _verdict(met):
    return 'met' if met else 'MISSED'


def _delete_images(engine, broker, ids, rate, record):
    """Delete ``ids`` as glance-api does (rows, then the notification),
    ``rate`` per second on a fixed schedule; ``record[id] = time``."""
    started = time.monotonic()
    with engine.connect() as conn:
        for index, image_id in enumerate(ids):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = glance_rows.utcnow()
            with conn.begin():
                conn.execute(
                    sa.text(
                        "UPDATE image_locations SET status = 'pending_delete',"
                        ' deleted = 1, deleted_at = :now, updated_at = :now '
                        'WHERE image_id = :id'
                    ),
                    {'now': now, 'id': image_id},
                )
                conn.execute(
                    sa.text(
                        "UPDATE images SET status = 'pending_delete', "
                        'deleted = 1, deleted_at = :now, updated_at = :now '
                        'WHERE id = :id'
                    ),
                    {'now': now, 'id': image_id},
                )
            record[image_id] = time.time()
            broker.publish(glance_message(image_id, size=4096))
    return time.monotonic() - started


def scenario_latency(args):
    n = max(1, int(args.rate * args.duration))
    scrub_time = args.scrub_time
    result = {
        'scenario': 'latency',
        'n': n,
        'rate': args.rate,
        'duration_s': args.duration,
        'scrub_time': scrub_time,
        'pool': args.pool,
    }
    log(
        f'## latency: due -> data gone, {n} deletions at {args.rate:g}/s, '
        f'scrub_time {scrub_time} s, scrub_pool_size {args.pool}'
    )
    problems = []
    with World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        ids = world.pending_images(n, size=4096, active=True)
        world.broker.declare_pool_queue()
        os.sync()
        config = world.config(
            'latency', scrub_time=scrub_time, pool_size=args.pool
        )
        svc = world.service('latency', config, env=gone_hook_env(world))
        calm = quiet(args)
        svc.start()
        svc.wait_started()
        time.sleep(1.0)  # the start-up sweep (nothing due) is over
        profiler = Profiler(args.profile, 'latency', svc.pid)
        deleted = {}
        engine = sa.create_engine(world.glance_url)
        paths = {os.path.join(world.store_dir, i): i for i in ids}
        with CpuWindow(svc.pid) as cpu:
            try:
                publish_s = _delete_images(
                    engine, world.broker, ids, args.rate, deleted
                )
            finally:
                engine.dispose()
            deadline = time.monotonic() + scrub_time + 60
            left = set(paths)
            while left and time.monotonic() < deadline and svc.alive():
                left = {p for p in left if os.path.exists(p)}
                time.sleep(0.1)
            window = cpu.stop()
        status = proc_status(svc.pid)
        profile_path = profiler.stop()
        rc, _ = svc.stop()
        if rc != 0:
            problems.append(f'service exit code {rc} on SIGTERM')
        if left:
            problems.append(f'{len(left)} of {n} data files still there')
        rows = world.glance_rows(ids)
        not_deleted = [
            i for i, row in rows.items() if not row or row[0] != 'deleted'
        ]
        if not_deleted:
            problems.append(f'{len(not_deleted)} images not deleted')
        gone = read_gone_log(world.path('logs', 'gone.log'))
        counts = {}
        for _, path in gone:
            counts[path] = counts.get(path, 0) + 1
        twice = [p for p, c in counts.items() if c > 1]
        if twice:
            problems.append(f'{len(twice)} files deleted more than once')
        problems += [f'log: {line}' for line in svc.problems_in_log()[:3]]
        # deleted_at as the Glance DB holds it (MariaDB DATETIME: whole
        # seconds), i.e. the due time the service itself works from.
        with world.glance.connect() as conn:
            deleted_at_db = dict(
                conn.execute(sa.text('SELECT id, deleted_at FROM images'))
                .tuples()
                .all()
            )
    latencies, after_real = [], []
    for when, path in gone:
        image_id = paths.get(path)
        if image_id is None or deleted_at_db.get(image_id) is None:
            continue
        due = _epoch(deleted_at_db[image_id]) + scrub_time
        latencies.append(when - due)
        after_real.append(when - deleted[image_id])
    lat = dist(latencies)
    if len(latencies) != n:
        problems.append(f'{len(latencies)} of {n} deletes logged')
    result.update(
        {
            'latency_s': lat,
            'gone_after_real_delete_s': dist(after_real),
            'publish_s': publish_s,
            'achieved_rate': n / publish_s if publish_s else None,
            'vmhwm_mib': status.get('VmHWM', 0) / 1024,
            'profile': profile_path,
            'profiled': bool(profile_path),
            'quiet': calm,
            **window,
            'problems': problems,
            'verified': not problems,
        }
    )
    w = args.wakeup_time
    result['glance_scrubber_computed'] = {
        'wakeup_time': w,
        'mean_s': w / 2,
        'p50_s': w / 2,
        'p99_s': 0.99 * w,
        'max_s': float(w),
        'note': 'computed, not measured: a deletion becomes due at a '
        'uniformly random phase of the wakeup_time cycle and waits for '
        "the next run, plus that run's own pass (~45 images/s)",
    }
    log(
        f'  published {n} deletions in {publish_s:.1f} s '
        f'({result["achieved_rate"]:.1f}/s)'
    )
    log(
        f'  due -> gone: {fmt_dist(lat, "s", 3)}'
        + (' (under py-spy)' if profile_path else '')
    )
    log(
        '  (real delete -> gone: '
        f'{fmt_dist(result["gone_after_real_delete_s"], "s", 3)}; '
        f'scrub_time {scrub_time} s; Glance stores deleted_at in whole '
        'seconds on MariaDB)'
    )
    log(
        f'  service CPU {window["service_cpu_s"]:.1f} s over '
        f'{window["wall_s"]:.1f} s, VmHWM {result["vmhwm_mib"]:.1f} MiB, '
        f'others {window["others_busy_cpus"]:.2f} CPUs'
    )
    log(
        f'  glance-scrubber (computed) with wakeup_time {w} s: mean/p50 '
        f'{w / 2:.0f} s, p99 {0.99 * w:.0f} s, max {w} s, plus its pass'
    )
    if lat.get('n'):
        result['target'] = TARGETS['latency_p99_s']
        log(
            f'  => p99 {lat["p99"]:.3f} s; target < '
            f'{TARGETS["latency_p99_s"]:g} s: '
            + _verdict(lat['p99'] < TARGETS['latency_p99_s'])
        )
    log(
        '  '
        + (
            'verified'
            if result['verified']
            else 'FAILED: ' + '; '.join(problems)
        )
    )
    if profile_path:
        for text in profile_summary(profile_path):
            log('    ' + text)
    return result


def _wait_count(world, svc, n, timeout, on_sample=None):
    deadline = time.monotonic() + timeout
    while True:
        count = world.queue_count()
        if on_sample:
            on_sample()
        if count >= n:
            return count
        if not svc.alive() or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def _rss_backlog(world, config, name, n, problems):
    """Start the service on a backlog of ``n``; sample its RSS until the
    due-queue holds ``n`` rows.  Returns (phase dict, running service)."""
    svc = world.service(name, config)
    svc.start()
    started = time.monotonic()
    with Sampler(lambda: proc_status(svc.pid).get('VmRSS', 0), 0.2) as s:
        count = _wait_count(world, svc, n, max(300.0, n / 100.0))
    took = time.monotonic() - started
    status = proc_status(svc.pid)
    values = [v for _, v in s.samples if v]
    if count != n:
        problems.append(f'{name}: {count} of {n} rows after consuming')
    return {
        'vmhwm_mib': status.get('VmHWM', 0) / 1024,
        'vmrss_sampled_max_mib': max(values, default=0) / 1024,
        'vmrss_sampled_median_mib': statistics.median(values) / 1024
        if values
        else 0,
        'seconds_from_spawn': took,
        'rate_from_spawn': count / took if took else None,
        'rows': count,
    }, svc


def _queue_ops(world, reps=20):
    """Mean ms of DueQueue.next_wakeup / claim (nothing due) / enqueue of
    100 new rows, with the product's own code, on the world's queue."""
    from scrub_listener import db
    from scrub_listener import glance_db
    from scrub_listener import queue

    url = world.queue_url or f'sqlite:///{world.sqlite_queue_path}'
    engine = db.create_engine(url, 'bench')
    try:
        due_queue = queue.DueQueue(engine)
        later = glance_db.utcnow() + datetime.timedelta(days=60)

        def enqueue():
            due_queue.enqueue(
                [
                    (glance_db.Deletion(str(uuid.uuid4()), None, later), later)
                    for _ in range(100)
                ]
            )

        out = {}
        for name, func in (
            ('next_wakeup', due_queue.next_wakeup),
            ('claim_nothing_due', lambda: due_queue.claim('bench', 500)),
            ('enqueue_100', enqueue),
        ):
            func()  # warm
            started = time.perf_counter()
            for _ in range(reps):
                func()
            out[name] = (time.perf_counter() - started) / reps * 1000
        # leave the queue as the scenario expects it
        with engine.begin() as conn:
            conn.execute(
                sa.text('DELETE FROM scrub_queue WHERE due_at > :t'),
                {'t': later - datetime.timedelta(seconds=1)},
            )
        return out
    finally:
        engine.dispose()


def scenario_rss(args):
    n = args.n or DEFAULT_N['rss']
    result = {'scenario': 'rss', 'n': n, 'phases': {}}
    log(
        f'## rss: the service with {n:,} queued entries, and consuming a '
        f'{n:,}-message broker backlog (defaults: batch_size '
        f'{DEFAULT_BATCH}, prefetch {DEFAULT_PREFETCH})'
    )
    problems = []
    phases = result['phases']
    with World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        started = time.monotonic()
        ids = world.pending_images(n, size=1)
        world.broker.declare_pool_queue()
        log(f'  setup {time.monotonic() - started:.1f} s')
        config = world.config('rss', pool_size=args.pool)

        # 1. idle, empty queue
        svc = world.service('rss-idle', config)
        svc.start()
        svc.wait_started()
        time.sleep(3)
        status = proc_status(svc.pid)
        phases['idle_empty'] = {
            'vmrss_mib': status.get('VmRSS', 0) / 1024,
            'vmhwm_mib': status.get('VmHWM', 0) / 1024,
        }
        rc, _ = svc.stop()
        if rc != 0:
            problems.append(f'idle service exit code {rc}')
        world.reset_queue()

        # 2. a backlog of n in the broker, consumed
        _, pub_s = world.broker.publish_all(_messages(ids))
        log(f'  published {n:,} messages in {pub_s:.1f} s')
        result['quiet'] = quiet(args)
        phases['consuming_backlog'], svc = _rss_backlog(
            world, config, 'rss-backlog', n, problems
        )
        time.sleep(5)
        status = proc_status(svc.pid)
        phases['after_backlog_n_queued'] = {
            'vmrss_mib': status.get('VmRSS', 0) / 1024,
            'vmhwm_mib': status.get('VmHWM', 0) / 1024,
        }
        rc, _ = svc.stop()
        if rc != 0:
            problems.append(f'backlog service exit code {rc}')
        problems += [f'log: {line}' for line in svc.problems_in_log()[:3]]
        depth = world.broker.depth()
        if depth:
            problems.append(f'{depth} messages left in the broker')
            world.broker.purge()

        # 3. restart with n entries queued, nothing in the broker
        svc = world.service('rss-queued', config)
        svc.start()
        svc.wait_started()
        time.sleep(5)
        status = proc_status(svc.pid)
        phases['restart_n_queued'] = {
            'vmrss_mib': status.get('VmRSS', 0) / 1024,
            'vmhwm_mib': status.get('VmHWM', 0) / 1024,
            'queued': world.queue_count(),
        }
        rc, _ = svc.stop()
        if rc != 0:
            problems.append(f'restarted service exit code {rc}')
        if phases['restart_n_queued']['queued'] != n:
            problems.append(
                f'{phases["restart_n_queued"]["queued"]} of {n} queued '
                'after the restart'
            )

        # the due-queue operations the service runs per wake-up, on the
        # real queue of n rows (service stopped: nothing else running)
        phases['queue_ops_ms'] = _queue_ops(world)

        # 4. contrast: the same, with the prefetch bound taken away
        # (oslo.messaging's own default, rabbit_qos_prefetch_count = 0)
        if args.rss_contrast:
            world.reset_queue()
            world.broker.publish_all(_messages(ids))
            unbounded = world.config(
                'rss-unbounded',
                pool_size=args.pool,
                extra={
                    'oslo_messaging_rabbit': {'rabbit_qos_prefetch_count': 0}
                },
            )
            quiet(args)
            phases['contrast_prefetch_unlimited'], svc = _rss_backlog(
                world, unbounded, 'rss-unbounded', n, problems
            )
            rc, _ = svc.stop()
            if rc != 0:
                problems.append(f'unbounded service exit code {rc}')
            if world.broker.depth():
                problems.append('messages left in the broker (unbounded)')
                world.broker.purge()
    peak = max(
        phases['consuming_backlog']['vmhwm_mib'],
        phases['restart_n_queued']['vmhwm_mib'],
    )
    result.update(
        {
            'peak_mib': peak,
            'target': TARGETS['rss_mib'],
            'problems': problems,
            'verified': not problems,
        }
    )
    names = {
        'idle_empty': 'idle, empty queue',
        'consuming_backlog': f'consuming a {n:,}-message backlog',
        'after_backlog_n_queued': f'5 s later, {n:,} entries queued',
        'restart_n_queued': f'restarted with {n:,} entries queued',
        'queue_ops_ms': 'due-queue ops on those rows, ms each',
        'contrast_prefetch_unlimited': 'same backlog, '
        'rabbit_qos_prefetch_count = 0 (unlimited)',
    }
    for key, values in phases.items():
        text = ', '.join(
            f'{k} {v:.1f}' if isinstance(v, float) else f'{k} {v}'
            for k, v in values.items()
        )
        log(f'  {names[key]:58} {text}')
    log(
        f'  => peak VmHWM {peak:.1f} MiB; target < {TARGETS["rss_mib"]} MB: '
        + _verdict(peak < TARGETS['rss_mib'])
    )
    log(
        '  '
        + ('verified' if not problems else 'FAILED: ' + '; '.join(problems))
    )
    return result


def scenario_rpc(args):
    m = args.n or DEFAULT_N['rpc']
    k = args.manage_runs
    result = {'scenario': 'rpc', 'n': m, 'manage_runs': k}
    log(
        f'## rpc: restore round trip over RabbitMQ, {m} restores of '
        f'distinct pending_delete images, service running'
    )
    problems = []
    with warnings.catch_warnings():
        # oslo.messaging pulls in oslo.service's eventlet backend, which
        # warns on import; this process never uses eventlet.
        warnings.simplefilter('ignore')
        import oslo_messaging
        from oslo_config import cfg

        from scrub_listener import exceptions

    with World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        ids = world.pending_images(m + 2 * k, size=1024)
        world.broker.declare_pool_queue()
        # queued through their notifications, as in real life
        world.broker.publish_all(_messages(ids))
        config = world.config('rpc', pool_size=args.pool)
        svc = world.service('rpc', config)
        svc.start()
        svc.wait_started()
        queued = _wait_count(world, svc, len(ids), 60)
        if queued != len(ids):
            problems.append(f'{queued} of {len(ids)} queued before restores')
        transport = oslo_messaging.get_rpc_transport(
            cfg.CONF,
            url=world.transport_url,
            allowed_remote_exmods=['scrub_listener.exceptions'],
        )
        client = oslo_messaging.get_rpc_client(
            transport,
            oslo_messaging.Target(topic=RPC_TOPIC, version='1.0'),
            timeout=30,
        )
        ctxt = {
            'user_identity': 'bench@tools.bench.events',
            'roles': ['admin'],
        }
        try:
            t = time.perf_counter()
            client.call(ctxt, 'status')
            first_call = time.perf_counter() - t
            status_times = []
            for _ in range(50):
                t = time.perf_counter()
                client.call(ctxt, 'status')
                status_times.append(time.perf_counter() - t)
            result['quiet'] = quiet(args)
            profiler = Profiler(args.profile, 'rpc', svc.pid)
            restore_times = []
            with CpuWindow(svc.pid) as cpu:
                for image_id in ids[:m]:
                    t = time.perf_counter()
                    reply = client.call(ctxt, 'restore', image_id=image_id)
                    restore_times.append(time.perf_counter() - t)
                    if (
                        reply.get('image_id') != image_id
                        or reply.get('locations') != 1
                    ):
                        problems.append(f'restore {image_id}: reply {reply}')
                window = cpu.stop()
            profile_path = profiler.stop()
            repeat = None
            try:
                client.call(ctxt, 'restore', image_id=ids[0])
            except exceptions.NotPendingDelete as exc:
                repeat = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - reported
                repeat = f'{type(exc).__name__}: {exc}'
            if repeat != 'NotPendingDelete_Remote':
                problems.append(
                    f'repeated restore: {repeat}, want NotPendingDelete_Remote'
                )
        finally:
            transport.cleanup()
        manage = {'rpc': [], 'direct': []}
        for mode, chunk in (
            ('rpc', ids[m : m + k]),
            ('direct', ids[m + k :]),
        ):
            for image_id in chunk:
                argv = [
                    bin_path('scrub-listener-manage'),
                    '--config-file',
                    config,
                    'restore',
                    image_id,
                ] + (['--direct'] if mode == 'direct' else [])
                t = time.perf_counter()
                proc = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    cwd=world.workdir,
                    env=dict(os.environ, PYTHONWARNINGS='ignore'),
                )
                manage[mode].append(time.perf_counter() - t)
                if proc.returncode != 0 or 'restored to active' not in (
                    proc.stdout
                ):
                    problems.append(
                        f'manage restore {mode} exit {proc.returncode}: '
                        f'{proc.stderr.strip()[-300:]}'
                    )
        status = proc_status(svc.pid)
        rc, _ = svc.stop()
        if rc != 0:
            problems.append(f'service exit code {rc} on SIGTERM')
        # The repeated restore is refused on purpose; the service logs it
        # as an ERROR with a traceback (see the docs), not counted here.
        logged = svc.problems_in_log()
        expected_error_lines = len(logged) - len(
            svc.problems_in_log(
                ('Exception during message handling', 'NotPendingDelete')
            )
        )
        problems += [
            f'log: {line}'
            for line in svc.problems_in_log(
                ('Exception during message handling', 'NotPendingDelete')
            )[:3]
        ]
        rows = world.glance_rows(ids)
        wrong = [
            i
            for i, row in rows.items()
            if row is None
            or row[:2] != ('active', False)
            or row[3] != 'active'
        ]
        if wrong:
            problems.append(f'{len(wrong)} restored images not active')
        missing = [
            i
            for i in ids
            if not os.path.exists(os.path.join(world.store_dir, i))
        ]
        if missing:
            problems.append(f'{len(missing)} data files missing')
        left = world.queue_count()
        if left:
            problems.append(f'{left} queue entries left after the restores')
    rt = dist(restore_times, 1000)
    result.update(
        {
            'first_call_ms': first_call * 1000,
            'status_ms': dist(status_times, 1000),
            'restore_ms': rt,
            'manage_rpc_s': dist(manage['rpc']),
            'manage_direct_s': dist(manage['direct']),
            'repeat_restore': repeat,
            'repeat_restore_error_log_lines': expected_error_lines,
            'vmhwm_mib': status.get('VmHWM', 0) / 1024,
            'profile': profile_path,
            'profiled': bool(profile_path),
            **window,
            'target': TARGETS['rpc_p50_ms'],
            'problems': problems,
            'verified': not problems,
        }
    )
    log(f'  first call (reply queue set-up): {first_call * 1000:.1f} ms')
    log(f'  status() round trip:  {fmt_dist(result["status_ms"], "ms")}')
    log(
        f'  restore() round trip: {fmt_dist(rt, "ms")}'
        + (' (under py-spy)' if profile_path else '')
    )
    log(
        '  scrub-listener-manage restore (whole process, over RPC): '
        f'{fmt_dist(result["manage_rpc_s"], "s", 2)}'
    )
    log(
        '  scrub-listener-manage restore --direct (whole process): '
        f'{fmt_dist(result["manage_direct_s"], "s", 2)}'
    )
    log(
        f'  service CPU during the restores {window["service_cpu_s"]:.2f} s '
        f'(DB server {window["db_server_cpu_s"]:.2f} s) over '
        f'{window["wall_s"]:.2f} s; repeated restore -> {repeat}'
    )
    if rt.get('n'):
        log(
            f'  => p50 {rt["p50"]:.1f} ms; target < {TARGETS["rpc_p50_ms"]} '
            'ms: ' + _verdict(rt['p50'] < TARGETS['rpc_p50_ms'])
        )
    log(
        '  '
        + ('verified' if not problems else 'FAILED: ' + '; '.join(problems))
    )
    if profile_path:
        for text in profile_summary(profile_path):
            log('    ' + text)
    return result


RUNNERS = {
    'ingest': scenario_ingest,
    'latency': scenario_latency,
    'rss': scenario_rss,
    'rpc': scenario_rpc,
}


# ------------------------------------------------------------------- main


def _write_json(path, args, info, results):
    data = []
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.append(
        {
            'command': 'python -m tools.bench events ' + ' '.join(_argv(args)),
            'args': {
                k: v
                for k, v in vars(args).items()
                if k not in ('report',) and not callable(v)
            },
            'machine': info,
            'results': results,
        }
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(data, f, indent=1, default=str)
    log(f'results appended to {path}')


def _argv(args):
    argv = getattr(args, 'argv', None)
    if argv is not None:
        return argv
    # Called through tools/bench/cli.py: its argv minus "events".
    rest = sys.argv[1:]
    return rest[1:] if rest[:1] == ['events'] else rest


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(args=None):
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog='python -m tools.bench events')
        add_arguments(parser)
        argv = sys.argv[1:] if args is None else list(args)
        args = parser.parse_args(argv)
        args.argv = argv
        signal.signal(signal.SIGTERM, _sigterm)
    if args.report:
        with open(args.report) as f:
            for line in markdown(json.load(f)):
                print(line)
        return 0
    info = machine(args.queue_backend)
    mem = info.get('mem_total_kib', 0) / 1048576
    log(
        f'# {info["nproc"]} CPUs ({info.get("cpu", "?")}), {mem:.1f} GiB, '
        f'MariaDB {info.get("mysql_version", "?")}, RabbitMQ '
        f'{info["rabbitmq_version"]}, oslo.messaging '
        f'{info.get("oslo.messaging_version", "?")}, load average '
        f'{" ".join(info["loadavg_at_start"])}'
    )
    results = []
    try:
        for name in args.scenario:
            started = time.monotonic()
            try:
                result = RUNNERS[name](args)
            except harness.HarnessError as exc:
                log(f'  FAILED: {exc}')
                result = {
                    'scenario': name,
                    'verified': False,
                    'error': str(exc),
                }
            result['elapsed_s'] = time.monotonic() - started
            log(f'  ({name}: {result["elapsed_s"]:.0f} s)')
            results.append(result)
    except KeyboardInterrupt:
        log('interrupted')
        return 130
    if args.json:
        _write_json(args.json, args, info, results)
    ok = all(r['verified'] for r in results)
    log('all verified' if ok else 'NOT all verified')
    return 0 if ok else 1


# ----------------------------------------------------------------- report


def markdown(entries):
    """Markdown lines from a results file, straight from its numbers."""
    lines = []
    for entry in entries:
        info = entry['machine']
        lines += [
            f'`{entry["command"]}` — {info.get("date", "?")}, git '
            f'{info.get("git", "?")}'
            + (
                ' (uncommitted changes to scrub_listener/)'
                if info.get('scrub_listener_uncommitted_changes')
                else ''
            )
            + f', due-queue {entry["args"].get("queue_backend")}, load '
            f'average at start {" ".join(info.get("loadavg_at_start", []))}',
            '',
        ]
        for result in entry['results']:
            lines += _md_result(result)
            lines.append('')
    return lines


def _num(value, fmt='.0f'):
    return '-' if value is None else format(value, fmt)


def _md_dist(d, fmt='.1f'):
    if not d or not d.get('n'):
        return '-', '-', '-', '-'
    return tuple(format(d[k], fmt) for k in ('p50', 'p90', 'p99', 'max'))


def _md_result(result):
    name = result['scenario']
    ok = 'verified' if result['verified'] else 'NOT verified'
    if 'error' in result:
        return [f'**{name}**: {ok}: {result["error"]}']
    if name == 'ingest':
        lines = [
            f'**ingest**, N = {result["n"]:,}, '
            f'{result.get("repeat", 1)} repetition(s) ({ok})',
            '',
            '| consumer | msgs/s: median (min–max) | verified runs | CPU s '
            '(median) | RabbitMQ CPU s (median) | peak RSS MiB |',
            '|---|---|---|---|---|---|',
        ]
        for row in result.get('summary', []):
            if row['consumer'] == 'scrub-listener':
                label = (
                    f'scrub-listener, batch_size {row["batch_size"]}, '
                    f'prefetch {row["prefetch"]}'
                )
                if row.get('prefilled'):
                    label += f', {row["prefilled"]:,} queued before'
                if row['default']:
                    label += ' (default)'
                cpu = f'{row["cpu_s"]:.1f} (service)'
            else:
                label = row['label']
                cpu = f'{row["cpu_s"]:.1f} (whole consumer process)'
            med, lo, hi = row['rate']
            lines.append(
                f'| {label} | {med:.0f} ({lo:.0f}–{hi:.0f}) | '
                f'{row["reps"]} | {cpu} | '
                f'{_num(row.get("broker_cpu_s"), ".1f")} | '
                f'{row["rss_mib"]:.1f} |'
            )
        failed = [r for r in result['runs'] if not r['verified']]
        for run in failed:
            lines.append(
                f'| {run["label"]} | FAILED: {"; ".join(run["problems"])} '
                '| | | | |'
            )
        if 'best_rate' in result:
            lines += [
                '',
                f'Best {result["best_rate"]:.0f}/s (batch_size '
                f'{result["best"]["batch_size"]}, prefetch '
                f'{result["best"]["prefetch"]}), default '
                f'{_num(result["default_rate"])}/s; target '
                f'{result["target"]:,}/s.',
            ]
        return lines
    if name == 'latency':
        p50, p90, p99, mx = _md_dist(result['latency_s'], '.3f')
        r50, r90, r99, rmx = _md_dist(
            result['gone_after_real_delete_s'], '.3f'
        )
        gs = result['glance_scrubber_computed']
        return [
            f'**latency**, {result["n"]} deletions at '
            f'{result["achieved_rate"]:.1f}/s, scrub_time '
            f'{result["scrub_time"]} s, scrub_pool_size {result["pool"]} '
            f'({ok}'
            + ('; under py-spy' if result.get('profiled') else '')
            + ')',
            '',
            '| | p50 s | p90 s | p99 s | max s |',
            '|---|---|---|---|---|',
            f'| scrub-listener: due -> data gone (measured) | {p50} | {p90} '
            f'| {p99} | {mx} |',
            '| scrub-listener: delete committed -> data gone (measured; '
            f'includes scrub_time {result["scrub_time"]} s, less the '
            'sub-second part Glance drops from deleted_at) | '
            f'{r50} | {r90} | {r99} | {rmx} |',
            f'| glance-scrubber, wakeup_time {gs["wakeup_time"]} s '
            f'(computed, plus its pass) | {gs["p50_s"]:.0f} | '
            f'{0.9 * gs["wakeup_time"]:.0f} | {gs["p99_s"]:.0f} | '
            f'{gs["max_s"]:.0f} |',
            '',
            f'Service CPU {result["service_cpu_s"]:.1f} s over '
            f'{result["wall_s"]:.1f} s, peak RSS {result["vmhwm_mib"]:.1f} '
            f'MiB, rest of the machine {result["others_busy_cpus"]:.2f} '
            'CPUs busy.',
        ]
    if name == 'rss':
        ph = result['phases']
        lines = [
            f'**rss**, N = {result["n"]:,} ({ok})',
            '',
            '| state | VmRSS MiB | VmHWM (peak) MiB |',
            '|---|---|---|',
        ]
        rows = (
            ('idle, empty queue', ph.get('idle_empty', {})),
            (
                f'consuming a {result["n"]:,}-message broker backlog '
                f'({ph["consuming_backlog"]["seconds_from_spawn"]:.0f} s; '
                'VmRSS: sampled max)',
                {
                    'vmrss_mib': ph['consuming_backlog'][
                        'vmrss_sampled_max_mib'
                    ],
                    'vmhwm_mib': ph['consuming_backlog']['vmhwm_mib'],
                },
            ),
            (
                f'5 s later, {result["n"]:,} entries queued',
                ph.get('after_backlog_n_queued', {}),
            ),
            (
                f'restarted with {result["n"]:,} entries queued',
                ph.get('restart_n_queued', {}),
            ),
        )
        for label, values in rows:
            lines.append(
                f'| {label} | {_num(values.get("vmrss_mib"), ".1f")} | '
                f'{_num(values.get("vmhwm_mib"), ".1f")} |'
            )
        contrast = ph.get('contrast_prefetch_unlimited')
        if contrast:
            lines.append(
                '| the same backlog with `[oslo_messaging_rabbit] '
                'rabbit_qos_prefetch_count = 0` (unlimited, '
                "oslo.messaging's default; "
                f'{contrast["seconds_from_spawn"]:.0f} s) | '
                f'{contrast["vmrss_sampled_max_mib"]:.1f} | '
                f'{contrast["vmhwm_mib"]:.1f} |'
            )
        ops = ph.get('queue_ops_ms')
        if ops:
            lines += [
                '',
                f'Due-queue operations on those {result["n"]:,} rows '
                '(product code, service stopped), ms each: '
                + ', '.join(f'`{k}` {v:.1f}' for k, v in ops.items()),
                '',
            ]
        return lines
    if name == 'rpc':
        s = _md_dist(result['status_ms'])
        r = _md_dist(result['restore_ms'])
        mr = _md_dist(result['manage_rpc_s'], '.2f')
        md = _md_dist(result['manage_direct_s'], '.2f')
        return [
            f'**rpc**, {result["n"]} restores ({ok}'
            + ('; restores under py-spy' if result.get('profiled') else '')
            + ')',
            '',
            '| | p50 | p90 | p99 | max |',
            '|---|---|---|---|---|',
            f'| status() round trip, ms | {" | ".join(s)} |',
            f'| restore() round trip, ms | {" | ".join(r)} |',
            f'| scrub-listener-manage restore (process, RPC), s '
            f'(n={result["manage_rpc_s"].get("n", 0)}) | {" | ".join(mr)} |',
            f'| scrub-listener-manage restore --direct (process), s '
            f'(n={result["manage_direct_s"].get("n", 0)}) | '
            f'{" | ".join(md)} |',
            '',
            f'First call (reply queue set-up) {result["first_call_ms"]:.1f} '
            f'ms; service CPU {result["service_cpu_s"]:.2f} s and DB server '
            f'CPU {result["db_server_cpu_s"]:.2f} s for {result["n"]} '
            f'restores; a repeated restore -> {result["repeat_restore"]}.',
        ]
    return [f'**{name}**: {ok}']


if __name__ == '__main__':
    sys.exit(main())
