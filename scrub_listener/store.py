"""glance_store adapter: where a location lives, what data it names, and
deleting that data.

Single-store (``[glance_store] stores/default_store``) or multi-store
(``enabled_backends``) is decided once, here, from the configuration, the
way glance-api decides it.  Every delete goes through glance_store's own
backend for the location, so every store Glance supports works.

Safety rules (a scrubber that deletes the wrong data cannot be undone):

* **Refused, never guessed at** (LocationRefused): a location whose
  scheme (or ``store``) is not one of our configured backends, or whose
  URI the backend's own parser rejects.
* **File containment is checked on the path the driver unlinks.** The
  filesystem driver deletes ``netloc + path``: ``file://backup/<datadir>/x``
  is ``backup/<datadir>/x`` under the working directory and
  ``file://localhost/p`` is ``localhost/p``.  A file location is refused
  unless that path is absolute and, symlinks followed, strictly inside a
  configured data directory.
* **NotFound is trusted per scheme** (:meth:`Stores._confirm_gone`): for
  a file store only when every data directory that should hold the file
  exists, is a directory, is on the device it was on when the service
  started, and is not empty (else an unmounted NFS export would make
  every image "already gone" while its data waits on the real disk); for
  a multi-store location without ``store`` metadata, only when no other
  candidate backend holds the data.  Other schemes keep glance-scrubber's
  rule (NotFound = gone) until they get their own.
* **Say whether the data is intact.** A StoreError carries
  ``data_intact=True`` when the store certainly removed nothing, so the
  caller may offer the data to a restore again; any other failure may
  have left it partly gone.
* **One location, one failure.** Anything unexpected while handling one
  location fails that location (LocationRefused from :meth:`Stores.resolve`,
  StoreError from :meth:`Stores.delete` / :meth:`Stores.check_present`)
  with a message naming the location id, never escapes as a traceback.
* **No secrets in messages.** Texts never quote a location URI (swift and
  s3 URIs carry credentials; glance_store's BadStoreUri quotes them); what
  glance_store says is passed through :func:`redaction.redact` with the
  URI itself replaced by ``<location ID>``.  Exceptions are raised
  ``from None`` so that no raw text rides along as ``__cause__``.

What data a URI names — for "does a live location still use this data?"
— is :func:`data_key`.
"""

import logging
import os
import posixpath
import re
import stat
import urllib.parse
import uuid

import glance_store
from glance_store import exceptions as store_exc
from glance_store import location as store_location
from glance_store._drivers import filesystem as fs_driver
from glance_store._drivers import rbd as rbd_driver
from glance_store._drivers import s3 as s3_driver

from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener import redaction

LOG = logging.getLogger(__name__)

FILE_SCHEMES = ('file', 'filesystem')
READ_ONLY_SCHEMES = ('http', 'https')

# scheme -> family: the schemes of one driver name the same data.
_FAMILY = {
    'file': 'file',
    'filesystem': 'file',
    's3': 's3',
    's3+http': 's3',
    's3+https': 's3',
    'swift': 'swift',
    'swift+http': 'swift',
    'swift+https': 'swift',
    'swift+config': 'swift',
    'http': 'http',
    'https': 'http',
}
# Explicit default ports name the same service; a family mixes http and
# https transports, so both defaults go.
_DEFAULT_PORT = re.compile(r':(80|443)?$')


def register_opts(conf):
    """Register glance_store's options (needs enabled_backends parsed)."""
    if conf.enabled_backends:
        glance_store.register_store_opts(conf)
    else:
        glance_store.register_opts(conf)


# ------------------------------------------------------------ data identity


class UnparseableKey:
    """The :func:`data_key` of a URI no driver can parse.

    Equal only to itself (identity), so it never matches another
    location, not even one with the same text.  Its repr shows nothing of
    the URI.
    """

    __slots__ = ()

    def __repr__(self):
        return '<unparseable location>'


def data_key(uri):
    """The identity of the data ``uri`` names, as its driver touches it.

    Usable without configured stores; never raises.  Keys are hashable
    and carry no credentials.

    * ``file``/``filesystem``: ``('file', realpath)`` of the path the
      filesystem driver unlinks (``netloc + path``, parsed by its own
      StoreLocation).  ``file://<d>/./x``, ``file://<d>//x``,
      ``file://<d>/sub/../x``, a symlink to ``<d>/x`` all give the key of
      ``<d>/x``; ``file://localhost/<d>/x`` gives the key of the relative
      path ``localhost/<d>/x`` (resolved against this process's working
      directory, as the driver in this process would), not of ``<d>/x``.
    * ``rbd``: ``('rbd', fsid, pool, image)``: the snapshot is ignored,
      since glance_store removes the whole RBD image.  The short form
      ``rbd://<image>`` gives ``('rbd', None, None, image)``.
    * ``cinder``: ``('cinder', volume uuid)``.
    * others (s3, swift, http, …): ``(family, host, path)``: the scheme
      family (``s3+https`` → ``s3``), the host lowercased with the
      credentials and a default port (80/443) stripped, the path
      unquoted and normalised (``//``, ``.``, ``..``), query and fragment
      dropped.
    * unparseable: an :class:`UnparseableKey`, equal to nothing else.

    **What equal keys mean.** Two URIs with the same key name the same
    data, or data we cannot tell apart: deleting one through glance_store
    may remove what the other reads, so a caller keeps the data.  The key
    errs only in that direction (credentials, default ports, ``s3`` vs
    ``s3+https``, query strings and symlinks are ignored), which at worst
    keeps data that could have gone.  Different keys mean deleting one
    does not touch the other's data — exactly so for file (symlinks as
    they are when the key is computed; a data directory's own path as it
    was when the stores were built), cinder and 4-part RBD URIs.
    Known limits, left for the per-store issues: the S3 driver contacts
    its configured ``s3_store_host``, not the URI's host, so two spellings
    of one S3 service differ; and a short-form ``rbd://<image>`` never
    equals the 4-part URI of the same RBD image.
    """
    try:
        if not isinstance(uri, str):
            return UnparseableKey()
        scheme = urllib.parse.urlsplit(uri).scheme
        if not scheme:
            return UnparseableKey()
        family = _FAMILY.get(scheme, scheme)
        builder = _KEY_BUILDERS.get(family, _generic_key)
        return builder(family, uri)
    except Exception:
        # Whatever the URI holds, the caller gets a key, never a crash.
        return UnparseableKey()


def _file_key(family, uri):
    return ('file', realpath(_driver_path(uri)))


# Data directories resolved once, as Stores does with its roots:
# {directory as configured: its realpath}.
_DATA_DIRECTORIES = {}


def remember_data_directory(directory):
    """Resolve ``directory`` once, for :func:`realpath`."""
    normalised = os.path.normpath(directory)
    _DATA_DIRECTORIES[normalised] = os.path.realpath(normalised)


def realpath(path):
    """``os.path.realpath(path)``, cheap for a file in a data directory.

    Images live directly in a store's data directory, whose realpath is
    taken once per process (:class:`Stores`).  For ``<datadir>/<name>``
    the answer is then that realpath joined with ``name`` — unless
    ``name`` is a symlink (one ``lstat``), which is resolved in full like
    any other path.  ``os.path.realpath`` walks every component in
    Python: two of them per deleted image cost more CPU than the delete.
    """
    directory, name = os.path.split(path)
    real_directory = _DATA_DIRECTORIES.get(directory)
    if real_directory is None or name in ('', '.', '..'):
        return os.path.realpath(path)
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return os.path.realpath(path)
    except FileNotFoundError:
        pass  # realpath leaves a missing last component as it is
    except OSError:
        return os.path.realpath(path)
    return os.path.join(real_directory, name)


def _driver_path(uri):
    """The path the filesystem driver computes for ``uri`` (netloc + path)."""
    parsed = fs_driver.StoreLocation({}, None)
    parsed.parse_uri(uri)
    return parsed.path


def _rbd_key(family, uri):
    parsed = rbd_driver.StoreLocation({}, None)
    parsed.parse_uri(uri)
    return ('rbd', parsed.fsid, parsed.pool, parsed.image)


def _s3_key(family, uri):
    # The s3 driver's own parse validates; its service URL still holds
    # any credentials, which end at the last '@'.
    parsed = s3_driver.StoreLocation({}, None)
    parsed.parse_uri(uri)
    host = parsed.s3serviceurl.rpartition('@')[2]
    return ('s3', _host(host.partition('/')[0]), parsed.bucket, parsed.key)


def _cinder_key(family, uri):
    # As the cinder driver parses it: the last segment is the volume id
    # (cinder://<store>/<id> or cinder://<id>).  Its module needs
    # os-brick, so it is not imported here.
    return ('cinder', str(uuid.UUID(uri.split('/')[-1])))


def _generic_key(family, uri):
    rest = uri.split('://', 1)[1]
    rest = re.split(r'[?#]', rest, maxsplit=1)[0]
    # Credentials end at the last '@' (a secret may hold '/' or '@').
    rest = rest.rpartition('@')[2]
    host, _, path = rest.partition('/')
    path = posixpath.normpath('/' + urllib.parse.unquote(path).lstrip('/'))
    return (family, _host(host), path)


def _host(host):
    if not host:
        raise ValueError('no host')
    return _DEFAULT_PORT.sub('', host.lower()).rstrip('.')


_KEY_BUILDERS = {
    'file': _file_key,
    'rbd': _rbd_key,
    's3': _s3_key,
    'cinder': _cinder_key,
}


# ------------------------------------------------------------------ stores


class Stores:
    """The configured glance_store backends.

    Built once per process.  The data directories of the file backends
    are resolved (realpath) and their device (``st_dev``) recorded here:
    a later NotFound is only believed while they are still on that device
    (see :meth:`_confirm_gone`).
    """

    def __init__(self, conf):
        self._conf = conf
        self.multi = bool(conf.enabled_backends)
        try:
            if self.multi:
                glance_store.create_multi_stores(conf)
                glance_store.verify_store()
            else:
                glance_store.create_stores(conf)
                glance_store.verify_default_store()
        except (store_exc.GlanceStoreException, RuntimeError) as exc:
            raise exceptions.ConfigError(
                '[glance_store] configuration is not usable: '
                + redaction.redact(str(exc))
            ) from None
        groups = list(conf.enabled_backends) if self.multi else []
        # realpath once: fixed for the life of the process, and a realpath
        # per location is measurable at thousands of deletes per second.
        self._roots = {
            group: [os.path.realpath(d) for d in _datadirs(conf, group)]
            for group in groups or ['glance_store']
        }
        for group in groups or ['glance_store']:
            for directory in _datadirs(conf, group):
                remember_data_directory(directory)
        self._devices = {
            root: _device(root)
            for roots in self._roots.values()
            for root in roots
        }

    def data_key(self, uri):
        """:func:`data_key` of ``uri`` (see there for what keys mean).

        The hook for keys that need the configuration (an RBD short form's
        default pool, an S3 backend's configured host): today none does.
        """
        return data_key(uri)

    # -- resolving ---------------------------------------------------------

    def resolve(self, location):
        """Return the backend name for ``location`` (None in single-store).

        Raises LocationRefused when the location is not inside one of our
        stores or its URI cannot be parsed (never anything else).
        """
        return self._resolve(location)[0]

    def _resolve(self, location):
        """(backend, candidates): the backend to use and every backend
        that might hold the data (more than one only when guessing)."""
        try:
            return self._resolve_unguarded(location)
        except exceptions.LocationRefused:
            raise
        except Exception as exc:
            raise _refused(
                location, f'malformed URI ({_describe(exc, location)})'
            ) from None

    def _resolve_unguarded(self, location):
        scheme = urllib.parse.urlsplit(location.uri).scheme
        if not self.multi:
            if scheme not in store_location.SCHEME_TO_CLS_MAP:
                raise _refused(
                    location,
                    f'scheme {scheme!r} is not served by any configured store',
                )
            self._refuse_unless_inside(location, None)
            return None, [None]
        backends = store_location.SCHEME_TO_CLS_BACKEND_MAP.get(scheme, {})
        if location.store is not None:
            if location.store not in backends:
                raise _refused(
                    location,
                    f'store {location.store!r} is not an enabled '
                    f'{scheme!r} backend',
                )
            self._refuse_unless_inside(location, location.store)
            return location.store, [location.store]
        # Glance wrote no 'store' metadata (older images, or locations
        # added by hand): the backends of the same scheme that may hold
        # the data are the candidates; the first is used.
        # glance-scrubber fails here forever.
        reasons = {b: self._why_refused(location, b) for b in backends}
        candidates = sorted(b for b, why in reasons.items() if why is None)
        if not candidates:
            why = '; '.join(sorted(set(filter(None, reasons.values()))))
            raise _refused(
                location,
                f'no enabled backend holds {scheme!r} data at this '
                'location' + (f' ({why})' if why else ''),
            )
        return candidates[0], candidates

    def _refuse_unless_inside(self, location, backend):
        why = self._why_refused(location, backend)
        if why is not None:
            raise _refused(location, why)

    def _why_refused(self, location, backend):
        """None if ``backend`` may delete the location's data, else why.

        Parses the URI with the backend's own location class, the one its
        delete will use; a URI it rejects raises (malformed).
        """
        parsed = self._parse(location.uri, backend).store_location
        if urllib.parse.urlsplit(location.uri).scheme not in FILE_SCHEMES:
            return None
        path = parsed.path
        if not os.path.isabs(path):
            return (
                'the file store would delete a path relative to its '
                'working directory (file://HOST/p means HOST/p to '
                'glance_store); only file:///absolute/path is scrubbed'
            )
        real = realpath(path)
        if any(_strictly_inside(real, r) for r in self._group_roots(backend)):
            return None
        return redaction.redact(
            f'file {real} is outside the store data directories'
        )

    def _parse(self, uri, backend):
        if backend is None:
            return store_location.get_location_from_uri(uri, conf=self._conf)
        return store_location.get_location_from_uri_and_backend(
            uri, backend, conf=self._conf
        )

    def _group_roots(self, backend):
        return self._roots.get(backend or 'glance_store', [])

    # -- acting ------------------------------------------------------------

    def delete(self, location):
        """Delete the data of ``location``; return a model.StoreAnswer.

        REMOVED: removed now.  ALREADY_GONE: the store says it is not
        there and that answer is trusted (see :meth:`_confirm_gone`).
        NOT_OURS: a read-only store (http) that only reads somebody
        else's server.  Raises LocationRefused (never deletable, nothing
        touched) or StoreError (failed this time, retry), both naming the
        location.  A StoreError has ``data_intact=True`` only when the
        store certainly removed nothing (the file driver's one unlink()
        failed, a read-only store, a 'not found' we do not trust);
        without it the data may be partly gone or still going (a timeout,
        a multi-step delete that stopped half-way, anything unexpected).
        """
        backend, candidates = self._resolve(location)
        try:
            return self._delete(location, backend, candidates)
        except exceptions.StoreError:
            raise
        except Exception as exc:
            # Any store failure, whatever the driver raised: report it
            # with the location, the caller retries with backoff.
            raise exceptions.StoreError(
                f'location {location.id}: store delete failed: '
                + _describe(exc, location)
            ) from None

    def _delete(self, location, backend, candidates):
        try:
            if self.multi:
                glance_store.delete(location.uri, backend)
            else:
                glance_store.delete_from_backend(location.uri)
        except store_exc.NotFound:
            self._confirm_gone(location, backend, candidates)
            return model.StoreAnswer.ALREADY_GONE
        except store_exc.StoreDeleteNotSupported:
            if urllib.parse.urlsplit(location.uri).scheme in READ_ONLY_SCHEMES:
                return model.StoreAnswer.NOT_OURS
            # A store that can delete says this when it could not start
            # writable (e.g. the file store's datadir was read-only): a
            # failure to retry, never a reason to forget the data.
            raise exceptions.StoreError(
                f'location {location.id}: store refuses deletes (it started '
                'read-only)',
                data_intact=True,
            ) from None
        except store_exc.Forbidden as exc:
            if _family(location.uri) != 'file':
                raise  # a multi-step delete may have stopped half-way
            # The file driver's one unlink() failed: nothing was removed.
            raise exceptions.StoreError(
                f'location {location.id}: store delete failed: '
                + _describe(exc, location),
                data_intact=True,
            ) from None
        return model.StoreAnswer.REMOVED

    def check_present(self, location):
        """Return if the location's data is in its store, whole.

        Raises DataGone when it is (trustworthily) not there, has another
        size than the image, or the location is refused; StoreError when
        the store cannot tell right now (retry later, nothing is known).
        """
        try:
            backend, candidates = self._resolve(location)
        except exceptions.LocationRefused as exc:
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'cannot verify its data: {exc}',
            ) from None
        try:
            size = self._size(location, backend, candidates)
        except (exceptions.DataGone, exceptions.StoreError):
            raise
        except Exception as exc:
            raise exceptions.StoreError(
                f'location {location.id}: cannot verify its data: '
                + _describe(exc, location)
            ) from None
        if location.size and size and size != location.size:
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'location {location.id} holds {size} bytes, the '
                f'image has {location.size}',
            )

    def _size(self, location, backend, candidates):
        try:
            return self._store_size(location.uri, backend)
        except store_exc.NotFound:
            self._confirm_gone(location, backend, candidates)
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'location {location.id} is no longer in its store',
            ) from None

    def _store_size(self, uri, backend):
        if self.multi:
            return glance_store.get_size_from_uri_and_backend(uri, backend)
        return glance_store.get_size_from_backend(uri)

    # -- trusting NotFound -------------------------------------------------

    def _confirm_gone(self, location, backend, candidates):
        """Return if the store's NotFound means the data is gone.

        Else raise StoreError: the location fails and is retried; it is
        never marked deleted on an answer we cannot trust.  Two rules:

        * the scheme's own rule (:data:`_NOT_FOUND_RULES`): file stores
          check their data directories; a scheme without a rule keeps
          glance-scrubber's behaviour (NotFound = gone).  Ceph RBD and S3
          get their rules in a later issue: add them to that table.
        * a guessed backend (multi-store, no ``store`` metadata, several
          candidates): gone only if no other candidate holds the data.
        """
        family = _family(location.uri)
        rule = _NOT_FOUND_RULES.get(family)
        if rule is not None:
            rule(self, location)
        if family != 'file':
            # File backends all unlink the same absolute path: guessing
            # among them cannot pick the wrong data.
            for other in candidates:
                if other != backend:
                    self._refuse_if_held(location, backend, other)

    def _file_not_found_trusted(self, location):
        real = realpath(_driver_path(location.uri))
        for root, recorded in self._devices.items():
            if not _strictly_inside(real, root):
                continue
            problem = _datadir_problem(root, recorded)
            if problem:
                raise exceptions.StoreError(
                    f'location {location.id}: data directory {root} looks '
                    f"unmounted/empty: not trusting 'not found' ({problem})",
                    data_intact=True,
                )

    def _refuse_if_held(self, location, guessed, other):
        try:
            self._store_size(location.uri, other)
        except store_exc.NotFound:
            return
        except Exception as exc:
            raise exceptions.StoreError(
                f'location {location.id} has no store metadata: backend '
                f'{guessed!r} does not hold it and backend {other!r} cannot '
                f'say ({_describe(exc, location)}): not trusting '
                "'not found'",
                data_intact=True,
            ) from None
        raise exceptions.StoreError(
            f'location {location.id} has no store metadata: backend '
            f'{guessed!r} does not hold it but backend {other!r} does; '
            "set the location's 'store' to have it scrubbed",
            data_intact=True,
        )


# scheme family -> the Stores method that raises StoreError when that
# store's NotFound cannot be believed.  'rbd' and 's3' come later.
_NOT_FOUND_RULES = {'file': Stores._file_not_found_trusted}


def _datadir_problem(root, recorded):
    """Why ``root`` does not look like the data directory we started with.

    An unmounted NFS export leaves an empty (or no) mount point; a
    remount of something else changes the device.
    """
    if recorded is None:
        return 'it could not be read when the service started'
    try:
        info = os.stat(root)
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else 'cannot stat it'
    if not stat.S_ISDIR(info.st_mode):
        return 'not a directory'
    if info.st_dev != recorded:
        return 'on another device than when the service started'
    with os.scandir(root) as entries:
        if next(entries, None) is None:
            return 'empty'
    return None


def _device(root):
    try:
        return os.stat(root).st_dev
    except OSError:
        return None


def _family(uri):
    scheme = urllib.parse.urlsplit(uri).scheme
    return _FAMILY.get(scheme, scheme)


def _strictly_inside(path, root):
    return path != root and os.path.commonpath([root, path]) == root


def _refused(location, why):
    return exceptions.LocationRefused(f'location {location.id}: {why}')


def _describe(exc, location):
    """``Type: text`` of an exception, safe to show: the location's URI
    replaced by its id, its credentials and any URL credentials masked."""
    try:
        text = str(exc)
        uri = location.uri
        if isinstance(uri, str) and uri:
            text = text.replace(uri, f'<location {location.id}>')
            for secret in _userinfo_parts(uri):
                text = text.replace(secret, redaction.MASK)
    except Exception:
        text = '(no text)'
    return redaction.redact(f'{type(exc).__name__}: {text}')


def _userinfo_parts(uri):
    """The credentials of ``uri`` and each ``:`` part of them, longest
    first: a driver may quote them apart from the URI (and a secret with
    a '/' escapes the URL pattern of :func:`redaction.redact`).  Parts
    shorter than 4 characters are left alone: masking every "a" of a
    message would make it unreadable, and such a part is no secret."""
    rest = uri.partition('://')[2]
    userinfo = rest.rpartition('@')[0]
    parts = {p for p in userinfo.split(':') if len(p) >= 4}
    parts.add(userinfo)
    return sorted(parts - {''}, key=len, reverse=True)


def _datadirs(conf, group):
    group_conf = getattr(conf, group, None)
    dirs = []
    if getattr(group_conf, 'filesystem_store_datadir', None):
        dirs.append(group_conf.filesystem_store_datadir)
    # "path[:priority]" entries
    for entry in getattr(group_conf, 'filesystem_store_datadirs', None) or []:
        dirs.append(entry.rsplit(':', 1)[0] if ':' in entry else entry)
    return dirs
