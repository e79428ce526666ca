"""Intent-to-command lag: how late the decoded command follows the true trajectory (docs/latency.md).

Shared by ``replay`` (device, deploy/replay.py) and ``evaluate`` (workstation,
train/evaluate.py); numpy only.  It lives here, below both packages, because
``train`` may not import ``deploy`` (tests/device/test_layers.py).
Both trajectories are put on one uniform time grid (:data:`GRID_MS`): the
truth as the label stream gives it, the decoded command as the hand holds it
(each command in force until the next; ``nan`` before the first).  Positive
lags mean the decoded command is late.

Per movement (the recording's ``movement`` events: a non-zero value starts
one, the next ``movement`` event ends it) and per output that takes part in it:

* rest levels: the median of the truth over the second half of the rest before
  the movement (``r0``) and of the rest after it (``r1``) -- the settled part,
  away from the movement's own edges;
* peak: the truth in the movement farthest from ``r0``; an output whose
  excursion ``peak - r0`` is below :data:`MIN_EXCURSION` of its range over the
  scored span takes no part in the movement and is not counted;
* onset at threshold ``f``: the level ``r0 + f (peak - r0)``; the true time is
  the truth's first arrival at it after the middle of the rest before; the
  decoded time is the command's first crossing of it from the rest side after
  which it stays past the level for :data:`DWELL_MS`, searched from the middle
  of the rest before to halfway between the true onset and release;
* release at ``f``: the level ``peak + f (r1 - peak)`` (``f`` of the way back);
  the true time is the truth's first arrival at it after the peak; the decoded
  time is where the command leaves the movement side for good (returns shorter
  than the dwell ignored), searched from the decoded onset to the middle of the
  rest after the movement, so a dip during the hold is not taken for the release.

A decoded command that never crosses the level in its search range is
*missed* and counted, never dropped; a movement whose truth is already past the
level at the start of its search, or whose command is not decoded yet there
(``evaluate`` restarts the decoder at each test repetition), is counted as
*not measured*.  Medians and 90th percentiles are over the measured crossings.
A movement counts where its start lies in the scored span.

The cross-correlation lag is the shift of the decoded trajectory against the
truth (mean removed per output, summed over outputs and pieces) with the
highest correlation, within +-:data:`MAX_XCORR_MS`, refined between grid steps
by a parabola through the peak.

The hold jitter (:func:`hold_jitter`) is what a faster decoder or a lighter
filter pays for its lag: the RMS of the decoded trajectory's second difference
at steps of :data:`JITTER_STEP_MS` while the true trajectory is still (within
:data:`STILL_FRACTION` of its range for :data:`STILL_HALF_WIDTH_MS` either side),
in the outputs' units (0..1 = full range), from :data:`JITTER_SETTLE_MS` after a
piece's first decoded value on.
"""
import numpy as np

#: Step of the common time grid, milliseconds.
GRID_MS = 1.0
#: Thresholds (fractions of the movement's excursion) reported; the headline uses HEADLINE_THRESHOLD.
THRESHOLDS = (0.2, 0.5)
HEADLINE_THRESHOLD = 0.5
#: Smallest excursion, as a fraction of the output's range over the scored span, that makes an output
#: part of a movement: smaller ones are cross-talk of the glove, and their thresholds sit in the noise.
MIN_EXCURSION = 0.2
#: A crossing counts where the command then stays past the level this long (a flicker of noise across
#: it moves no hand); the crossing's time is where that stay begins.
DWELL_MS = 50.0
#: Largest shift searched by the cross-correlation, milliseconds.
MAX_XCORR_MS = 1000.0
#: A trajectory spanning no more than this (label units, 0..1 as trained) is flat: it has no timing.
FLAT = 1e-9
#: Event kind that delimits movements.
MOVEMENT_EVENT = "movement"
#: Spacing of the samples whose second difference is the hold jitter, milliseconds: the default stride,
#: so a decoder with that stride is judged command by command, and one with a shorter stride on the
#: same footing.
JITTER_STEP_MS = 20.0
#: The truth is still at a time where, from this long before it to this long after it, it stays within a
#: band of STILL_FRACTION of the output's range over the scored span: long enough that a decoder late by
#: a few hundred milliseconds has settled too, so what is measured is noise, not a late movement.
STILL_HALF_WIDTH_MS = 260.0
STILL_FRACTION = 0.02
#: The decoded trajectory's first second in a piece is not a hold: the decoder (and a filter after it)
#: start from rest there, which ``evaluate`` does at every test segment and a device once.
JITTER_SETTLE_MS = 1000.0


def movements_from_events(events, first_sample, samples_per_step):
    """(start, stop) grid indices of each movement, from ``movement`` events, in time order.

    events : iterable of (sample, kind, value) (recording Event tuples), samples on
    the recording's axis; first_sample : the recording sample at grid index 0;
    samples_per_step : signal samples per grid step.  ``stop`` is None for a
    movement still going at the recording's end.  Indices may lie outside the grid.
    """
    changes = sorted((int(e[0]), int(e[2])) for e in events if e[1] == MOVEMENT_EVENT)
    movements = []
    current = None
    for sample, value in changes:
        index = int(np.floor((sample - first_sample) / float(samples_per_step)))
        if current is not None:
            movements.append((current, index))
            current = None
        if value != 0:
            current = index
    if current is not None:
        movements.append((current, None))
    return movements


def hold(times, values, grid):
    """Values as held from each time until the next (zero-order hold), at ``grid``; nan before the first.

    times : (n,) increasing; values : (n, k); grid : (m,) in the units of ``times``.
    """
    values = np.asarray(values, dtype=np.float64).reshape(len(times), -1)
    index = np.searchsorted(np.asarray(times, dtype=np.float64), grid, side="right") - 1
    held = values[np.clip(index, 0, max(len(values) - 1, 0))] if len(values) else \
        np.zeros((len(grid), values.shape[1]))
    held[index < 0] = np.nan
    return held


def _first(mask):
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _final_crossing(far, offset, dwell):
    """Start of the last stay past the level that lasts to the end of ``far``, ignoring returns
    shorter than ``dwell`` (a stay on the near side from the start always counts)."""
    if not far[-1]:
        return None, "missed"
    near = ~far
    starts = np.flatnonzero(near[1:] & far[:-1]) + 1
    if near[0]:
        starts = np.append(0, starts)
    ends = np.flatnonzero(near[:-1] & far[1:]) + 1
    held = (ends - starts >= dwell) | (starts == 0)
    if not np.any(held):
        return None, "missed"
    return offset + int(ends[np.flatnonzero(held)[-1]]), "ok"


def _decoded_crossing(decoded, level, sign, lo, hi, dwell, final=False):
    """Grid index where ``decoded`` first crosses ``level`` in direction ``sign`` within [lo, hi)
    and then stays beyond it for ``dwell`` steps (or to ``hi``); with ``final``, where it crosses
    for the last time (:func:`_final_crossing`).

    Returns (index or None, status) with status "ok", "missed" or "not_measured"
    (not decoded yet at ``lo``, or decoding began already past the level)."""
    segment = decoded[lo:hi]
    first = _first(np.isfinite(segment))
    if first is None:
        return None, "not_measured"
    far = sign * (segment[first:] - level) >= 0
    if first > 0 and far[0]:
        return None, "not_measured"
    if final:
        return _final_crossing(far, lo + first, dwell)
    starts = np.flatnonzero(far[1:] & ~far[:-1]) + 1
    if not starts.size:
        return None, "missed"
    ends = np.append(np.flatnonzero(far[:-1] & ~far[1:]) + 1, len(far))
    run_ends = ends[np.searchsorted(ends, starts, side="right")]
    lasting = (run_ends - starts >= dwell) | (run_ends == len(far))
    chosen = _first(lasting)
    if chosen is None:
        return None, "missed"
    return lo + first + int(starts[chosen]), "ok"


class CrossingLags(object):
    """Threshold-crossing lags of one threshold, in grid steps, gathered over pieces."""

    def __init__(self, threshold, dwell):
        self.threshold = threshold
        self.dwell = dwell
        self.onsets, self.releases = [], []
        self.counts = {"onsets_missed": 0, "releases_missed": 0, "onsets_not_measured": 0,
                       "releases_not_measured": 0}

    def _add(self, kind, index, status, true_index):
        if status == "ok":
            (self.onsets if kind == "onset" else self.releases).append(index - true_index)
        else:
            self.counts["{}s_{}".format(kind, status)] += 1

    def add_piece(self, truth, decoded, movements, floor):
        """Add the movements of one piece; ``floor`` (k,) is each output's smallest excursion."""
        n = len(truth)
        for m, (start, stop) in enumerate(movements):
            if not 0 <= start < n:
                continue
            rest_from = max(movements[m - 1][1] if m and movements[m - 1][1] is not None else 0, 0)
            end = n if stop is None else min(stop, n)
            next_start = movements[m + 1][0] if m + 1 < len(movements) else n
            rest_to = min(next_start, n)
            for j in range(truth.shape[1]):
                self._add_output(truth[:, j], decoded[:, j], start, end, stop, rest_from, rest_to, floor[j])

    def _add_output(self, truth, decoded, start, end, stop, rest_from, rest_to, floor):
        f = self.threshold
        # With no rest before it (it follows another movement at once), its rest level is where it starts.
        settled = (rest_from + start) // 2 if start - rest_from >= 2 else start
        r0 = float(np.median(truth[settled:start])) if settled < start else float(truth[start])
        peak_index = start + int(np.argmax(np.abs(truth[start:end] - r0)))
        peak = float(truth[peak_index])
        if not abs(peak - r0) >= floor:
            return
        sign = np.sign(peak - r0)
        level = r0 + f * (peak - r0)
        true_onset = settled + _first(sign * (truth[settled:peak_index + 1] - level) >= 0)
        release = None
        if stop is not None and stop < rest_to - 1:
            r1 = float(np.median(truth[(stop + rest_to) // 2:rest_to]))
            if abs(r1 - peak) >= floor:
                back = np.sign(r1 - peak)
                release_level = peak + f * (r1 - peak)
                found = _first(back * (truth[peak_index:rest_to] - release_level) >= 0)
                release = (None if found is None else peak_index + found, release_level, back)
        true_release = release[0] if release else None
        middle = (true_onset + true_release) // 2 if true_release is not None else end
        decoded_onset = None
        if true_onset > settled:
            decoded_onset, status = _decoded_crossing(decoded, level, sign, settled, max(middle, true_onset + 1),
                                                      self.dwell)
            self._add("onset", decoded_onset, status, true_onset)
        else:
            self.counts["onsets_not_measured"] += 1     # the truth is past the level where the search starts
        if release is None:
            return
        if true_release is None:
            self.counts["releases_not_measured"] += 1
            return
        # The hand lets go when the command leaves the movement for good: a dip during the hold is a
        # decoding error (R² counts it), not the release.  Searched from the decoded onset, so an early
        # release is found however early.
        lo = decoded_onset if decoded_onset is not None else middle
        # Up to the middle of the rest after it, where the next movement's onset search begins.
        hi = max((stop + rest_to) // 2, true_release + 1)
        index, status = _decoded_crossing(decoded, release[1], release[2], lo, hi, self.dwell, final=True)
        self._add("release", index, status, true_release)

    def summary(self, step_ms):
        def percentile(values, q):
            return round(float(np.percentile(values, q)) * step_ms, 1) if values else None

        result = {"onset_p50": percentile(self.onsets, 50), "onset_p90": percentile(self.onsets, 90),
                  "release_p50": percentile(self.releases, 50), "release_p90": percentile(self.releases, 90),
                  "onsets": len(self.onsets), "releases": len(self.releases)}
        result.update(self.counts)
        return result


def xcorr_terms(truth, decoded, max_shift):
    """Cross-products of decoded against truth at shifts -max_shift..max_shift, and the energies of
    the overlapping parts, each an array over the shifts.

    Over the rows where ``decoded`` is defined, per output with its mean removed:
    ``cross[max_shift + s] = sum_i truth[i] * decoded[i + s]`` summed over outputs
    (a decoded copy late by s steps peaks at +s), and the energies of the truth and
    decoded rows in those sums, so that a shift is not penalised for overlapping less
    (pieces are short in ``evaluate``).  Returns (cross, truth energy, decoded energy)."""
    cross = np.zeros(2 * max_shift + 1)
    energy_t = np.zeros_like(cross)
    energy_d = np.zeros_like(cross)
    first = _first(np.all(np.isfinite(decoded), axis=1))
    if first is None or len(truth) - first < 2:
        return cross, energy_t, energy_d
    truth, decoded = truth[first:], decoded[first:]
    n = len(truth)
    size = 1
    while size < 2 * n:
        size *= 2
    # At least half the piece overlaps: a correlation of a few rows says nothing.
    shifts = min(max_shift, n // 2)
    ahead = np.arange(shifts + 1)               # decoded late by s: truth[0:n-s] against decoded[s:n]
    behind = np.arange(shifts, 0, -1)           # decoded early by s: truth[s:n] against decoded[0:n-s]
    window = slice(max_shift - shifts, max_shift + shifts + 1)
    for j in range(truth.shape[1]):
        t = truth[:, j] - truth[:, j].mean()
        d = decoded[:, j] - decoded[:, j].mean()
        if np.ptp(t) <= FLAT or np.ptp(d) <= FLAT:
            continue        # a flat output has no timing to find
        full = np.fft.irfft(np.fft.rfft(d, size) * np.conj(np.fft.rfft(t, size)), size)
        cross[max_shift:max_shift + shifts + 1] += full[:shifts + 1]
        if shifts:
            cross[max_shift - shifts:max_shift] += full[size - shifts:]
        ct = np.concatenate(([0.0], np.cumsum(t * t)))
        cd = np.concatenate(([0.0], np.cumsum(d * d)))
        energy_t[window] += np.concatenate((ct[n] - ct[behind], ct[n - ahead]))
        energy_d[window] += np.concatenate((cd[n - behind], cd[n] - cd[ahead]))
    return cross, energy_t, energy_d


def _peak(cross):
    """Index of the highest value, refined by a parabola through it and its neighbours."""
    best = int(np.argmax(cross))
    if 0 < best < len(cross) - 1:
        left, middle, right = cross[best - 1], cross[best], cross[best + 1]
        curvature = left - 2 * middle + right
        if curvature < 0:
            return best + 0.5 * (left - right) / curvature
    return float(best)


def _block_extremes(values, block, blocks):
    """Per output, the largest and smallest of each run of ``block`` rows, shape (blocks, k) each."""
    shaped = values[:blocks * block].reshape(blocks, block, values.shape[1])
    return shaped.max(axis=1), shaped.min(axis=1)


def jitter_terms(truth, decoded, step, half_width, tolerance, settle=0):
    """Squared second differences of ``decoded`` where ``truth`` is still, summed, and their count.

    truth, decoded : (n, k) on one grid; step : grid steps between the samples of the second
    difference; half_width : grid steps either side of the middle sample over which the truth must
    stay within ``tolerance`` (k,) (rounded to whole multiples of ``step``, at least two, so the
    window holds the three samples); the middle samples are multiples of ``step``.  A sample counts
    per output where the three decoded values are finite and the first of them lies at least
    ``settle`` grid steps after the first row decoded.  Returns (sum of squares, count)."""
    n, k = truth.shape
    blocks = n // step
    reach = max(2, int(round(half_width / float(step))))        # blocks either side of a middle sample
    if blocks < 2 * reach + 1:
        return 0.0, 0
    high, low = _block_extremes(truth, step, blocks)
    # Middle sample b * step; its window is blocks b - reach .. b + reach - 1, i.e. the grid rows
    # [(b - reach) step, (b + reach) step), which hold b * step - step and b * step + step.
    middles = np.arange(reach, blocks - reach + 1)
    first = _first(np.any(np.isfinite(decoded), axis=1))
    if first is None:
        return 0.0, 0
    middles = middles[middles * step - step >= first + settle]
    top = np.full((middles.size, k), -np.inf)
    bottom = np.full((middles.size, k), np.inf)
    for offset in range(-reach, reach):
        np.maximum(top, high[middles + offset], out=top)
        np.minimum(bottom, low[middles + offset], out=bottom)
    still = (top - bottom) <= tolerance
    rows = middles * step
    second = decoded[rows - step] - 2.0 * decoded[rows] + decoded[rows + step]
    counted = still & np.isfinite(second)
    return float(np.sum(second[counted] ** 2)), int(np.count_nonzero(counted))


def hold_jitter(pieces, step_ms=GRID_MS, jitter_step_ms=JITTER_STEP_MS, half_width_ms=STILL_HALF_WIDTH_MS,
                still_fraction=STILL_FRACTION):
    """RMS second difference of the decoded trajectories while the truth is still: (jitter, count).

    pieces : list of (truth (n, k), decoded (n, k), ...) on grids of ``step_ms``.  The
    decoded trajectory is sampled every ``jitter_step_ms``; a sample counts for an output
    where the truth of that output stays within ``still_fraction`` of its range over all
    pieces (at least :data:`FLAT`) from ``half_width_ms`` before to ``half_width_ms`` after
    it, and not within :data:`JITTER_SETTLE_MS` of the piece's first decoded value.  jitter
    is in the outputs' units (a second difference of values ``jitter_step_ms`` apart, not
    divided by its square), None where no sample counts."""
    truths = [np.asarray(p[0], dtype=np.float64) for p in pieces if len(p[0])]
    if not truths:
        return None, 0
    both = np.concatenate(truths)
    tolerance = np.maximum(still_fraction * (both.max(axis=0) - both.min(axis=0)), FLAT)
    step = max(1, int(round(jitter_step_ms / step_ms)))
    half_width = max(1, int(round(half_width_ms / step_ms)))
    settle = int(round(JITTER_SETTLE_MS / step_ms))
    total, count = 0.0, 0
    for piece in pieces:
        squares, counted = jitter_terms(np.asarray(piece[0], dtype=np.float64),
                                        np.asarray(piece[1], dtype=np.float64), step, half_width, tolerance,
                                        settle)
        total += squares
        count += counted
    return (float(np.sqrt(total / count)) if count else None), count


def lag_summary(pieces, step_ms=GRID_MS, thresholds=THRESHOLDS, headline=HEADLINE_THRESHOLD,
                max_xcorr_ms=MAX_XCORR_MS):
    """The ``lag_ms`` document of decoded trajectories against the truth.

    pieces : list of (truth (n, k), decoded (n, k), movements) on grids of ``step_ms``:
    decoded nan where no command is in force yet; movements as from
    :func:`movements_from_events`.  Returns a JSON-ready dict: onset_p50, onset_p90,
    release_p50, release_p90 (headline threshold), xcorr, xcorr_peak, counts,
    ``thresholds`` (the same per threshold), ``jitter`` and ``jitter_points``
    (:func:`hold_jitter`; not a lag, but its price), and ``reason`` (None, or why a figure is null).
    """
    pieces = [(np.asarray(t, dtype=np.float64), np.asarray(d, dtype=np.float64), list(m)) for t, d, m in pieces]
    if headline not in thresholds:
        raise ValueError("the headline threshold {} is not among {}".format(headline, thresholds))
    reasons = []
    n_outputs = pieces[0][0].shape[1] if pieces else 0
    truths = [t for t, _, _ in pieces if len(t)]
    if truths:
        both = np.concatenate(truths)
        floor = np.maximum(MIN_EXCURSION * (both.max(axis=0) - both.min(axis=0)), FLAT)
    else:
        floor = np.full(n_outputs, np.inf)
    by_threshold = {}
    events = 0
    for f in thresholds:
        gathered = CrossingLags(f, max(1, int(round(DWELL_MS / step_ms))))
        for truth, decoded, movements in pieces:
            gathered.add_piece(truth, decoded, movements, floor)
        by_threshold["{:g}".format(f)] = gathered.summary(step_ms)
    for truth, _, movements in pieces:
        events += sum(1 for start, _ in movements if 0 <= start < len(truth))
    max_shift = max(1, int(round(max_xcorr_ms / step_ms)))
    cross = np.zeros(2 * max_shift + 1)
    energy_t = np.zeros_like(cross)
    energy_d = np.zeros_like(cross)
    for truth, decoded, _ in pieces:
        c, et, ed = xcorr_terms(truth, decoded, max_shift)
        cross += c
        energy_t += et
        energy_d += ed
    energy = energy_t * energy_d
    if np.any(energy > 0):
        correlation = np.where(energy > 0, cross / np.sqrt(np.where(energy > 0, energy, 1.0)), -np.inf)
        xcorr_peak = round(float(correlation.max()), 4)
        best = int(np.argmax(correlation))
        if best in (0, len(correlation) - 1) or not np.isfinite(correlation[best - 1:best + 2]).all():
            # Highest at the end of the search (or beside shifts with no overlap): no peak found.
            xcorr = None
            reasons.append("the cross-correlation rises to the edge of its +-{:g} ms search: no peak".format(
                max_xcorr_ms))
        else:
            xcorr = round(float(_peak(correlation) - max_shift) * step_ms, 1)
    else:
        xcorr = xcorr_peak = None
        reasons.append("no output varies in both the truth and the decoded command")
    head = by_threshold["{:g}".format(headline)]
    if events == 0:
        reasons.append("no movement starts in the scored span (no '{}' events)".format(MOVEMENT_EVENT))
    elif head["onsets"] + head["releases"] == 0:
        reasons.append("no onset or release measured at {:g} of any movement's excursion ({} missed, "
                       "{} not measured)".format(headline, head["onsets_missed"] + head["releases_missed"],
                                                 head["onsets_not_measured"] + head["releases_not_measured"]))
    jitter, jitter_points = hold_jitter(pieces, step_ms)
    result = dict(head)
    result.update({"xcorr": xcorr, "xcorr_peak": xcorr_peak, "threshold": headline, "movements": events,
                   "thresholds": by_threshold, "grid_ms": step_ms,
                   "jitter": None if jitter is None else round(jitter, 6), "jitter_points": jitter_points,
                   "jitter_step_ms": JITTER_STEP_MS,
                   "reason": "; ".join(reasons) if reasons else None})
    return result


def replay_lag(truth_at, commands_at, positions, first_sample, stop_sample, rate, events, step_ms=GRID_MS):
    """``lag_ms`` of one replay: commands at ``commands_at`` (samples on the recording's axis,
    increasing) held until the next, against ``truth_at(samples)`` on a grid from
    ``first_sample`` to ``stop_sample``; ``events`` the recording's events."""
    step = rate * step_ms / 1000.0
    grid = first_sample + step * np.arange(max(int((stop_sample - first_sample) // step), 0))
    truth = truth_at(grid)
    decoded = hold(commands_at, positions, grid)
    return lag_summary([(truth, decoded, movements_from_events(events, first_sample, step))], step_ms)


def format_lag(lag):
    """One line of a lag document for a table."""
    def ms(value):
        return "n/a" if value is None else "{:+.0f} ms".format(value)

    if lag is None:
        return "lag            n/a"
    jitter = lag.get("jitter")
    text = ("lag            onset p50 {} p90 {}  release p50 {}  xcorr {}  hold jitter {}  "
            "({} onsets, {} missed{})").format(
        ms(lag["onset_p50"]), ms(lag["onset_p90"]), ms(lag["release_p50"]), ms(lag["xcorr"]),
        "n/a" if jitter is None else "{:.2f}e-3".format(1000.0 * jitter), lag["onsets"],
        lag["onsets_missed"], ", {} not measured".format(lag["onsets_not_measured"])
        if lag["onsets_not_measured"] else "")
    if lag.get("reason"):
        text += "; " + lag["reason"]
    return text
