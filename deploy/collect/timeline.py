"""One timeline: the chip's sample counter is the master clock; the glove is mapped onto it.

Both devices stamp nothing we can trust on the host's clock: what we know is
when their bytes *arrived* (``time.monotonic()``), and their own counters (the
chip's samples, the glove's sequence numbers).  Arrival is the true time plus
a delay that is never negative and jitters (USB polling, the reader thread
waking late, a loaded CPU).  So, per device, :class:`ArrivalClock` fits the
*lower envelope* of arrival against count over a sliding window: the count's
period from the minima of the window's first and last quarters (a device's crystal is
not the host's), then the offset as the smallest ``arrival - count * period``
in the window.  The fastest arrivals carry the least delay; the window
follows slow drift.  ``time_of(count)`` is then the best estimate of when
that count happened, on the monotonic clock.

A glove sample ``k`` happened at ``glove.time_of(k)``; the chip sample index
at that moment is ``chip.count_at(t)``: that is the glove sample's place on
the recording's time axis.  :class:`LabelResampler` turns the glove's samples,
so placed, into label rows at the label rate by linear interpolation, and
emits a row once the glove sample after it is known -- or, when the glove is
late by more than ``max_wait_samples`` of chip time, holds the last value and
counts the row as ``held`` (the session marks them with ``glove_gap`` events),
so the recording never waits for a glove that stopped.

What is left: the constant part of each device's delay (its frame's time on
the wire), which the envelope cannot see; docs/collect.md gives its size.

numpy and the standard library only (Python 3.6).
"""
import collections

import numpy as np

#: Seconds of arrivals each clock fits over.
WINDOW_S = 8.0
#: Fewest points before the period is fitted (before: the nominal period).
MIN_FIT_POINTS = 16
#: Relative deviation of a fitted period from the nominal one beyond which it is
#: not believed (a glove claiming 100 Hz that runs at 90 is broken, not drifting).
MAX_PERIOD_DEVIATION = 0.05


class ArrivalClock(object):
    """Count <-> monotonic time for one device, from its arrivals (see the module docstring).

    Parameters
    ----------
    rate : float, the device's nominal counts per second (chip samples, glove samples)
    window_s : float, seconds of arrivals kept for the fit
    """

    def __init__(self, rate, window_s=WINDOW_S):
        self.rate = float(rate)
        self.period = 1.0 / self.rate
        self.window_s = float(window_s)
        self._counts = collections.deque()
        self._arrivals = collections.deque()
        self.offset = None           # time of count 0
        self._dirty = False

    def add(self, count, arrival):
        """The bytes completing count ``count`` (exclusive end of a chip frame, a glove sample's
        index) arrived at ``arrival``."""
        self._counts.append(float(count))
        self._arrivals.append(float(arrival))
        horizon = float(arrival) - self.window_s
        while len(self._arrivals) > 2 and self._arrivals[0] < horizon:
            self._counts.popleft()
            self._arrivals.popleft()
        self._dirty = True

    def reset(self):
        """Forget the arrivals (the device's counter restarted)."""
        self._counts.clear()
        self._arrivals.clear()
        self.offset = None
        self.period = 1.0 / self.rate
        self._dirty = False

    @property
    def ready(self):
        return bool(self._arrivals)

    def update(self):
        """Refit period and offset from the window (cheap: a few thousand points at most)."""
        if not self._dirty:
            return
        self._dirty = False
        counts = np.fromiter(self._counts, dtype=np.float64, count=len(self._counts))
        arrivals = np.fromiter(self._arrivals, dtype=np.float64, count=len(self._arrivals))
        nominal = 1.0 / self.rate
        period = nominal
        if len(counts) >= MIN_FIT_POINTS and counts[-1] - counts[0] > 0:
            # The slope between the lowest points of the window's first and last quarters: at least half
            # the window apart.  (The minima of its two halves could be neighbours across the middle,
            # whose microseconds of jitter over one frame tilted the period by tenths of a percent:
            # 5-9 ms of error a few seconds on.)
            residual = arrivals - counts * nominal
            quarter = len(counts) // 4
            last = len(counts) - quarter
            first, second = int(np.argmin(residual[:quarter])), last + int(np.argmin(residual[last:]))
            if counts[second] > counts[first]:
                fitted = nominal + (residual[second] - residual[first]) / (counts[second] - counts[first])
                if abs(fitted - nominal) <= MAX_PERIOD_DEVIATION * nominal:
                    period = fitted
        self.period = period
        self.offset = float(np.min(arrivals - counts * period))

    def time_of(self, count):
        """Monotonic time at which ``count`` happened (call :meth:`update` first)."""
        return self.offset + float(count) * self.period

    def count_at(self, t):
        """The (fractional) count at monotonic time ``t``."""
        return (float(t) - self.offset) / self.period


class SequenceUnwrapper(object):
    """A glove's sequence numbers (which wrap at an unknown width) as a growing count.

    ``feed(sequence)`` returns ``(count, lost, restarted)``: the count of this
    sample, how many were skipped before it, and True where the counter went
    back in a way no wrap explains (the glove restarted: a new count segment).
    A sample without sequence (None) counts one more than the last.
    """

    #: Widths a sequence counter may wrap at, narrowest first.
    MODULI = (1 << 8, 1 << 16, 1 << 32)
    #: Largest jump still taken for lost samples rather than a restart.
    MAX_JUMP = 1000

    def __init__(self):
        self.count = -1
        self._last = None

    def feed(self, sequence):
        if sequence is None or self._last is None:
            self._last = sequence
            self.count += 1
            return self.count, 0, False
        step = sequence - self._last
        if step <= 0:
            step = None
            for modulus in self.MODULI:
                if self._last < modulus and sequence < modulus:
                    wrapped = (sequence - self._last) % modulus
                    if 0 < wrapped <= self.MAX_JUMP:
                        step = wrapped
                    break
        self._last = sequence
        if step is None or step > self.MAX_JUMP:
            self.count += 1
            return self.count, 0, True
        self.count += step
        return self.count, step - 1, False


class LabelResampler(object):
    """Glove samples placed on the chip's sample axis -> label rows at the label rate.

    Parameters
    ----------
    first_sample : float, session chip sample of label row 0 (the recording's sample 0)
    samples_per_row : float, chip samples between rows (signal rate / label rate)
    n_columns : int, raw values per glove sample
    max_wait_samples : float, how far (chip samples) the chip may be ahead of a row before
        the row is emitted without the glove sample after it (held)

    ``add(position, raw)``: a glove sample at chip sample ``position`` (positions must
    grow; a smaller one is moved just after the last).  ``take(chip_count)`` returns
    ``(rows (n, n_columns) float64, held (n,) bool)`` for every row now due.
    """

    def __init__(self, first_sample, samples_per_row, n_columns, max_wait_samples):
        self.first_sample = float(first_sample)
        self.samples_per_row = float(samples_per_row)
        self.n_columns = int(n_columns)
        self.max_wait = float(max_wait_samples)
        self.next_row = 0
        self.held_rows = 0
        self._positions = collections.deque()
        self._values = collections.deque()

    def add(self, position, raw):
        position = float(position)
        if self._positions and position <= self._positions[-1]:
            position = self._positions[-1] + 1e-6
        self._positions.append(position)
        self._values.append(np.asarray(raw, dtype=np.float64))

    @property
    def last_position(self):
        return self._positions[-1] if self._positions else None

    def row_position(self, row):
        return self.first_sample + row * self.samples_per_row

    def take(self, chip_count, final=False):
        """Rows due now: each one whose position the glove has passed (interpolated), or that the
        chip passed by more than ``max_wait_samples`` (the last value held).  ``final``: every
        row up to ``chip_count`` (the end of a session), held where the glove has nothing newer."""
        rows, held = [], []
        positions, values = self._positions, self._values
        while positions:
            q = self.row_position(self.next_row)
            if q >= chip_count:
                break     # rows only where the chip has samples: the signal never lacks its labels
            late = final or q < chip_count - self.max_wait
            # Drop samples no later row needs: keep the last one at or before q.
            while len(positions) > 1 and positions[1] <= q:
                positions.popleft()
                values.popleft()
            if positions[0] == q:
                rows.append(values[0])
                held.append(False)
            elif positions[0] < q and len(positions) > 1:
                p0, p1 = positions[0], positions[1]
                w = (q - p0) / (p1 - p0)
                rows.append(values[0] + w * (values[1] - values[0]))
                held.append(False)
            elif late:
                # No glove sample after q yet (or, at the very start, none before it): hold.
                rows.append(values[0])
                held.append(True)
            else:
                break
            self.next_row += 1
        self.held_rows += int(sum(held))
        if not rows:
            return np.zeros((0, self.n_columns)), np.zeros(0, dtype=bool)
        return np.array(rows), np.array(held, dtype=bool)
