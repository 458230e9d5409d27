"""``scrub-listener``: the scrub service, or one pass with --sweep-once."""

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
        description='Scrub the data of images Glance deleted lazily.',
    )
    if conf.dry_run and not conf.sweep_once:
        print('ERROR: --dry-run only goes with --sweep-once', file=sys.stderr)
        return 2
    if not conf.sweep_once:
        print(
            'ERROR: the always-on service is not available yet; use '
            '--sweep-once',
            file=sys.stderr,
        )
        return 2
    parts = components.build(conf)
    try:
        if conf.dry_run:
            oneshot.dry_run(parts, sys.stdout)
            return 0
        stats = oneshot.sweep_once(
            parts, sys.stdout, conf.scrubber.progress_interval
        )
    finally:
        parts.close()
    return 1 if stats.failed else 0


if __name__ == '__main__':
    sys.exit(main())
