"""The event-path benchmark (``python -m tools.bench events``) still runs.

A small variant (N = 50) of its ingest and rpc scenarios runs for real:
the service as a subprocess on MariaDB and RabbitMQ, the reference
consumers, the RPC client, ``scrub-listener-manage restore``.  Each must
report verified results, and everything it made (temp dir, databases,
vhost) must be gone afterwards.  The full benchmark is run by hand.
"""

import json
import os
import subprocess
import sys

from tools import harness

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _gone(resources):
    vhosts = harness._rabbitmqctl('list_vhosts', '--quiet').split()
    assert resources['vhost'] not in vhosts
    assert not os.path.exists(resources['workdir'])
    rows = harness.fetch_all(
        harness._url_string(harness._admin_url('mysql')),
        'SELECT schema_name AS name FROM information_schema.schemata',
    )
    names = {row['name'] for row in rows}
    for name in resources['databases']:
        assert name not in names, f'database {name} left behind'


def test_events_smoke_ingest_and_rpc(tmp_path):
    tmpdir = tmp_path / 'tmp'
    tmpdir.mkdir()
    out = tmp_path / 'events.json'
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'tools.bench',
            'events',
            '--scenario',
            'ingest,rpc',
            '-n',
            '50',
            '--configs',
            '100:200',
            '--manage-runs',
            '1',
            '--quiet-wait',
            '0',
            '--json',
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TMPDIR=str(tmpdir)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [entry] = json.loads(out.read_text())
    assert entry['machine']['nproc'] >= 1
    assert entry['machine']['rabbitmq_version']
    ingest, rpc = entry['results']

    assert ingest['scenario'] == 'ingest' and ingest['verified']
    kinds = [run['consumer'] for run in ingest['runs']]
    assert kinds == ['kombu', 'oslo-plain', 'oslo-batch', 'scrub-listener']
    for run in ingest['runs']:
        assert run['verified'] and run['problems'] == [], run
        assert run['n'] == 50
    service = ingest['runs'][-1]
    assert service['default'] and service['exit_code'] == 0
    assert 10 < service['vmhwm_mib'] < 1000

    assert rpc['scenario'] == 'rpc' and rpc['verified'], rpc['problems']
    assert rpc['restore_ms']['n'] == 50
    assert 0 < rpc['restore_ms']['p50'] < 5000
    assert rpc['manage_rpc_s']['n'] == 1
    assert rpc['manage_direct_s']['n'] == 1
    assert rpc['repeat_restore'] == 'NotPendingDelete_Remote'

    assert 'all verified' in proc.stdout
    for result in (ingest, rpc):
        _gone(result['resources'])
    assert os.listdir(tmpdir) == [], 'the bench left files behind'
