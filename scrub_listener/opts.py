"""Every configuration option of scrub-listener, by group.

An operator's existing ``glance-scrubber.conf`` loads unchanged: the
``[DEFAULT]`` options glance-scrubber reads keep their names and meaning,
``[database] connection`` is the Glance database and ``[glance_store]`` plus
the per-backend sections are glance_store's own (registered by glance_store,
see :mod:`scrub_listener.store`).  Options of our own live in their own
groups.  Nothing is registered at import time: call :func:`register_opts`.
"""

import socket

from oslo_config import cfg

# Ten years: any time option beyond it is a typo, and would overflow
# datetime arithmetic (an ERROR naming the option beats a traceback).
MAX_SECONDS = 10 * 365 * 24 * 3600

# Options glance-scrubber (glance 33.0.0) reads from [DEFAULT], same names,
# same types, same defaults, so its config file is a drop-in.
scrubber_compat_opts = [
    cfg.IntOpt(
        'scrub_time',
        default=0,
        min=0,
        max=MAX_SECONDS,
        mutable=True,
        help='Seconds an image stays in pending_delete before its data is '
        'scrubbed. The due time of a deletion is fixed when it is queued '
        '(deleted_at + scrub_time).',
    ),
    cfg.IntOpt(
        'scrub_pool_size',
        default=1,
        min=1,
        help='Number of threads deleting image data from the stores in '
        'parallel.',
    ),
    cfg.IntOpt(
        'wakeup_time',
        default=300,
        min=0,
        max=MAX_SECONDS,
        help='Seconds between two sweeps of the Glance database for '
        'deletions the notifications missed.',
    ),
    cfg.BoolOpt(
        'daemon',
        default=False,
        help='Accepted for glance-scrubber compatibility. scrub-listener '
        'runs as a service; use --sweep-once for a single pass.',
    ),
    cfg.StrOpt(
        'metadata_encryption_key',
        secret=True,
        help='AES key Glance uses to encrypt image location URLs '
        '(the same value as in glance-api.conf). Needed to read encrypted '
        'locations.',
    ),
    cfg.DictOpt(
        'enabled_backends',
        help='Glance multi-store backends, "name:type" pairs, as in '
        'glance-api.conf. Unset means glance_store single-store mode.',
    ),
    cfg.StrOpt(
        'host',
        default=socket.gethostname(),
        sample_default='<hostname>',
        help='Name of this host: the RPC server name and part of the lease '
        'owner shown in listings.',
    ),
    cfg.StrOpt(
        'state_path',
        default='/var/lib/scrub-listener',
        help='Directory for local state (the default due-queue database).',
    ),
]

database_opts = [
    cfg.StrOpt(
        'connection',
        secret=True,
        help='SQLAlchemy URL of the Glance database (the same as '
        '[database] connection in glance-api.conf).',
    ),
]

scrub_queue_opts = [
    cfg.StrOpt(
        'connection',
        secret=True,
        default='sqlite:///$state_path/scrub-queue.sqlite',
        help='SQLAlchemy URL of the due-queue database. Instances that '
        'share one MariaDB/PostgreSQL queue share the work.',
    ),
    cfg.IntOpt(
        'batch_size',
        default=500,
        min=1,
        help='Deletions claimed and committed per database transaction.',
    ),
    cfg.IntOpt(
        'retry_backoff',
        default=30,
        min=1,
        max=MAX_SECONDS,
        help='Seconds before the first retry of a failed deletion; doubles '
        'with every further failure.',
    ),
    cfg.IntOpt(
        'retry_backoff_max',
        default=3600,
        min=1,
        max=MAX_SECONDS,
        help='Upper bound, in seconds, of the retry backoff.',
    ),
]

scrubber_opts = [
    cfg.IntOpt(
        'lease_time',
        default=600,
        min=10,
        max=MAX_SECONDS,
        help='Seconds a claim on a deletion is held. A running batch renews '
        "its claims every lease_time / 3; a stalled or crashed worker's "
        'claims (in the due-queue, and Glance location rows in the '
        '"scrubbing:<token>" state) are taken over by another worker after '
        'lease_time, at once when the worker was a process of this host '
        'that no longer runs. A takeover is always safe (data that was '
        'claimed is never restored), so this only trades how soon a '
        'stalled claim is retried against duplicate store deletes.',
    ),
    cfg.IntOpt(
        'deletion_window',
        default=60,
        min=1,
        max=MAX_SECONDS,
        help='Locations and properties of an image soft-deleted at most '
        'this many seconds before the image belong to its deletion: '
        'glance-api stamps each with its own time during one DELETE '
        "request (tags and members carry the image's exact deleted_at "
        'and need no window). Restore brings back those only; rows '
        'deleted earlier were removed on purpose and stay removed.',
    ),
    cfg.IntOpt(
        'progress_interval',
        default=10,
        min=1,
        max=MAX_SECONDS,
        help='Seconds between two progress lines of a long --sweep-once.',
    ),
]

listener_opts = [
    cfg.StrOpt(
        'exchange',
        default='glance',
        help='Exchange Glance publishes its notifications to (its '
        'control_exchange).',
    ),
    cfg.ListOpt(
        'topics',
        default=['notifications'],
        help="Notification topics to consume (Glance's "
        '[oslo_messaging_notifications] topics); the info priority is read.',
    ),
    cfg.StrOpt(
        'pool',
        default='scrub-listener',
        help='Listener pool: the RabbitMQ queue is named after it. All '
        'scrub-listener instances share it (each event is handled once) '
        'and other consumers of the topic (ceilometer...) keep their own '
        'copy. The queue is created on first start and is transient unless '
        '[oslo_messaging_rabbit] amqp_durable_queues is set here and in '
        'glance-api.conf (the glance exchange must be durable too).',
    ),
    cfg.IntOpt(
        'batch_size',
        default=100,
        min=1,
        help='Notifications committed to the due-queue per transaction.',
    ),
    cfg.FloatOpt(
        'batch_timeout',
        default=0.2,
        min=0.01,
        help='Seconds to wait for a batch to fill before committing it.',
    ),
    cfg.IntOpt(
        'prefetch',
        default=200,
        min=1,
        help='Unacknowledged notifications held in memory at once (sets '
        '[oslo_messaging_rabbit] rabbit_qos_prefetch_count unless that is '
        'set). Bounds memory when a large backlog waits in the broker.',
    ),
]

rpc_opts = [
    cfg.StrOpt(
        'topic',
        default='scrub-listener-api',
        help='RPC topic of the restore/status API. Must differ from '
        '[listener] pool: RabbitMQ names both queues after them, and a '
        'shared queue would hand RPC requests to the notification listener.',
    ),
    cfg.IntOpt(
        'timeout',
        default=60,
        min=1,
        help='Seconds scrub-listener-manage waits for the service to answer.',
    ),
    cfg.IntOpt(
        'connect_retries',
        default=2,
        min=0,
        help='How often scrub-listener-manage retries reaching the broker '
        'before giving up.',
    ),
    cfg.ListOpt(
        'client_roles',
        default=['admin'],
        help='Roles scrub-listener-manage puts in its request context. The '
        'service only restores for callers with the admin role.',
    ),
]

service_opts = [
    cfg.IntOpt(
        'graceful_shutdown_timeout',
        default=60,
        min=0,
        help='Seconds a stopping service waits for in-flight scrubs.',
    ),
]

cli_opts = [
    cfg.BoolOpt(
        'sweep-once',
        default=False,
        help='Reconcile once: scrub everything due in the Glance database, '
        'print a summary and exit (0 only if nothing failed).',
    ),
    cfg.StrOpt(
        'restore',
        metavar='IMAGE_ID',
        help="Restore a pending_delete image (glance-scrubber's flag; same "
        'as scrub-listener-manage restore IMAGE_ID) and exit.',
    ),
    cfg.BoolOpt(
        'dry-run',
        default=False,
        help='With --sweep-once: list what would be scrubbed, change nothing.',
    ),
]


def register_opts(conf):
    """Register every file option of scrub-listener on ``conf``."""
    conf.register_opts(scrubber_compat_opts)
    conf.register_opts(database_opts, group='database')
    conf.register_opts(scrub_queue_opts, group='scrub_queue')
    conf.register_opts(scrubber_opts, group='scrubber')
    conf.register_opts(listener_opts, group='listener')
    conf.register_opts(rpc_opts, group='rpc')
    conf.register_opts(service_opts, group='service')


def list_opts():
    """Options for oslo-config-generator (entry point oslo.config.opts)."""
    return [
        ('DEFAULT', scrubber_compat_opts),
        ('database', database_opts),
        ('scrub_queue', scrub_queue_opts),
        ('scrubber', scrubber_opts),
        ('listener', listener_opts),
        ('rpc', rpc_opts),
        ('service', service_opts),
    ]
