"""RPC restore: how long a restore takes over oslo.messaging RPC.

``python -m tools.bench events --scenario rpc [-n M] [--manage-runs K]``

The service runs (``scrub_time`` huge, nothing scrubbed) with M
pending_delete images queued through their notifications.  An
oslo.messaging RPC client in this process (reply queue warmed up by a
first ``status()``) times ``status()`` (the transport alone) and then
``restore(image_id)`` for each image in turn, each a real restore (image,
locations back to active, data checked in the store).  Then the whole
``scrub-listener-manage restore ID`` process (over RPC), and
``--direct``, K times each.  Verified: every reply names its image, every
restored image is active with its location active and its file present,
its queue entry gone, a repeated restore is refused with
``NotPendingDelete`` (typed, across the wire).
"""

import os
import time
import warnings

from tools import service_process
from tools.bench.events import common
from tools.bench.events import fixtures
from tools.bench.events import profiling


def run(args):
    m = args.n or common.DEFAULT_N['rpc']
    k = args.manage_runs
    result = {'scenario': 'rpc', 'n': m, 'manage_runs': k}
    common.log(
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

    with fixtures.World(args.queue_backend, args.keep_logs) as world:
        result['resources'] = world.created
        ids = world.pending_images(m + 2 * k, size=1024)
        world.publisher.declare_pool_queue(world.pool)
        # queued through their notifications, as in real life
        world.publish_deletes(ids)
        config = world.config(pool_size=args.pool)
        svc = world.service('rpc', config)
        svc.start(timeout=90)
        queued = fixtures.wait_count(world, svc, len(ids), 60)
        if queued != len(ids):
            problems.append(f'{queued} of {len(ids)} queued before restores')
        transport = oslo_messaging.get_rpc_transport(
            cfg.CONF,
            url=world.transport_url,
            allowed_remote_exmods=['scrub_listener.exceptions'],
        )
        client = oslo_messaging.get_rpc_client(
            transport,
            oslo_messaging.Target(topic=common.RPC_TOPIC, version='1.0'),
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
            result['quiet'] = common.quiet(args)
            profiler = profiling.Profiler(args.profile, 'rpc', svc.pid)
            restore_times = []
            with common.CpuWindow(svc.pid) as cpu:
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
                argv = ['restore', image_id]
                if mode == 'direct':
                    argv.append('--direct')
                rc, out, err, seconds = service_process.run_cli(
                    argv, svc.config_file
                )
                manage[mode].append(seconds)
                if rc != 0 or 'restored to active' not in out:
                    problems.append(
                        f'manage restore {mode} exit {rc}: '
                        f'{err.strip()[-300:]}'
                    )
        status = common.proc_status(svc.pid)
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
    rt = common.dist(restore_times, 1000)
    result.update(
        {
            'first_call_ms': first_call * 1000,
            'status_ms': common.dist(status_times, 1000),
            'restore_ms': rt,
            'manage_rpc_s': common.dist(manage['rpc']),
            'manage_direct_s': common.dist(manage['direct']),
            'repeat_restore': repeat,
            'repeat_restore_error_log_lines': expected_error_lines,
            'vmhwm_mib': status.get('VmHWM', 0) / 1024,
            'profile': profile_path,
            'profiled': bool(profile_path),
            **window,
            'target': common.TARGETS['rpc_p50_ms'],
            'problems': problems,
            'verified': not problems,
        }
    )
    common.log(
        f'  first call (reply queue set-up): {first_call * 1000:.1f} ms'
    )
    common.log(
        f'  status() round trip:  {common.fmt_dist(result["status_ms"], "ms")}'
    )
    common.log(
        f'  restore() round trip: {common.fmt_dist(rt, "ms")}'
        + (' (under py-spy)' if profile_path else '')
    )
    common.log(
        '  scrub-listener-manage restore (whole process, over RPC): '
        f'{common.fmt_dist(result["manage_rpc_s"], "s", 2)}'
    )
    common.log(
        '  scrub-listener-manage restore --direct (whole process): '
        f'{common.fmt_dist(result["manage_direct_s"], "s", 2)}'
    )
    common.log(
        f'  service CPU during the restores {window["service_cpu_s"]:.2f} s '
        f'(DB server {window["db_server_cpu_s"]:.2f} s) over '
        f'{window["wall_s"]:.2f} s; repeated restore -> {repeat}'
    )
    if rt.get('n'):
        target = common.TARGETS['rpc_p50_ms']
        common.log(
            f'  => p50 {rt["p50"]:.1f} ms; target < {target} ms: '
            + common.verdict(rt['p50'] < target)
        )
    common.log(
        '  '
        + ('verified' if not problems else 'FAILED: ' + '; '.join(problems))
    )
    if profile_path:
        for text in profiling.profile_summary(profile_path):
            common.log('    ' + text)
    return result


def markdown(result, ok):
    """Markdown lines of one result (``ok``: its verdict word)."""
    s = common.md_dist(result['status_ms'])
    r = common.md_dist(result['restore_ms'])
    mr = common.md_dist(result['manage_rpc_s'], '.2f')
    md = common.md_dist(result['manage_direct_s'], '.2f')
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
