"""Fixtures for the unit tests: no servers, no subprocesses.

The Glance tables are the real ones (``glance-manage db_sync`` on SQLite,
made once per session by ``tests/conftest.py`` and emptied before each
test); the due-queue is a SQLite file per test; stores are fakes.

``glance``
    A :class:`Glance`: the Glance engine, a file store directory and
    helpers that write rows the way glance-api 33 does.
``gdb``
    ``scrub_listener.glance_db.GlanceDB`` on that database.
``due_queue``
    ``scrub_listener.queue.DueQueue`` on a fresh SQLite file.
``stores``
    A :class:`FakeStores`.
"""

import datetime
import json
import os
import urllib.parse

import pytest
import sqlalchemy as sa

from scrub_listener import db
from scrub_listener import exceptions
from scrub_listener import glance_db
from scrub_listener import model
from scrub_listener import queue
from tools import glance_rows
from tools import harness


def ago(seconds):
    """Naive UTC ``seconds`` ago (negative: in the future)."""
    return glance_db.utcnow() - datetime.timedelta(seconds=seconds)


class Glance:
    """A Glance database with the real schema, and a file store dir."""

    def __init__(self, url, store_dir):
        self.url = url
        self.engine = db.create_engine(url, 'test Glance database')
        self.store_dir = store_dir
        meta = sa.MetaData()
        meta.reflect(self.engine, only=harness.GLANCE_IMAGE_TABLES)
        self.tables = meta.tables

    def make_image(self, **kwargs):
        """tools.glance_rows.make_image in our store dir; returns the id.

        Default: pending_delete, deleted a minute ago, 1 KiB of random
        data in ``<store_dir>/<id>``.
        """
        status = kwargs.get('status', 'pending_delete')
        if status in ('pending_delete', 'deleted'):
            kwargs.setdefault('deleted_at', ago(60))
        kwargs.setdefault('data', os.urandom(1024))
        return glance_rows.make_image(self.engine, self.store_dir, **kwargs)

    def write_file(self, name, data=b'data'):
        path = os.path.join(self.store_dir, name)
        with open(path, 'wb') as f:
            f.write(data)
        return 'file://' + path

    def path(self, image_id):
        return os.path.join(self.store_dir, image_id)

    def image(self, image_id):
        return glance_rows.image_row(self.engine, image_id)

    def locations(self, image_id):
        return glance_rows.location_rows(self.engine, image_id)

    def children(self, table, image_id):
        return glance_rows.child_rows(self.engine, table, image_id)

    def deletion(self, image_id):
        """The Deletion of a pending_delete image, as the queue holds it."""
        return glance_db.Deletion(
            image_id, None, self.image(image_id).deleted_at
        )

    def location_deletion(self, location_id):
        """The Deletion of one removed location, as the queue holds it."""
        t = self.tables['image_locations']
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.c.image_id, t.c.deleted_at).where(
                    t.c.id == location_id
                )
            ).one()
        return glance_db.Deletion(row.image_id, location_id, row.deleted_at)

    def update(self, table, row_id, **values):
        t = self.tables[table]
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.id == row_id).values(values))

    def remove_location(self, location_id, when):
        """What glance-api does to a location removed from a live image."""
        glance_rows.remove_location(self.engine, location_id, when)

    def glance_delete(self, image_id, when):
        """What glance-api 33 does on DELETE with delayed_delete."""
        glance_rows.glance_delete(self.engine, image_id, when)

    def add_location(self, image_id, url, status='active', store_name='fs'):
        """Insert one more location row; returns its id."""
        now = glance_db.utcnow()
        deleted = status != 'active'
        with self.engine.begin() as conn:
            result = conn.execute(
                self.tables['image_locations'].insert(),
                {
                    'image_id': image_id,
                    'value': url,
                    'meta_data': json.dumps({'store': store_name}),
                    'status': status,
                    'created_at': now,
                    'updated_at': now,
                    'deleted_at': now if deleted else None,
                    'deleted': deleted,
                },
            )
            return result.inserted_primary_key[0]


@pytest.fixture
def glance(sqlite_glance_db_url, tmp_path):
    store_dir = tmp_path / 'images'
    store_dir.mkdir()
    g = Glance(sqlite_glance_db_url, str(store_dir))
    yield g
    g.engine.dispose()


@pytest.fixture
def gdb(glance):
    return glance_db.GlanceDB(glance.engine)


@pytest.fixture
def due_queue(tmp_path):
    engine = db.create_engine(
        f'sqlite:///{tmp_path / "queue.sqlite"}', 'test queue'
    )
    q = queue.DueQueue(
        engine, lease_time=600, retry_backoff=30, retry_backoff_max=3600
    )
    q.create_schema()
    yield q
    engine.dispose()


def path_of(uri):
    return urllib.parse.urlsplit(uri).path


class FakeStores:
    """Stands in for :class:`scrub_listener.store.Stores`.

    ``file://`` URLs are real files: ``delete`` unlinks them (missing →
    ``StoreAnswer.ALREADY_GONE``), ``check_present`` stats them.
    ``fail[uri] = exc`` makes every delete of ``uri`` raise ``exc``;
    ``deleted`` records the URIs whose data was really removed, ``calls``
    every delete attempt.
    """

    def __init__(self):
        self.fail = {}
        self.calls = []
        self.deleted = []
        self.before_delete = None  # callable(location), for interleavings

    def delete(self, location):
        self.calls.append(location.uri)
        if self.before_delete is not None:
            self.before_delete(location)
        if location.uri in self.fail:
            raise self.fail[location.uri]
        try:
            os.unlink(path_of(location.uri))
        except FileNotFoundError:
            return model.StoreAnswer.ALREADY_GONE
        self.deleted.append(location.uri)
        return model.StoreAnswer.REMOVED

    def check_present(self, location):
        if not os.path.exists(path_of(location.uri)):
            raise exceptions.DataGone(
                image_id=location.image_id,
                reason=f'location {location.id} is no longer in its store',
            )


@pytest.fixture
def stores():
    return FakeStores()
