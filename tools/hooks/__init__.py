"""The test side of the import hooks in ``tools/hooks/sitecustomize.py``.

The hooks run inside child processes; this module is what the parent (a
test, a benchmark) uses to switch them on and to read what they wrote:

``hook_env(**variables) -> dict``
    Environment additions for a child: ``PYTHONPATH`` with this directory
    first, plus the variables (see the sitecustomize docstring for each;
    an unknown name is a ``ValueError``, ``None`` leaves one out)::

        env = dict(os.environ, **hook_env(
            SL_TEST_DELETE_LOG=log.path, BENCH_STORE_DELETE_DELAY=0.05))

``DeleteLog`` / ``DeleteEvent``
    The ``SL_TEST_DELETE_LOG`` parsed: per call ``call`` then ``ok``,
    ``notfound`` or ``error``, with pid, time and path.
``SweepLog``
    The ``SL_TEST_SWEEP_LOG`` parsed: ``[(pid, start, end)]``.
``read_gone_log(path)``
    The ``BENCH_GONE_LOG`` parsed: ``[(time, path)]``.
``Gate``
    The server side of ``SL_TEST_GATE``: processes block at their first
    store delete (or restore) until ``release()``.
"""

import collections
import contextlib
import dataclasses
import os
import socket
import time

from tools.hooks import sitecustomize

#: The directory to put first on a child's PYTHONPATH.
HOOKS_DIR = os.path.dirname(os.path.abspath(__file__))
VARIABLES = sitecustomize.VARIABLES


def hook_env(env=None, **variables):
    """Environment additions switching the hooks of ``variables`` on.

    ``PYTHONPATH`` is this directory, then the one of ``env`` (default
    ``os.environ``).  Values are turned into strings; ``None`` is left
    out.  With no variables the hooks module is still imported by the
    child but installs nothing.
    """
    unknown = sorted(set(variables) - set(VARIABLES))
    if unknown:
        raise ValueError(f'unknown hook variables: {", ".join(unknown)}')
    base = (os.environ if env is None else env).get('PYTHONPATH')
    out = {'PYTHONPATH': os.pathsep.join(p for p in (HOOKS_DIR, base) if p)}
    out.update({k: str(v) for k, v in variables.items() if v is not None})
    return out


def _lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


@dataclasses.dataclass
class DeleteEvent:
    """One line of the delete log."""

    pid: int
    event: str
    time: float
    path: str


class DeleteLog:
    """The SL_TEST_DELETE_LOG written by the hooks, parsed.

    ``event``: ``call`` when a delete begins, then ``ok``, ``notfound``
    or ``error`` when it ends.
    """

    def __init__(self, path):
        self.path = str(path)

    def events(self):
        events = []
        for line in _lines(self.path):
            pid, event, when, path = line.split(' ', 3)
            events.append(DeleteEvent(int(pid), event, float(when), path))
        return events

    def calls(self, event='call'):
        return [e for e in self.events() if e.event == event]

    def calls_by_path(self, event='call'):
        counts = {}
        for e in self.calls(event):
            counts[e.path] = counts.get(e.path, 0) + 1
        return counts

    def paths_deleted_more_than_once(self):
        return {p: n for p, n in self.calls_by_path().items() if n > 1}

    def counts(self):
        """Counter of (event, path)."""
        return collections.Counter((e.event, e.path) for e in self.events())


class SweepLog:
    """The SL_TEST_SWEEP_LOG written by the hooks: [(pid, start, end)]."""

    def __init__(self, path):
        self.path = str(path)

    def runs(self):
        runs, open_runs = [], {}
        for line in _lines(self.path):
            pid, event, when = line.split()
            if event == 'start':
                if int(pid) in open_runs:
                    # a second start before the first ended: overlap
                    runs.append((int(pid), open_runs[int(pid)], None))
                open_runs[int(pid)] = float(when)
            else:
                runs.append((int(pid), open_runs.pop(int(pid)), float(when)))
        runs.extend((pid, start, None) for pid, start in open_runs.items())
        return sorted(runs, key=lambda r: r[1])


def read_gone_log(path):
    """[(time, path)] of the deletes that returned (BENCH_GONE_LOG)."""
    out = []
    for line in _lines(path):
        when, _, where = line.partition(' ')
        out.append((float(when), where))
    return out


class GateTimeout(AssertionError):
    """Some processes never reached the gate."""


class Gate:
    """Cross-process barrier: processes block in the hook's gate.

    Give ``SL_TEST_GATE=gate.address`` to the processes (``hook_env``).
    ``wait_for(procs)`` returns once each is at the gate (or has exited);
    ``release()`` lets them all go at once.  A process is anything with
    ``pid``, ``poll()`` and ``name`` (a ``tools.service_process``
    ``ChildProcess``).
    """

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(('127.0.0.1', 0))
        self._sock.listen(128)
        self._sock.settimeout(0.2)
        self.address = f'127.0.0.1:{self._sock.getsockname()[1]}'
        self._conns = []

    def wait_for(self, procs, timeout=90):
        """Wait until each of ``procs`` is at the gate or has exited;
        return those at the gate (the others' exit is for the caller to
        judge)."""
        deadline = time.monotonic() + timeout
        by_pid = {proc.pid: proc for proc in procs}
        arrived = {}
        while True:
            missing = [
                p
                for pid, p in by_pid.items()
                if pid not in arrived and p.poll() is None
            ]
            if not missing:
                return list(arrived.values())
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise GateTimeout(
                        f'{[p.name for p in missing]} did not reach the '
                        f'gate in {timeout} s'
                    ) from None
                continue
            conn.settimeout(30)
            pid = int(conn.recv(64).split()[0])
            self._conns.append(conn)
            arrived[pid] = by_pid[pid]

    def release(self):
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.sendall(b'x')
            conn.close()
        self._conns = []

    def close(self):
        self.release()
        self._sock.close()
