"""Event-path benchmarks of the always-on service.

``python -m tools.bench events [--scenario ingest|latency|rss|rpc|all]``

Every scenario runs the real service, ``scrub-listener --config-file F``
(no ``--sweep-once``), as a child process in its own process group
(:mod:`tools.service_process`), on a fresh world (:mod:`.fixtures` on
:mod:`tools.world`): a Glance 33.0.0 database on MariaDB (real
``glance-manage db_sync``, :mod:`tools.harness`), a file store, a RabbitMQ
vhost, and the due-queue on SQLite under ``state_path`` (default) or a
fresh database (``--queue-backend mysql|postgresql``).  Images are written
as glance-api 33 leaves them (:mod:`tools.glance_rows`); notifications are
published as glance-api 33 publishes them (:mod:`tools.publisher`:
exchange ``glance``, topic, non-durable, routing key
``notifications.info``, oslo envelope 2.0, the payload seen on the wire:
see /work/shared/NOTES.md).  Everything made is removed at the end, and
every child process is killed, even on Ctrl-C / SIGTERM.

One module per scenario, each saying what it measures and how:

:mod:`.ingest`
    notifications -> committed due-queue rows per second, against raw
    kombu and do-nothing oslo.messaging consumers (:mod:`.consumer`);
:mod:`.latency`
    due -> data gone;
:mod:`.rss`
    the service's memory with a large queue and a large broker backlog;
:mod:`.rpc`
    the RPC ``status()`` / ``restore()`` round trip and
    ``scrub-listener-manage restore``.

What they share: :mod:`.fixtures` (the world, on the scaffolding the
tests use too), :mod:`.common` (constants, statistics, CPU and memory
readings, the quiet-machine wait), :mod:`.profiling` (py-spy), and
:mod:`.cli` (options, the run, the results file, ``--report``).

Results are printed, and appended to ``--json`` (default
``tools/bench/results/events.json``); ``--report FILE`` prints the
Markdown tables of such a file (for docs/performance-events.md).
Exit status 0 only when every run was verified.
"""

from tools.bench.events import ingest
from tools.bench.events import latency
from tools.bench.events import rpc
from tools.bench.events import rss
from tools.bench.events.cli import RUNNERS
from tools.bench.events.cli import add_arguments
from tools.bench.events.cli import add_parser
from tools.bench.events.cli import main
from tools.bench.events.cli import markdown
from tools.bench.events.common import SCENARIOS
from tools.bench.events.profiling import profile_summary
from tools.bench.events.profiling import profile_top

scenario_ingest = ingest.run
scenario_latency = latency.run
scenario_rss = rss.run
scenario_rpc = rpc.run

__all__ = [
    'RUNNERS',
    'SCENARIOS',
    'add_arguments',
    'add_parser',
    'main',
    'markdown',
    'profile_summary',
    'profile_top',
    'scenario_ingest',
    'scenario_latency',
    'scenario_rpc',
    'scenario_rss',
]
