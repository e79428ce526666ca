"""What every glove source is: samples with their arrival time, and counters.

A source owns a :class:`~neurohand.firmware_bridge.link.SerialLink` whose
reader thread feeds the source's parser; complete samples wait in a bounded
queue until the caller takes them with :meth:`GloveSource.read`.
"""
import collections
import threading
import time

from neurohand.firmware_bridge.shared.counters import new_counters

GloveSample = collections.namedtuple("GloveSample", "arrival sequence raw")
GloveSample.__doc__ = """One glove sample.

arrival : float, ``time.monotonic()`` when the bytes that completed it were read
sequence : int (the neurohand serial protocol's frame counter) or None (a CyberGlove has none)
raw : tuple of float, one per sensor, in the glove's own units (ADC counts)
"""

#: Counters every source has (each may add its own): frames (samples accepted),
#: lost (samples the glove sent that never arrived intact, where the protocol can
#: tell), crc_errors, resyncs (runs of discarded bytes), timeouts (times the
#: glove went silent for longer than its stall limit).
GLOVE_COUNTERS = ("frames", "lost", "crc_errors", "resyncs", "timeouts")

#: Samples kept for a caller that does not read: 10 minutes at 100 Hz.
QUEUE_LIMIT = 60000


class GloveSource(object):
    """Base class of the glove sources; see the module docstring.

    Attributes
    ----------
    kind : str, the registry name (``serial``, ``cyberglove``)
    port : str
    sensor_names : list of str, one per raw sensor
    rate_hz : float, the glove's nominal sample rate
    stall_timeout_s : float, silence after which the glove counts as stopped
    stalled : bool, silent for longer than ``stall_timeout_s`` now

    Subclasses open the link, learn the sensors and rate, and call
    :meth:`_push` from the link's reader thread.
    """

    kind = None

    def __init__(self, port):
        self.port = port
        self.sensor_names = []
        self.rate_hz = None
        self.stall_timeout_s = 0.5
        self.stalled = False
        self.link = None
        self._counters = new_counters(GLOVE_COUNTERS + ("unread_dropped",))
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._last_arrival = None
        self._opened_at = time.monotonic()
        self._closed = False

    # -- what a caller uses ------------------------------------------------------
    @property
    def counters(self):
        """A snapshot dict: :data:`GLOVE_COUNTERS`, the source's own, and the link's
        ``disconnects`` and ``reconnects``; ``unread_dropped``: samples dropped because
        more than :data:`QUEUE_LIMIT` were waiting."""
        counters = dict(self._counters)
        counters.update(self._extra_counters())
        if self.link is not None:
            counters["disconnects"] = self.link.counters["disconnects"]
            counters["reconnects"] = self.link.counters["reconnects"]
        return counters

    def read(self, timeout=0.1):
        """Every sample that arrived since the last call, oldest first (a list of GloveSample).

        Waits up to ``timeout`` seconds for the first one; returns [] if none came.
        A glove silent for longer than ``stall_timeout_s`` after a sample counts
        one timeout (``stalled`` stays True until a sample arrives); before its
        first sample, ``silent_s`` says how long it has been quiet.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._queue:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            samples = list(self._queue)
            self._queue.clear()
            if samples:
                self.stalled = False
            else:
                self._check_stall()
        return samples

    @property
    def silent_s(self):
        """Seconds since the last sample arrived (since opening, before the first)."""
        return time.monotonic() - (self._opened_at if self._last_arrival is None else self._last_arrival)

    def close(self):
        """Stop the glove (where the protocol has a stop) and close the port.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._before_close()
        finally:
            if self.link is not None:
                self.link.close()
            with self._cond:
                self._cond.notify_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "{}({!r}, {} sensors at {} Hz)".format(type(self).__name__, self.port, len(self.sensor_names),
                                                    self.rate_hz)

    # -- what subclasses use -----------------------------------------------------
    def _started(self):
        """The source is open; stall detection starts with its first sample (a glove
        may rightly be quiet until then: a bench's glove waiting for --start-at)."""
        self._opened_at = time.monotonic()

    def _push(self, samples):
        """Queue GloveSamples (from the link's reader thread)."""
        if not samples:
            return
        with self._cond:
            overflow = len(self._queue) + len(samples) - QUEUE_LIMIT
            if overflow > 0:
                for _ in range(min(overflow, len(self._queue))):
                    self._queue.popleft()
                self._counters["unread_dropped"] += overflow
            self._queue.extend(samples[-QUEUE_LIMIT:])
            self._last_arrival = samples[-1].arrival
            self._cond.notify_all()

    def _check_stall(self):
        # Caller holds _cond.
        if self._last_arrival is None or self.stalled:
            return
        if time.monotonic() - self._last_arrival > self.stall_timeout_s:
            self.stalled = True
            self._counters["timeouts"] += 1

    def _extra_counters(self):
        """Counters of the subclass's parser, merged into :attr:`counters`."""
        return {}

    def _before_close(self):
        """Stop the glove's stream before the port closes (best effort)."""
