"""Run one tool once on a fresh workload; record what it cost and did.

The two tools, run as an operator runs them:

``scrub-listener``
    ``scrub-listener --config-file F --sweep-once``
``glance-scrubber``
    ``glance-scrubber --config-file F`` (glance 33.0.0, one-shot: no
    ``--daemon``), with the same ``scrub_pool_size``.

Both read a config with the same ``[DEFAULT] scrub_time = 0``,
``scrub_pool_size``, ``enabled_backends = fs:file``, ``[database]
connection``, ``[glance_store] default_backend`` and ``[fs]
filesystem_store_datadir``; scrub-listener also gets ``state_path`` (its
SQLite due-queue lives there unless ``[scrub_queue] connection`` names a
database server).  Both log at their default level, to files.
"""

import dataclasses
import os
import re
import shutil
import statistics
import subprocess

from tools import harness
from tools import hooks
from tools.bench import measure
from tools.bench import workload as workload_mod

TOOLS = ('scrub-listener', 'glance-scrubber')
SHORT = {'scrub-listener': 'SL', 'glance-scrubber': 'GS'}
#: A run during which the rest of the machine kept more than this many
#: CPUs busy (database server excluded) is flagged NOISY.
NOISY = 0.5
#: Names of database server processes whose CPU time is recorded.
DB_SERVERS = {'mariadbd', 'mysqld'}

#: "net images/s" only when wall - fixed cost is at least this long.
NET_MIN_SECONDS = 1.0

#: N of the runs that measure a tool's fixed cost per process.
FIXED_N = 1

_DONE = re.compile(r'^Done: (?P<text>.*)$', re.MULTILINE)


def tool_bin(name):
    """Console script ``name`` next to the running python (the venv)."""
    return harness.bin_path(name, _exit_error)


def _exit_error(message):
    return SystemExit(f'ERROR: {message}')


def command(tool, config):
    if tool == 'scrub-listener':
        return [tool_bin(tool), '--config-file', config, '--sweep-once']
    if tool == 'glance-scrubber':
        return [tool_bin(tool), '--config-file', config]
    raise ValueError(f'unknown tool {tool!r}')


def export_code(rev, directory):
    """Export ``scrub_listener/`` at git revision ``rev`` into directory.

    Put first on the children's PYTHONPATH, it shadows the editable
    install (whose import finder comes after the path finder), so a run
    measures that commit, not a working tree others are editing.
    Returns the short commit hash.
    """
    repo = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    commit = subprocess.run(
        ['git', '-C', repo, 'rev-parse', '--short', rev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ['git', '-C', repo, 'archive', commit, 'scrub_listener'],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(['tar', '-x', '-C', directory], input=archive, check=True)
    return commit


def child_env(delete_delay=0.0, delete_delay_per_mib=0.0, code_dir=None):
    """Environment for both tools; with a delay, the slow-store patch."""
    env = dict(os.environ)
    if code_dir:
        env['PYTHONPATH'] = os.pathsep.join(
            p for p in (code_dir, env.get('PYTHONPATH')) if p
        )
    # The same for both tools: deprecation warnings off (their cost and
    # noise are not what we measure).
    env['PYTHONWARNINGS'] = 'ignore'
    if delete_delay or delete_delay_per_mib:
        # the shared import hook (tools/hooks) slows every store delete
        env.update(
            hooks.hook_env(
                env,
                BENCH_STORE_DELETE_DELAY=delete_delay,
                BENCH_STORE_DELETE_DELAY_PER_MIB=delete_delay_per_mib,
            )
        )
    return env


@dataclasses.dataclass
class Run:
    """One measured run (``n == FIXED_N``: a fixed-cost run)."""

    tool: str
    backend: str
    queue_backend: str
    n: int
    size: int
    pool: int
    delay: float
    rep: int
    wall: float = 0.0
    user: float = 0.0
    sys: float = 0.0
    rss_mib: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    verified: bool = False
    problems: list = dataclasses.field(default_factory=list)
    tool_summary: str = ''
    profiled: bool = False
    stderr_tail: str = ''
    live: int = 0
    # Shared machine: how long we waited for it to calm down, and how
    # busy the rest of it was during the run (CPUs, database excluded).
    quiet_wait: float = 0.0
    others: float = 0.0
    db_cpu: float | None = None
    kernel_cpu: float | None = None
    sync: bool = True

    @property
    def cpu(self):
        return self.user + self.sys

    @property
    def rate(self):
        return self.n / self.wall if self.wall and self.n else 0.0

    @property
    def ok(self):
        return self.verified and self.returncode == 0 and not self.timed_out

    def as_dict(self):
        data = dataclasses.asdict(self)
        data.update(cpu=self.cpu, rate=self.rate, ok=self.ok)
        return data

    def line(self):
        what = (
            f'{self.tool:15} N={self.n:<6} size={self.size} '
            f'pool={self.pool:<2} db={self.backend}'
        )
        if self.tool == 'scrub-listener':
            what += f' queue={self.queue_backend}'
        if self.delay:
            what += f' delay={self.delay * 1000:g}ms'
        if self.live:
            what += f' live={self.live}'
        if not self.sync:
            what += ' files-not-synced'
        numbers = (
            f'wall {self.wall:7.2f} s  cpu {self.cpu:7.2f} s '
            f'(user {self.user:.2f} + sys {self.sys:.2f})  '
            f'rss {self.rss_mib:6.1f} MiB'
        )
        if self.db_cpu is not None:
            numbers += f'  db cpu {self.db_cpu:6.2f} s'
        if self.kernel_cpu is not None:
            numbers += f'  kernel {self.kernel_cpu:5.2f} s'
        if self.n:
            numbers += f'  {self.rate:7.1f} images/s'
        if self.timed_out:
            verdict = 'TIMED OUT'
        elif self.returncode != 0:
            verdict = f'FAILED (exit {self.returncode})'
        elif self.problems:
            verdict = 'WRONG OUTCOME: ' + '; '.join(self.problems)
        else:
            verdict = 'verified'
        if self.profiled:
            verdict += ' (under py-spy: timings not comparable)'
        if self.others > NOISY:
            verdict += f' NOISY (rest of machine {self.others:.1f} CPUs)'
        return f'{what}  {numbers}  {verdict}'


def run_once(
    tool,
    backend='mysql',
    n=1000,
    size=65536,
    pool=8,
    queue_backend='sqlite',
    keep=5,
    delay=0.0,
    delay_per_mib=0.0,
    rep=0,
    timeout=900,
    profile_to=None,
    visibility='shared',
    keep_logs=None,
    live=0,
    code_dir=None,
    quiet_below=0.3,
    quiet_wait=300.0,
    sync=True,
):
    """Build a fresh workload, run ``tool`` on it, verify, clean up."""
    run = Run(
        tool,
        backend,
        queue_backend if tool == 'scrub-listener' else '-',
        n,
        size,
        pool,
        delay,
        rep,
        live=live,
        sync=sync,
    )
    load = workload_mod.Workload(
        backend=backend,
        count=n,
        size=size,
        keep=keep,
        queue_backend=queue_backend if tool == 'scrub-listener' else 'sqlite',
        visibility=visibility,
        live=live,
        sync=sync,
    )
    with load:
        config = load.write_config(tool, pool)
        argv = command(tool, config)
        if profile_to:
            argv = [
                tool_bin('py-spy'),
                'record',
                '--format',
                'raw',
                '--rate',
                '250',
                '--threads',
                '--idle',
                '--output',
                profile_to,
                '--',
                *argv,
            ]
            run.profiled = True
        if quiet_wait > 0:
            run.quiet_wait, _ = measure.wait_until_quiet(
                quiet_below, quiet_wait
            )
        db_pids = ()
        if 'mysql' in (backend, load.queue_backend):
            db_pids = measure.find_pids(DB_SERVERS)
        result = measure.run_child(
            argv,
            load.path('logs', 'stdout'),
            load.path('logs', 'stderr'),
            db_pids=db_pids,
            env=child_env(delay, delay_per_mib, code_dir),
            # not the repo: a python child would import scrub_listener
            # from its cwd before PYTHONPATH (``--code``)
            cwd=load.workdir,
            timeout=timeout,
        )
        run.wall, run.user, run.sys = result.wall, result.user, result.sys
        run.rss_mib = result.rss_mib
        run.db_cpu = result.db_cpu
        run.kernel_cpu = result.kernel_cpu
        if result.wall > 0:
            mine = result.cpu + (result.db_cpu or 0) + result.kernel_cpu
            run.others = max(0.0, (result.machine_busy - mine) / result.wall)
        run.returncode = result.returncode
        run.timed_out = result.timed_out
        done = _DONE.search(result.stdout())
        run.tool_summary = done.group('text') if done else ''
        if result.timed_out:
            run.problems = ['timed out']
        else:
            run.problems = load.verify()
        run.verified = not run.problems
        if (not run.ok) and keep_logs:
            _save_logs(load, keep_logs, run)
        if not run.ok:
            run.stderr_tail = result.stderr_tail(8)
    return run


def from_dict(data):
    """A Run back from ``Run.as_dict()`` (a --json file)."""
    names = {f.name for f in dataclasses.fields(Run)}
    return Run(**{k: v for k, v in data.items() if k in names})


def summarize_entry(entry):
    """Summary rows of one --json entry, recomputed from its runs."""
    return summarize([from_dict(r) for r in entry['runs']])


def _save_logs(load, directory, run):
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(
        directory, f'{SHORT[run.tool]}-n{run.n}-p{run.pool}-r{run.rep}'
    )
    for name in ('stdout', 'stderr'):
        shutil.copyfile(load.path('logs', name), f'{prefix}.{name}')
    run.problems.append(f'logs kept in {prefix}.stdout/.stderr')


# -- summaries -------------------------------------------------------------


def spread(values):
    """(median, min, max) of a non-empty list."""
    return statistics.median(values), min(values), max(values)


def group_key(run):
    return (run.n, run.size, run.pool, run.delay, run.backend, run.live)


def summarize(runs):
    """Rows of {key, tool, reps, ok, median/min/max of each measure}."""
    groups = {}
    for run in runs:
        groups.setdefault((group_key(run), run.tool), []).append(run)
    startup = _startup_walls(runs)
    rows = []
    for (key, tool), group in sorted(groups.items()):
        n, size, pool, delay, backend, live = key
        good = [r for r in group if r.ok]
        row = {
            'tool': tool,
            'n': n,
            'size': size,
            'pool': pool,
            'delay': delay,
            'backend': backend,
            'live': live,
            'queue_backend': group[0].queue_backend,
            'reps': len(group),
            'ok': len(good),
        }
        if good:
            for name in ('rate', 'wall', 'cpu', 'rss_mib'):
                row[name] = spread([getattr(r, name) for r in good])
            db = [r.db_cpu for r in good if r.db_cpu is not None]
            if db:
                row['db_cpu'] = spread(db)
            kernel = [r.kernel_cpu for r in good if r.kernel_cpu is not None]
            if kernel:
                row['kernel_cpu'] = spread(kernel)
            row['noisy'] = sum(r.others > NOISY for r in good)
            base = startup.get((tool, pool, delay, backend, live))
            # Only when the per-image part stands clear of the noise of a
            # shared machine (a few tenths of a second).
            if (
                n > FIXED_N
                and base is not None
                and row['wall'][0] - base >= NET_MIN_SECONDS
            ):
                # Per-image throughput without the fixed cost (start-up,
                # imports, pool start/stop): (N - 1) over (median wall -
                # median wall of the same tool on N = 1).
                row['net_rate'] = (n - FIXED_N) / (row['wall'][0] - base)
        rows.append(row)
    _add_ratios(rows)
    return rows


def _startup_walls(runs):
    walls = {}
    for run in runs:
        if run.n == FIXED_N and run.ok:
            key = (run.tool, run.pool, run.delay, run.backend, run.live)
            walls.setdefault(key, []).append(run.wall)
    return {k: statistics.median(v) for k, v in walls.items()}


def _add_ratios(rows):
    by_key = {}
    for row in rows:
        key = (row['n'], row['size'], row['pool'], row['delay'])
        key += (row.get('live', 0),)
        by_key.setdefault(key, {})[row['tool']] = row
    for pair in by_key.values():
        sl, gs = pair.get('scrub-listener'), pair.get('glance-scrubber')
        if not (sl and gs and 'rate' in sl and 'rate' in gs):
            continue
        if sl['n'] == 0:
            continue
        sl['ratio'] = sl['rate'][0] / gs['rate'][0]
        if 'net_rate' in sl and 'net_rate' in gs:
            sl['net_ratio'] = sl['net_rate'] / gs['net_rate']
        sl['rss_ratio'] = gs['rss_mib'][0] / sl['rss_mib'][0]
        sl['cpu_ratio'] = gs['cpu'][0] / sl['cpu'][0]


def _fmt(triple, fmt):
    med, lo, hi = triple
    return f'{format(med, fmt)} [{format(lo, fmt)}..{format(hi, fmt)}]'


def summary_lines(rows):
    """Human-readable summary table: median [min..max] per measure."""
    lines = [
        'Summary (median [min..max] over the verified runs; images/s = '
        'N / wall of the whole process; net = (N - 1) / (wall - wall at '
        'N=1), i.e. without the fixed cost per process)'
    ]
    for row in rows:
        head = (
            f'{row["tool"]:15} N={row["n"]:<6} pool={row["pool"]:<2} '
            f'size={row["size"]}'
        )
        if row['delay']:
            head += f' delay={row["delay"] * 1000:g}ms'
        if row.get('live'):
            head += f' live={row["live"]}'
        head += f' ({row["ok"]}/{row["reps"]} ok)'
        if 'rate' not in row:
            lines.append(f'{head}  no verified run')
            continue
        parts = []
        if row['n']:
            parts.append(f'images/s {_fmt(row["rate"], ".1f")}')
            if 'net_rate' in row:
                parts.append(f'net {row["net_rate"]:.1f}')
        parts += [
            f'wall {_fmt(row["wall"], ".2f")} s',
            f'cpu {_fmt(row["cpu"], ".2f")} s',
            f'rss {_fmt(row["rss_mib"], ".1f")} MiB',
        ]
        if 'db_cpu' in row:
            parts.append(f'db cpu {_fmt(row["db_cpu"], ".2f")} s')
        if 'kernel_cpu' in row:
            parts.append(f'kernel {_fmt(row["kernel_cpu"], ".2f")} s')
        if row.get('noisy'):
            parts.append(f'{row["noisy"]} noisy')
        lines.append(f'{head}  ' + '  '.join(parts))
        if 'ratio' in row:
            lines.append(
                '  => scrub-listener/glance-scrubber: ' + ratio_text(row)
            )
    return lines


def ratio_text(row, times='x'):
    """scrub-listener against glance-scrubber in a summary row that has
    ``ratio``: ``4.4x images/s (4.0x net), 7.5x less CPU, 1.2x less peak
    RSS``.  ``times`` is the sign after each factor ('×' in Markdown)."""
    text = f'{row["ratio"]:.1f}{times} images/s'
    if 'net_ratio' in row:
        text += f' ({row["net_ratio"]:.1f}{times} net)'
    return text + (
        f', {row["cpu_ratio"]:.1f}{times} less CPU, '
        f'{row["rss_ratio"]:.1f}{times} less peak RSS'
    )
