"""Debian's Ceph packages and their Python bindings for the tox venv.

``ensure_packages()`` installs what a throw-away cluster needs with
``apt-get`` (as root); ``link_bindings()`` makes ``import rados, rbd``
work in a venv.  The bindings exist only as Debian packages built for
Debian's Python 3.11 (there are none on PyPI).
"""

import os
import pathlib
import shutil
import subprocess

# What a cluster with RBD needs; radosgw only for S3.
PACKAGES = ('ceph-mon', 'ceph-osd', 'python3-rados', 'python3-rbd')
RGW_PACKAGES = ('radosgw',)
BINDINGS = ('rados', 'rbd')
APT_TIMEOUT = 600


class CephUnavailable(Exception):
    """Ceph cannot be installed or started here; the message says why."""


def missing_packages(packages):
    """The names in ``packages`` that dpkg does not list as installed."""
    if not shutil.which('dpkg-query'):
        return list(packages)
    proc = subprocess.run(
        ['dpkg-query', '-W', '-f=${Package} ${db:Status-Status}\n']
        + list(packages),
        capture_output=True,
        text=True,
    )
    installed = {
        line.split()[0]
        for line in proc.stdout.splitlines()
        if line.endswith(' installed')
    }
    return [name for name in packages if name not in installed]


def _apt_install(names):
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    return subprocess.run(
        ['apt-get', 'install', '-y', '--no-install-recommends', *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=APT_TIMEOUT,
    )


def ensure_packages(rgw=False):
    """Install the Ceph packages that are missing; return their names.

    Raises ``CephUnavailable`` naming what is missing when they cannot be
    installed (not root, no ``apt-get``, or the install fails).
    """
    wanted = PACKAGES + (RGW_PACKAGES if rgw else ())
    missing = missing_packages(wanted)
    if not missing:
        return []
    hint = 'apt-get install -y ' + ' '.join(missing)
    if not shutil.which('apt-get'):
        raise CephUnavailable(f'no apt-get to install: {hint}')
    if os.geteuid() != 0:
        raise CephUnavailable(f'not root; install them with: {hint}')
    proc = _apt_install(missing)
    if proc.returncode != 0:
        # A fresh machine may have no package lists yet: update only then,
        # since "apt-get update" costs seconds and network every time.
        env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
        subprocess.run(
            ['apt-get', 'update'],
            capture_output=True,
            env=env,
            timeout=APT_TIMEOUT,
        )
        proc = _apt_install(missing)
    if proc.returncode != 0:
        raise CephUnavailable(
            f'{hint} failed (exit {proc.returncode}):\n'
            f'{proc.stdout[-2000:]}{proc.stderr[-2000:]}'
        )
    return missing


def _binding_files():
    """The ``rados`` and ``rbd`` extension modules, from dpkg's lists."""
    found = {}
    for package in ('python3-rados', 'python3-rbd'):
        proc = subprocess.run(
            ['dpkg', '-L', package], capture_output=True, text=True
        )
        for line in proc.stdout.splitlines():
            path = pathlib.Path(line)
            name = path.name.split('.', 1)[0]
            if path.suffix == '.so' and name in BINDINGS:
                found[name] = path
    missing = [name for name in BINDINGS if name not in found]
    if missing:
        raise CephUnavailable(
            f'no {", ".join(missing)} binding found; '
            'apt-get install -y python3-rados python3-rbd'
        )
    return found


def link_bindings(venv_site_packages):
    """Make ``import rados, rbd`` work in a venv; return the link folder.

    Puts links to the two ``.so`` files into ``ceph-bindings/`` beside
    the venv's site-packages and a ``ceph-bindings.pth`` naming it.  Not
    the whole of Debian's dist-packages: that would drag Debian's copies
    of other libraries (six, requests, ...) into the venv.  Idempotent.
    """
    site = pathlib.Path(venv_site_packages).resolve()
    folder = site / 'ceph-bindings'
    folder.mkdir(exist_ok=True)
    for path in _binding_files().values():
        link = folder / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path)
    (site / 'ceph-bindings.pth').write_text(f'{folder}\n')
    return folder
