"""Event-path benchmarks of the always-on service (work in progress)."""

import argparse

SCENARIOS = ('ingest', 'latency', 'rss', 'rpc')


def add_arguments(parser):
    parser.add_argument(
        '--scenario',
        default='all',
        choices=(*SCENARIOS, 'all'),
        help='which scenario to run (default: %(default)s)',
    )
    parser.add_argument('-n', type=int, default=None)


def add_parser(subparsers):
    """Register ``events`` on the subparsers of tools/bench/cli.py."""
    parser = subparsers.add_parser(
        'events',
        help='event path of the running service: ingest, latency, RSS, RPC',
    )
    add_arguments(parser)
    return parser


def main(args=None):
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog='python -m tools.bench events')
        add_arguments(parser)
        args = parser.parse_args(args)
    raise SystemExit('not implemented yet')
