"""PNG plots of benchmark summaries (matplotlib, a bench-only dependency).

``plot_rows(rows, prefix, machine)`` writes, from the summary rows of
:func:`tools.bench.runs.summarize` (also stored in the ``--json`` files):

``PREFIX-scale.png``
    images/s and peak RSS against N (log scales), one line per tool and
    scrub_pool_size, median with min..max bars; when more than one N was
    measured.
``PREFIX-pools.png``
    images/s against scrub_pool_size, one line per tool and per store
    delay; when more than one pool size was measured.
"""

import matplotlib

matplotlib.use('Agg')

from matplotlib import pyplot  # noqa: E402
from matplotlib import ticker  # noqa: E402

# N = 1 runs measure the fixed cost per process; they are not a point
# of a curve.
FIXED_N = 1
_PLAIN = ticker.FuncFormatter(lambda v, _: f'{v:,.0f}')


def _minor_label(value, _):
    # On log axes, label 2x and 5x of each decade, plainly.
    if value <= 0:
        return ''
    lead = f'{value:e}'[0]
    return f'{value:,.0f}' if lead in '25' else ''


def _plain_log_y(ax):
    ax.yaxis.set_major_formatter(_PLAIN)
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_minor_label))


COLORS = {'scrub-listener': 'tab:blue', 'glance-scrubber': 'tab:red'}
LINES = ('-', '--', ':', '-.')


def _dedup(rows):
    latest = {}
    for row in rows:
        if 'rate' not in row and row['n']:
            continue
        key = (row['tool'], row['n'], row['pool'], row['delay'], row['size'])
        latest[key] = row
    return list(latest.values())


def _subtitle(machine, rows):
    sizes = sorted({r['size'] for r in rows})
    size = ', '.join(
        f'{s // 1024} KiB' if s % 1024 == 0 else f'{s} B' for s in sizes
    )
    backend = rows[0]['backend']
    version = machine.get(f'{backend}_version', '')
    db = {'mysql': 'MariaDB/MySQL', 'postgresql': 'PostgreSQL'}.get(
        backend, 'SQLite'
    )
    if 'MariaDB' in version:
        db = 'MariaDB'
    db += ' ' + version.split('-')[0].split(' ')[0]
    return (
        f'{machine.get("nproc", "?")} CPUs, Glance DB on {db}, {size} '
        'images, glance-scrubber from glance 33.0.0'
    )


def _bars(triples):
    meds = [t[0] for t in triples]
    lows = [t[0] - t[1] for t in triples]
    highs = [t[2] - t[0] for t in triples]
    return meds, [lows, highs]


def _label_points(ax, xs, ys):
    """Write each point's value next to it."""
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(
            f'{y:.0f}', (x, y), textcoords='offset points', xytext=(4, 4)
        )


def _finish_axis(ax, xticks, log_y):
    """Ticks at the measured x values, plain numbers, grid, legend."""
    ax.set_xticks(sorted(xticks))
    if log_y:
        _plain_log_y(ax)
    ax.xaxis.set_major_formatter(_PLAIN)
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path, machine, rows):
    """Title, layout, write the figure to ``path``; return ``path``."""
    fig.suptitle(_subtitle(machine, rows), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return path


def _series(rows, group, x):
    series = {}
    for row in rows:
        series.setdefault(tuple(row[k] for k in group), []).append(row)
    for key in series:
        series[key].sort(key=lambda r: r[x])
    return dict(sorted(series.items()))


def plot_scale(rows, path, machine):
    rows = [r for r in rows if r['n'] > FIXED_N and 'rate' in r]
    fig, (ax_rate, ax_rss) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    pools = {r['pool'] for r in rows}
    for (tool, pool, delay), points in _series(
        rows, ('tool', 'pool', 'delay'), 'n'
    ).items():
        if len(points) < 2:
            continue
        xs = [p['n'] for p in points]
        label = f'{tool} (pool {pool}'
        label += f', +{delay * 1000:g} ms/delete)' if delay else ')'
        style = dict(
            color=COLORS.get(tool), marker='o', capsize=3, label=label
        )
        style['linestyle'] = LINES[sorted(pools).index(pool) % len(LINES)]
        meds, err = _bars([p['rate'] for p in points])
        ax_rate.errorbar(xs, meds, yerr=err, **style)
        _label_points(ax_rate, xs, meds)
        meds, err = _bars([p['rss_mib'] for p in points])
        ax_rss.errorbar(xs, meds, yerr=err, **style)
        _label_points(ax_rss, xs, meds)
    ax_rate.set(
        xscale='log',
        yscale='log',
        xlabel='pending_delete images (N)',
        ylabel='images/s (whole process, start-up included)',
        title='Throughput',
    )
    ax_rss.set(
        xscale='log',
        xlabel='pending_delete images (N)',
        ylabel='peak RSS (MiB)',
        title='Peak memory',
    )
    ax_rss.set_ylim(bottom=0)
    for ax in (ax_rate, ax_rss):
        _finish_axis(ax, {r['n'] for r in rows}, log_y=ax is ax_rate)
    return _save(fig, path, machine, rows)


def plot_pools(rows, path, machine):
    rows = [r for r in rows if r['n'] > FIXED_N and 'rate' in r]
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    for (tool, delay, n), points in _series(
        rows, ('tool', 'delay', 'n'), 'pool'
    ).items():
        if len(points) < 2:
            continue
        xs = [p['pool'] for p in points]
        meds, err = _bars([p['rate'] for p in points])
        label = f'{tool}, N={n}'
        label += f', +{delay * 1000:g} ms/delete' if delay else ''
        ax.errorbar(
            xs,
            meds,
            yerr=err,
            color=COLORS.get(tool),
            marker='o' if delay else 's',
            linestyle='--' if delay else '-',
            capsize=3,
            label=label,
        )
        _label_points(ax, xs, meds)
    ax.set(
        xscale='log',
        yscale='log',
        xlabel='scrub_pool_size',
        ylabel='images/s (whole process)',
        title='What scrub_pool_size buys',
    )
    _finish_axis(ax, {r['pool'] for r in rows}, log_y=True)
    return _save(fig, path, machine, rows)


def plot_rows(rows, prefix, machine):
    """Write the plots that the rows have data for; return their paths."""
    rows = _dedup(rows)
    written = []
    by_tool_n = {}
    by_tool_pool = {}
    for row in rows:
        if row['n'] > FIXED_N:
            by_tool_n.setdefault(row['tool'], set()).add(row['n'])
            by_tool_pool.setdefault(row['tool'], set()).add(row['pool'])
    if any(len(ns) > 1 for ns in by_tool_n.values()):
        written.append(plot_scale(rows, f'{prefix}-scale.png', machine))
    if any(len(ps) > 1 for ps in by_tool_pool.values()):
        written.append(plot_pools(rows, f'{prefix}-pools.png', machine))
    return written
