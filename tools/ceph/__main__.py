"""``python -m tools.ceph start|stop|status DIR``: a cluster for people.

``start`` bootstraps a cluster in DIR (or restarts the one stopped
there, with its data) and prints what a client needs; ``stop`` stops it
(``--wipe`` also deletes DIR); ``status`` says what runs and how the
cluster is.
"""

import argparse
import sys

from tools.ceph.cluster import S3_ACCESS_KEY
from tools.ceph.cluster import S3_SECRET_KEY
from tools.ceph.cluster import CephCluster
from tools.ceph.packages import CephUnavailable
from tools.ceph.packages import ensure_packages


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m tools.ceph')
    parser.add_argument('action', choices=('start', 'stop', 'status'))
    parser.add_argument('directory')
    parser.add_argument('--rgw', action='store_true', help='also S3')
    parser.add_argument(
        '--mimic',
        action='store_true',
        help='require-min-compat-client mimic (RBD clone format 2)',
    )
    parser.add_argument('--wipe', action='store_true', help='stop: rm DIR')
    args = parser.parse_args(argv)
    cluster = CephCluster(
        args.directory,
        rgw=args.rgw,
        min_compat_client='mimic' if args.mimic else None,
        remove=False,
    )
    if args.action == 'start':
        try:
            ensure_packages(rgw=args.rgw)
            cluster.start()
        except (CephUnavailable, RuntimeError, TimeoutError) as exc:
            print(f'ceph: {exc}', file=sys.stderr)
            return 1
        print(f'ready after {cluster.start_seconds:.1f} s')
        print(f'CEPH_CONF={cluster.conf_path}  fsid {cluster.fsid}')
        print(f'pools: {", ".join(cluster.pools)}')
        if args.rgw:
            print(
                f'S3: {cluster.rgw_endpoint} '
                f'({S3_ACCESS_KEY} / {S3_SECRET_KEY})'
            )
        print(f'stop: python -m tools.ceph stop {cluster.directory}')
    elif args.action == 'stop':
        cluster.stop(remove=args.wipe)
    else:
        pids = cluster.running_pids()
        print(f'processes: {", ".join(map(str, pids)) or "none"}')
        if pids:
            client = cluster.connect(timeout=5)
            try:
                status = cluster.command(client, 'status')
            finally:
                client.shutdown()
            print(f'health: {status["health"]["status"]}')
            print(f'osdmap: {status["osdmap"]}')
            print(f'pgs: {status["pgmap"].get("pgs_by_state")}')
        return 0 if pids else 3
    return 0


if __name__ == '__main__':
    sys.exit(main())
