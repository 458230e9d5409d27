"""Glance's tables, as far as scrub-listener reads and writes them.

Only the columns we use.  Never create or alter these tables: they belong
to Glance's migrations (the tests run on the schema of a real
``glance-manage db_sync``).  Also the few SQL conditions and the image
row lock that every part of the package shares.
"""

import sqlalchemy as sa

from scrub_listener import model

_META = sa.MetaData()

IMAGES = sa.Table(
    'images',
    _META,
    sa.Column('id', sa.String(36), primary_key=True),
    sa.Column('name', sa.String(255)),
    sa.Column('size', sa.BigInteger),
    sa.Column('status', sa.String(30)),
    sa.Column('owner', sa.String(255)),
    sa.Column('visibility', sa.String(9)),
    sa.Column('deleted', sa.Boolean(create_constraint=False)),
    sa.Column('deleted_at', sa.DateTime),
    sa.Column('updated_at', sa.DateTime),
)
LOCATIONS = sa.Table(
    'image_locations',
    _META,
    sa.Column('id', sa.Integer, primary_key=True),
    sa.Column('image_id', sa.String(36)),
    sa.Column('value', sa.Text),
    sa.Column('meta_data', sa.Text),
    sa.Column('status', sa.String(30)),
    sa.Column('deleted', sa.Boolean(create_constraint=False)),
    sa.Column('deleted_at', sa.DateTime),
    sa.Column('updated_at', sa.DateTime),
)


def _child_table(name, *extra):
    return sa.Table(
        name,
        _META,
        sa.Column('id', sa.Integer, primary_key=True),
        sa.Column('image_id', sa.String(36)),
        sa.Column('deleted', sa.Boolean(create_constraint=False)),
        sa.Column('deleted_at', sa.DateTime),
        sa.Column('updated_at', sa.DateTime),
        *extra,
    )


# Soft-deleted by Glance with the image (see restore.in_deletion).
PROPERTIES = _child_table(
    'image_properties',
    sa.Column('name', sa.String(255)),
    sa.Column('value', sa.Text),
)
TAGS = _child_table('image_tags')
MEMBERS = _child_table('image_members')
CHILD_TABLES = (PROPERTIES, TAGS, MEMBERS)


def claimed():
    """Rows some claim holds: 'scrubbing' (legacy) and 'scrubbing:<t>'."""
    return LOCATIONS.c.status.like(model.SCRUBBING + '%')


def unfinished():
    """Rows whose data a scrub has still to deal with."""
    return sa.or_(
        LOCATIONS.c.status.in_([model.PENDING_DELETE, model.INTERRUPTED]),
        claimed(),
    )


def deletion_time_column():
    """:func:`scrub_listener.model.deletion_time`, in SQL."""
    return sa.func.coalesce(IMAGES.c.deleted_at, IMAGES.c.updated_at)


def lock_images(conn, image_ids):
    """Lock the image rows of ``image_ids``; return {id: row}.

    Always lock image rows first and in id order: claim, finish and
    restore all do, so they queue on the same row instead of deadlocking
    on each other's location rows.
    """
    query = (
        sa.select(
            IMAGES.c.id,
            IMAGES.c.status,
            IMAGES.c.deleted_at,
            IMAGES.c.updated_at,
            IMAGES.c.size,
        )
        .where(IMAGES.c.id.in_(sorted(image_ids)))
        .order_by(IMAGES.c.id)
        .with_for_update()
    )
    return {row.id: row for row in conn.execute(query)}


def unfinished_locations(image_ids):
    """The deleted, unfinished location rows of ``image_ids``, by id."""
    return (
        sa.select(LOCATIONS)
        .where(
            LOCATIONS.c.image_id.in_(sorted(image_ids)),
            LOCATIONS.c.deleted == sa.true(),
            unfinished(),
        )
        .order_by(LOCATIONS.c.id)
    )
