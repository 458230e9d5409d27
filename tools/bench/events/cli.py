"""The command line of the event-path benchmarks: options, running the
chosen scenarios, the results file, and the Markdown report.

``python -m tools.bench events [--scenario ingest|latency|rss|rpc|all]
[--json FILE] [--report FILE] ...`` (``--help`` lists every option; each
scenario's module says what it measures).  Results are printed, and
appended to ``--json`` (default ``tools/bench/results/events.json``);
``--report FILE`` prints the Markdown tables of such a file (for
docs/performance-events.md).  Exit status 0 only when every run was
verified.
"""

import argparse
import json
import os
import signal
import sys
import time

from tools import harness
from tools import service_process
from tools.bench.events import common
from tools.bench.events import ingest
from tools.bench.events import latency
from tools.bench.events import rpc
from tools.bench.events import rss

#: First line of the package's docstring, for ``--help``.
DESCRIPTION = 'Event-path benchmarks of the always-on service.'

#: scenario name -> its module (``run(args)``, ``markdown(result, ok)``)
SCENARIO_MODULES = {
    'ingest': ingest,
    'latency': latency,
    'rss': rss,
    'rpc': rpc,
}
RUNNERS = {name: module.run for name, module in SCENARIO_MODULES.items()}


# --------------------------------------------------------------- arguments


def _scenarios(text):
    names = [s.strip() for s in text.split(',') if s.strip()]
    if names == ['all']:
        return list(common.SCENARIOS)
    bad = set(names) - set(common.SCENARIOS)
    if bad or not names:
        choices = ', '.join(common.SCENARIOS)
        raise argparse.ArgumentTypeError(
            f'choose from {choices} or all (comma-separated)'
        )
    return names


def _configs(text):
    pairs = []
    for item in text.split(','):
        batch, _, prefetch = item.strip().partition(':')
        pairs.append((int(batch), int(prefetch or 2 * int(batch))))
    return pairs


def add_arguments(parser):
    defaults = common.DEFAULT_N
    parser.add_argument(
        '--scenario',
        type=_scenarios,
        default=list(common.SCENARIOS),
        metavar='ingest|latency|rss|rpc|all',
        help='scenario(s) to run, comma-separated (default: all)',
    )
    parser.add_argument(
        '-n',
        type=int,
        default=None,
        help='messages (ingest, rss) or restores (rpc); default ingest '
        f'{defaults["ingest"]:,}, rss {defaults["rss"]:,}, rpc '
        f'{defaults["rpc"]}',
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
        default=common.DEFAULT_JSON,
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
        description=DESCRIPTION,
    )
    add_arguments(parser)
    return parser


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
    common.log(f'results appended to {path}')


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
    info = common.machine(args.queue_backend)
    mem = info.get('mem_total_kib', 0) / 1048576
    common.log(
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
            except (
                harness.HarnessError,
                service_process.WaitTimeout,
            ) as exc:
                common.log(f'  FAILED: {exc}')
                result = {
                    'scenario': name,
                    'verified': False,
                    'error': str(exc),
                }
            result['elapsed_s'] = time.monotonic() - started
            common.log(f'  ({name}: {result["elapsed_s"]:.0f} s)')
            results.append(result)
    except KeyboardInterrupt:
        common.log('interrupted')
        return 130
    if args.json:
        _write_json(args.json, args, info, results)
    ok = all(r['verified'] for r in results)
    common.log('all verified' if ok else 'NOT all verified')
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


def _md_result(result):
    name = result['scenario']
    ok = 'verified' if result['verified'] else 'NOT verified'
    if 'error' in result:
        return [f'**{name}**: {ok}: {result["error"]}']
    module = SCENARIO_MODULES.get(name)
    if module is None:
        return [f'**{name}**: {ok}']
    return module.markdown(result, ok)
