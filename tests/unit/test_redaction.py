"""scrub_listener.redaction: no secret in any text that leaves the process.

The helper itself, and where it is wired in: log handlers, stdout and
stderr of the commands, our exceptions (also across RPC), the ERROR
line, oslo.config's option dump.
"""

import io
import logging
import sys

import oslo_messaging
import pytest
from oslo_config import cfg
from oslo_log import formatters
from oslo_log import log as oslo_logging
from oslo_messaging import opts as messaging_opts
from oslo_messaging._drivers import common as rpc_common

from scrub_listener import exceptions
from scrub_listener import opts
from scrub_listener import redaction
from scrub_listener.cmd import common

SECRET = 'S3cr3t-7f0d2c'
SECRET_URL = f's3://AKIA:{SECRET}@h/b/o'


@pytest.fixture(autouse=True)
def _clean_state():
    """No secret registered, logging and std streams as they were."""
    redaction.forget_secrets()
    handler_format = logging.Handler.format
    yield
    logging.Handler.format = handler_format
    redaction.forget_secrets()


# -- redact(): URLs -----------------------------------------------------------


@pytest.mark.parametrize(
    ('text', 'expected'),
    [
        (
            f's3://AKIA:{SECRET}@s3.example.com/bucket/obj',
            's3://***@s3.example.com/bucket/obj',
        ),
        (
            f'swift+https://tenant:user:{SECRET}@auth.example.com/v3/c/o',
            'swift+https://***@auth.example.com/v3/c/o',
        ),
        # passwords holding "@", ":" and "/" (legacy S3 secret keys)
        (
            f'mysql+pymysql://glance:p@ss:{SECRET}@db:3306/glance',
            'mysql+pymysql://***@db:3306/glance',
        ),
        (
            f's3+https://AKIA:ab/{SECRET}+c/d@s3.example.com/b/o',
            's3+https://***@s3.example.com/b/o',
        ),
        # quotes and backslashes (JSON, repr) inside a password
        (
            f's3://AKIA:a"b\\\'{SECRET}@s3.example.com/b/o',
            's3://***@s3.example.com/b/o',
        ),
        # percent-encoded userinfo
        (
            f'swift+https://proj%3Auser:{SECRET}%2F%40x@keystone/v3/c/o',
            'swift+https://***@keystone/v3/c/o',
        ),
        (f'rabbit://guest:{SECRET}@mq:5672/', 'rabbit://***@mq:5672/'),
        # a user and no password: masked all the same
        ('rabbit://guest@mq:5672/', 'rabbit://***@mq:5672/'),
        # two schemes: glance_store's own example of a bad swift URI
        (
            f'swift://user:{SECRET}@http://authurl.com/v1/c/o',
            'swift://***@http://authurl.com/v1/c/o',
        ),
        # file://user:pw@/path, and what glance_store's file driver makes
        # of it (netloc + path)
        (
            f'file://operator:{SECRET}@/var/lib/glance/images/x',
            'file://***@/var/lib/glance/images/x',
        ),
        (
            f'Deleting image at operator:{SECRET}@/var/lib/glance/x',
            'Deleting image at ***@/var/lib/glance/x',
        ),
    ],
)
def test_redact_masks_url_credentials(text, expected):
    assert redaction.redact(text) == expected
    assert redaction.redact(expected) == expected  # idempotent


def test_several_urls_in_one_text():
    text = (
        f'locations s3://a:{SECRET}1@h1/b/o, '
        f"'swift://u:{SECRET}2@h2/c/o','s3://b:{SECRET}3@h3/b/o' "
        f'and rabbit://g:{SECRET}4@mq/ failed'
    )
    result = redaction.redact(text)
    assert SECRET not in result
    for host in ('h1/b/o', 'h2/c/o', 'h3/b/o', 'mq/'):
        assert f'://***@{host}' in result
    assert result.startswith('locations s3://') and 'failed' in result


def test_urls_in_exception_reprs_and_containers():
    exc = ValueError(f"bad location 's3://k:{SECRET}@h/b/o'")
    texts = [
        repr(exc),
        str([f's3://k:{SECRET}@h/b/o', f'swift://u:{SECRET}@h/c/o']),
        repr({'uri': f'file://u:{SECRET}@/data/x'}),
        repr(RuntimeError(exc)),
    ]
    for text in texts:
        assert SECRET not in redaction.redact(text), text


@pytest.mark.parametrize(
    'text',
    [
        'Scrubbed image 3310c7fe-1111: 1 location(s), 1024 bytes freed',
        'location 3: file /var/lib/glance/images/x@2 is outside the store',
        'file:///var/lib/glance/images/x@2',  # no authority, no userinfo
        'mailto admin@example.com; requested by root@host',
        "Access denied for user 'glance'@'10.0.0.1' (using password: YES)",
        '2026-12-04 20:45:08.964 16200 DEBUG x [-] a: b@c',
        'http://glance.example.com:9292/v2/images',
        'lease owner host:1234:abcd, time 12:30:01',
        # masked by SQLAlchemy already: the user name stays
        'cannot reach the DB (mysql+pymysql://glance:***@db/glance)',
        '',
    ],
)
def test_text_without_credentials_is_unchanged(text):
    assert redaction.redact(text) == text


def test_none_and_non_text():
    assert redaction.redact(None) is None
    assert redaction.redact(ValueError(f's3://k:{SECRET}@h/b')) == (
        's3://***@h/b'
    )


# -- registered secrets -------------------------------------------------------


def test_registered_secret_is_masked_anywhere():
    redaction.add_secret(SECRET)
    text = f"Can't connect to MySQL server on '{SECRET}@127.0.0.1'"
    assert redaction.redact(text) == (
        "Can't connect to MySQL server on '***@127.0.0.1'"
    )


def test_registered_secret_inside_a_longer_word_is_left():
    redaction.add_url_secret('mysql+pymysql://glance:glance@db/glance')
    assert redaction.redact('glance_store: glance refused') == (
        'glance_store: *** refused'
    )


def test_secret_with_punctuation_at_its_ends_is_masked_anywhere():
    redaction.add_secret('!pw-7!')
    assert redaction.redact('user=x!pw-7!y') == 'user=x***y'


def test_url_secret_is_registered_in_every_form():
    redaction.add_url_secret(f'mysql+pymysql://glance:p%40{SECRET}@db/g')
    assert redaction.redact(f'password p@{SECRET}') == 'password ***'
    assert redaction.redact(f'password p%40{SECRET}') == 'password ***'


def test_transport_url_with_several_hosts():
    redaction.add_url_secret(
        f'rabbit://a:{SECRET}1@h1:5672,b:{SECRET}2@h2:5672/vhost'
    )
    assert redaction.redact(f'x {SECRET}1 y {SECRET}2') == 'x *** y ***'


def test_short_and_empty_secrets_are_not_literals():
    for value in (None, '', 'abc'):
        redaction.add_secret(value)
    assert redaction.redact('abc abcd') == 'abc abcd'
    redaction.add_url_secret('sqlite:////var/lib/x.sqlite')
    redaction.add_url_secret(None)
    assert redaction.redact('sqlite:////var/lib/x.sqlite') == (
        'sqlite:////var/lib/x.sqlite'
    )


# -- logs ---------------------------------------------------------------------


def _logger(formatter=None):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    if formatter is not None:
        handler.setFormatter(formatter)
    log = logging.getLogger(f'test_redaction.{id(stream)}')
    log.propagate = False
    log.handlers = [handler]
    log.setLevel(logging.DEBUG)
    return log, stream


def test_installed_handlers_redact_messages_and_tracebacks():
    redaction.install()
    log, stream = _logger()
    url = f's3://AKIA:{SECRET}@s3.example.com/b/o'
    log.info('deleting %s', url)
    try:
        raise RuntimeError(f'store failed on {url}')
    except RuntimeError:
        log.exception('Drain failed')
    text = stream.getvalue()
    assert SECRET not in text
    assert 's3://***@s3.example.com/b/o' in text
    assert 'Traceback' in text


def test_oslo_log_error_summary_is_redacted():
    # oslo.log appends the exception being handled to a WARNING, even
    # when the call did not pass it: the whole line must be redacted.
    redaction.install()
    conf = cfg.ConfigOpts()
    oslo_logging.register_options(conf)
    conf([])
    log, stream = _logger(formatters.ContextFormatter(config=conf))
    try:
        raise RuntimeError(f'rabbit://guest:{SECRET}@mq/')
    except RuntimeError:
        log.warning('broker trouble')
    assert SECRET not in stream.getvalue()
    assert 'broker trouble' in stream.getvalue()


def test_structured_formatters_keep_their_shape():
    # oslo.log's fluentd formatter returns a dict, not text.
    redaction.install()
    handler = logging.Handler()
    handler.setFormatter(formatters.FluentFormatter())
    record = logging.LogRecord(
        'x', logging.ERROR, __file__, 1, 'failed on %s', (SECRET_URL,), None
    )
    formatted = handler.format(record)
    assert isinstance(formatted, dict)
    assert formatted['message'] == 'failed on s3://***@h/b/o'
    assert SECRET not in repr(formatted)


def test_install_is_idempotent():
    redaction.install()
    redaction.install()
    log, stream = _logger()
    log.warning('x %s', f'rabbit://g:{SECRET}@mq/')
    assert stream.getvalue() == 'x rabbit://***@mq/\n'


# -- stdout / stderr ----------------------------------------------------------


def test_redacting_stream():
    target = io.StringIO()
    stream = redaction.RedactingStream(target)
    print(f'REFUSED: s3://k:{SECRET}@h/b/o', file=stream, flush=True)
    stream.writelines([f'swift://u:{SECRET}@h/c\n'])
    assert target.getvalue() == 'REFUSED: s3://***@h/b/o\nswift://***@h/c\n'


def test_redacted_output_restores_the_streams(capsys):
    before = sys.stdout, sys.stderr
    with redaction.redacted_output():
        print(f'out s3://k:{SECRET}@h/b')
        print(f'err s3://k:{SECRET}@h/b', file=sys.stderr)
    assert (sys.stdout, sys.stderr) == before
    captured = capsys.readouterr()
    assert captured.out == 'out s3://***@h/b\n'
    assert captured.err == 'err s3://***@h/b\n'


# -- our exceptions -----------------------------------------------------------


def test_exception_message_and_kwargs_are_redacted():
    url = f's3://AKIA:{SECRET}@h/b/o'
    exc = exceptions.DataGone(image_id='x', reason=f'cannot read {url}')
    assert SECRET not in str(exc)
    assert SECRET not in exc.message
    assert SECRET not in repr(exc.kwargs)
    assert exc.reason == 'cannot read s3://***@h/b/o'
    plain = exceptions.StoreError(f'location 3: store delete failed: {url}')
    assert str(plain) == ('location 3: store delete failed: s3://***@h/b/o')
    # non-text arguments pass untouched (the client rebuilds from them)
    assert exceptions.NotPendingDelete(image_id='x', status=5).status == 5


def test_exception_over_rpc_carries_no_secret():
    try:
        raise exceptions.DataGone(
            image_id='x', reason=f'location s3://k:{SECRET}@h/b/o'
        )
    except exceptions.DataGone:
        wire = rpc_common.serialize_remote_exception(sys.exc_info())
    assert SECRET not in wire
    remote = rpc_common.deserialize_remote_exception(
        wire, ['scrub_listener.exceptions']
    )
    assert isinstance(remote, exceptions.DataGone)
    assert SECRET not in str(remote)


# -- the commands -------------------------------------------------------------


def test_reports_errors_redacts_stdout_and_the_error_line(capsys):
    @common.reports_errors
    def main(argv):
        print(f'listing s3://k:{SECRET}@h/b/o')
        raise exceptions.DatabaseUnavailable(
            f'cannot reach mysql+pymysql://glance:{SECRET}@db/glance'
        )

    assert main([]) == exceptions.DatabaseUnavailable.exit_code
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert captured.err == (
        'ERROR: cannot reach mysql+pymysql://***@db/glance\n'
    )


def test_malformed_transport_url_is_a_config_error():
    conf = cfg.ConfigOpts()
    conf([])
    conf.register_opts(messaging_opts.list_opts()[0][1])
    conf.set_override('transport_url', f'rabbit://g:{SECRET}@mq:nope/')
    with pytest.raises(exceptions.ConfigError) as info:
        with common.messaging_config(conf):
            oslo_messaging.get_rpc_transport(conf)
    assert 'transport_url' in str(info.value)
    assert SECRET not in str(info.value)
    # and the broker password is a registered secret from now on
    assert redaction.redact(f'pw={SECRET}') == 'pw=***'


# -- oslo.config's option dump ------------------------------------------------


def test_option_dump_masks_every_secret_option():
    """log_opt_values prints "****" for options declared secret=True."""
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    for group, group_opts in messaging_opts.list_opts():
        if group in (None, 'oslo_messaging_notifications'):
            conf.register_opts(group_opts, group=group)
    conf([])
    values = {
        ('DEFAULT', 'metadata_encryption_key'): f'{SECRET}0123456789',
        ('DEFAULT', 'transport_url'): f'rabbit://g:{SECRET}@mq/',
        ('database', 'connection'): f'mysql+pymysql://g:{SECRET}@db/g',
        ('scrub_queue', 'connection'): f'mysql+pymysql://q:{SECRET}@db/q',
        ('oslo_messaging_notifications', 'transport_url'): (
            f'rabbit://n:{SECRET}@mq/'
        ),
    }
    for (group, name), value in values.items():
        conf.set_override(name, value, None if group == 'DEFAULT' else group)
    log, stream = _logger()  # no redaction installed: oslo.config's own
    conf.log_opt_values(log, logging.INFO)
    text = stream.getvalue()
    assert SECRET not in text
    for group, name in values:
        option = name if group == 'DEFAULT' else f'{group}.{name}'
        line = next(x for x in text.splitlines() if x.startswith(option))
        assert line.split() == [option, '=', '****'], text
