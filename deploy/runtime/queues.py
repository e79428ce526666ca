"""The hand-overs between the real-time threads, none of which ever blocks without a timeout.

:class:`BatchQueue`: chip link reader -> decode thread, bounded (a full queue
refuses the event; the receiver counts it and reports a gap).
:class:`LatestSlot`: decode thread -> writer thread, one slot holding only the
newest command (an unsent older one is superseded and counted).
:class:`ChunkBatch`: no hand-over at all (``decode_in`` "reader"): the events
of one chunk, which the reader thread decodes itself right after parsing it.
"""
import collections
import threading


class BatchQueue(object):
    """Bounded FIFO filled item by item and drained all at once.

    One lock round per batch on the consumer side; ``put`` never blocks (a
    full queue returns False and the caller decides what was lost).
    """

    def __init__(self, capacity):
        self.capacity = int(capacity)
        self._items = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.high_water = 0

    def put(self, item):
        """Append ``item``; False (nothing added) when the queue is full or closed."""
        with self._cond:
            items = self._items
            if self._closed or len(items) >= self.capacity:
                return False
            items.append(item)
            if len(items) == 1:
                # The consumer only ever waits on an empty queue.
                self._cond.notify()
            if len(items) > self.high_water:
                self.high_water = len(items)
            return True

    def take_all(self, out, timeout_s):
        """Move every queued item to list ``out``, waiting up to ``timeout_s`` for one.

        Returns True once the queue is closed and empty (the consumer should stop).
        """
        with self._cond:
            items = self._items
            if not items and not self._closed:
                self._cond.wait(timeout_s)
            out.extend(items)
            items.clear()
            return self._closed and not out

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ChunkBatch(object):
    """The frame sink when the reader thread decodes: collects one chunk's events, never refuses one.

    Bounded by what one read returns (the port's buffer); ``high_water`` is the
    most events a chunk held (a backlog read at once after a stall).
    """

    def __init__(self):
        self.items = []
        self.high_water = 0

    def put(self, item):
        items = self.items
        items.append(item)
        if len(items) > self.high_water:
            self.high_water = len(items)
        return True

    def close(self):
        pass


class LatestSlot(object):
    """A one-item mailbox: ``put`` replaces, ``get`` waits with a timeout.

    ``superseded`` counts items replaced before anyone took them (the writer
    fell behind the decoder, which only happens when the hand link stalls).
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._item = None
        self._nudged = False
        self.superseded = 0

    def put(self, item):
        with self._cond:
            if self._item is not None:
                self.superseded += 1
            self._item = item
            self._cond.notify()

    def nudge(self):
        """Wake the consumer without an item (e.g. a fault: send the safe posture now)."""
        with self._cond:
            self._nudged = True
            self._cond.notify()

    def get(self, timeout_s):
        """The newest item, or None after ``timeout_s`` or a nudge."""
        with self._cond:
            if self._item is None and not self._nudged and timeout_s > 0:
                self._cond.wait(timeout_s)
            item, self._item, self._nudged = self._item, None, False
            return item
