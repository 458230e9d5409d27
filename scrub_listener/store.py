"""glance_store adapter: where a location lives, and deleting its data.

Single-store (``[glance_store] stores/default_store``) or multi-store
(``enabled_backends``) is decided once, here, from the configuration, the
way glance-api decides it.  Every delete goes through glance_store's own
backend for the location, so every store Glance supports works.

Safety rules (a scrubber that deletes the wrong data cannot be undone):

* a location whose scheme (or ``store``) is not one of our configured
  backends is refused, never guessed at;
* a ``file://`` location must resolve (symlinks followed) inside the
  backend's data directory, else it is refused;
* glance_store's ``NotFound`` means the data is already gone: success.
"""

import logging
import os
import urllib.parse

import glance_store
from glance_store import exceptions as store_exc
from glance_store import location as store_location

from scrub_listener import exceptions

LOG = logging.getLogger(__name__)

FILE_SCHEMES = ('file', 'filesystem')
READ_ONLY_SCHEMES = ('http', 'https')

# Outcomes of Stores.delete()
DELETED = 'deleted'
ALREADY_GONE = 'already gone'
NOT_OURS = 'not deletable by this store'


def register_opts(conf):
    """Register glance_store's options (needs enabled_backends parsed)."""
    if conf.enabled_backends:
        glance_store.register_store_opts(conf)
    else:
        glance_store.register_opts(conf)


class Stores:
    """The configured glance_store backends."""

    def __init__(self, conf):
        self._conf = conf
        self._root_cache = {}
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
                f'[glance_store] configuration is not usable: {exc}'
            ) from exc

    # -- resolving ---------------------------------------------------------

    def resolve(self, location):
        """Return the backend name for ``location`` (None in single-store).

        Raises LocationRefused when the location is not inside one of our
        stores.
        """
        scheme = urllib.parse.urlsplit(location.uri).scheme
        if not self.multi:
            if scheme not in store_location.SCHEME_TO_CLS_MAP:
                raise exceptions.LocationRefused(
                    f'location {location.id}: scheme {scheme!r} is not '
                    'served by any configured store'
                )
            self._check_inside(location, 'glance_store')
            return None
        backends = store_location.SCHEME_TO_CLS_BACKEND_MAP.get(scheme, {})
        if location.store is not None:
            if location.store not in backends:
                raise exceptions.LocationRefused(
                    f'location {location.id}: store {location.store!r} is '
                    f'not an enabled {scheme!r} backend'
                )
            self._check_inside(location, location.store)
            return location.store
        # Glance wrote no 'store' metadata (older images, or locations
        # added by hand): the backends of the same scheme that contain
        # the data are the only candidates.  glance-scrubber fails here
        # forever.
        for backend in sorted(backends):
            try:
                self._check_inside(location, backend)
            except exceptions.LocationRefused:
                continue
            return backend
        raise exceptions.LocationRefused(
            f'location {location.id}: no enabled backend holds {scheme!r} '
            'data at this location'
        )

    def _check_inside(self, location, group):
        scheme = urllib.parse.urlsplit(location.uri).scheme
        if scheme not in FILE_SCHEMES:
            return
        path = os.path.realpath(urllib.parse.urlsplit(location.uri).path)
        for root in self._roots(group):
            if os.path.commonpath([root, path]) == root and path != root:
                return
        raise exceptions.LocationRefused(
            f'location {location.id}: file {path} is outside the store '
            'data directories'
        )

    def _roots(self, group):
        """realpath of the data directories of a config group, cached.

        They are fixed for the life of the process, and a realpath per
        location is measurable at thousands of deletes per second.
        """
        if group not in self._root_cache:
            self._root_cache[group] = [
                os.path.realpath(datadir)
                for datadir in _datadirs(getattr(self._conf, group))
            ]
        return self._root_cache[group]

    # -- acting ------------------------------------------------------------

    def delete(self, location):
        """Delete the data of ``location``; return one of the outcomes."""
        backend = self.resolve(location)
        try:
            if self.multi:
                glance_store.delete(location.uri, backend)
            else:
                glance_store.delete_from_backend(location.uri)
        except store_exc.NotFound:
            return ALREADY_GONE
        except store_exc.StoreDeleteNotSupported as exc:
            if urllib.parse.urlsplit(location.uri).scheme in READ_ONLY_SCHEMES:
                # The http store only reads somebody else's server.
                return NOT_OURS
            # A store that can delete says this when it could not start
            # writable (e.g. the file store's datadir was read-only): a
            # failure to retry, never a reason to forget the data.
            raise exceptions.StoreError(
                f'location {location.id}: store refuses deletes: {exc}'
            ) from exc
        except Exception as exc:
            # Any store failure, whatever the driver raised: report it
            # with the location, the caller retries with backoff.
            raise exceptions.StoreError(
                f'location {location.id}: store delete failed: '
                f'{type(exc).__name__}: {exc}'
            ) from exc
        return DELETED

    def check_present(self, location):
        """Raise DataGone unless the location's data is in its store."""
        try:
            backend = self.resolve(location)
            if self.multi:
                size = glance_store.get_size_from_uri_and_backend(
                    location.uri, backend
                )
            else:
                size = glance_store.get_size_from_backend(location.uri)
        except store_exc.NotFound:
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'location {location.id} is no longer in its store',
            ) from None
        except exceptions.LocationRefused as exc:
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'cannot verify its data: {exc}',
            ) from exc
        except Exception as exc:
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'cannot verify location {location.id}: '
                f'{type(exc).__name__}: {exc}',
            ) from exc
        if location.size and size and size != location.size:
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'location {location.id} holds {size} bytes, the '
                f'image has {location.size}',
            )


def _datadirs(group_conf):
    dirs = []
    if getattr(group_conf, 'filesystem_store_datadir', None):
        dirs.append(group_conf.filesystem_store_datadir)
    # "path[:priority]" entries
    for entry in getattr(group_conf, 'filesystem_store_datadirs', None) or []:
        dirs.append(entry.rsplit(':', 1)[0] if ':' in entry else entry)
    return dirs
