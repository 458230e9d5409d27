"""The always-on service: who runs what, and in which order.

Threads:

* the oslo.messaging **listener** (batch, pool ``[listener] pool``) turns
  ``image.delete`` events into due-queue rows and wakes the drain;
* the **drain** thread runs the scrub pipeline
  (:meth:`scrub_listener.scrubber.Scrubber.drain`) while anything is
  due; store deletes fan out to the futurist pool (``scrub_pool_size``).
  It sleeps until the next due time (or a wake-up from the listener),
  never on a fixed poll;
* a futurist **PeriodicWorker** runs the sweep every ``wakeup_time``
  seconds (first run at start), catching what the events missed.  A
  periodic callback never overlaps itself;
* the oslo.messaging **RPC server** serves ``restore``/``status``.

Start order: drain, sweep, RPC, listener — everything that consumes work
is up before work arrives.  Stop order is the reverse for the producers
(listener first: stop taking events; the broker keeps what we did not
ack), then the RPC server and the sweep, then the drain finishes the
batch it has (bounded by ``graceful_shutdown_timeout``) and the pool
drains.  A batch cut short leaves leases that another instance (or the
next start) takes over after ``lease_time``: nothing is lost.
"""

import datetime
import logging
import threading

import oslo_messaging
from futurist import periodics
from oslo_config import cfg
from oslo_messaging import opts as messaging_opts
from oslo_messaging.notify import listener as notify_listener

from scrub_listener import exceptions
from scrub_listener import messaging_compat
from scrub_listener import model
from scrub_listener import notification
from scrub_listener import retry
from scrub_listener import rpc

LOG = logging.getLogger(__name__)

# The drain re-checks the queue at least this often, for rows another
# instance sharing the queue added (their listener cannot wake us).
MAX_IDLE = 5.0
# After an unexpected drain error (database down), wait about this long
# before retrying: not growing, so that scrubbing resumes within seconds
# of the database coming back (the error is logged once per pause).
ERROR_PAUSE = 5.0


def check_messaging_config(conf):
    if conf.rpc.topic == conf.listener.pool:
        raise exceptions.ConfigError(
            f'[rpc] topic and [listener] pool are both {conf.rpc.topic!r}: '
            'they name RabbitMQ queues and must differ'
        )


def set_messaging_defaults(conf):
    """Bound the broker backlog held in memory (see [listener] prefetch).

    The rabbit driver reads its options when the transport is built, so
    they are registered here (from oslo.messaging's own list) to set a
    default the operator's file still overrides.
    """
    for group, opts in messaging_opts.list_opts():
        if group == 'oslo_messaging_rabbit':
            conf.register_opts(opts, group=group)
    messaging_compat.ack_duplicate_messages()
    conf.set_default(
        'rabbit_qos_prefetch_count',
        conf.listener.prefetch,
        group='oslo_messaging_rabbit',
    )


class Service:
    """The always-on service: threads, start and stop order, reload."""

    def __init__(self, conf, parts, on_fatal):
        """``on_fatal(exc)`` is called (from a thread) if the service
        cannot run; the caller stops it and exits non-zero."""
        self._conf = conf
        self._on_fatal = on_fatal
        self._parts = parts
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._messaging_started = threading.Event()
        self._drain_thread = None
        self._endpoint = notification.ImageDeleteEndpoint(
            parts.glance_db, parts.queue, parts.schedule, self._wake.set
        )
        self._periodic = periodics.PeriodicWorker(
            [(self._make_sweep(), None, None)]
        )
        self._periodic_thread = None
        self._listener = None
        self._rpc_server = None
        self._transports = []

    # -- building ------------------------------------------------------

    def _make_sweep(self):
        # glance-scrubber accepts wakeup_time = 0; a sweep per second is
        # the closest sane reading of it.
        spacing = max(self._conf.wakeup_time, 1)

        @periodics.periodic(spacing, run_immediately=True)
        def sweep():
            try:
                found, queued = self._parts.sweeper.sweep()
            except Exception:
                LOG.exception(
                    'Sweep failed; retrying in %d s', self._conf.wakeup_time
                )
                return
            if queued:
                self._wake.set()

        return sweep

    def _build_messaging(self):
        conf = self._conf
        check_messaging_config(conf)
        set_messaging_defaults(conf)
        notify_transport = oslo_messaging.get_notification_transport(conf)
        rpc_transport = oslo_messaging.get_rpc_transport(conf)
        self._transports = [notify_transport, rpc_transport]
        targets = [
            oslo_messaging.Target(topic=topic, exchange=conf.listener.exchange)
            for topic in conf.listener.topics
        ]
        # The factory get_batch_notification_listener() with our own
        # dispatcher (see messaging_compat.TolerantBatchDispatcher).
        self._listener = notify_listener.BatchNotificationServer(
            notify_transport,
            targets,
            messaging_compat.TolerantBatchDispatcher(
                [self._endpoint], oslo_messaging.NoOpSerializer()
            ),
            # No requeue: the endpoint retries a transient failure itself
            # (the batch stays unacked meanwhile) and a batch oslo.messaging
            # cannot even dispatch (malformed envelope) would otherwise be
            # redelivered in a hot loop.  See notification.py.
            allow_requeue=False,
            pool=conf.listener.pool,
            batch_size=conf.listener.batch_size,
            batch_timeout=conf.listener.batch_timeout,
        )
        api = rpc.ScrubListenerAPI(self._parts.restorer, self.status)
        self._rpc_server = rpc.get_server(conf, rpc_transport, api)

    # -- running -------------------------------------------------------

    def start(self):
        """Start everything; return at once, even if the broker is down.

        The drain and the sweep need only the databases, so they start
        first and work while oslo.messaging is still (re)connecting to
        the broker in its own thread: a broker outage delays events, it
        does not stop scrubbing.  It also keeps the main thread free to
        act on SIGTERM while the broker cannot be reached.
        """
        self._build_messaging()
        self._drain_thread = threading.Thread(
            target=self._drain_loop, name='drain', daemon=True
        )
        self._drain_thread.start()
        self._periodic_thread = threading.Thread(
            target=self._periodic.start, name='sweep', daemon=True
        )
        self._periodic_thread.start()
        threading.Thread(
            target=self._start_messaging, name='messaging-start', daemon=True
        ).start()

    def _start_messaging(self):
        # Blocks (oslo.messaging retries) for as long as the broker is
        # unreachable; the rabbit driver logs each attempt.
        try:
            self._rpc_server.start()
            self._listener.start()
        except Exception as exc:
            # e.g. the broker refuses our queue declaration: without a
            # listener and an RPC server we must not look alive.
            LOG.critical('Cannot start consuming from the broker: %s', exc)
            self._on_fatal(exc)
            return
        self._messaging_started.set()
        LOG.info(
            'scrub-listener started on %s: events from exchange %r topics '
            '%s (pool %r), RPC topic %r, sweep every %d s, scrub_time %d s, '
            '%d scrub threads',
            self._conf.host,
            self._conf.listener.exchange,
            self._conf.listener.topics,
            self._conf.listener.pool,
            self._conf.rpc.topic,
            self._conf.wakeup_time,
            self._conf.scrub_time,
            self._conf.scrub_pool_size,
        )

    def stop(self):
        """Stop; return False if in-flight scrubs were left unfinished."""
        LOG.info('Stopping: no new events, finishing in-flight scrubs')
        self._endpoint.stopping.set()
        if self._messaging_started.is_set():
            for server in (self._listener, self._rpc_server):
                server.stop()
            for server in (self._listener, self._rpc_server):
                server.wait()
        else:
            # Still connecting: nothing consumed, nothing to hand back.
            LOG.warning('Stopping before the broker was reached')
        self._periodic.stop()
        self._periodic.wait()
        self._stopping.set()
        self._wake.set()
        finished = True
        if self._drain_thread is not None:
            self._drain_thread.join(
                self._conf.service.graceful_shutdown_timeout
            )
            finished = not self._drain_thread.is_alive()
            if not finished:
                LOG.warning(
                    'In-flight scrubs did not finish within %d s; '
                    'their leases will be taken over',
                    self._conf.service.graceful_shutdown_timeout,
                )
        if self._messaging_started.is_set():
            for transport in self._transports:
                transport.cleanup()
        LOG.info('Stopped')
        return finished

    def reload(self):
        """SIGHUP: re-read the mutable options.

        A bad new value is logged and the running one kept: a typo in a
        reload must not take the service down.
        """
        try:
            self._conf.mutate_config_files()
            scrub_time = self._conf.scrub_time
        except (cfg.Error, ValueError) as exc:
            LOG.error(
                'Reload refused, keeping scrub_time %d s: %s',
                self._parts.schedule.scrub_time,
                exc,
            )
            return
        # One Schedule, shared by the endpoint, the sweep and the scrubber:
        # new deletions are due after the new scrub_time; queued ones
        # keep the due time they were given.
        self._parts.schedule.scrub_time = scrub_time
        LOG.info('Configuration reloaded: scrub_time %d s', scrub_time)

    def _drain_loop(self):
        scrubber = self._parts.scrubber
        pauses = retry.delays(ERROR_PAUSE, maximum=ERROR_PAUSE)
        while not self._stopping.is_set():
            try:
                scrubber.drain(stop=self._stopping.is_set)
            except Exception:
                pause = next(pauses)
                LOG.exception('Drain failed; retrying in %.0f s', pause)
                self._stopping.wait(pause)
                continue
            self._sleep_until_due()

    def _sleep_until_due(self):
        # Clear before looking: a wake-up that lands after the look is
        # kept and ends the wait at once.
        self._wake.clear()
        next_at = self._parts.queue.next_wakeup()
        timeout = MAX_IDLE
        if next_at is not None:
            delta = (next_at - model.utcnow()).total_seconds()
            timeout = max(0.0, min(delta, MAX_IDLE))
        if timeout > 0:
            self._wake.wait(timeout)

    def status(self):
        stats = self._parts.queue.stats(model.utcnow())
        return {
            'host': self._conf.host,
            'time': datetime.datetime.now(datetime.UTC).isoformat(),
            'scrub_time': self._parts.schedule.scrub_time,
            **stats,
        }
