"""A project-owned, throw-away single-node Ceph cluster (RBD, S3).

One monitor, one memstore OSD (data in RAM), optionally radosgw for S3,
``auth none``, no systemd, every file in one directory, on ports of its
own so that several clusters can run at once.  Built on Debian's
packages: ``ensure_packages()`` installs them (root, apt-get) and
``link_bindings()`` makes ``import rados, rbd`` work in a venv (the
bindings exist only as Debian packages for Python 3.11).

Tests::

    from tools import ceph

    ceph.ensure_packages()            # raises CephUnavailable: skip
    with ceph.CephCluster(min_compat_client='mimic') as cluster:
        client = cluster.connect()    # a rados.Rados; shutdown() it
        ...                           # cluster.conf_path, cluster.fsid

People::

    python -m tools.ceph start /tmp/ceph1 [--rgw] [--mimic]
    python -m tools.ceph status /tmp/ceph1
    python -m tools.ceph stop /tmp/ceph1 [--wipe]

The recipe it grew from, with its pitfalls, is in
``../shared/recipes/ceph/``; the pitfalls are commented where they bite.
"""

from tools.ceph.cluster import S3_ACCESS_KEY
from tools.ceph.cluster import S3_SECRET_KEY
from tools.ceph.cluster import CephCluster
from tools.ceph.cluster import import_bindings
from tools.ceph.packages import CephUnavailable
from tools.ceph.packages import ensure_packages
from tools.ceph.packages import link_bindings

__all__ = [
    'S3_ACCESS_KEY',
    'S3_SECRET_KEY',
    'CephCluster',
    'CephUnavailable',
    'ensure_packages',
    'import_bindings',
    'link_bindings',
]
