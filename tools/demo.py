"""A guided demo of scrub-listener against a real Glance, on defaults.

``tox -e demo`` (or ``python -m tools.demo``) builds everything in a temp
directory and removes it afterwards: a Glance 33.0.0 database (SQLite,
real ``glance-manage db_sync``), a real glance-api with
``delayed_delete = True`` and a file store, a RabbitMQ vhost for its
notifications, and scrub-listener as a service on an otherwise default
configuration.  Then it does what an operator sees:

1. three images uploaded through the Glance API;
2. one deleted: the service hears ``image.delete`` and scrubs its data
   within a second;
3. one deleted by mistake and restored over RPC
   (``scrub-listener-manage restore``): it downloads byte-identical, with
   its properties and tags;
4. the service stopped, one more deleted, and ``scrub-listener
   --sweep-once`` catches what no event announced.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tools import harness

BIN = os.path.dirname(sys.executable)


def say(text):
    print(f'\n=== {text}', flush=True)


def run(*args, check=True):
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    print(proc.stdout, end='')
    if proc.returncode and check:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f'{args[0]} failed with exit code {proc.returncode}')
    return proc


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    start = time.monotonic()
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.02)
    raise SystemExit(f'timed out after {timeout} s waiting for {what}')


def write_conf(workdir, api, transport_url, scrub_time=0):
    """A glance-scrubber.conf style file; everything else is default."""
    path = os.path.join(workdir, 'scrub-listener.conf')
    harness.write_config(
        path,
        {
            'DEFAULT': {
                'scrub_time': scrub_time,
                'transport_url': transport_url,
                'enabled_backends': 'fs:file',
                'state_path': os.path.join(workdir, 'state'),
            },
            'database': {'connection': api.db_url},
            'glance_store': {'default_backend': 'fs'},
            'fs': {'filesystem_store_datadir': api.store_dir},
        },
    )
    return path


def start_service(conf, workdir):
    log = open(os.path.join(workdir, 'scrub-listener.log'), 'w')
    proc = subprocess.Popen(
        [os.path.join(BIN, 'scrub-listener'), '--config-file', conf],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for(
        lambda: 'scrub-listener started' in open(log.name).read(),
        60,
        'the service to start',
    )
    return proc, log


def demo(workdir):
    say('Glance 33.0.0: database (glance-manage db_sync) and glance-api')
    db_url = harness.create_glance_database('sqlite', cache=False)
    vhost, transport_url = harness.create_vhost()
    api = harness.GlanceApi(db_url, workdir, transport_url=transport_url)
    service = log = None
    try:
        api.start()
        print(f'glance-api at {api.url}, images in {api.store_dir}')
        conf = write_conf(workdir, api, transport_url)
        say('scrub-listener service (image.delete listener, RPC, sweep)')
        service, log = start_service(conf, workdir)
        print(f'running, pid {service.pid}, config {conf}')

        say('Upload three images through the Glance API')
        data = {name: os.urandom(256 * 1024) for name in ('a', 'b', 'c')}
        ids = {
            name: api.create_image(
                f'demo-{name}', blob, os_distro='ubuntu', tags=['demo']
            )
            for name, blob in data.items()
        }
        for name, image_id in ids.items():
            print(f'  demo-{name}: {image_id}')

        say('DELETE demo-a: the service scrubs it on the notification')
        api.delete_image(ids['a'])
        path_a = os.path.join(api.store_dir, ids['a'])
        took = wait_for(lambda: not os.path.exists(path_a), 30, 'scrub')
        print(f'  data of demo-a gone {took:.2f} s after the DELETE returned')

        say('scrub_time = 3600 and SIGHUP: deletions now wait an hour')
        write_conf(workdir, api, transport_url, scrub_time=3600)
        service.send_signal(signal.SIGHUP)
        wait_for(
            lambda: 'Configuration reloaded' in open(log.name).read(),
            30,
            'the reload',
        )
        print('  reloaded')

        say('DELETE demo-b by mistake, find it, restore it over RPC')
        api.delete_image(ids['b'])
        print(f'  GET /v2/images/{ids["b"]} -> {api.get_image(ids["b"])}')
        manage = os.path.join(BIN, 'scrub-listener-manage')
        run(manage, '--config-file', conf, 'list')
        run(manage, '--config-file', conf, 'restore', ids['b'])
        image = api.get_image(ids['b'])
        status, body = api.download(ids['b'])
        print(
            f'  status {image["status"]}, os_distro '
            f'{image.get("os_distro")}, tags {image["tags"]}, download '
            f'{status}, {len(body)} bytes, identical: {body == data["b"]}'
        )

        say('Stop the service, DELETE demo-c, then one --sweep-once pass')
        service.terminate()
        print(f'  service exited with {service.wait(60)}')
        api.delete_image(ids['c'])
        write_conf(workdir, api, transport_url, scrub_time=0)
        listener = os.path.join(BIN, 'scrub-listener')
        run(listener, '--config-file', conf, '--sweep-once')
        path_c = os.path.join(api.store_dir, ids['c'])
        print(f'  data of demo-c still on disk: {os.path.exists(path_c)}')
        say('Done. Logs of this run were in ' + workdir)
    finally:
        if service is not None and service.poll() is None:
            service.kill()
            service.wait()
        if log is not None:
            log.close()
        api.stop()
        harness.drop_database(db_url)
        harness.delete_vhost(vhost)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--keep', action='store_true', help='keep the temp directory'
    )
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix='scrub-listener-demo-')
    try:
        demo(workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
