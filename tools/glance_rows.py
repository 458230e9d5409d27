"""Write Glance rows exactly as glance-api 33.0.0 leaves them.

For tests and benchmarks that need many images fast, without going
through a real glance-api (the end-to-end tests do that).  The shapes
mirror glance/db/sqlalchemy/api.py: image_destroy and
image_location_delete(..., 'pending_delete') under delayed_delete.
"""

import datetime
import json
import os
import uuid

import sqlalchemy as sa

from scrub_listener import glance_db

META = sa.MetaData()


def _tables(engine):
    META.reflect(
        engine,
        only=[
            'images',
            'image_locations',
            'image_properties',
            'image_tags',
            'image_members',
        ],
        extend_existing=True,
    )
    return META.tables


def utcnow():
    return glance_db.utcnow()


def make_image(
    engine,
    store_dir=None,
    data=b'x' * 1024,
    status='pending_delete',
    deleted_at=None,
    visibility='shared',
    owner=None,
    name=None,
    properties=None,
    tags=(),
    members=(),
    locations=None,
    backend='fs',
    encrypt_key=None,
    location_deleted_at=None,
):
    """Create one image with its data file(s) and rows; return its id.

    ``status='pending_delete'`` leaves it as a delayed delete does; with
    ``status='active'`` it is a live image.  ``locations`` overrides the
    list of (url, meta_data dict) to write; by default one file in
    ``store_dir`` holding ``data``.
    """
    image_id = str(uuid.uuid4())
    now = utcnow()
    deleted = status in ('pending_delete', 'deleted')
    deleted_at = deleted_at or (now if deleted else None)
    if locations is None:
        path = os.path.join(store_dir, image_id)
        with open(path, 'wb') as f:
            f.write(data)
        locations = [('file://' + path, {'store': backend} if backend else {})]
    tables = _tables(engine)
    loc_deleted_at = location_deleted_at or deleted_at
    with engine.begin() as conn:
        conn.execute(
            tables['images'].insert(),
            {
                'id': image_id,
                'name': name or f'img-{image_id[:8]}',
                'size': len(data),
                'status': status,
                'created_at': now,
                'updated_at': now,
                'deleted_at': deleted_at,
                'deleted': deleted,
                'disk_format': 'raw',
                'container_format': 'bare',
                'owner': owner,
                'min_disk': 0,
                'min_ram': 0,
                'protected': False,
                'visibility': visibility,
                'os_hidden': False,
            },
        )
        for url, meta in locations:
            value = url
            if encrypt_key:
                from glance.common import crypt

                value = crypt.urlsafe_encrypt(encrypt_key, url, 64)
            conn.execute(
                tables['image_locations'].insert(),
                {
                    'image_id': image_id,
                    'value': value,
                    'meta_data': json.dumps(meta),
                    'status': 'pending_delete' if deleted else 'active',
                    'created_at': now,
                    'updated_at': loc_deleted_at or now,
                    'deleted_at': loc_deleted_at if deleted else None,
                    'deleted': deleted,
                },
            )
        child = {
            'created_at': now,
            'updated_at': deleted_at or now,
            'deleted_at': deleted_at,
            'deleted': deleted,
            'image_id': image_id,
        }
        for key, value in (properties or {}).items():
            conn.execute(
                tables['image_properties'].insert(),
                dict(child, name=key, value=value),
            )
        for tag in tags:
            conn.execute(tables['image_tags'].insert(), dict(child, value=tag))
        for member in members:
            conn.execute(
                tables['image_members'].insert(),
                dict(child, member=member, can_share=False, status='accepted'),
            )
    return image_id


def bulk_pending_images(
    engine, store_dir, count, size, deleted_at=None, backend='fs', batch=1000
):
    """Create ``count`` pending_delete images of ``size`` bytes, fast."""
    tables = _tables(engine)
    deleted_at = deleted_at or (utcnow() - datetime.timedelta(hours=1))
    payload = os.urandom(size)
    ids = []
    for start in range(0, count, batch):
        images, locations = [], []
        for _ in range(min(batch, count - start)):
            image_id = str(uuid.uuid4())
            path = os.path.join(store_dir, image_id)
            with open(path, 'wb') as f:
                f.write(payload)
            ids.append(image_id)
            images.append(
                {
                    'id': image_id,
                    'name': 'bench',
                    'size': size,
                    'status': 'pending_delete',
                    'created_at': deleted_at,
                    'updated_at': deleted_at,
                    'deleted_at': deleted_at,
                    'deleted': True,
                    'disk_format': 'raw',
                    'container_format': 'bare',
                    'min_disk': 0,
                    'min_ram': 0,
                    'protected': False,
                    'visibility': 'shared',
                    'os_hidden': False,
                }
            )
            locations.append(
                {
                    'image_id': image_id,
                    'value': 'file://' + path,
                    'meta_data': json.dumps(
                        {'store': backend} if backend else {}
                    ),
                    'status': 'pending_delete',
                    'created_at': deleted_at,
                    'updated_at': deleted_at,
                    'deleted_at': deleted_at,
                    'deleted': True,
                }
            )
        with engine.begin() as conn:
            conn.execute(tables['images'].insert(), images)
            conn.execute(tables['image_locations'].insert(), locations)
    return ids


def image_row(engine, image_id):
    tables = _tables(engine)
    with engine.connect() as conn:
        return conn.execute(
            sa.select(tables['images']).where(
                tables['images'].c.id == image_id
            )
        ).first()


def location_rows(engine, image_id):
    tables = _tables(engine)
    table = tables['image_locations']
    with engine.connect() as conn:
        return conn.execute(
            sa.select(table)
            .where(table.c.image_id == image_id)
            .order_by(table.c.id)
        ).all()


def child_rows(engine, table_name, image_id):
    table = _tables(engine)[table_name]
    with engine.connect() as conn:
        return conn.execute(
            sa.select(table).where(table.c.image_id == image_id)
        ).all()


def glance_delete(engine, image_id, when):
    """What glance-api 33 does to an image on DELETE with delayed_delete.

    (Simplified to one timestamp: the real API stamps locations and
    properties a few ms before the image, see glance_db._in_deletion.)
    """
    tables = _tables(engine)
    soft_deleted = {'deleted': True, 'deleted_at': when, 'updated_at': when}
    with engine.begin() as conn:
        for name in ('image_locations', 'images'):
            table = tables[name]
            key = table.c.image_id if name == 'image_locations' else table.c.id
            conn.execute(
                table.update()
                .where(key == image_id, table.c.deleted == sa.false())
                .values(status='pending_delete', **soft_deleted)
            )
        for name in ('image_properties', 'image_tags', 'image_members'):
            child = tables[name]
            conn.execute(
                child.update()
                .where(
                    child.c.image_id == image_id, child.c.deleted == sa.false()
                )
                .values(**soft_deleted)
            )


def half_finished_delete(engine, image_id, when):
    """Glance 33's DELETE cut between its two transactions (a crash).

    The locations are ``pending_delete`` (their own transactions) and the
    properties purged; image_update set the image ``pending_delete`` but
    image_destroy never ran: ``deleted = 0``, ``deleted_at`` NULL, tags
    and members untouched.
    """
    tables = _tables(engine)
    soft_deleted = {'deleted': True, 'deleted_at': when, 'updated_at': when}
    with engine.begin() as conn:
        locations = tables['image_locations']
        conn.execute(
            locations.update()
            .where(
                locations.c.image_id == image_id,
                locations.c.deleted == sa.false(),
            )
            .values(status='pending_delete', **soft_deleted)
        )
        props = tables['image_properties']
        conn.execute(
            props.update()
            .where(props.c.image_id == image_id, props.c.deleted == sa.false())
            .values(**soft_deleted)
        )
        images = tables['images']
        conn.execute(
            images.update()
            .where(images.c.id == image_id)
            .values(status='pending_delete', updated_at=when)
        )


def remove_location(engine, location_id, when):
    """What glance-api does to a location removed from a live image."""
    table = _tables(engine)['image_locations']
    with engine.begin() as conn:
        conn.execute(
            table.update()
            .where(table.c.id == location_id)
            .values(
                status='pending_delete',
                deleted=True,
                deleted_at=when,
                updated_at=when,
            )
        )
