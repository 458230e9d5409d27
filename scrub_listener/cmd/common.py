"""What both commands share: configuration, logging, error reporting.

Nothing a command writes may quote a secret (see
:mod:`scrub_listener.redaction`): :func:`reports_errors` runs each
command with its logs, stdout and stderr redacted, and the configured
passwords and keys are registered as secrets as soon as they are read.
"""

import contextlib
import dataclasses
import functools
import sys

from oslo_config import cfg
from oslo_log import log as logging
from sqlalchemy import exc as sa_exc

from scrub_listener import components
from scrub_listener import exceptions
from scrub_listener import model
from scrub_listener import opts
from scrub_listener import redaction

LOG = logging.getLogger(__name__)


def default_config_files():
    """Our own file if there is one, else the operator's glance-scrubber's.

    So that on a host that ran glance-scrubber, scrub-listener works with
    no flag at all.
    """
    return cfg.find_config_files(project='scrub-listener') or (
        cfg.find_config_files(project='glance', prog='glance-scrubber')
    )


def load_config(argv, prog, cli_opts=(), description=None):
    conf = cfg.CONF
    opts.register_opts(conf)
    logging.register_options(conf)
    # Logs to stderr unless configured otherwise: stdout carries what the
    # commands print (summaries, listings, JSON) for scripts to read.
    conf.set_default('use_stderr', True)
    # glance_store's driver manager tries to import every store driver it
    # knows and stevedore logs an ERROR for each one whose library is not
    # installed (cinder without os-brick...).  A driver we are configured
    # to use and cannot load still fails loudly, from glance_store.
    logging.set_defaults(
        default_log_levels=[
            *logging.get_default_log_levels(),
            'stevedore.extension=CRITICAL',
            # oslo.messaging imports oslo.service, which announces its
            # eventlet backend at INFO; we never use it
            'oslo_service.backend=WARN',
        ]
    )
    conf.register_cli_opts(list(cli_opts))
    conf(
        argv,
        project='scrub-listener',
        prog=prog,
        description=description,
        default_config_files=default_config_files(),
    )
    _check_values(conf)
    # before logging starts: nothing logged may quote them
    redaction.add_secret(conf.metadata_encryption_key)
    redaction.add_url_secret(conf.database.connection)
    redaction.add_url_secret(conf.scrub_queue.connection)
    logging.setup(conf, 'scrub-listener')
    return conf


def _check_values(conf):
    # oslo.config parses values lazily; read ours now so a bad value is
    # reported before anything starts, naming the option.
    for group, group_opts in opts.list_opts():
        for opt in group_opts:
            if group == 'DEFAULT':
                getattr(conf, opt.dest)
            else:
                getattr(getattr(conf, group), opt.dest)


def usage_error(message):
    return _fail(message, exceptions.ConfigError.exit_code)


def restore(conf, image_id, direct):
    """Restore over RPC (the service does it), or ``direct``ly here."""
    model.validate_image_id(image_id)
    if direct:
        parts = components.build(conf)
        try:
            result = dataclasses.asdict(
                parts.restorer.restore(image_id, requested_by='local admin')
            )
        finally:
            parts.close()
    else:
        # imported here: only this path needs oslo.messaging
        from scrub_listener import rpc
        from scrub_listener import service

        with messaging_config(conf):
            service.set_messaging_defaults(conf)
            client = rpc.Client(conf)
        try:
            result = client.restore(image_id)
        finally:
            client.close()
    print(
        f'Image {result["image_id"]} restored to active: '
        f'{result["locations"]} location(s), {result["properties"]} '
        f'properties, {result["tags"]} tags, {result["members"]} members '
        'brought back.'
    )
    return 0


@contextlib.contextmanager
def messaging_config(conf):
    """Around building oslo.messaging transports from ``conf``.

    Registers the broker passwords as secrets first (oslo.messaging's own
    options, registered here ahead of it: their values are needed before
    a transport exists), and turns a malformed ``transport_url`` into a
    ConfigError instead of a traceback.
    """
    import oslo_messaging
    from oslo_messaging import opts as messaging_opts

    for group, group_opts in messaging_opts.list_opts():
        if group in (None, 'oslo_messaging_notifications'):
            conf.register_opts(group_opts, group=group)
    redaction.add_url_secret(conf.transport_url)
    redaction.add_url_secret(conf.oslo_messaging_notifications.transport_url)
    try:
        yield
    except (
        ValueError,  # e.g. a port that is not a number
        oslo_messaging.InvalidTransportURL,
        oslo_messaging.DriverLoadFailure,
    ) as exc:
        raise exceptions.ConfigError(
            f'[DEFAULT] transport_url is not valid: {exc}'
        ) from None


def _fail(message, code):
    print(f'ERROR: {redaction.redact(message)}', file=sys.stderr)
    return code


def reports_errors(main):
    """Turn known failures into one ``ERROR:`` line and an exit code.

    The command runs with its logs, stdout and stderr redacted.
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        with redaction.redacted_output():
            return _run(main, sys.argv[1:] if argv is None else argv)

    return wrapper


def _run(main, argv):
    try:
        return main(argv)
    except exceptions.ScrubListenerError as exc:
        # .message: an error rebuilt from RPC has the remote traceback
        # appended to str(exc).
        return _fail(getattr(exc, 'message', exc), exc.exit_code)
    except cfg.Error as exc:
        return _fail(exc, exceptions.ConfigError.exit_code)
    except sa_exc.OperationalError as exc:
        return _fail(
            f'database error: {exc.orig}',
            exceptions.DatabaseUnavailable.exit_code,
        )
    except KeyboardInterrupt:
        return _fail('interrupted', 130)
