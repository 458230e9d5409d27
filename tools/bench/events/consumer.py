"""Reference consumer of the ingest scenario, run as a child process.

``python -P tools/bench/events/consumer.py SPEC_JSON`` (what
:func:`tools.bench.events.ingest.run_consumer` runs; ``-P``: nothing from
this repository is importable, so the child loads only what it
measures).  It consumes ``n`` messages from the pool queue, as ``kind``:

``kombu``
    raw kombu consume + ack;
``oslo-plain``
    a do-nothing oslo.messaging notification listener;
``oslo-batch``
    a do-nothing oslo.messaging batch notification listener;

then prints one JSON line of timings, by its own clock: ``first`` and
``last`` are when the first and the last message were handled, ``ready``
when it started consuming, plus its CPU seconds and its peak RSS.
"""

import json
import resource
import sys
import threading
import time


class Counter:
    """Messages handled, and when the first and the last one were."""

    def __init__(self, n):
        self.n = n
        self.count = 0
        self.first = None
        self.first_count = 0
        self.last = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def seen(self, k=1):
        now = time.time()
        with self._lock:
            self.count += k
            if self.first is None:
                self.first = now
                self.first_count = self.count
            self.last = now
            if self.count >= self.n:
                self.done.set()


def consume_kombu(spec, counter):
    """Raw kombu consume + ack; returns when it started consuming."""
    import kombu

    conn = kombu.Connection(spec['amqp_url'])
    channel = conn.channel()
    if spec['prefetch']:
        channel.basic_qos(0, spec['prefetch'], False)

    def on_message(message):
        message.ack()
        counter.seen()

    consumer = kombu.Consumer(
        channel,
        [kombu.Queue(spec['queue'], no_declare=True)],
        on_message=on_message,
    )
    consumer.consume()
    ready = time.time()
    deadline = ready + spec['timeout']
    while not counter.done.is_set() and time.time() < deadline:
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            pass
    consumer.cancel()
    conn.release()
    return ready


def consume_oslo(spec, counter):
    """A do-nothing oslo.messaging listener (plain or batch); returns
    when it started consuming."""
    import oslo_messaging
    from oslo_config import cfg
    from oslo_messaging import opts

    for group, group_opts in opts.list_opts():
        if group == 'oslo_messaging_rabbit':
            cfg.CONF.register_opts(group_opts, group=group)
    cfg.CONF.set_override(
        'rabbit_qos_prefetch_count',
        spec['prefetch'],
        group='oslo_messaging_rabbit',
    )
    transport = oslo_messaging.get_notification_transport(
        cfg.CONF, url=spec['transport_url']
    )
    targets = [oslo_messaging.Target(topic='notifications', exchange='glance')]
    if spec['kind'] == 'oslo-batch':

        class BatchEndpoint:
            def info(self, messages):
                counter.seen(len(messages))

        listener = oslo_messaging.get_batch_notification_listener(
            transport,
            targets,
            [BatchEndpoint()],
            pool=spec['queue'],
            batch_size=spec['batch_size'],
            batch_timeout=spec['batch_timeout'],
        )
    else:

        class Endpoint:
            def info(self, ctxt, publisher_id, event_type, payload, metadata):
                counter.seen()

        listener = oslo_messaging.get_notification_listener(
            transport, targets, [Endpoint()], pool=spec['queue']
        )
    listener.start()
    ready = time.time()
    counter.done.wait(spec['timeout'])
    listener.stop()
    listener.wait()
    transport.cleanup()
    return ready


def main(argv):
    spec = json.loads(argv[1])
    counter = Counter(spec['n'])
    started = time.time()
    if spec['kind'] == 'kombu':
        ready = consume_kombu(spec, counter)
    else:
        ready = consume_oslo(spec, counter)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: that one survives exec() and starts at the
    # RSS of the parent that forked us.
    with open('/proc/self/status') as f:
        hwm = [
            int(line.split()[1]) for line in f if line.startswith('VmHWM:')
        ][0]
    print(
        json.dumps(
            {
                'count': counter.count,
                'started': started,
                'ready': ready,
                'first': counter.first,
                'first_count': counter.first_count,
                'last': counter.last,
                'cpu': usage.ru_utime + usage.ru_stime,
                'maxrss_kib': hwm,
            }
        )
    )


if __name__ == '__main__':
    main(sys.argv)
