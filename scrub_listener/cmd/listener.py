"""``scrub-listener``: the scrub service, or one pass with --sweep-once."""

import queue
import signal
import sys

from scrub_listener import components
from scrub_listener import oneshot
from scrub_listener import opts
from scrub_listener.cmd import common


@common.reports_errors
def main(argv):
    conf = common.load_config(
        argv,
        'scrub-listener',
        cli_opts=opts.cli_opts,
        description='Scrub the data of images Glance deleted lazily: a '
        'service fed by image.delete notifications, or one pass with '
        '--sweep-once.',
    )
    if conf.dry_run and not conf.sweep_once:
        return common.usage_error('--dry-run only goes with --sweep-once')
    if conf.restore:
        if conf.sweep_once:
            return common.usage_error(
                '--restore and --sweep-once should not be set together'
            )
        # glance-scrubber's flag, kept for habit: same as
        # `scrub-listener-manage restore IMAGE_ID`.
        return common.restore(conf, conf.restore, direct=False)
    sys.setswitchinterval(SWITCH_INTERVAL)
    # --sweep-once builds the stores only if something is due
    parts = components.build(conf, with_stores=not conf.sweep_once)
    try:
        if conf.sweep_once:
            return _sweep_once(conf, parts)
        return _serve(conf, parts)
    finally:
        parts.close()


def _sweep_once(conf, parts):
    if conf.dry_run:
        oneshot.dry_run(parts, sys.stdout)
        return 0
    stats = oneshot.sweep_once(
        parts, sys.stdout, conf.scrubber.progress_interval
    )
    return 1 if stats.failed or stats.waiting_retry else 0


FATAL = 'fatal'

# How long a thread may hold the GIL while another waits for it (Python's
# default is 5 ms).  Store deletes are I/O: a pool thread whose delete
# returned waited up to 5 ms for the GIL while the scrub loop crunched a
# batch of rows, and with a 20 ms store that cost a third of the pool's
# time (137 against 183 deletes/s at pool 4, docs/performance.md).
SWITCH_INTERVAL = 0.0005


def _serve(conf, parts):
    # imported here: --sweep-once does not need oslo.messaging's start-up
    from scrub_listener import service

    # Signal handlers and the service's fatal-error callback only post an
    # event (SimpleQueue.put is reentrant, safe in a handler); the work
    # happens in the main thread below.
    events = queue.SimpleQueue()
    parts.scrubber  # noqa: B018 (built before any thread starts)
    server = service.Service(
        conf, parts, on_fatal=lambda exc: events.put(FATAL)
    )
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: events.put(signum))
    with common.messaging_config(conf):
        server.start()
    while (event := events.get()) == signal.SIGHUP:
        server.reload()
    # graceful_shutdown_timeout bounds stop(); deletes still running
    # then are abandoned by parts.close() (their leases are taken over).
    server.stop()
    return 1 if event == FATAL else 0


if __name__ == '__main__':
    sys.exit(main())
