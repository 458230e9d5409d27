"""Latency: how soon after an image is due its data is gone.

``python -m tools.bench events --scenario latency [--rate R] [--duration
S] [--scrub-time T] [--pool P] [--wakeup-time W]``

The service runs with ``scrub_time`` = 2 s.  Active images (with data)
are deleted at a steady rate (``--rate`` per second for ``--duration``
s): each deletion is the Glance rows update glance-api makes under
``delayed_delete``, then the notification.  The shared import hook
(:mod:`tools.hooks`, ``BENCH_GONE_LOG``), put first on the service's
``PYTHONPATH``, wraps glance_store's filesystem ``Store.delete`` and logs
``time.time()`` per path when the delete returned (the product is
unchanged).  Latency = gone - due, due =
``deleted_at`` as stored in the Glance DB + ``scrub_time`` (the service's
own definition of due).  Verified: every image ``deleted``, every file
gone, each deleted once.  glance-scrubber's latency with ``wakeup_time``
W is computed for contrast, not measured.
"""

import os
import time

import sqlalchemy as sa

from tools import glance_rows
from tools import hooks
from tools.bench.events import common
from tools.bench.events import fixtures
from tools.bench.events import profiling


def _delete_images(engine, publisher, ids, rate, record):
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
            publisher.publish(fixtures.glance_message(image_id, size=4096))
    return time.monotonic() - started


def run(args):
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
    common.log(
        f'## latency: due -> data gone, {n} deletions at {args.rate:g}/s, '
        f'scrub_time {scrub_time} s, scrub_pool_size {args.pool}'
    )
    problems = []
    with fixtures.World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        ids = world.pending_images(n, size=4096, active=True)
        world.publisher.declare_pool_queue(world.pool)
        os.sync()
        config = world.config(scrub_time=scrub_time, pool_size=args.pool)
        # the shared import hook logs when each delete returned
        gone_log = world.path('gone.log')
        svc = world.service(
            'latency', config, env=hooks.hook_env(BENCH_GONE_LOG=gone_log)
        )
        calm = common.quiet(args)
        svc.start(timeout=90)
        time.sleep(1.0)  # the start-up sweep (nothing due) is over
        profiler = profiling.Profiler(args.profile, 'latency', svc.pid)
        deleted = {}
        engine = sa.create_engine(world.glance_url)
        paths = {os.path.join(world.store_dir, i): i for i in ids}
        with common.CpuWindow(svc.pid) as cpu:
            try:
                publish_s = _delete_images(
                    engine, world.publisher, ids, args.rate, deleted
                )
            finally:
                engine.dispose()
            deadline = time.monotonic() + scrub_time + 60
            left = set(paths)
            while left and time.monotonic() < deadline and svc.alive():
                left = {p for p in left if os.path.exists(p)}
                time.sleep(0.1)
            window = cpu.stop()
        status = common.proc_status(svc.pid)
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
        gone = hooks.read_gone_log(gone_log)
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
        due = common.epoch(deleted_at_db[image_id]) + scrub_time
        latencies.append(when - due)
        after_real.append(when - deleted[image_id])
    lat = common.dist(latencies)
    if len(latencies) != n:
        problems.append(f'{len(latencies)} of {n} deletes logged')
    result.update(
        {
            'latency_s': lat,
            'gone_after_real_delete_s': common.dist(after_real),
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
    common.log(
        f'  published {n} deletions in {publish_s:.1f} s '
        f'({result["achieved_rate"]:.1f}/s)'
    )
    common.log(
        f'  due -> gone: {common.fmt_dist(lat, "s", 3)}'
        + (' (under py-spy)' if profile_path else '')
    )
    common.log(
        '  (real delete -> gone: '
        f'{common.fmt_dist(result["gone_after_real_delete_s"], "s", 3)}; '
        f'scrub_time {scrub_time} s; Glance stores deleted_at in whole '
        'seconds on MariaDB)'
    )
    common.log(
        f'  service CPU {window["service_cpu_s"]:.1f} s over '
        f'{window["wall_s"]:.1f} s, VmHWM {result["vmhwm_mib"]:.1f} MiB, '
        f'others {window["others_busy_cpus"]:.2f} CPUs'
    )
    common.log(
        f'  glance-scrubber (computed) with wakeup_time {w} s: mean/p50 '
        f'{w / 2:.0f} s, p99 {0.99 * w:.0f} s, max {w} s, plus its pass'
    )
    if lat.get('n'):
        result['target'] = common.TARGETS['latency_p99_s']
        common.log(
            f'  => p99 {lat["p99"]:.3f} s; target < '
            f'{common.TARGETS["latency_p99_s"]:g} s: '
            + common.verdict(lat['p99'] < common.TARGETS['latency_p99_s'])
        )
    common.log(
        '  '
        + (
            'verified'
            if result['verified']
            else 'FAILED: ' + '; '.join(problems)
        )
    )
    if profile_path:
        for text in profiling.profile_summary(profile_path):
            common.log('    ' + text)
    return result


def markdown(result, ok):
    """Markdown lines of one result (``ok``: its verdict word)."""
    p50, p90, p99, mx = common.md_dist(result['latency_s'], '.3f')
    r50, r90, r99, rmx = common.md_dist(
        result['gone_after_real_delete_s'], '.3f'
    )
    gs = result['glance_scrubber_computed']
    return [
        f'**latency**, {result["n"]} deletions at '
        f'{result["achieved_rate"]:.1f}/s, scrub_time '
        f'{result["scrub_time"]} s, scrub_pool_size {result["pool"]} '
        f'({ok}' + ('; under py-spy' if result.get('profiled') else '') + ')',
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
