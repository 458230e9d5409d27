"""RSS: how much memory the service needs with a large queue or backlog.

``python -m tools.bench events --scenario rss [-n N] [--no-rss-contrast]``

/proc/PID/status of the service: idle with an empty queue; while it
consumes a backlog of N (default 100,000) notifications (VmRSS sampled
every 0.2 s, and VmHWM); and after a restart with the N entries queued
(not due) and an empty broker queue.  Plus the cost of the due-queue
queries the service runs, with the product's code, on those N rows.  For
contrast, the service consumes the same backlog once more with the bound
removed (``[oslo_messaging_rabbit] rabbit_qos_prefetch_count = 0``,
oslo.messaging's own default: unlimited).
"""

import datetime
import statistics
import time

import sqlalchemy as sa

from tools.bench.events import common
from tools.bench.events import fixtures


def _memory(svc):
    """{vmrss_mib, vmhwm_mib} of the running service, now."""
    status = common.proc_status(svc.pid)
    return {
        'vmrss_mib': status.get('VmRSS', 0) / 1024,
        'vmhwm_mib': status.get('VmHWM', 0) / 1024,
    }


def _rss_backlog(world, config, name, n, problems):
    """Start the service on a backlog of ``n``; sample its RSS until the
    due-queue holds ``n`` rows.  Returns (phase dict, running service)."""
    svc = world.service(name, config)
    svc.start(wait=False)
    started = time.monotonic()
    with common.Sampler(
        lambda: common.proc_status(svc.pid).get('VmRSS', 0), 0.2
    ) as s:
        count = fixtures.wait_count(world, svc, n, max(300.0, n / 100.0))
    took = time.monotonic() - started
    status = common.proc_status(svc.pid)
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
    from scrub_listener import glance_db

    started_at = glance_db.utcnow()
    with world.product_queue() as due_queue:
        out = {}
        for name, func in (
            ('next_wakeup', due_queue.next_wakeup),
            ('claim_nothing_due', lambda: due_queue.claim('bench', 500)),
            ('enqueue_100', lambda: due_queue.enqueue(fixtures.not_due(100))),
        ):
            func()  # warm
            started = time.perf_counter()
            for _ in range(reps):
                func()
            out[name] = (time.perf_counter() - started) / reps * 1000
        # leave the queue as the scenario expects it
        with due_queue.engine.begin() as conn:
            conn.execute(
                sa.text('DELETE FROM scrub_queue WHERE due_at > :t'),
                {
                    't': started_at
                    + fixtures.NOT_DUE_IN
                    - datetime.timedelta(seconds=1)
                },
            )
    return out


def run(args):
    n = args.n or common.DEFAULT_N['rss']
    result = {'scenario': 'rss', 'n': n, 'phases': {}}
    common.log(
        f'## rss: the service with {n:,} queued entries, and consuming a '
        f'{n:,}-message broker backlog (defaults: batch_size '
        f'{common.DEFAULT_BATCH}, prefetch {common.DEFAULT_PREFETCH})'
    )
    problems = []
    phases = result['phases']
    with fixtures.World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        started = time.monotonic()
        ids = world.pending_images(n, size=1)
        world.publisher.declare_pool_queue(world.pool)
        common.log(f'  setup {time.monotonic() - started:.1f} s')
        config = world.config(pool_size=args.pool)

        # 1. idle, empty queue
        svc = world.service('rss-idle', config)
        svc.start(timeout=90)
        time.sleep(3)
        phases['idle_empty'] = _memory(svc)
        rc, _ = svc.stop()
        if rc != 0:
            problems.append(f'idle service exit code {rc}')
        world.reset_queue()

        # 2. a backlog of n in the broker, consumed
        pub_s = world.publish_deletes(ids)
        common.log(f'  published {n:,} messages in {pub_s:.1f} s')
        result['quiet'] = common.quiet(args)
        phases['consuming_backlog'], svc = _rss_backlog(
            world, config, 'rss-backlog', n, problems
        )
        time.sleep(5)
        phases['after_backlog_n_queued'] = _memory(svc)
        rc, _ = svc.stop()
        if rc != 0:
            problems.append(f'backlog service exit code {rc}')
        problems += [f'log: {line}' for line in svc.problems_in_log()[:3]]
        depth = world.purge_pool()
        if depth:
            problems.append(f'{depth} messages left in the broker')

        # 3. restart with n entries queued, nothing in the broker
        svc = world.service('rss-queued', config)
        svc.start(timeout=90)
        time.sleep(5)
        phases['restart_n_queued'] = {
            **_memory(svc),
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
            world.publish_deletes(ids)
            unbounded = world.config(
                pool_size=args.pool,
                extra={
                    'oslo_messaging_rabbit': {'rabbit_qos_prefetch_count': 0}
                },
            )
            common.quiet(args)
            phases['contrast_prefetch_unlimited'], svc = _rss_backlog(
                world, unbounded, 'rss-unbounded', n, problems
            )
            rc, _ = svc.stop()
            if rc != 0:
                problems.append(f'unbounded service exit code {rc}')
            if world.purge_pool():
                problems.append('messages left in the broker (unbounded)')
    peak = max(
        phases['consuming_backlog']['vmhwm_mib'],
        phases['restart_n_queued']['vmhwm_mib'],
    )
    target = common.TARGETS['rss_mib']
    result.update(
        {
            'peak_mib': peak,
            'target': target,
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
        common.log(f'  {names[key]:58} {text}')
    common.log(
        f'  => peak VmHWM {peak:.1f} MiB; target < {target} MB: '
        + common.verdict(peak < target)
    )
    common.log(
        '  '
        + ('verified' if not problems else 'FAILED: ' + '; '.join(problems))
    )
    return result


def markdown(result, ok):
    """Markdown lines of one result (``ok``: its verdict word)."""
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
                'vmrss_mib': ph['consuming_backlog']['vmrss_sampled_max_mib'],
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
            f'| {label} | {common.num(values.get("vmrss_mib"), ".1f")} | '
            f'{common.num(values.get("vmhwm_mib"), ".1f")} |'
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
