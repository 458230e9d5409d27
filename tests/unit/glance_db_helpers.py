"""Shared helpers of the unit tests of scrub_listener.glance_db.

Used by tests/unit/test_glance_db.py (claims), test_glance_db_reads.py,
test_glance_db_restore.py and test_glance_db_locations.py; the fixtures
(``glance``, ``gdb``, ``stores``) are in tests/unit/conftest.py.
"""

import os

from scrub_listener import exceptions
from scrub_listener import glance_db
from tests.unit.conftest import path_of

KEY = '0123456789abcdef0123456789abcdef'
OTHER_KEY = 'fedcba9876543210fedcba9876543210'

GONE = glance_db.Verdict.GONE
FAILED = glance_db.Verdict.FAILED


def verify_files(locations):
    """GlanceDB.restore's verify: each location's file is there."""
    for location in locations:
        if not os.path.exists(path_of(location.uri)):
            raise exceptions.DataGone(
                image_id=location.image_id, reason='file missing'
            )


def finish(gdb, claim, verdicts, images):
    """finish() with {location id: Verdict} of ``claim``'s locations."""
    by_id = {loc.id: loc for loc in claim.locations}
    return gdb.finish(
        claim.token, [(by_id[i], v) for i, v in verdicts.items()], images
    )


def snapshot(glance, image_id):
    """Every row of the image, its locations and children, as tuples."""
    return (
        tuple(glance.image(image_id)),
        [tuple(r) for r in glance.locations(image_id)],
        *(
            [tuple(r) for r in glance.children(t, image_id)]
            for t in ('image_properties', 'image_tags', 'image_members')
        ),
    )
