"""Who holds a claim: this process, named so it can be recognised later.

A claim on Glance location rows is written into the row itself, as the
status ``scrubbing:<token>`` (Glance's ``status`` column is 30
characters; ``scrubbing:`` takes 10, the token the other 20).  The token
is unique per claim, so it fences exactly: a worker moves only rows that
still carry its own token.  It also says who wrote it:

``<host tag: 4 hex><pid: 7 hex><nonce: 9 hex>``

The host tag is a hash of ``[DEFAULT] host``.  When a claim of *this* host
names a process that no longer runs (a service killed with SIGKILL and
restarted), its claims are taken over at once instead of after
``lease_time``.  Getting that wrong is harmless by construction: a claim
taken over is never handed back to ``pending_delete`` (and so to a
restore), because a delete of the old holder might still be running (see
:mod:`scrub_listener.glance_db`).  At worst a live worker is judged dead
(two hosts with one ``host`` value) and both delete the same data, which
is idempotent.  A dead worker judged alive (its pid reused by another
program) is only waited for, up to ``lease_time``.

Due-queue leases carry the same identity (``host:pid:nonce``), for the
same reason.
"""

import hashlib
import os
import secrets
import threading

TOKEN_LENGTH = 20
_TAG, _PID = 4, 7


def host_tag(host):
    """4 hex characters naming ``host`` inside a claim token."""
    return hashlib.sha256(host.encode('utf-8')).hexdigest()[:_TAG]


def pid_alive(pid):
    """True unless no process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except (OverflowError, ValueError):
        return False
    return True


_PROCESSES = {}
_PROCESSES_LOCK = threading.Lock()


def this_process(host):
    """The one :class:`Process` of this process for ``host``.

    One per process, whoever asks: two objects would each take the
    other's claims for those of a dead predecessor (same pid, unknown
    token).
    """
    key = (host, os.getpid())
    with _PROCESSES_LOCK:
        if key not in _PROCESSES:
            _PROCESSES[key] = Process(host)
        return _PROCESSES[key]


class Process:
    """This process as a claim holder: makes tokens, recognises the dead.

    Use :func:`this_process`; ``pid`` and ``alive`` are for tests.
    """

    def __init__(self, host, pid=None, alive=pid_alive):
        self.host = host
        self.pid = os.getpid() if pid is None else pid
        self.tag = host_tag(host)
        self.nonce = secrets.token_hex(4)
        self._alive = alive
        self._lock = threading.Lock()
        self._held = set()

    # -- claim tokens (Glance rows) --------------------------------------

    def new_token(self):
        """A fresh claim token; held until :meth:`drop` is called."""
        token = (
            f'{self.tag}{self.pid:0{_PID}x}'[: _TAG + _PID]
            + secrets.token_hex(5)[: TOKEN_LENGTH - _TAG - _PID]
        )
        with self._lock:
            self._held.add(token)
        return token

    def drop(self, token):
        """The claim ``token`` is over (finished or abandoned)."""
        with self._lock:
            self._held.discard(token)

    def holds(self, token):
        with self._lock:
            return token in self._held

    def holder_is_dead(self, token):
        """True when ``token`` was written by a process of this host that
        no longer runs (or by an earlier process with our pid)."""
        if not token or len(token) != TOKEN_LENGTH:
            return False  # a legacy claim, or not ours to judge
        if token[:_TAG] != self.tag:
            return False
        try:
            pid = int(token[_TAG : _TAG + _PID], 16)
        except ValueError:
            return False
        if pid == self.pid:
            return not self.holds(token)
        return not self._alive(pid)

    # -- due-queue lease owners -------------------------------------------

    @property
    def lease_owner(self):
        """Lease owner name in the due-queue: readable in listings."""
        return f'{self.host}:{self.pid}:{self.nonce}'

    def lease_owner_is_dead(self, owner):
        """True when ``owner`` is a lease of this host whose process is
        gone (or an earlier process with our pid)."""
        host, sep, rest = (owner or '').rpartition(':')
        host, sep2, pid = host.rpartition(':')
        if not (sep and sep2) or host != self.host:
            return False
        try:
            pid = int(pid)
        except ValueError:
            return False
        if pid == self.pid:
            return owner != self.lease_owner
        return not self._alive(pid)
