"""``scrub-listener-manage``: admin commands (restore, list)."""

import datetime
import json
import sys

from oslo_config import cfg

from scrub_listener import components
from scrub_listener import listing
from scrub_listener import model
from scrub_listener.cmd import common


def _add_commands(subparsers):
    restore = subparsers.add_parser(
        'restore',
        help='Bring a pending_delete image back to active, with its data, '
        'locations, properties, tags and members.',
    )
    restore.add_argument('image_id', metavar='IMAGE_ID')
    restore.add_argument(
        '--direct',
        action='store_true',
        help='Restore here, straight in the databases, instead of asking '
        'the running service over RPC (for when it is down).',
    )

    list_ = subparsers.add_parser(
        'list', help='Show the images waiting to be scrubbed.'
    )
    list_.add_argument('--owner', help='Only images of this owner.')
    # dest: conf.command.name is the sub-command's own name
    list_.add_argument(
        '--name', dest='image_name', help='Only images with this exact name.'
    )
    list_.add_argument(
        '--deleted-since',
        type=_timestamp,
        help='Only images deleted at or after this UTC time '
        '(ISO 8601, e.g. 2026-11-25T15:00:00).',
    )
    list_.add_argument('--format', choices=('table', 'json'), default='table')


def _timestamp(text):
    try:
        value = datetime.datetime.fromisoformat(text.replace('Z', '+00:00'))
    except ValueError:
        raise ValueError(f'not an ISO 8601 time: {text!r}') from None
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC).replace(tzinfo=None)
    return value


command_opt = cfg.SubCommandOpt(
    'command',
    title='Commands',
    handler=_add_commands,
    help='restore IMAGE_ID | list',
)


@common.reports_errors
def main(argv):
    conf = common.load_config(argv, 'scrub-listener-manage', [command_opt])
    if conf.command.name == 'restore':
        return common.restore(conf, conf.command.image_id, conf.command.direct)
    return _list(conf)


def _list(conf):
    parts = components.build(conf, with_stores=False)
    command = conf.command
    try:
        rows = listing.iter_rows(
            parts.glance_db,
            parts.queue,
            parts.schedule,
            model.utcnow(),
            owner=command.owner,
            name=command.image_name,
            deleted_since=command.deleted_since,
        )
        if command.format == 'json':
            _print_json(rows)
        else:
            _print_table(rows)
    finally:
        parts.close()
    return 0


def _print_json(rows):
    # Streamed, one row at a time, so a huge backlog does not sit in memory.
    sys.stdout.write('[')
    for index, row in enumerate(rows):
        sys.stdout.write(',\n ' if index else '\n ')
        sys.stdout.write(json.dumps(row.as_json()))
    sys.stdout.write('\n]\n')


def _print_table(rows):
    header = (
        f'{"ID":36}  {"NAME":20}  {"OWNER":32}  {"SIZE":>12}  '
        f'{"DELETED AT":19}  {"DUE AT":19}  STATE'
    )
    print(header)
    count = 0
    for row in rows:
        count += 1
        state = row.state
        if row.state is listing.State.FAILED:
            state = f'failed ({row.attempts} attempts): {row.last_error}'
        print(
            f'{row.id:36}  {(row.name or "")[:20]:20}  '
            f'{(row.owner or "")[:32]:32}  '
            f'{row.size if row.size is not None else "-":>12}  '
            f'{row.deleted_at:%Y-%m-%d %H:%M:%S}  '
            f'{row.due_at:%Y-%m-%d %H:%M:%S}  {state}'
        )
    print(f'{count} image(s) pending delete')


if __name__ == '__main__':
    sys.exit(main())
