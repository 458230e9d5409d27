"""A throw-away single-node Ceph cluster: 1 mon, 1 memstore OSD, radosgw.

``CephCluster`` bootstraps and starts the daemons in a directory of its
own (config, mon store, OSD, logs, pid files, admin sockets), on ports
nobody else uses, with ``auth none``; no systemd.  ``stop()`` ends every
process whose command line names this cluster's ``ceph.conf``, so it also
stops a cluster started by another process (the CLI).
"""

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from tools.ceph.packages import CephUnavailable
from tools.ceph.packages import _binding_files

MON_ID = 'a'
OSD_ID = 0
RGW_NAME = 'client.rgw.x'
S3_ACCESS_KEY = 'glance-access'
S3_SECRET_KEY = 'glance-secret'
# The OSD binds several ports (public, cluster, heartbeats; v1 and v2)
# from this range, taking the next one when a port is in use, so clusters
# running at once share it.  Below the kernel's ephemeral range (32768+),
# from which _free_port() takes the mon and radosgw ports.
OSD_PORT_RANGE = (16800, 17299)

_CONF = """\
[global]
fsid = {fsid}
mon initial members = {mon_id}
mon host = {mon_addrs}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind port min = {osd_port_min}
ms bind port max = {osd_port_max}
auth cluster required = none
auth service required = none
auth client required = none
run dir = {dir}/run
# a unix socket path has at most 107 bytes: keep the directory short
admin socket = {dir}/run/$cluster-$name.asok
pid file = {dir}/run/$cluster-$name.pid
log file = {dir}/log/$cluster-$name.log
mon cluster log file = {dir}/log/$cluster.log
crash dir = {dir}/crash
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
# no mgr runs, so nothing would autoscale anyway
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# the servers' disks are often nearly full: do not stop the mon for it
mon data avail warn = 2
mon data avail crit = 1
mon warn on insecure global id reclaim allowed = false

[mon]
mon data = {dir}/mon/$cluster-$id
# default 1 s: every pool or snapshot change (each rbd snap create,
# protect, remove: each glance add or delete) waits for a paxos round;
# 0.05 s makes a glance add or delete take ~0.1 s instead of ~1 s
paxos propose interval = 0.05
# a port taken since _free_port(): exit at once, start() then retries
# with new ports (the default retries the bind 3 times, 5 s apart; the
# count is of attempts: 0 would never bind)
ms bind retry count = 1

[osd]
osd data = {dir}/osd/$cluster-$id
osd objectstore = memstore
# Pacific's default fast shutdown skips unmounting the store, so memstore
# would not save its RAM contents on SIGTERM and a restarted OSD would
# come back with no PGs (all data lost)
osd fast shutdown = false
memstore device bytes = {memstore_bytes}
osd crush update on start = true
osd crush initial weight = 1
# two cores shared with others: few threads
osd op num shards = 1
osd op num threads per shard = 2

[{rgw_name}]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {dir}/rgw/$cluster-$id
rgw dns name = 127.0.0.1
rgw thread pool size = 32
# radosgw waits up to this long on SIGTERM before exiting (default 120;
# it took ~5 s here): nothing of its own to save, its data is in RADOS
rgw exit timeout secs = 1
# radosgw asks for "secure" mon connections, which auth none cannot give
# (symptom: "get_initial_auth_request returned -13", then after 300 s
# "failed to fetch mon config")
ms mon client mode = crc
"""


def import_bindings():
    """Return the ``rados`` and ``rbd`` modules.

    From ``sys.path`` when ``link_bindings()`` made them importable, else
    loaded straight from Debian's files (only for Python 3.11).
    """
    try:
        import rados
        import rbd
    except ImportError:
        for name, path in sorted(_binding_files().items()):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as exc:
                raise CephUnavailable(
                    f'cannot load {path} in Python '
                    f'{sys.version.split()[0]}: {exc}'
                ) from exc
            sys.modules[name] = module
        import rados
        import rbd
    return rados, rbd


def _free_port():
    # The kernel hands out a port nobody listens on; the daemon binds it a
    # moment later.  Another process could take it in between: start()
    # then fails fast (the mon exits) and retries with new ports.
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _listening(port):
    socket.create_connection(('127.0.0.1', port), timeout=1).close()
    return True


def _cmdline(pid):
    try:
        raw = pathlib.Path(f'/proc/{pid}/cmdline').read_bytes()
    except OSError:
        return []
    return raw.decode(errors='replace').split('\0')


class CephCluster:
    """A throw-away Ceph cluster in ``directory``; a context manager.

    ``with CephCluster(rgw=True) as cluster:`` bootstraps (first time) or
    restarts (after ``stop(remove=False)``) the daemons, creates ``pools``
    (application ``rbd``) and returns once an object can be written to
    and read from each of them.  On exit, even after an error, every
    daemon is stopped and, with ``remove`` (the default), the directory
    is deleted.  ``min_compat_client='mimic'`` makes librbd clone in
    format 2 by default (``rbd_default_clone_format = auto``), as on
    clouds where glance_store then trashes parents; without it, clones
    use format 1 unless a client asks for ``rbd_default_clone_format=2``
    (allowed on this Pacific cluster either way).
    """

    def __init__(
        self,
        directory=None,
        *,
        pools=('images', 'vms'),
        rgw=False,
        min_compat_client=None,
        memstore_bytes=2 * 1024**3,
        timeout=120,
        remove=True,
    ):
        if directory is None:
            # /tmp, not a deep test path: admin sockets live in here
            directory = tempfile.mkdtemp(prefix='ceph-', dir='/tmp')
        self.directory = pathlib.Path(directory).absolute()
        self.conf_path = self.directory / 'ceph.conf'
        self.pools = tuple(pools)
        self.rgw = rgw
        self.min_compat_client = min_compat_client
        self.memstore_bytes = memstore_bytes
        self.timeout = timeout
        self.remove = remove
        self.start_seconds = None
        self._pgid = None

    # ------------------------------------------------------------ facts

    def _conf_value(self, key):
        # our own ceph.conf, "key = value" lines
        for line in self.conf_path.read_text().splitlines():
            name, _, value = line.partition(' = ')
            if name == key:
                return value
        raise KeyError(f'{key} not in {self.conf_path}')

    @property
    def fsid(self):
        """The cluster's fsid (the first part of an ``rbd://`` URL)."""
        return self._conf_value('fsid')

    @property
    def rgw_endpoint(self):
        """``http://127.0.0.1:PORT`` of radosgw (S3), or None."""
        if not self.rgw:
            return None
        port = self._conf_value('rgw frontends').rsplit(':', 1)[-1]
        return f'http://127.0.0.1:{port}'

    def connect(self, timeout=10, **conf):
        """A connected ``rados.Rados``; the caller calls ``shutdown()``.

        ``timeout`` bounds the connect and every later mon and OSD call
        (librados waits 300 s by default); ``conf`` adds client options,
        e.g. ``rbd_default_clone_format='2'``.
        """
        rados, _ = import_bindings()
        options = {
            'client_mount_timeout': str(timeout),
            'rados_mon_op_timeout': str(timeout),
            'rados_osd_op_timeout': str(timeout),
            **{key: str(value) for key, value in conf.items()},
        }
        client = rados.Rados(conffile=str(self.conf_path), conf=options)
        try:
            client.connect(timeout=timeout)
        except BaseException:
            client.shutdown()
            raise
        return client

    def command(self, client, prefix, **args):
        """Run a mon command (``ceph PREFIX ...``); return its JSON reply."""
        request = json.dumps({'prefix': prefix, 'format': 'json', **args})
        ret, out, err = client.mon_command(request, b'', timeout=10)
        if ret != 0:
            raise RuntimeError(f'ceph {prefix} {args}: {ret} {err}')
        return json.loads(out) if out.strip() else None

    # ---------------------------------------------------------- daemons

    def _spawn(self, *argv):
        # -f: stay in the foreground (no daemonizing), so the daemons are
        # our children, in one process group of their own: stop() can
        # SIGKILL that group whatever state the daemons are in, and a
        # Ctrl-C at the terminal does not reach them.
        if self._pgid and self._group_gone(self._pgid):
            self._pgid = None  # all gone (a mon that failed): a new group
        with open(self.directory / 'log' / 'daemons.out', 'ab') as out:
            proc = subprocess.Popen(
                [*argv, '-f', '-c', str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=self._pgid or 0,
            )
        self._pgid = self._pgid or proc.pid
        return proc

    def _run(self, *argv):
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=self.timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f'{" ".join(argv)} failed (exit {proc.returncode}):\n'
                f'{proc.stdout[-2000:]}{proc.stderr[-2000:]}'
            )
        return proc

    def _wait(self, what, condition, procs=()):
        # A bounded wait on a condition, failing at once if a daemon died.
        deadline = time.monotonic() + self.timeout
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f'{proc.args[0]} exited ({proc.returncode}) while '
                        f'waiting for {what}; logs in {self.directory}/log'
                        f'\n{self._log_tail()}'
                    )
            try:
                result = condition()
            except Exception as exc:
                result, error = None, exc
            else:
                error = None
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f'ceph: no {what} after {self.timeout} s ({error}); '
                    f'logs in {self.directory}/log\n{self._log_tail()}'
                )
            time.sleep(0.1)

    def _log_tail(self):
        lines = []
        for log in sorted((self.directory / 'log').glob('*')):
            tail = log.read_text(errors='replace').splitlines()[-5:]
            lines += [f'{log.name}: {line}' for line in tail]
        return '\n'.join(lines)

    def _write_conf(self):
        mon_addrs = (
            f'[v2:127.0.0.1:{_free_port()},v1:127.0.0.1:{_free_port()}]'
        )
        self.conf_path.write_text(
            _CONF.format(
                fsid=uuid.uuid4(),
                mon_id=MON_ID,
                mon_addrs=mon_addrs,
                osd_port_min=OSD_PORT_RANGE[0],
                osd_port_max=OSD_PORT_RANGE[1],
                dir=self.directory,
                memstore_bytes=self.memstore_bytes,
                rgw_name=RGW_NAME,
                rgw_port=_free_port(),
            )
        )
        return mon_addrs

    def _mon_answers(self):
        # short: a connect waits for a mon that is not up yet but does not
        # notice it die (a port taken: it exits at once), so try again
        # often, checking in between that it still runs
        self.connect(timeout=2).shutdown()
        return True

    def _start_mon(self):
        mon_dir = self.directory / 'mon' / f'ceph-{MON_ID}'
        for attempt in range(3):
            if not (mon_dir / 'done').exists():
                mon_addrs = self._write_conf()
                shutil.rmtree(mon_dir, ignore_errors=True)
                monmap = self.directory / 'monmap'
                self._run(
                    'monmaptool', '--create', '--clobber', '--fsid', self.fsid,
                    '--addv', MON_ID, mon_addrs, str(monmap),
                )  # fmt: skip
                self._run(
                    'ceph-mon', '-c', str(self.conf_path), '-i', MON_ID,
                    '--mkfs', '--monmap', str(monmap),
                )  # fmt: skip
                (mon_dir / 'done').touch()
            mon = self._spawn('ceph-mon', '-i', MON_ID)
            try:
                self._wait('mon', self._mon_answers, [mon])
            except RuntimeError:
                # most likely a port taken since _free_port(): new ports
                # (possible only before the OSD exists)
                osd_done = self.directory / 'osd' / f'ceph-{OSD_ID}' / 'done'
                if attempt == 2 or osd_done.exists():
                    raise
                (mon_dir / 'done').unlink()
                continue
            return mon, self.connect()

    def _start_osd(self, client):
        osd_dir = self.directory / 'osd' / f'ceph-{OSD_ID}'
        if not (osd_dir / 'done').exists():
            shutil.rmtree(osd_dir, ignore_errors=True)
            osd_dir.mkdir(parents=True)
            osd_uuid = str(uuid.uuid4())
            osd_id = self.command(client, 'osd new', uuid=osd_uuid)
            if osd_id['osdid'] != OSD_ID:
                raise RuntimeError(f'unexpected OSD id {osd_id}')
            self._run(
                'ceph-osd', '-c', str(self.conf_path), '-i', str(OSD_ID),
                '--mkfs', '--osd-uuid', osd_uuid,
            )  # fmt: skip
            (osd_dir / 'done').touch()
        return self._spawn('ceph-osd', '-i', str(OSD_ID))

    def _create_pools(self, client):
        existing = set(client.list_pools())
        for pool in self.pools:
            if pool not in existing:
                self.command(client, 'osd pool create', pool=pool, pg_num=8)
                self.command(
                    client,
                    'osd pool application enable',
                    pool=pool,
                    app='rbd',
                )
        if self.min_compat_client:
            self.command(
                client,
                'osd set-require-min-compat-client',
                version=self.min_compat_client,
            )

    def _pools_writable(self, client):
        # Ready means data really goes through: the PGs are active and the
        # OSD answers (bounded by the client's rados_osd_op_timeout).
        for pool in self.pools:
            with client.open_ioctx(pool) as ioctx:
                ioctx.write_full('_ready', b'ok')
                if ioctx.read('_ready') != b'ok':
                    return False
                ioctx.remove_object('_ready')
        return True

    def _start_rgw(self):
        rgw = self._spawn('radosgw', '-n', RGW_NAME)
        port = int(self.rgw_endpoint.rsplit(':', 1)[1])
        self._wait('radosgw', lambda: _listening(port), [rgw])
        admin = ('radosgw-admin', '-c', str(self.conf_path), '-n', RGW_NAME)
        info = subprocess.run(
            [*admin, 'user', 'info', '--uid=glance'], capture_output=True
        )
        if info.returncode != 0:  # not there yet: a first start
            self._run(
                *admin, 'user', 'create', '--uid=glance',
                '--display-name=glance', f'--access-key={S3_ACCESS_KEY}',
                f'--secret-key={S3_SECRET_KEY}',
            )  # fmt: skip

    def start(self):
        """Bootstrap or restart the cluster and wait until it is ready."""
        started = time.monotonic()
        for sub in ('mon', 'osd', 'log', 'run', 'crash', 'rgw/ceph-rgw.x'):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        if self.running_pids():
            raise RuntimeError(f'a cluster already runs in {self.directory}')
        try:
            mon, client = self._start_mon()
            try:
                osd = self._start_osd(client)
                self._wait(
                    'OSD up',
                    lambda: self.command(client, 'osd stat')['num_up_osds'],
                    [mon, osd],
                )
                self._create_pools(client)
                self._wait(
                    'writable pools',
                    lambda: self._pools_writable(client),
                    [mon, osd],
                )
            finally:
                client.shutdown()
            if self.rgw:
                self._start_rgw()
        except BaseException:
            self.stop(remove=False)
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def running_pids(self):
        """Pids of live processes whose command line names our conf."""
        conf = str(self.conf_path)
        pids = []
        for entry in pathlib.Path('/proc').iterdir():
            if entry.name.isdigit() and conf in _cmdline(entry.name):
                pids.append(int(entry.name))
        return pids

    def stop(self, remove=None, grace=30):
        """Stop every daemon; delete the directory if ``remove``.

        SIGTERM first, radosgw and OSD before the mon (the OSD saves its
        memstore data on a clean stop and needs the mon for it), one
        after the other; after ``grace`` seconds in all, SIGKILL of the
        process group and of any daemon left.
        """
        order = ('radosgw', 'ceph-osd', 'ceph-mon')
        pids = self.running_pids()
        pids.sort(key=lambda pid: order.index(self._name(pid)))
        deadline = time.monotonic() + grace
        for pid in pids:
            self._signal(pid, signal.SIGTERM)
            while self._alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        survivors = self.running_pids()
        for pgid in {self._group(pid) for pid in survivors}:
            # never our own group (daemons are started in one of theirs)
            if pgid not in (None, os.getpgrp()):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        for pid in survivors:
            self._signal(pid, signal.SIGKILL)
        self._pgid = None
        if self.remove if remove is None else remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def _name(pid):
        argv = _cmdline(pid)
        name = os.path.basename(argv[0]) if argv else ''
        return name if name in ('radosgw', 'ceph-osd') else 'ceph-mon'

    @staticmethod
    def _group_gone(pgid):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    @staticmethod
    def _group(pid):
        try:
            return os.getpgid(pid)
        except ProcessLookupError:
            return None

    @staticmethod
    def _alive(pid):
        # Our own children stay zombies until we reap them; the CLI's
        # orphans until pid 1 does, which here took ~2 s: a zombie counts
        # as stopped.
        try:
            reaped, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            reaped = 0
        try:
            stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
        except OSError:
            return False
        return not reaped and stat.rsplit(')', 1)[1].split()[0] != 'Z'

    @staticmethod
    def _signal(pid, signum):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()  # start() kept the directory, for its logs
            raise

    def __exit__(self, *exc_info):
        self.stop()
