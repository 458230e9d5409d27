"""Location rows made into :class:`~scrub_listener.model.Location`.

Glance may store location URLs encrypted (``metadata_encryption_key``):
:func:`decrypt_location` undoes glance.common.crypt.  :class:`Decoder`
turns a row into a Location and names the data a URL points at
(``data_key``), and :class:`LiveDataIndex` knows the data keys of every
live location, so that a scrub never deletes data a live image uses.
"""

import base64
import json
import re
import threading

import sqlalchemy as sa

from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener.glance_db import tables

_URL_START = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def decrypt_location(key, ciphertext):
    """Decrypt a location URL exactly as glance.common.crypt encrypts it.

    AES-CBC, urlsafe base64 of IV (16 bytes) + ciphertext; the plaintext
    ends at the last NUL byte (the rest is random padding).
    """
    # Imported here: only deployments with metadata_encryption_key pay
    # for loading the cryptography bindings.
    from cryptography.hazmat.primitives.ciphers import Cipher
    from cryptography.hazmat.primitives.ciphers import algorithms
    from cryptography.hazmat.primitives.ciphers import modes

    try:
        raw = base64.urlsafe_b64decode(ciphertext.encode('ascii'))
        if len(raw) < 32 or len(raw) % 16:
            raise ValueError('not a multiple of the AES block size')
        decryptor = Cipher(
            algorithms.AES(key.encode('utf-8')), modes.CBC(raw[:16])
        ).decryptor()
        padded = decryptor.update(raw[16:]) + decryptor.finalize()
        end = padded.rfind(b'\0')
        if end < 0:
            raise ValueError('no NUL delimiter (wrong key?)')
        text = padded[:end].decode('utf-8')
        # A wrong key still "decrypts" to junk now and then; a location
        # is a URL, junk almost never looks like one.
        if '\0' in text or not _URL_START.match(text):
            raise ValueError('the result is not a URL (wrong key?)')
        return text
    except (ValueError, UnicodeError) as exc:
        raise exceptions.CorruptLocation(
            f'cannot decrypt location URL with metadata_encryption_key: {exc}'
        ) from exc


def plain_key(uri):
    """The default data key: the URI itself (tests without stores)."""
    return uri


class Decoder:
    """Reads location rows: decrypts URLs, parses meta_data, keys data.

    ``data_key(uri)`` names the data a URI points at (two URIs with one
    key are the same data: :func:`scrub_listener.store.data_key`).
    """

    def __init__(self, encryption_key=None, data_key=None):
        self._encryption_key = encryption_key
        self._data_key = data_key or plain_key

    def uri(self, value):
        """The plain URL of a stored ``value``; CorruptLocation if not."""
        if self._encryption_key:
            return decrypt_location(self._encryption_key, value)
        return value

    def key_of(self, uri):
        """The data key of ``uri``; never raises."""
        try:
            return self._data_key(uri)
        except Exception:  # a key function must never let a delete through
            return ('unreadable', uri)

    def location(self, row, size):
        """The Location of a row; CorruptLocation if it cannot be read."""
        try:
            meta = json.loads(row.meta_data) if row.meta_data else {}
            if not isinstance(meta, dict):
                raise ValueError('meta_data is not a JSON object')
        except ValueError as exc:
            raise exceptions.CorruptLocation(
                f'location {row.id} has unreadable meta_data: {exc}'
            ) from exc
        return model.Location(
            id=row.id,
            image_id=row.image_id,
            uri=self.uri(row.value),
            store=meta.get('store'),
            size=size,
        )

    def locations(self, rows, size):
        """(Locations, [(location id, error)]) of ``rows``."""
        locations, errors = [], []
        for row in rows:
            try:
                locations.append(self.location(row, size))
            except exceptions.CorruptLocation as exc:
                errors.append((row.id, str(exc)))
        return locations, errors


_LIVE_FINGERPRINT = sa.select(
    sa.func.count(),
    sa.func.coalesce(sa.func.sum(tables.LOCATIONS.c.id), 0),
    sa.func.max(tables.LOCATIONS.c.id),
    sa.func.max(tables.LOCATIONS.c.updated_at),
    sa.func.coalesce(sa.func.sum(sa.func.length(tables.LOCATIONS.c.value)), 0),
).where(tables.LOCATIONS.c.deleted == sa.false())


class LiveDataIndex:
    """The data keys of every live location, for the shared-data check.

    "Does a live location point at this data?" cannot be asked in SQL:
    URLs are compared by what they name (``data_key``), and with
    ``metadata_encryption_key`` the same URL never encrypts the same way.
    So the ``(id, value)`` of every live row is read and keyed (decrypting,
    resolving paths), each ``(id, value)`` once per process, from a cache.

    Reading 100,000 live rows for every claimed batch is what made a
    sweep 3× slower, so each claim first asks the database for a
    fingerprint of the live rows (count, sum and max of the ids, newest
    ``updated_at``, total URL length; one aggregate, computed by the
    server) and reads the rows again only when it changed.  No watermark,
    no time margin: a row inserted out of order or revived by a restore
    changes the count or the id sum, whatever its timestamps.
    """

    def __init__(self, decoder):
        self._decoder = decoder
        self._lock = threading.Lock()
        self._cache = {}  # location id -> (value, key)
        self._fingerprint = None
        self._keys = frozenset()

    def warm(self, engine):
        """Fill an empty cache outside any transaction.

        The first fill keys every live row (a realpath each for files);
        later claims key only the few rows added since, under the locks.
        """
        if self._cache:
            return
        with engine.connect() as conn:
            self.keys(conn)

    def keys(self, conn):
        """The set of data keys live locations name, read in ``conn``."""
        fingerprint = tuple(conn.execute(_LIVE_FINGERPRINT).one())
        with self._lock:
            if fingerprint == self._fingerprint:
                return self._keys
        live = tables.LOCATIONS
        rows = conn.execute(
            sa.select(live.c.id, live.c.value).where(
                live.c.deleted == sa.false()
            )
        ).all()
        with self._lock:
            fresh = {}
            for row in rows:
                cached = self._cache.get(row.id)
                if cached is None or cached[0] != row.value:
                    cached = (row.value, self._key(row.value))
                fresh[row.id] = cached
            self._cache = fresh
            self._keys = frozenset(key for _, key in fresh.values())
            self._fingerprint = fingerprint
            return self._keys

    def _key(self, value):
        try:
            uri = self._decoder.uri(value)
        except exceptions.CorruptLocation:
            # Unreadable live row: it cannot match, and cannot be scrubbed.
            return ('corrupt', value)
        return self._decoder.key_of(uri)
