"""Command line of the benchmark: ``python -m tools.bench COMMAND``.

sweep
    scrub-listener ``--sweep-once`` on N pending_delete images (default
    MariaDB Glance DB, SQLite due-queue), one line per run + a summary.
compare
    The same workload for glance-scrubber 33.0.0 and scrub-listener,
    alternating A B A B, with fixed-cost runs (N = 1: start-up, imports,
    pool start and shutdown) to separate the fixed cost from the per-image
    cost; scale curves over ``--sizes`` and
    ``--pools``; ``--delete-delay`` for the slow-store scenario.
plot
    PNG plots from the JSON files of earlier runs.
report
    Markdown tables from those JSON files (docs/performance.md).
micro
    Per-location cost of each layer of a store delete, in-process.
profile
    Read a py-spy raw profile (``sweep --profile``) and print where the
    time goes, by function.

Exit status: 0 when every run was verified, 1 otherwise.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile

from tools import harness
from tools.bench import runs as runs_mod

DEFAULT_TIMEOUT = 900


def _int_list(text):
    return [int(x) for x in text.split(',') if x.strip()]


def _add_workload_args(parser, n_default, pool_default):
    parser.add_argument(
        '--backend',
        default='mysql',
        choices=harness.BACKENDS,
        help='database server of the Glance DB (default: %(default)s)',
    )
    parser.add_argument(
        '-n',
        type=int,
        default=n_default,
        help='pending_delete images per run (default: %(default)s)',
    )
    parser.add_argument(
        '--size',
        type=int,
        default=65536,
        help='bytes of data per image (default: %(default)s)',
    )
    parser.add_argument(
        '--pool',
        type=int,
        default=pool_default,
        help='scrub_pool_size of both tools (default: %(default)s)',
    )
    parser.add_argument(
        '--keep',
        type=int,
        default=5,
        help='active images created alongside, that must survive '
        '(default: %(default)s)',
    )
    parser.add_argument(
        '--code',
        metavar='REV',
        help='measure scrub_listener/ as committed at git revision REV '
        '(exported to a temp dir put first on PYTHONPATH) instead of the '
        'working tree',
    )
    parser.add_argument(
        '--live',
        type=int,
        default=0,
        help='also this many live (active) images of 1 KiB, made in bulk, '
        'whose files must survive: a real Glance DB has many more live '
        'locations than deleted ones (default: %(default)s)',
    )
    parser.add_argument(
        '--queue-backend',
        default='sqlite',
        choices=harness.BACKENDS,
        help="scrub-listener's due-queue DB: sqlite under state_path "
        '(default) or a fresh database on the mysql/postgresql server',
    )
    parser.add_argument(
        '--repeat',
        type=int,
        default=1,
        help='repetitions (default: %(default)s)',
    )
    parser.add_argument(
        '--delete-delay',
        type=float,
        default=0.0,
        help='slow-store scenario: seconds added to every store delete, '
        'in both tools (default: %(default)s)',
    )
    parser.add_argument(
        '--delete-delay-per-mib',
        type=float,
        default=0.0,
        help='slow-store scenario: seconds per MiB of data added to every '
        'store delete (default: %(default)s)',
    )
    parser.add_argument(
        '--timeout',
        type=float,
        default=DEFAULT_TIMEOUT,
        help='seconds after which one run is killed and counted as failed '
        '(default: %(default)s)',
    )
    parser.add_argument(
        '--no-sync',
        dest='sync',
        action='store_false',
        help='do not sync the new data files to disk before the run: the '
        'deletes then hit files still in the page cache, never written '
        '(cheaper unlinks than a real store)',
    )
    parser.add_argument(
        '--quiet-below',
        type=float,
        default=0.3,
        metavar='CPUS',
        help='before each run, wait until the machine keeps fewer than '
        'this many CPUs busy (it may be shared; default: %(default)s)',
    )
    parser.add_argument(
        '--quiet-wait',
        type=float,
        default=300,
        metavar='SECONDS',
        help='wait at most this long for that, then run anyway; 0: do not '
        'wait (default: %(default)s)',
    )
    parser.add_argument(
        '--json', help='append every run and the summary to this JSON file'
    )
    parser.add_argument(
        '--keep-logs',
        metavar='DIR',
        help='copy the stdout/stderr of failed runs into DIR',
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m tools.bench',
        description='Benchmarks of scrub-listener (and glance-scrubber).',
    )
    sub = parser.add_subparsers(dest='command', required=True)

    sweep = sub.add_parser(
        'sweep', help='scrub-listener --sweep-once on N images'
    )
    _add_workload_args(sweep, n_default=10000, pool_default=8)
    sweep.add_argument(
        '--profile',
        metavar='FILE',
        help='run under py-spy (raw format to FILE) and print where the '
        'time goes; the timings of that run are not comparable',
    )
    sweep.add_argument(
        '--target',
        type=float,
        default=None,
        help='images/s the median must reach; exit 1 if missed',
    )

    compare = sub.add_parser(
        'compare', help='glance-scrubber vs scrub-listener, A B A B'
    )
    _add_workload_args(compare, n_default=1000, pool_default=8)
    compare.add_argument(
        '--sizes',
        type=_int_list,
        help='scale curve: comma-separated N values (overrides -n)',
    )
    compare.add_argument(
        '--pools',
        type=_int_list,
        help='comma-separated scrub_pool_size values (overrides --pool)',
    )
    compare.add_argument(
        '--tools',
        default=','.join(runs_mod.TOOLS),
        help='comma-separated subset of %(default)s',
    )
    compare.add_argument(
        '--scrubber-max-n',
        type=int,
        default=20000,
        help='skip glance-scrubber above this N: at ~45 images/s, 100,000 '
        'images would take ~40 min (default: %(default)s)',
    )
    compare.add_argument(
        '--no-startup',
        action='store_true',
        help='skip the fixed-cost runs (N = 1)',
    )
    compare.add_argument(
        '--plot',
        metavar='PREFIX',
        help='write PNG plots to PREFIX-*.png (needs matplotlib)',
    )

    plot = sub.add_parser('plot', help='PNG plots from --json files')
    plot.add_argument('json_files', nargs='+')
    plot.add_argument(
        '--out', required=True, metavar='PREFIX', help='PREFIX-*.png'
    )

    micro = sub.add_parser(
        'micro', help='per-location cost of each layer of a store delete'
    )
    micro.add_argument('-n', type=int, default=3000)
    micro.add_argument('--size', type=int, default=65536)
    micro.add_argument('--pool', type=int, default=8)

    report = sub.add_parser(
        'report', help='Markdown tables from --json files (for the docs)'
    )
    report.add_argument('json_files', nargs='+')

    profile = sub.add_parser(
        'profile', help='summarize a py-spy raw profile by function'
    )
    profile.add_argument('raw_file')
    profile.add_argument('--top', type=int, default=25)

    from tools.bench import events

    events.add_parser(sub)
    return parser


# -- machine ---------------------------------------------------------------


def machine_info(backends=()):
    """What the numbers were measured on."""
    info = {
        'date': datetime.datetime.now(datetime.UTC).isoformat(
            timespec='seconds'
        ),
        'nproc': os.cpu_count(),
        'python': platform.python_version(),
        'platform': platform.platform(),
    }
    try:
        with open('/proc/meminfo') as f:
            info['mem_total_kib'] = int(f.readline().split()[1])
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    for backend in set(backends) - {'sqlite'}:
        try:
            rows = harness.fetch_all(
                harness._url_string(harness._admin_url(backend)),
                'SELECT version() AS v',
            )
            info[f'{backend}_version'] = rows[0]['v']
        except Exception as exc:  # noqa: BLE001 - informational only
            info[f'{backend}_version'] = f'unknown ({exc})'
    if 'sqlite' in backends:
        import sqlite3

        info['sqlite_version'] = sqlite3.sqlite_version
    for dist in ('glance', 'glance_store', 'SQLAlchemy', 'scrub-listener'):
        try:
            from importlib import metadata

            info[f'{dist}_version'] = metadata.version(dist)
        except Exception:  # noqa: BLE001
            pass
    try:
        info['git'] = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ['git', 'status', '--porcelain', '--', 'scrub_listener'],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
            timeout=10,
        ).stdout.strip()
        # The working tree is what an editable install runs: say whether
        # it differed from the commit (others may be editing it).
        info['scrub_listener_uncommitted_changes'] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _print_machine(info):
    mem = info.get('mem_total_kib', 0) / 1048576
    dbs = ', '.join(
        f'{k[: -len("_version")]} {v}'
        for k, v in info.items()
        if k in ('mysql_version', 'postgresql_version', 'sqlite_version')
    )
    print(
        f'# {info["nproc"]} CPUs ({info.get("cpu", "?")}), {mem:.1f} GiB, '
        f'Python {info["python"]}, glance '
        f'{info.get("glance_version", "?")}, {dbs}',
        flush=True,
    )


# -- commands --------------------------------------------------------------


def _common(args):
    return {
        'backend': args.backend,
        'size': args.size,
        'keep': args.keep,
        'queue_backend': args.queue_backend,
        'delay': args.delete_delay,
        'delay_per_mib': args.delete_delay_per_mib,
        'timeout': args.timeout,
        'keep_logs': args.keep_logs,
        'live': args.live,
        'code_dir': args.code_dir,
        'quiet_below': args.quiet_below,
        'quiet_wait': args.quiet_wait,
        'sync': args.sync,
    }


def _report(runs, args, info, extra=None):
    rows = runs_mod.summarize(runs)
    print()
    for line in runs_mod.summary_lines(rows):
        print(line)
    if args.json:
        _write_json(args.json, args, info, runs, rows, extra)
    return rows


def _write_json(path, args, info, runs, rows, extra):
    data = []
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.append(
        {
            'command': ' '.join(sys.argv),
            'args': {k: v for k, v in vars(args).items() if not callable(v)},
            'machine': info,
            'runs': [r.as_dict() for r in runs],
            'summary': rows,
            **(extra or {}),
        }
    )
    with open(path, 'w') as f:
        json.dump(data, f, indent=1, default=str)
    print(f'results appended to {path}')


def _print_run(run):
    print(run.line(), flush=True)
    if run.stderr_tail:
        print('    last stderr lines of the failed run:')
        for line in run.stderr_tail.splitlines():
            print(f'    | {line}')


def cmd_sweep(args):
    info = machine_info({args.backend, args.queue_backend})
    _print_machine(info)
    runs = []
    for rep in range(args.repeat):
        run = runs_mod.run_once(
            'scrub-listener',
            n=args.n,
            pool=args.pool,
            rep=rep,
            profile_to=args.profile,
            **_common(args),
        )
        _print_run(run)
        if run.tool_summary:
            print(f'    scrub-listener says: {run.tool_summary}', flush=True)
        runs.append(run)
    rows = _report(runs, args, info)
    if args.profile:
        from tools.bench import profile

        print()
        for line in profile.report(args.profile):
            print(line)
    ok = all(r.ok for r in runs)
    if ok and args.target and rows and rows[0]['rate'][0] < args.target:
        print(
            f'TARGET MISSED: median {rows[0]["rate"][0]:.1f} images/s < '
            f'{args.target:g} ({rows[0]["rate"][0] / args.target:.0%})'
        )
        return 1
    return 0 if ok else 1


def cmd_compare(args):
    tools = [t for t in args.tools.split(',') if t]
    unknown = set(tools) - set(runs_mod.TOOLS)
    if unknown:
        print(f'ERROR: unknown tools {sorted(unknown)}', file=sys.stderr)
        return 2
    sizes = args.sizes or [args.n]
    pools = args.pools or [args.pool]
    info = machine_info({args.backend, args.queue_backend})
    _print_machine(info)
    if args.visibility_note:
        print(args.visibility_note)
    runs = []
    skipped = []

    def record(run):
        _print_run(run)
        runs.append(run)

    for rep in range(args.repeat):
        if not args.no_startup:
            # Fixed cost (N = 1) at every pool size.  Not N = 0: with no
            # work, scrub-listener never starts its pool, and the pool's
            # shutdown is part of the fixed cost.
            for pool in pools:
                for tool in tools:
                    record(
                        runs_mod.run_once(
                            tool,
                            n=runs_mod.FIXED_N,
                            pool=pool,
                            rep=rep,
                            **_common(args),
                        )
                    )
        for n in sizes:
            for pool in pools:
                # why alternate: drift (page cache, DB buffer pool, other
                # load on a shared machine) then hits both tools alike.
                order = tools if rep % 2 == 0 else list(reversed(tools))
                for tool in order:
                    if tool == 'glance-scrubber' and n > args.scrubber_max_n:
                        if rep == 0:
                            skipped.append((tool, n, pool))
                            print(
                                f'{tool:15} N={n:<6} pool={pool:<2} skipped: '
                                f'N > --scrubber-max-n {args.scrubber_max_n}',
                                flush=True,
                            )
                        continue
                    record(
                        runs_mod.run_once(
                            tool, n=n, pool=pool, rep=rep, **_common(args)
                        )
                    )
    rows = _report(
        runs,
        args,
        info,
        {'skipped': [list(s) for s in skipped]},
    )
    if args.plot:
        from tools.bench import plot

        for path in plot.plot_rows(rows, args.plot, info):
            print(f'plot written to {path}')
    return 0 if all(r.ok for r in runs) else 1


def cmd_plot(args):
    from tools.bench import plot

    rows, info = [], {}
    for path in args.json_files:
        with open(path) as f:
            for entry in json.load(f):
                rows.extend(runs_mod.summarize_entry(entry))
                info = entry.get('machine', info)
    for path in plot.plot_rows(rows, args.out, info):
        print(f'plot written to {path}')
    return 0


def _md_spread(triple, fmt):
    med, lo, hi = triple
    return f'{format(med, fmt)} ({format(lo, fmt)}–{format(hi, fmt)})'


def markdown_tables(entries):
    """Markdown lines: one table per --json entry, straight from it."""
    lines = []
    for entry in entries:
        lines.append(f'`{_command_line(entry)}`')
        lines.append('')
        lines.append(_code_line(entry))
        lines.append('')
        lines.append(
            '| tool | N | pool | store delay | live images | ok/runs | '
            'images/s | net images/s | wall s | CPU s | DB server CPU s | '
            'kernel threads CPU s | peak RSS MiB | SL vs GS |'
        )
        lines.append('|' + '---|' * 14)
        for row in runs_mod.summarize_entry(entry):
            cells = [
                row['tool'],
                f'{row["n"]:,}',
                str(row['pool']),
                f'{row["delay"] * 1000:g} ms' if row['delay'] else '-',
                f'{row.get("live", 0):,}',
                f'{row["ok"]}/{row["reps"]}',
            ]
            if 'rate' in row:
                cells += [
                    _md_spread(row['rate'], '.0f') if row['n'] else '-',
                    f'{row["net_rate"]:.0f}' if 'net_rate' in row else '-',
                    _md_spread(row['wall'], '.2f'),
                    _md_spread(row['cpu'], '.2f'),
                    _md_spread(row['db_cpu'], '.2f')
                    if 'db_cpu' in row
                    else '-',
                    _md_spread(row['kernel_cpu'], '.2f')
                    if 'kernel_cpu' in row
                    else '-',
                    _md_spread(row['rss_mib'], '.0f'),
                ]
                if row.get('noisy'):
                    cells[5] += f' ({row["noisy"]} noisy)'
            else:
                cells += ['no verified run', '', '', '', '', '', '']
            ratio = ''
            if 'ratio' in row:
                ratio = runs_mod.ratio_text(row, times='×')
            cells.append(ratio)
            lines.append('| ' + ' | '.join(cells) + ' |')
        for tool, n, pool in entry.get('skipped', []):
            lines.append(
                f'| {tool} | {n:,} | {pool} | | | skipped (N > '
                f'--scrubber-max-n) | | | | | | | | |'
            )
        lines.append('')
    return lines


def _code_line(entry):
    machine = entry.get('machine', {})
    commit = entry.get('args', {}).get('code_commit')
    if commit:
        code = f'scrub_listener/ at commit {commit}'
    else:
        code = f'working tree at {machine.get("git", "?")}'
        if machine.get('scrub_listener_uncommitted_changes'):
            code += ' with uncommitted changes to scrub_listener/'
        elif 'scrub_listener_uncommitted_changes' not in machine:
            code += ' (uncommitted changes not recorded)'
    if entry.get('args', {}).get('sync', False):
        files = 'data files synced to disk before each run'
    else:
        files = 'data files not synced (still in the page cache)'
    return f'Measured {machine.get("date", "?")}, {code}; {files}.'


def _command_line(entry):
    command = entry['command']
    # sys.argv[0] is the path of __main__.py under ``python -m``.
    if command.split(' ', 1)[0].endswith('__main__.py'):
        command = 'python -m tools.bench ' + command.split(' ', 1)[1]
    return command


def cmd_report(args):
    entries = []
    for path in args.json_files:
        with open(path) as f:
            entries.extend(json.load(f))
    for line in markdown_tables(entries):
        print(line)
    return 0


def cmd_micro(args):
    from tools.bench import micro

    results = micro.run(args.n, args.size, args.pool)
    for line in micro.lines(results, args.n, args.size, args.pool):
        print(line)
    return 0


def cmd_profile(args):
    from tools.bench import profile

    for line in profile.report(args.raw_file, top=args.top):
        print(line)
    return 0


def cmd_events(args):
    from tools.bench import events

    return events.main(args)


def _sigterm(signum, frame):
    # Unwind like Ctrl-C, so the running child is killed and every
    # database of the run is dropped.
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    if getattr(args, 'code', None):
        with tempfile.TemporaryDirectory(prefix='sl_bench_code_') as tmp:
            args.code_commit = runs_mod.export_code(args.code, tmp)
            args.code_dir = tmp
            print(f'# scrub_listener/ as committed at {args.code_commit}')
            return _dispatch(args)
    args.code_dir = None
    return _dispatch(args)


def _dispatch(args):
    if args.command == 'compare':
        args.visibility_note = (
            '# images are visibility=shared: glance-scrubber 33.0.0 never '
            'scrubs community images'
        )
    handler = {
        'sweep': cmd_sweep,
        'compare': cmd_compare,
        'plot': cmd_plot,
        'report': cmd_report,
        'micro': cmd_micro,
        'profile': cmd_profile,
        'events': cmd_events,
    }[args.command]
    try:
        return handler(args)
    except harness.HarnessError as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
