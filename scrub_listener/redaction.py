"""Keep secrets inside the process.

Location URLs can carry credentials (``swift+https://user:key@auth/...``,
``s3://access:secret@host/bucket/key``), and so can database and broker
URLs.  Anything that leaves the process — a log line, ``last_error`` in
the due-queue, ``list`` output, an exception text sent over RPC — goes
through :func:`redact` first when it may quote one.

Three layers, because a secret can reach a text in ways no caller sees
(a library's debug line, an exception's repr, a traceback):

* :func:`redact` masks the userinfo of every URL in a text, and any
  secret the process registered with :func:`add_secret` (the configured
  database passwords, the broker password, the metadata encryption key);
* :func:`install` makes every log handler redact what it writes, and
  :class:`RedactingStream` what is printed to stdout/stderr (commands
  use :func:`redacted_output`);
* our own exceptions redact their message when built
  (:class:`scrub_listener.exceptions.ScrubListenerError`).
"""

import contextlib
import logging
import re
import sys
import threading
import urllib.parse

MASK = '***'

# scheme://userinfo@...: the userinfo carries secrets.  It runs to the
# *last* "@" of the URL: a password may hold "@", ":", "/" (legacy S3
# secret keys hold "/" and "+"), even a quote, so masking stops only
# where the URL ends (whitespace) or where the next URL starts.  At worst
# it masks too much (an "@" further on), never too little.  An empty
# authority ("file:///path") has no userinfo: its "@"s are the path's.
# The scheme starts where a word starts: tried at every position, a long
# run of letters made the search quadratic (100 KB of them: 17 s).
_URL_USERINFO = re.compile(
    r'(?<![A-Za-z0-9+.-])'
    r'(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?!/)(?:(?!://)\S)*@'
)

# A userinfo already masked by its writer: user name, then only the mask.
_MASKED_PASSWORD = re.compile(r'[^:@/]*:' + re.escape(MASK))

# user:password@... without a scheme: what glance_store's file driver
# makes of file://user:password@/path (netloc + path), and what some
# drivers print of a host.  A token of its own (start of text, or after
# a blank, quote, bracket, "=" or ","), a user without ":" or "/", and
# never "//" after the colon (that is a URL the pattern above handled).
_BARE_USERINFO = re.compile(r'(?<![^\s\'"(\[<=,])[^\s\'"/:@]+:(?!//)\S*@')

# Shorter secrets are not masked as literals: masking "ab" everywhere
# would garble every log line (URLs still mask them, as userinfo).  For
# the same reason a literal is masked only where it is not part of a
# longer word: a weak password "glance" leaves "glance_store" readable.
MIN_SECRET_LENGTH = 4

_secrets = set()
_secrets_lock = threading.Lock()
_literal = None  # compiled alternation of _secrets, longest first


def redact(text):
    """``text`` with the credentials of every URL in it masked.

    ``s3://key:secret@host/b/o`` becomes ``s3://***@host/b/o`` (but
    ``user:***@``, already masked, is kept);
    ``user:secret@/path`` becomes ``***@/path``; every registered secret
    becomes ``***``.  Text without any is returned unchanged.  Not a str:
    its ``str()`` is redacted.
    """
    if not text:
        return text
    text = str(text)
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _BARE_USERINFO.sub(f'{MASK}@', text)
    literal = _literal
    if literal is not None:
        text = literal.sub(MASK, text)
    return text


def _mask_userinfo(match):
    userinfo = match.group(0)[len(match.group('scheme')) : -1]
    if _MASKED_PASSWORD.fullmatch(userinfo):
        # "user:***", as SQLAlchemy renders a URL: the user name helps
        # the operator (which account was refused) and is no secret.
        return match.group(0)
    return f'{match.group("scheme")}{MASK}@'


def add_secret(value):
    """Mask ``value`` wherever it appears from now on (also URL-quoted).

    For secrets the process knows: configured passwords and keys.  A text
    can quote them outside any URL (a driver's error, a mis-parsed URL).
    """
    global _literal
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    # as configured, and as it may be printed: quoted, or decoded
    forms = {
        value,
        urllib.parse.quote(value, safe=''),
        urllib.parse.unquote(value),
    }
    with _secrets_lock:
        if forms <= _secrets:
            return
        _secrets.update(f for f in forms if len(f) >= MIN_SECRET_LENGTH)
        ordered = sorted(_secrets, key=len, reverse=True)
        _literal = re.compile('|'.join(_literal_pattern(s) for s in ordered))


def _literal_pattern(secret):
    """``secret`` as a regex, not matching inside a longer word."""
    pattern = re.escape(secret)
    if re.match(r'\w', secret):
        pattern = r'(?<!\w)' + pattern
    if re.match(r'\w', secret[-1]):
        pattern += r'(?!\w)'
    return pattern


def add_url_secret(url):
    """Register the password of ``url`` (a DB or broker URL) as a secret."""
    if not url:
        return
    # The authority as urllib (and so oslo.messaging) reads it, by hand:
    # urlsplit refuses some malformed URLs, which must still be masked.
    rest = str(url).partition('://')[2]
    authority = re.split(r'[/?#]', rest, maxsplit=1)[0]
    for host in authority.split(','):  # transport URLs list several hosts
        userinfo = host.rpartition('@')[0]
        if ':' in userinfo:
            add_secret(userinfo.split(':', 1)[1])


def forget_secrets():
    """Drop every registered secret (for tests)."""
    global _literal
    with _secrets_lock:
        _secrets.clear()
        _literal = None


# -- where text leaves the process ---------------------------------------

_handler_format = logging.Handler.format


def _redacting_format(self, record):
    formatted = _handler_format(self, record)
    # Some handlers (journald) also ship the traceback on its own.
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    return _redact_formatted(formatted)


def _redact_formatted(value):
    # Formatters return text, except oslo.log's fluentd one: a dict.
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_formatted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_formatted(v) for v in value]
    return value


def install():
    """Make every log handler redact what it writes; idempotent.

    At the class, not per handler: oslo.log replaces its handlers on a
    reload, an operator's ``log_config_append`` brings its own, and
    libraries may add some; all of them format through Handler.format.
    The formatted text is redacted as a whole, so oslo.log's additions
    (the traceback, the summary of the exception being handled) are too.
    """
    logging.Handler.format = _redacting_format


class RedactingStream:
    """A text stream that redacts each write before passing it on.

    Redaction is per ``write()`` call: ``print`` writes its text in one
    call, so a URL is never split between two.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact(text) if text else text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output():
    """Redact logs, stdout and stderr of a command while it runs.

    stderr also carries what Python itself prints: a traceback before
    logging is set up, an exception that ends a thread.
    """
    install()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (
        RedactingStream(saved[0]),
        RedactingStream(saved[1]),
    )
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
