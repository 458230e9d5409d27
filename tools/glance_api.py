"""A real glance-api (glance 33.0.0 under gunicorn, no keystone) for tests:
``GlanceApi``, its data directories, policy and paste file, free ports,
and stopping every glance-api still running at exit.

Part of ``tools.harness`` (which re-exports it); see its docstring.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import requests
import sqlalchemy as sa

from tools.databases import _engine
from tools.services import HarnessError
from tools.services import bin_path
from tools.services import write_config

# --------------------------------------------------------------- glance-api

#: Policy file content that lets the keystone-less admin context do
#: everything.  ``{"default": ""}`` alone is not enough in glance 33: rules
#: without a deprecated ``rule:default`` fallback (copy_image,
#: publicize_image, fetch_image_location, stores_info_detail, ...) check
#: ``role:admin`` through ``context_is_admin`` / ``service_api``, and the
#: unauthenticated context has ``is_admin=True`` but no roles.
ALLOW_ALL_POLICY = {'default': '', 'context_is_admin': '', 'service_api': ''}


DATADIR_MARKER = '.scrub-listener-mounted'


def make_datadir(path):
    """A file store data directory as docs/store-trust.md recommends it:
    with a marker file, so that an empty store is never taken for an
    unmounted one (scrub-listener then distrusts "not found")."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, DATADIR_MARKER), 'a'):
        pass
    return str(path)


def free_port():
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def glance_paste_ini():
    """Path of the glance-api-paste.ini installed with the glance package.

    pip puts the package's ``etc/glance`` data files under
    ``<prefix>/etc/glance``.
    """
    candidates = [
        os.path.join(sys.prefix, 'etc', 'glance', 'glance-api-paste.ini'),
        '/usr/local/etc/glance/glance-api-paste.ini',
        '/usr/etc/glance/glance-api-paste.ini',
        '/etc/glance/glance-api-paste.ini',
    ]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise HarnessError(f'glance-api-paste.ini not found in {candidates}')


class GlanceApi:
    """A real glance-api (glance 33.0.0) under gunicorn, for tests.

    No keystone: the default paste pipeline uses ``unauthenticated-context``,
    so every request runs as an admin context (``is_admin=True``, no
    project).  With ``enforce_new_defaults = False`` and ALLOW_ALL_POLICY
    as policy file every API call is allowed, delete included.

    Config written to ``<workdir>/etc/glance-api.conf``:
    ``[DEFAULT] delayed_delete = True``, ``enabled_backends =
    <backend_name>:file``, ``show_multiple_locations`` (default True: glance
    refuses PATCH ``/locations`` with 403 without it), optional
    ``metadata_encryption_key``; ``[glance_store] default_backend``;
    ``[<backend_name>]``, ``[os_glance_staging_store]``,
    ``[os_glance_tasks_store]`` under ``<workdir>/{images,staging,tasks}``;
    ``[oslo_messaging_notifications] driver = messagingv2`` when
    ``transport_url`` is given, else ``noop``.  ``extra_config`` is merged
    in last (``{section: {option: value}}``).

    The server log (gunicorn + glance, stdout and stderr) is
    ``<workdir>/glance-api.log``.  gunicorn runs in its own session; stop()
    signals the whole process group, so no worker survives.
    """

    def __init__(
        self,
        db_url,
        workdir,
        transport_url=None,
        encryption_key=None,
        backend_name='fs',
        *,
        extra_backends=(),
        show_multiple_locations=True,
        workers=1,
        threads=4,
        extra_config=None,
        start_timeout=60,
    ):
        if encryption_key is not None and len(encryption_key) not in (
            16,
            24,
            32,
        ):
            raise HarnessError('metadata_encryption_key must be 16/24/32 long')
        self.db_url = db_url
        self.workdir = os.path.abspath(workdir)
        self.transport_url = transport_url
        self.encryption_key = encryption_key
        self.backend_name = backend_name
        self.extra_backends = tuple(extra_backends)
        self.show_multiple_locations = show_multiple_locations
        self.workers = workers
        self.threads = threads
        self.extra_config = extra_config or {}
        self.start_timeout = start_timeout
        self.config_dir = os.path.join(self.workdir, 'etc')
        self.log_path = os.path.join(self.workdir, 'glance-api.log')
        self.port = None
        self.proc = None
        self._log = None
        self.session = requests.Session()

    # -- paths and config

    @property
    def store_dir(self):
        """filesystem_store_datadir of the default image backend."""
        return os.path.join(self.workdir, 'images')

    def store_dir_of(self, backend):
        """filesystem_store_datadir of ``backend`` (default or extra)."""
        if backend == self.backend_name:
            return self.store_dir
        return os.path.join(self.workdir, 'images-' + backend)

    @property
    def staging_dir(self):
        return os.path.join(self.workdir, 'staging')

    @property
    def url(self):
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f'http://127.0.0.1:{self.port}'

    @property
    def config_file(self):
        return os.path.join(self.config_dir, 'glance-api.conf')

    def config_sections(self):
        """The glance-api.conf content as ``{section: {option: value}}``."""
        b = self.backend_name
        backends = (b, *self.extra_backends)
        default = {
            'delayed_delete': True,
            'enabled_backends': [f'{name}:file' for name in backends],
            'show_multiple_locations': self.show_multiple_locations,
            'metadata_encryption_key': self.encryption_key,
            'transport_url': self.transport_url,
            'worker_self_reference_url': self.url,
            'debug': False,
        }
        sections = {
            'DEFAULT': default,
            'glance_store': {'default_backend': b},
            **{
                name: {'filesystem_store_datadir': self.store_dir_of(name)}
                for name in backends
            },
            'os_glance_staging_store': {
                'filesystem_store_datadir': self.staging_dir
            },
            'os_glance_tasks_store': {
                'filesystem_store_datadir': os.path.join(self.workdir, 'tasks')
            },
            'database': {'connection': self.db_url},
            'paste_deploy': {
                'config_file': os.path.join(
                    self.config_dir, 'glance-api-paste.ini'
                )
            },
            'oslo_policy': {
                'enforce_scope': False,
                'enforce_new_defaults': False,
                'policy_file': os.path.join(self.config_dir, 'policy.json'),
            },
            'oslo_messaging_notifications': {
                'driver': 'messagingv2' if self.transport_url else 'noop',
                'transport_url': self.transport_url,
            },
            'oslo_concurrency': {
                'lock_path': os.path.join(self.workdir, 'locks')
            },
        }
        for section, options in self.extra_config.items():
            sections.setdefault(section, {}).update(options)
        return sections

    def write_config(self):
        for sub in ('etc', 'staging', 'tasks', 'locks'):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        make_datadir(self.store_dir)
        for name in self.extra_backends:
            make_datadir(self.store_dir_of(name))
        shutil.copyfile(
            glance_paste_ini(),
            os.path.join(self.config_dir, 'glance-api-paste.ini'),
        )
        with open(os.path.join(self.config_dir, 'policy.json'), 'w') as f:
            json.dump(ALLOW_ALL_POLICY, f)
        write_config(self.config_file, self.config_sections())

    # -- process

    def start(self):
        """Start gunicorn and wait until GET /v2/images answers 200."""
        if self.proc is not None:
            raise HarnessError('glance-api already started')
        for attempt in range(3):
            self.port = free_port()
            self.write_config()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except HarnessError:
                in_use = 'Address already in use' in self.log_tail()
                self.stop()
                if not in_use or attempt == 2:
                    raise
        return self

    def _spawn(self):
        env = dict(os.environ, OS_GLANCE_CONFIG_DIR=self.config_dir)
        env.setdefault('PYTHONWARNINGS', 'ignore')
        self._log = open(self.log_path, 'ab')
        cmd = [
            bin_path('gunicorn'),
            '--bind',
            f'127.0.0.1:{self.port}',
            '--workers',
            str(self.workers),
            '--threads',
            str(self.threads),
            '--timeout',
            '120',
            '--graceful-timeout',
            '5',
            '--access-logfile',
            '-',
            'glance.wsgi.api:application',
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _running.add(self)

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f'glance-api exited with {self.proc.returncode} during '
                    f'start; log {self.log_path}:\n{self.log_tail()}'
                )
            try:
                resp = self.session.get(
                    self.url + '/v2/images', params={'limit': 1}, timeout=5
                )
                if resp.status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise HarnessError(
                    f'glance-api did not answer within {self.start_timeout}'
                    f' s; log {self.log_path}:\n{self.log_tail()}'
                )
            time.sleep(0.1)

    def stop(self, timeout=10):
        """SIGINT the process group, SIGKILL it after ``timeout`` s."""
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is not None:
            _kill_group(proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.session.close()
        self.session = requests.Session()

    def log_tail(self, lines=60):
        try:
            with open(self.log_path, 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            return ''
        text = data.decode('utf-8', 'replace')
        return '\n'.join(text.splitlines()[-lines:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP helpers

    def request(self, method, path, **kwargs):
        """Raw request to ``<url><path>``; returns the requests.Response."""
        kwargs.setdefault('timeout', 60)
        return self.session.request(method, self.url + path, **kwargs)

    def _check(self, resp, *expected):
        if resp.status_code not in expected:
            raise HarnessError(
                f'{resp.request.method} {resp.request.url} -> '
                f'{resp.status_code} (expected {expected}): {resp.text}'
            )
        return resp

    def create_image(self, name, data, tags=(), **props):
        """POST /v2/images (raw/bare, ``props`` as extra properties or
        image attributes such as ``visibility``), then PUT the data.

        Returns the image id; the image is ``active`` afterwards.
        """
        body = {
            'name': name,
            'disk_format': 'raw',
            'container_format': 'bare',
            'tags': list(tags),
        }
        body.update(props)
        resp = self._check(self.request('POST', '/v2/images', json=body), 201)
        image_id = resp.json()['id']
        if data is not None:
            self.upload(image_id, data)
        return image_id

    def upload(self, image_id, data):
        """PUT /v2/images/ID/file."""
        self._check(
            self.request(
                'PUT',
                f'/v2/images/{image_id}/file',
                data=data,
                headers={'Content-Type': 'application/octet-stream'},
            ),
            204,
        )

    def delete_image(self, image_id):
        """DELETE /v2/images/ID (204 expected)."""
        self._check(self.request('DELETE', f'/v2/images/{image_id}'), 204)

    def get_image(self, image_id):
        """GET /v2/images/ID as a dict, or None on 404."""
        resp = self.request('GET', f'/v2/images/{image_id}')
        if resp.status_code == 404:
            return None
        return self._check(resp, 200).json()

    def download(self, image_id):
        """GET /v2/images/ID/file -> ``(status_code, body bytes)``."""
        resp = self.request('GET', f'/v2/images/{image_id}/file')
        return resp.status_code, resp.content

    def add_tag(self, image_id, tag):
        """PUT /v2/images/ID/tags/TAG."""
        self._check(
            self.request('PUT', f'/v2/images/{image_id}/tags/{tag}'), 204
        )

    def patch(self, image_id, operations):
        """PATCH /v2/images/ID with a JSON-patch list; returns the image."""
        resp = self.request(
            'PATCH',
            f'/v2/images/{image_id}',
            data=json.dumps(operations),
            headers={
                'Content-Type': 'application/openstack-images-v2.1-json-patch'
            },
        )
        return self._check(resp, 200).json()

    def add_location(self, image_id, url, metadata=None, index='-'):
        """PATCH ``add /locations/<index>`` (needs show_multiple_locations).

        In multi-store mode glance fills ``metadata['store']`` itself from
        the URL.  The data must exist: glance reads its size from the store.
        """
        return self.patch(
            image_id,
            [
                {
                    'op': 'add',
                    'path': f'/locations/{index}',
                    'value': {'url': url, 'metadata': metadata or {}},
                }
            ],
        )

    def remove_location(self, image_id, index):
        """PATCH ``remove /locations/<index>``; returns the image.

        Glance 33 allows it only with ``show_multiple_locations = True``
        (403 otherwise), on an ``active`` image (409 otherwise) and never
        for the last location (403 "Cannot remove last location").  With
        delayed_delete the removed location row becomes ``pending_delete``
        (deleted=1) while the image stays active, and the data stays.
        """
        return self.patch(
            image_id, [{'op': 'remove', 'path': f'/locations/{index}'}]
        )

    def add_location_row(self, image_id, url, store=None):
        """INSERT a second ``active`` location for an image into the DB.

        The API cannot do it here: PATCH ``add /locations`` refuses
        ``file://`` ("Invalid location", a restricted scheme), http
        locations must pass the import host filter, and the ``copy-image``
        import fails without keystone (its task row needs an owner, the
        unauthenticated context has no project).  The URL is encrypted with
        ``encryption_key`` like glance does.  ``store`` defaults to the
        default backend.  Returns the new row id.
        """
        value = url
        if self.encryption_key:
            from glance.common import crypt

            value = crypt.urlsafe_encrypt(self.encryption_key, url)
        now = sa.func.now()
        table = sa.Table(
            'image_locations',
            sa.MetaData(),
            sa.Column('id', sa.Integer, primary_key=True),
            sa.Column('image_id', sa.String(36)),
            sa.Column('value', sa.Text),
            sa.Column('meta_data', sa.Text),
            sa.Column('status', sa.String(30)),
            sa.Column('created_at', sa.DateTime),
            sa.Column('updated_at', sa.DateTime),
            sa.Column('deleted', sa.Boolean),
        )
        with _engine(self.db_url).begin() as conn:
            result = conn.execute(
                table.insert().values(
                    image_id=image_id,
                    value=value,
                    meta_data=json.dumps(
                        {'store': store or self.backend_name}
                    ),
                    status='active',
                    created_at=now,
                    updated_at=now,
                    deleted=False,
                )
            )
            return result.inserted_primary_key[0]

    def delete_from_store(self, image_id, store=None):
        """DELETE /v2/stores/STORE/ID (multi-store "delete from store")."""
        store = store or self.backend_name
        self._check(
            self.request('DELETE', f'/v2/stores/{store}/{image_id}'), 204
        )


def _kill_group(proc, timeout):
    # why SIGINT: gunicorn's "quick shutdown"; SIGTERM waits for the
    # gthread workers' 1 s poll loop and takes ~2.5 s.
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    # why: gunicorn's master may exit before a stuck worker; the group
    # outlives it, so always sweep it with SIGKILL.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


_running = set()


@atexit.register
def stop_all_glance_apis():
    """Stop every GlanceApi still running (also run at exit)."""
    for api in list(_running):
        api.stop(timeout=5)
