"""Ingest: how fast the service turns notifications into due-queue rows.

``python -m tools.bench events --scenario ingest [-n N] [--configs
BATCH:PREFETCH,...] [--repeat R] [--prefill K] [--no-reference]
[--queue-backend sqlite|mysql|postgresql]``

N ``image.delete`` notifications are pre-loaded into the pool queue
``[listener] pool`` (declared exactly as oslo.messaging declares it),
then the service is started with a huge ``scrub_time`` (nothing becomes
due, the start-up sweep finds nothing) and the committed due-queue is
polled (``COUNT(*)``, autocommit) until it holds N rows.  Rate = rows
committed after the first poll that saw any / time from that poll to the
poll that saw N (start-up is not counted).  The same messages are then
consumed, from the same queue, by reference consumers in a child process
(:mod:`.consumer`): raw kombu consume+ack, a do-nothing oslo.messaging
notification listener (plain, and batch), timed in the child from the
first to the last message.  Several ``[listener] batch_size``/``prefetch``
pairs are tried (``--configs``).  Verified: exactly N rows, one per image,
``due_at = deleted_at (Glance DB) + scrub_time``, broker queue empty (all
acked), service exit 0 on SIGTERM, no error in its log.
"""

import datetime
import json
import statistics
import subprocess
import sys
import time

from tools import harness
from tools import service_process
from tools.bench.events import common
from tools.bench.events import consumer
from tools.bench.events import fixtures
from tools.bench.events import profiling


def run_consumer(world, kind, n, prefetch, batch_size=100, timeout=600):
    """Run one reference consumer on the pool queue; its JSON dict."""
    spec = {
        'kind': kind,
        'n': n,
        'queue': world.pool,
        'prefetch': prefetch,
        'batch_size': batch_size,
        'batch_timeout': 0.2,
        'timeout': timeout,
        'amqp_url': harness.amqp_url(world.transport_url),
        'transport_url': world.transport_url,
    }
    proc = subprocess.run(
        [sys.executable, '-P', consumer.__file__, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        cwd=world.workdir,
        env=service_process.child_env(),
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise harness.HarnessError(
            f'{kind} consumer failed (exit {proc.returncode}):\n'
            f'{proc.stderr[-3000:]}'
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
        when = common.as_datetime(r.deleted_at)
        if (
            r.location_id != 0
            or when != deleted_at.get(r.image_id)
            or common.as_datetime(r.due_at) - when != delay
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
    with world.product_queue() as due_queue:
        for start in range(0, count, 5000):
            due_queue.enqueue(fixtures.not_due(min(5000, count - start)))


def _ingest_service(world, args, ids, deleted_at, batch, prefetch, profile):
    n = len(ids)
    prefill = args.prefill
    label = f'service batch_size={batch} prefetch={prefetch}'
    if prefill:
        label += f' ({prefill:,} queued before)'
    world.reset_queue()
    if prefill:
        _prefill(world, prefill)
    pub_s = world.publish_deletes(ids)
    name = f'ingest-b{batch}-p{prefetch}'
    config = world.config(
        batch_size=batch, prefetch=prefetch, pool_size=args.pool
    )
    svc = world.service(name, config)
    calm = common.quiet(args)
    spawned_at = time.time()
    svc.start(wait=False)
    profiler = profiling.Profiler(
        args.profile if profile else None, 'ingest', svc.pid
    )
    samples = []
    rss_peak = 0
    started_line = None
    problems = []
    deadline = time.monotonic() + max(120.0, n / 100.0)
    interval = 0.05 if world.queue_url else 0.1
    cpu = common.CpuWindow(svc.pid)
    with cpu:
        while True:
            now = time.time()
            count = world.queue_count() - prefill
            samples.append((now, count))
            if started_line is None and service_process.STARTED_RE.search(
                svc.log()
            ):
                started_line = now
            rss_peak = max(
                rss_peak, common.proc_status(svc.pid).get('VmRSS', 0)
            )
            if count >= n:
                break
            if not svc.alive():
                problems.append(f'service exited ({svc.returncode})')
                break
            if time.monotonic() > deadline:
                problems.append(f'only {count} of {n} rows after the timeout')
                break
            time.sleep(interval)
        window = cpu.stop()
    status = common.proc_status(svc.pid)
    profile_path = profiler.stop()
    time.sleep(0.5)  # the last batch's acks follow its commit
    rc, stop_s = svc.stop()
    if rc != 0:
        problems.append(f'service exit code {rc} on SIGTERM')
    depth = world.purge_pool()
    if depth:
        problems.append(f'{depth} messages left in the broker queue')
    problems += _check_queue_rows(
        world, ids, common.NEVER, deleted_at, prefill
    )
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
        'default': (batch, prefetch)
        == (common.DEFAULT_BATCH, common.DEFAULT_PREFETCH),
        'prefilled': prefill,
        'n': n,
        'rate': rate,
        'rate_from_start_line': n / (done_at - started_line)
        if started_line and done_at > started_line
        else None,
        'seconds_from_spawn': done_at - spawned_at,
        'first_rows_at_s': first[0] - spawned_at if first else None,
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
    common.log(line)
    if profile_path:
        for text in profiling.profile_summary(profile_path):
            common.log('    ' + text)
    return run


def _ingest_reference(world, args, ids, kind, prefetch, batch):
    n = len(ids)
    pub_s = world.publish_deletes(ids)
    calm = common.quiet(args)
    with common.CpuWindow(None) as cpu:
        out = run_consumer(world, kind, n, prefetch, batch)
        window = cpu.stop()
    problems = []
    if out['count'] != n:
        problems.append(f'consumed {out["count"]} of {n}')
    depth = world.purge_pool()
    if depth:
        problems.append(f'{depth} messages left in the broker queue')
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
    common.log(
        f'  {label:58} '
        + (f'{rate:7.0f}/s' if rate else '      -  ')
        + f'  CPU {out["cpu"]:5.1f} s  RabbitMQ CPU '
        f'{window["broker_cpu_s"]:5.1f} s  maxrss '
        f'{run["maxrss_mib"]:5.1f} MiB  '
        + ('verified' if not problems else 'FAILED: ' + '; '.join(problems))
    )
    return run


def run(args):
    n = args.n or common.DEFAULT_N['ingest']
    result = {'scenario': 'ingest', 'n': n, 'repeat': args.repeat, 'runs': []}
    common.log(
        f'## ingest: {n:,} image.delete notifications from RabbitMQ into '
        f'the committed due-queue ({args.queue_backend}), '
        f'{args.repeat} repetition(s)'
    )
    with fixtures.World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        started = time.monotonic()
        ids = world.pending_images(n, size=1)
        deleted_at = {i: row[2] for i, row in world.glance_rows().items()}
        world.publisher.declare_pool_queue(world.pool)
        common.log(f'  setup {time.monotonic() - started:.1f} s')
        references = []
        if args.reference:
            references = [
                ('kombu', 0, None),
                ('oslo-plain', 0, None),
                ('oslo-batch', common.DEFAULT_PREFETCH, common.DEFAULT_BATCH),
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
        common.log('  median [min..max] over the repetitions:')
        for row in result['summary']:
            common.log(
                f'  {row["label"]:66} {common.num(row["rate"][0]):>6}/s '
                f'[{common.num(row["rate"][1])}..{common.num(row["rate"][2])}]'
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
        result['target'] = common.TARGETS['ingest_per_s']
        common.log(
            f'  => best {best["rate"][0]:.0f}/s (batch_size '
            f'{best["batch_size"]}, prefetch {best["prefetch"]}); default '
            + (f'{default["rate"][0]:.0f}/s' if default else 'not run')
            + f'; target {common.TARGETS["ingest_per_s"]:,}/s: '
            + common.verdict(best['rate'][0] >= common.TARGETS['ingest_per_s'])
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


def markdown(result, ok):
    """Markdown lines of one result (``ok``: its verdict word)."""
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
            f'{common.num(row.get("broker_cpu_s"), ".1f")} | '
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
            f'{common.num(result["default_rate"])}/s; target '
            f'{result["target"]:,}/s.',
        ]
    return lines
