"""Keep secrets inside the process.

Location URLs can carry credentials (``swift+https://user:key@auth/...``,
``s3://access:secret@host/bucket/key``), and so can database and broker
URLs.  Anything that leaves the process — a log line, ``last_error`` in
the due-queue, ``list`` output, an exception text sent over RPC — goes
through :func:`redact` first when it may quote one.
"""

import re

# scheme://userinfo@ ...: the userinfo carries secrets (greedy: a
# password may hold an "@" itself).
_USERINFO = re.compile(r'(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@')
MASK = '***'


def redact(text):
    """``text`` with the credentials of every URL in it masked.

    ``s3://key:secret@host/b/o`` becomes ``s3://***@host/b/o``; text
    without URLs is returned unchanged.
    """
    if not text:
        return text
    return _USERINFO.sub(lambda m: f'{m.group("scheme")}{MASK}@', str(text))
