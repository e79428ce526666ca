"""Python's cyclic garbage collector, run between commands instead of inside one.

Left alone, the collector starts whenever enough container objects have been
allocated, in whichever thread allocates next: in the middle of a decode step
or a hand write as often as anywhere else.  Measured during 15-s real-time
replays (devices in processes of their own, 2-core workstation): about 0.7
collections a second, young ones pausing every thread for up to 0.25 ms and
middle-aged ones for 0.5-1.3 ms, i.e. one window in 70 delayed by a pause,
which is exactly the tail a p99 sees.

So, for the real-time loop only (:class:`IdleCollector`):

* at start, everything built while loading (the bundle, the backend, numpy's
  and the ONNX reader's objects) is collected once and, where Python has
  ``gc.freeze`` (3.7+; not the Jetson's 3.6), moved out of the collector's
  reach for good, so later collections only look at what the run allocates;
* automatic collection is switched off for the run;
* the thread that has just written a new command (the reader with
  ``decode_in`` "reader", else the writer; the quiet moment: the next window
  is a stride away) runs the collection that
  Python's own thresholds say is due, with the same thresholds, so memory is
  reclaimed as often as before, only at another moment;
* at the end the collector is switched back on as it was.

Reference counting, which frees almost everything, is untouched.
"""
import gc


class IdleCollector(object):
    """Runs due garbage collections when told the moment is quiet; times each into ``timer``.

    Parameters
    ----------
    timer : Distribution or None
        Receives the duration of each collection run here (seconds).
    clock : callable () -> float seconds
    """

    def __init__(self, timer, clock):
        self._timer = timer
        self._clock = clock
        self._was_enabled = None
        self.collections = [0, 0, 0]

    @property
    def active(self):
        return self._was_enabled is not None

    def start(self):
        """Collect what loading left, freeze it where possible, and take over from automatic collection."""
        if self.active:
            return
        self._was_enabled = gc.isenabled()
        gc.collect()
        freeze = getattr(gc, "freeze", None)
        if freeze is not None:
            freeze()
        gc.disable()

    def collect_if_due(self):
        """Run the collection Python's thresholds say is due (none, young, middle or all generations)."""
        if not self.active:
            return None
        counts = gc.get_count()
        thresholds = gc.get_threshold()
        if thresholds[0] <= 0 or counts[0] < thresholds[0]:
            return None
        generation = 0
        if counts[1] >= thresholds[1]:
            generation = 2 if counts[2] >= thresholds[2] else 1
        start = self._clock()
        gc.collect(generation)
        if self._timer is not None:
            self._timer.add(self._clock() - start)
        self.collections[generation] += 1
        return generation

    def stop(self):
        """Hand collection back to Python as it was before :meth:`start` (frozen objects stay frozen)."""
        if not self.active:
            return
        was_enabled, self._was_enabled = self._was_enabled, None
        if was_enabled:
            gc.enable()
