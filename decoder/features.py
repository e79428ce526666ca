"""Windowed features, one implementation for the offline and the streaming path.

:class:`WindowFeatures` computes every feature of a batch of windows,
``(n_windows, n_channels, window_samples)`` -> ``(n_windows, n_features)``.
The offline path calls it on strided views of a whole filtered recording
(:func:`offline_windows`); the streaming path keeps the last window of
filtered samples in a :class:`WindowRing` and calls the very same method on
the windows a block completes -- or, when windows are whole strides, both
paths share per-block sums (:meth:`WindowFeatures.block_sums`, :class:`BlockRing`).  Windows are channels-first with each
channel's samples contiguous in memory in both paths: reductions and FFTs
then run along contiguous rows (several times faster than along a strided
axis) and numpy sums each row in the same order whichever path built it.

Features (registry :data:`FEATURES`, name -> :class:`FeatureKind`):

==========  ==============================================================  ======
name        definition over one window x[0..W-1] of one channel            log?
==========  ==============================================================  ======
mav         mean |x|                                                        yes
rms         sqrt(mean x^2)                                                  yes
wl          waveform length, sum |x[i+1] - x[i]|                            yes
zc          zero crossings: x[i] x[i+1] < 0 and |x[i] - x[i+1]| >= T        no
ssc         slope-sign changes: p = (x[i]-x[i-1])(x[i]-x[i+1]) > 0, p >= T^2 no
bandpower   power in each band (µV^2), Hann-tapered periodogram of the      yes
            window: 2 sum_k |X_k|^2 / (W sum w^2) over bins lo <= f_k < hi
bandpower_  mean over the window's stride-long blocks of the same per-block  yes
  welch     periodogram band sums (needs the window to be whole strides)
mean        mean x (envelope mode)                                          yes
std         standard deviation of x (ddof 0) (envelope mode)                yes
max / min   largest / smallest x (envelope mode)                            yes
==========  ==============================================================  ======

``T`` is the amplitude threshold (µV), as LibEMG uses for zc and ssc, so
quantisation noise around zero is not counted.  Features marked "log" are
replaced by ``log(value + epsilon)`` when log compression is on.  Output
columns are feature-major: for each feature (and band), every channel.

Band powers come from one FFT of the window rather than a filter bank: no
extra state to carry, identical offline and streaming by construction, and
one rfft of 1000 x 16 samples is cheaper than 4 more IIR banks per sample.

The sums (mav, rms, wl, zc, ssc, bandpower_welch) are computed per
stride-long block and shared by the overlapping windows: see
:class:`WindowFeatures` and :class:`BlockRing`, and docs/dsp.md.
"""
import numbers

import numpy as np

from neurohand.firmware_bridge.shared.checks import check_number, check_real_array
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError


class FeatureKind(object):
    """One registry entry: how to compute a feature and how to name/log it.

    A *block* kind is a sum over the window that splits into sums over its
    blocks (see :class:`WindowFeatures`): ``blocks`` is :data:`SHARED` for the
    kinds :func:`_shared_block_sums` computes together (mav, rms, wl, zc, ssc), else
    ``blocks(parts, plan, inner, closed)`` fills ``inner`` and ``closed``,
    ndarrays (n_outputs, n_rows, n_blocks), and ``finish(total, plan, out)``
    writes the feature of the window's total (any shape) into ``out`` (same shape and dtype).  A *window* kind needs
    the whole window: ``window(windows, plan, workspace)`` -> (n_windows, n_outputs, n_channels),
    windows (n_windows, n_channels, window_samples), workspace a :class:`Workspace` or None.
    amplitude: True when log compression applies (amplitudes and powers, not counts).
    per_band: one output per band power band.
    """

    def __init__(self, amplitude, blocks=None, finish=None, window=None, per_band=False):
        self.amplitude = amplitude
        self.blocks = blocks
        self.finish = finish
        self.window = window
        self.per_band = per_band


# ---------------------------------------------------------------- block kinds
# Each fills inner[o] (the sum over a block's own samples, pairs or triples)
# and closed[o] (inner plus the terms linking the block to the one before).
# A window of blocks A .. A+m-1 totals inner[A] + closed[A+1] + ... + closed[A+m-1].

def _shared_block_sums(span, n_blocks, plan, inner, closed, workspace):
    """mav, rms, wl, zc and ssc of every block at once (the kinds marked :data:`SHARED`).

    One numpy call per step for all channels, blocks and kinds together, on
    one contiguous copy of ``span`` taken as a single row: the sums are of
    200-sample blocks, where each call's fixed cost (about a microsecond)
    outweighs its arithmetic, and an operation on one contiguous row runs
    about twice as fast as on 16 strided ones.  The terms straddling two
    channels' rows of that copy land in the two leading columns, which no
    block reads.  ``closed`` gets the sums over each block's positions
    0 .. B-1, pairs and triples reaching into the block before included;
    ``inner`` those less the terms that reach back (position 0 of wl and zc,
    0 and 1 of ssc).
    """
    shared = plan.shared
    n_rows, n_columns = span.shape
    width = plan.block_samples
    dtype = span.dtype
    copy = workspace.array("shared_span", (n_rows, n_columns), dtype)
    np.copyto(copy, span)
    flat = copy.reshape(-1)
    size = flat.shape[0]

    def blocks(values):
        """(k, size) -> (k, n_rows, n_blocks, B): each block's positions 0 .. B-1 (a view)."""
        return values.reshape(len(values), n_rows, n_columns)[:, :, 2:].reshape(len(values), n_rows, n_blocks, width)

    steps = None
    if shared.needs_steps:
        steps = workspace.array("shared_steps", (size,), dtype)     # steps[i] = flat[i] - flat[i - 1]
        steps[0] = 0.0
        np.subtract(flat[1:], flat[:-1], out=steps[1:])
    values = workspace.array("shared_values", (len(shared.floats), size), dtype)
    abs_steps = None
    for index, name in enumerate(shared.floats):
        if name == "mav":
            np.abs(flat, out=values[index])
        elif name == "rms":
            np.multiply(flat, flat, out=values[index])
        else:
            abs_steps = values[index]
            np.abs(steps, out=abs_steps)
    if shared.floats:
        sums = blocks(values)
        if shared.float_rows.__class__ is slice:
            np.add.reduce(sums, axis=3, out=closed[shared.float_rows])
        else:
            sums = np.add.reduce(sums, axis=3)
            for index, row in enumerate(shared.float_rows):
                closed[row] = sums[index]
    if shared.counts:
        flags = workspace.array("shared_flags", (len(shared.counts), size), np.bool_)
        product = workspace.array("shared_product", (size,), dtype)
        product[:2] = 0.0
        for index, name in enumerate(shared.counts):
            if name == "zc":
                np.multiply(flat[:-1], flat[1:], out=product[1:])       # x[t-1] x[t] < 0
                np.less(product, 0.0, out=flags[index])
                if plan.threshold > 0.0:
                    if abs_steps is None:
                        abs_steps = workspace.array("shared_abs_steps", (size,), dtype)
                        np.abs(steps, out=abs_steps)
                    large = workspace.array("shared_large", (size,), np.bool_)
                    np.greater_equal(abs_steps, plan.threshold, out=large)
                    np.logical_and(flags[index], large, out=flags[index])
            else:
                # (x[t-1] - x[t-2]) (x[t] - x[t-1]) < 0 (and <= -T^2): a slope change at t - 1.
                np.multiply(steps[1:-1], steps[2:], out=product[2:])
                if plan.threshold > 0.0:
                    np.less_equal(product, -(plan.threshold * plan.threshold), out=flags[index])
                else:
                    np.less(product, 0.0, out=flags[index])
        # Counted as bytes: exact, and in bytes where no count can pass 255 (a 200-sample block).
        as_bytes = blocks(flags.view(np.uint8))
        counts = np.add.reduce(as_bytes, axis=3, dtype=np.uint8 if width < 256 else closed.dtype)
        if shared.count_rows.__class__ is slice:
            closed[shared.count_rows] = counts
        else:
            for index, row in enumerate(shared.count_rows):
                closed[row] = counts[index]
    if shared.all_rows.__class__ is slice:
        inner[shared.all_rows] = closed[shared.all_rows]
    else:
        for row in shared.all_rows:
            inner[row] = closed[row]
    # Less the terms reaching into the block before (counts: exact; wl: to within rounding).
    for name, row in shared.linked:
        if name == "wl":
            inner[row] -= blocks(abs_steps[None])[0, :, :, 0]
        else:
            first = blocks(flags[shared.counts.index(name)][None])[0]
            inner[row] -= first[:, :, 0]
            if name == "ssc":
                inner[row] -= first[:, :, 1]


class _SharedPlan(object):
    """Which of the shared kinds a pipeline computes, and the block-sum rows they fill."""

    FLOATS = ("mav", "rms", "wl")
    COUNTS = ("zc", "ssc")

    def __init__(self, rows):
        # rows: name -> block-sum row, for the shared kinds the pipeline has.
        self.floats = sorted((name for name in rows if name in self.FLOATS), key=rows.get)
        self.counts = sorted((name for name in rows if name in self.COUNTS), key=rows.get)
        self.float_rows = self._rows([rows[name] for name in self.floats])
        self.count_rows = self._rows([rows[name] for name in self.counts])
        self.all_rows = self._rows(sorted(rows.values()))
        self.linked = [(name, rows[name]) for name in ("wl", "zc", "ssc") if name in rows]
        self.needs_steps = any(name in rows for name in ("wl", "zc", "ssc"))
        self.any = bool(rows)

    @staticmethod
    def _rows(rows):
        """A slice where ``rows`` are consecutive (one call), else the list."""
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return rows


def _bandpower_welch_blocks(parts, plan, inner, closed):
    spectrum = np.fft.rfft(parts.blocked(parts.samples()) * plan.block_taper, axis=2)
    low, high = plan.block_bin_span
    spectrum = spectrum[:, :, low:high]
    power = spectrum.real ** 2
    power += spectrum.imag ** 2
    for index, (low_bin, high_bin) in enumerate(plan.block_band_bins):
        np.add.reduce(power[:, :, low_bin - low:high_bin - low], axis=2, out=inner[index])
    closed[...] = inner


def _mean_of_window(total, plan, out):
    np.divide(total, plan.window_samples, out=out)


def _root_mean_of_window(total, plan, out):
    np.divide(total, plan.window_samples, out=out)
    np.sqrt(out, out=out)


def _as_is(total, plan, out):
    out[...] = total


def _mean_block_power(total, plan, out):
    np.multiply(total, plan.block_power_scale, out=out)


# ---------------------------------------------------------------- window kinds
# Each is window(windows, plan, workspace) -> (n_windows, n_outputs, n_channels);
# workspace (a Workspace or None) lends the large temporaries.

def _bandpower(windows, plan, workspace):
    workspace = workspace or Workspace()
    tapered = workspace.array("bandpower_tapered", windows.shape, np.result_type(windows.dtype, plan.taper.dtype))
    np.multiply(windows, plan.taper, out=tapered)
    spectrum = _rfft_last_axis(tapered, workspace)
    low, high = plan.bin_span       # only the bins some band sums
    # Bins as (re, im) pairs of reals: |X_k|^2 summed over a band is the sum of
    # the squares of its 2 (high - low) reals, one contiguous run per band.
    # (numpy < 1.23 views a whole C-contiguous array only: view first, then slice.)
    pairs = np.ascontiguousarray(spectrum).view(spectrum.real.dtype)[:, :, 2 * low:2 * high]
    squares = workspace.array("bandpower_squares", pairs.shape, pairs.dtype)
    np.square(pairs, out=squares)
    if plan.band_starts is not None:
        # Adjacent bands (the default's): one call sums every band (reduceat adds each run in
        # order, where reduce adds pairwise: the same sums to within rounding, ~1e-16).
        out = np.add.reduceat(squares, plan.band_starts, axis=2).transpose(0, 2, 1)
    else:
        out = np.empty((len(windows), len(plan.band_bins), windows.shape[1]))
        for index, (low_bin, high_bin) in enumerate(plan.band_bins):
            np.add.reduce(squares[:, :, 2 * (low_bin - low):2 * (high_bin - low)], axis=2, out=out[:, index])
    out *= plan.power_scale
    return out


def _rfft_takes_out():
    """True where numpy.fft.rfft writes into a given array (numpy >= 2.0; JetPack's 1.19 does not)."""
    try:
        np.fft.rfft(np.zeros(4), out=np.empty(3, dtype=np.complex128))
    except TypeError:
        return False
    return True


_RFFT_TAKES_OUT = _rfft_takes_out()


def _rfft_last_axis(real, workspace):
    """numpy.fft.rfft along the last axis, into the workspace where numpy allows it (same numbers)."""
    if not _RFFT_TAKES_OUT or real.dtype != np.float64:
        return np.fft.rfft(real, axis=-1)
    shape = real.shape[:-1] + (real.shape[-1] // 2 + 1,)
    return np.fft.rfft(real, axis=-1, out=workspace.array("rfft", shape, np.complex128))


def _mean(windows, plan, workspace):
    return np.mean(windows, axis=2)[:, None, :]


def _std(windows, plan, workspace):
    return np.std(windows, axis=2)[:, None, :]


def _max(windows, plan, workspace):
    return np.max(windows, axis=2)[:, None, :]


def _min(windows, plan, workspace):
    return np.min(windows, axis=2)[:, None, :]


class Workspace(object):
    """Scratch arrays lent to the window kinds, kept by one caller (a stream, one offline pass).

    Fast replay computes the band powers of ~25 windows at a time: the tapered
    windows and their spectra are megabytes.  Allocated afresh on every call,
    glibc's malloc gives such blocks back to the kernel when they are freed and
    the next call faults every page in again (measured: ~1,500 page faults and
    2-3 ms per 25-window batch, over half the feature time).  Kept here, they are
    allocated once.  Not shared between threads: each stream has its own.
    """

    def __init__(self):
        self._arrays = {}
        self._views = {}

    def array(self, name, shape, dtype):
        """An uninitialised array of ``shape`` and ``dtype`` (the same memory each time it fits)."""
        # The view handed out last time for this name, shape and dtype, if its memory is still
        # the name's: one dict look-up per call in real time, where the same shapes recur every stride.
        key = (name, shape, dtype)
        view = self._views.get(key)
        if view is not None:
            return view
        dtype = np.dtype(dtype)
        size = 1
        for length in shape:        # not np.prod: a few microseconds per call, every stride
            size *= int(length)
        flat = self._arrays.get(name)
        if flat is None or flat.dtype != dtype or flat.size < size:
            flat = np.empty(size, dtype=dtype)
            self._arrays[name] = flat
            # Views of the name's old memory must not be handed out again.
            self._views = {known: old for known, old in self._views.items() if known[0] != name}
        view = flat[:size].reshape(shape)
        if len(self._views) >= 64:      # many shapes (offline batches of every length): forget, don't grow
            self._views = {}
        self._views[key] = view
        return view


class _BlockParts(object):
    """A span of blocks as the one-by-one block kinds (bandpower_welch) read it.

    span : ndarray (n_rows, 2 + n_blocks * B): the two samples before the
    first block (whatever they are; only terms no window uses read them), then the blocks.
    """

    def __init__(self, span, n_blocks, block_samples):
        self.span = span
        self.shape = (span.shape[0], n_blocks, block_samples)

    def samples(self):
        """The blocks' samples, (n_rows, n_blocks * B)."""
        return self.span[:, 2:]

    def blocked(self, values):
        """(n_rows, n_blocks * B) -> (n_rows, n_blocks, B), a view."""
        return values.reshape(self.shape)


# The block kinds computed together by _shared_block_sums rather than one by one.
SHARED = "shared"

# Explicit registry: feature name -> kind.  Order within a pipeline follows the
# user's list, not this dict.
FEATURES = {
    "mav": FeatureKind(True, blocks=SHARED, finish=_mean_of_window),
    "rms": FeatureKind(True, blocks=SHARED, finish=_root_mean_of_window),
    "wl": FeatureKind(True, blocks=SHARED, finish=_as_is),
    "zc": FeatureKind(False, blocks=SHARED, finish=_as_is),
    "ssc": FeatureKind(False, blocks=SHARED, finish=_as_is),
    "bandpower": FeatureKind(True, window=_bandpower, per_band=True),
    "bandpower_welch": FeatureKind(True, blocks=_bandpower_welch_blocks, finish=_mean_block_power, per_band=True),
    "mean": FeatureKind(True, window=_mean),
    "std": FeatureKind(True, window=_std),
    "max": FeatureKind(True, window=_max),
    "min": FeatureKind(True, window=_min),
}
# Fewest samples a window needs for each feature to be defined.
MIN_WINDOW_SAMPLES = {"wl": 2, "zc": 2, "ssc": 3}
# Features whose definition is per stride-long block: they need the window to be whole blocks.
BLOCK_DEFINED = ("bandpower_welch",)


def check_bands(bands_hz):
    """Return ``bands_hz`` as a list of [low, high] float pairs, or raise UsageError.

    Only the form is checked here (a list of pairs of numbers); whether each
    band fits the sampling rate and window is :func:`band_bins`' job.
    """
    if not isinstance(bands_hz, (list, tuple)):
        raise UsageError("bandpower_bands_hz must be a list of [low, high] pairs in Hz, but got {!r}".format(
            bands_hz))
    pairs = []
    for band in bands_hz:
        if (not isinstance(band, (list, tuple)) or len(band) != 2
                or not all(isinstance(edge, numbers.Real) and not isinstance(edge, bool) for edge in band)):
            raise UsageError("each band power band must be a pair [low, high] in Hz, but got {!r}".format(band))
        pairs.append([check_number("bandpower_bands_hz[{}] low edge".format(len(pairs)), band[0]),
                      check_number("bandpower_bands_hz[{}] high edge".format(len(pairs)), band[1])])
    return pairs


def band_bins(signal_rate, window_samples, bands_hz, what="window"):
    """FFT bin ranges [low_bin, high_bin) holding frequencies lo <= f < hi for each band.

    Raises UsageError for a band outside (0, Nyquist] or one that no bin of a
    ``window_samples``-long FFT falls in (the ``what`` -- window or block -- is too short for it).
    """
    nyquist = signal_rate / 2.0
    resolution = signal_rate / window_samples
    bins = []
    for band in bands_hz:
        try:
            low, high = float(band[0]), float(band[1])
        except (TypeError, ValueError, IndexError):
            raise UsageError("each band power band must be a pair [low, high] in Hz, but got {!r}".format(
                band)) from None
        if not (0.0 < low < high <= nyquist):
            raise UsageError("band power band {!r} must satisfy 0 < low < high <= Nyquist ({} Hz)".format(
                [low, high], nyquist))
        low_bin = int(np.ceil(low / resolution - 1e-9))
        high_bin = int(np.ceil(high / resolution - 1e-9))
        if high_bin <= low_bin:
            raise UsageError("band power band {!r} holds no FFT bin of a {}-sample {} ({} Hz apart); "
                             "use a longer {} or a wider band".format([low, high], window_samples, what,
                                                                      resolution, what))
        bins.append((low_bin, high_bin))
    return bins


def _bin_span(bins):
    """The bins some band sums, [lowest low, highest high); (0, 0) without bands (no outputs)."""
    if not bins:
        return (0, 0)
    return (min(low for low, _ in bins), max(high for _, high in bins))


def _hann(n_samples):
    """Periodic Hann taper, against leakage from strong low bands into weak high ones."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_samples) / n_samples)


class WindowFeatures(object):
    """The window -> feature-vector function shared by both paths.

    Parameters
    ----------
    names : list of str, keys of :data:`FEATURES`, in output order
    signal_rate : float, Hz (of the samples in the windows)
    window_samples : int
    n_channels : int
    bands_hz : list of [low, high] Hz, for "bandpower" and "bandpower_welch"
    threshold : float, µV, for "zc" and "ssc"
    log : bool, log-compress amplitude features
    log_epsilon : float, added before the log so silent channels stay finite
    dtype : numpy dtype of windows and output
    stride_samples : int or None, the hop between windows

    Block sums.  mav, rms, wl, zc, ssc and bandpower_welch are sums over the
    window that split into sums over blocks of ``block_samples`` (B): the
    stride when the window is a whole number ``blocks_per_window`` (m) of
    strides of at least 2 samples (``aligned``), else the whole window (m = 1).
    Aligned, consecutive windows share m - 1 blocks, so each block's sums are
    computed once (:meth:`block_sums`) and a window adds up its m blocks
    (:meth:`compute_from_blocks`) -- every sample is processed once instead
    of m times.  :meth:`compute` does the same for any batch of windows,
    block by block within each window, so all paths add the same numbers in
    the same order.  The mode is chosen here, once.
    """

    def __init__(self, names, signal_rate, window_samples, n_channels, bands_hz, threshold, log, log_epsilon,
                 dtype, stride_samples=None):
        unknown = [name for name in names if name not in FEATURES]
        if unknown:
            from neurohand.firmware_bridge.shared.checks import check_option
            check_option("feature", unknown[0], sorted(FEATURES))
        if not names:
            raise UsageError("features must name at least one feature")
        if len(set(names)) != len(names):
            raise UsageError("features must not repeat a name, but got {!r}".format(list(names)))
        for name in names:
            if window_samples < MIN_WINDOW_SAMPLES.get(name, 1):
                raise UsageError("feature {!r} needs windows of at least {} samples, but got {}".format(
                    name, MIN_WINDOW_SAMPLES[name], window_samples))
        self.names = list(names)
        self.n_channels = n_channels
        self.window_samples = window_samples
        self.dtype = np.dtype(dtype)
        self.threshold = float(threshold)
        self.log = bool(log)
        self.log_epsilon = float(log_epsilon)
        self.aligned = (stride_samples is not None and stride_samples >= 2
                        and window_samples % stride_samples == 0)
        self.block_samples = stride_samples if self.aligned else window_samples
        self.blocks_per_window = window_samples // self.block_samples
        for name in names:
            if name in BLOCK_DEFINED and not self.aligned:
                raise UsageError("feature {!r} averages over stride-long blocks, so the window must be a whole "
                                 "number of strides of at least 2 samples, but got window {} and stride {} "
                                 "samples; use 'bandpower' for one periodogram of the window".format(
                                     name, window_samples, stride_samples))
        bands_hz = check_bands(bands_hz)
        per_band = any(FEATURES[name].per_band for name in names)
        self.bands_hz = bands_hz if per_band else []
        self.band_bins = []
        self.bin_span = (0, 0)
        self.band_starts = None
        if "bandpower" in names:
            self.band_bins = band_bins(signal_rate, window_samples, self.bands_hz)
            self.bin_span = _bin_span(self.band_bins)
            if self.band_bins and all(self.band_bins[i][1] == self.band_bins[i + 1][0]
                                      for i in range(len(self.band_bins) - 1)):
                # Bands that follow each other without gap or overlap: where each starts among the pairs.
                self.band_starts = np.array([2 * (low_bin - self.bin_span[0]) for low_bin, _ in self.band_bins],
                                            dtype=np.intp)
        self.taper = _hann(window_samples)
        self.power_scale = 2.0 / (window_samples * float(np.sum(self.taper ** 2)))
        self.block_band_bins = []
        self.block_bin_span = (0, 0)
        if "bandpower_welch" in names:
            self.block_band_bins = band_bins(signal_rate, self.block_samples, self.bands_hz, what="block")
            self.block_bin_span = _bin_span(self.block_band_bins)
        self.block_taper = _hann(self.block_samples)
        # Mean over the window's blocks of each block's periodogram.
        self.block_power_scale = 2.0 / (self.block_samples * float(np.sum(self.block_taper ** 2))
                                        * self.blocks_per_window)
        self._layout = []          # (kind, first column, n_outputs, first block-sum row or None)
        column = 0
        n_sums = 0
        for name in self.names:
            kind = FEATURES[name]
            n_outputs = len(self.bands_hz) if kind.per_band else 1
            if kind.blocks is not None:
                self._layout.append((kind, column, n_outputs, n_sums))
                n_sums += n_outputs
            else:
                self._layout.append((kind, column, n_outputs, None))
            column += n_outputs * n_channels
        self.n_features = column
        self.n_block_sums = n_sums
        self.shared = _SharedPlan({name: row for name, (kind, _, _, row) in zip(self.names, self._layout)
                                   if kind.blocks is SHARED})
        self._block_finish = self._plan_block_finish(window_samples)
        # Columns of block kinds to log-compress, as runs of adjacent columns (mav, rms, wl: one run).
        self._block_log_runs = []
        for kind, column, n_outputs, row in self._layout:
            if row is None or not (self.log and kind.amplitude):
                continue
            stop = column + n_outputs * n_channels
            if self._block_log_runs and self._block_log_runs[-1][1] == column:
                self._block_log_runs[-1] = (self._block_log_runs[-1][0], stop)
            else:
                self._block_log_runs.append((column, stop))
        self.needs_windows = any(kind.window is not None for kind in (FEATURES[name] for name in self.names))

    def _plan_block_finish(self, window_samples):
        """(first column, divisors (n_block_sums, 1), root rows) where every block kind's columns follow
        each other in block-sum order (the default list): then one division finishes them all
        (by W for the means, 1 for the sums, 1 / scale for the Welch powers), and one square
        root per rms; else None (kind by kind)."""
        divisors = np.ones((self.n_block_sums, 1))
        roots = []
        first = None
        for kind, column, n_outputs, row in self._layout:
            if row is None:
                continue
            if first is None:
                first = column - row * self.n_channels
            if column != first + row * self.n_channels:
                return None
            if kind.finish is _mean_of_window or kind.finish is _root_mean_of_window:
                divisors[row] = window_samples
            elif kind.finish is _mean_block_power:
                divisors[row:row + n_outputs] = 1.0 / self.block_power_scale
            elif kind.finish is not _as_is:
                return None
            if kind.finish is _root_mean_of_window:
                roots.append(row)
        if first is None:
            return None
        return first, divisors.astype(self.dtype), roots

    @property
    def feature_names(self):
        """Column names, e.g. ``mav_ch0`` or ``bandpower_20-70Hz_ch3``."""
        names = []
        for name in self.names:
            if FEATURES[name].per_band:
                for low, high in self.bands_hz:
                    names.extend("{}_{:g}-{:g}Hz_ch{}".format(name, low, high, c) for c in range(self.n_channels))
            else:
                names.extend("{}_ch{}".format(name, c) for c in range(self.n_channels))
        return names

    def block_sums(self, span, n_blocks, inner=None, closed=None, workspace=None):
        """Per-block sums of the block features over a run of consecutive blocks.

        span : ndarray (n_rows, 2 + n_blocks * block_samples), ``dtype``, µV: the
            two samples before the first block, then the blocks; rows contiguous
        inner, closed : optional ndarrays (n_block_sums, n_rows, n_blocks) to fill
        workspace : optional :class:`Workspace` the caller keeps between calls (fewer allocations)
        Returns (inner, closed): each block's sums over its own samples, and
        those plus the terms linking it to the block before (read only for
        blocks that are not the first of a window, so the two leading samples
        of ``span`` matter only there).
        """
        shape = (self.n_block_sums, span.shape[0], n_blocks)
        if inner is None:
            inner = np.empty(shape, dtype=self.dtype)
        if closed is None:
            closed = np.empty(shape, dtype=self.dtype)
        if self.shared.any:
            _shared_block_sums(span, n_blocks, self, inner, closed, workspace or Workspace())
        parts = None
        for kind, _, n_outputs, row in self._layout:
            if row is not None and kind.blocks is not SHARED:
                parts = parts or _BlockParts(span, n_blocks, self.block_samples)
                kind.blocks(parts, self, inner[row:row + n_outputs], closed[row:row + n_outputs])
        return inner, closed

    def _window_totals(self, inner, closed, starts):
        """(n_block_sums, n_rows, n_windows): inner[first] + closed[first + 1] + ..., always in that order."""
        # Added as closed[first + 1] + ... + closed[first + m - 1], then inner[first], in every branch:
        # one window alone (the real-time case) is one reduce over its m - 1 closed blocks
        # (numpy adds fewer than 8 terms one after the other), the same sums in the same order.
        first, count = int(starts[0]), len(starts)
        blocks = self.blocks_per_window
        if blocks == 1:
            return inner[:, :, starts]
        if count == 1:
            total = np.add.reduce(closed[:, :, first + 1:first + blocks], axis=2, keepdims=True)
            total += inner[:, :, first:first + 1]
            return total
        if starts[-1] - first == count - 1 and np.all(np.diff(starts) == 1):
            # Consecutive windows (the streaming case): slices instead of gathered copies, same sums.
            total = closed[:, :, first + 1:first + 1 + count].copy()
            for offset in range(2, blocks):
                total += closed[:, :, first + offset:first + offset + count]
            total += inner[:, :, first:first + count]
            return total
        total = closed[:, :, starts + 1]
        for offset in range(2, blocks):
            total += closed[:, :, starts + offset]
        total += inner[:, :, starts]
        return total

    def compute_from_blocks(self, inner, closed, starts, windows, out, workspace=None):
        """Features of windows made of consecutive blocks whose sums are known.

        inner, closed : from :meth:`block_sums` over n_channels rows (or kept from several calls)
        starts : int ndarray (n_windows,), the block index (last axis of inner)
            where each window starts; it covers blocks starts .. starts + m - 1
        windows : ndarray (n_windows, n_channels, W) for window kinds, else may be None
        out : ndarray (n_windows, n_features) to fill; returned
        workspace : optional :class:`Workspace` the caller keeps between calls (fewer allocations)
        """
        totals = self._window_totals(inner, closed, np.asarray(starts, dtype=np.intp))
        return self._finish(totals.transpose(2, 0, 1), windows, out, workspace)

    def compute(self, windows, out=None, workspace=None):
        """Features of a batch of windows.

        windows : ndarray, shape (n_windows, n_channels, window_samples), ``dtype``, µV
        out : optional ndarray (n_windows, n_features) to fill
        workspace : optional :class:`Workspace` the caller keeps between calls (fewer allocations)
        Returns ndarray, shape (n_windows, n_features), ``dtype``; raw (not normalised).
        """
        n_windows = len(windows)
        if out is None:
            out = np.empty((n_windows, self.n_features), dtype=self.dtype)
        totals = np.zeros((n_windows, self.n_block_sums, self.n_channels), dtype=self.dtype)
        if self.n_block_sums and n_windows:
            # Each window is its own run of m blocks (its first block's link terms are unused).
            span = np.zeros((n_windows * self.n_channels, 2 + self.window_samples), dtype=self.dtype)
            span[:, 2:] = windows.reshape(n_windows * self.n_channels, self.window_samples)
            inner, closed = self.block_sums(span, self.blocks_per_window)
            totals = self._window_totals(inner, closed, np.zeros(1, dtype=np.intp))
            totals = totals.reshape(self.n_block_sums, n_windows, self.n_channels).transpose(1, 0, 2)
        return self._finish(totals, windows, out, workspace)

    def _finish(self, totals, windows, out, workspace):
        """totals (n_windows, n_block_sums, n_channels) (+ windows for window kinds) -> out (n_windows, n_features)."""
        n_windows = len(out)
        n_channels = self.n_channels
        # Block kinds write straight into their columns (a view: one axis split in two) and are
        # log-compressed there, a run of columns at a time; where the dtypes differ, the values
        # are computed in the totals' dtype first, as everything else is.
        direct = totals.dtype == out.dtype
        together = direct and self._block_finish is not None
        if together:
            first, divisors, roots = self._block_finish
            values = out[:, first:first + self.n_block_sums * n_channels].reshape(n_windows, self.n_block_sums,
                                                                                   n_channels)
            np.divide(totals, divisors, out=values)
            for row in roots:
                np.sqrt(values[:, row], out=values[:, row])
        for kind, column, n_outputs, row in self._layout:
            columns = out[:, column:column + n_outputs * n_channels]
            if row is not None:
                if together:
                    continue
                if direct:
                    kind.finish(totals[:, row:row + n_outputs], self, columns.reshape(n_windows, n_outputs, n_channels))
                    continue
                values = np.empty(totals[:, row:row + n_outputs].shape, dtype=totals.dtype)
                kind.finish(totals[:, row:row + n_outputs], self, values)
            else:
                values = kind.window(windows, self, workspace)   # (n_windows, n_outputs, n_channels)
            if self.log and kind.amplitude:
                _log_compress(values, self.log_epsilon)
            columns[...] = values.reshape(n_windows, -1)
        if direct:
            for start, stop in self._block_log_runs:
                _log_compress(out[:, start:stop], self.log_epsilon)
        return out


def _log_compress(values, epsilon):
    """``log(max(values, 0) + epsilon)``, in place."""
    # An amplitude cannot be negative, but a filtered envelope dips below zero (NinaPro-style
    # RMS after a high-pass): such a window counts as silent, log(epsilon), instead of NaN.
    np.maximum(values, 0.0, out=values)
    values += epsilon
    np.log(values, out=values)


def window_ends(n_samples, window_samples, stride_samples):
    """End indices (exclusive) of all windows within ``n_samples``: W, W + stride, ...; int64."""
    if n_samples < window_samples:
        return np.zeros(0, dtype=np.int64)
    return np.arange(window_samples, n_samples + 1, stride_samples, dtype=np.int64)


def offline_windows(channels, window_samples, stride_samples):
    """Read-only strided view of every window of ``channels`` (n_channels, n_samples).

    Each channel's samples must be contiguous (copied here if they are not).
    Returns (windows (n_windows, n_channels, window_samples), ends (n_windows,)).
    """
    channels = np.asarray(channels)
    if channels.strides[1] != channels.itemsize:
        channels = np.ascontiguousarray(channels)
    ends = window_ends(channels.shape[1], window_samples, stride_samples)
    row, column = channels.strides
    windows = np.lib.stride_tricks.as_strided(
        channels, shape=(len(ends), channels.shape[0], window_samples),
        strides=(stride_samples * column, row, column), writeable=False)
    return windows, ends


def windows_touching_missing(missing, ends, window_samples):
    """Boolean (n_windows,): True where window [end - W, end) holds a missing sample."""
    missing_before = np.concatenate([[0], np.cumsum(missing, dtype=np.int64)])
    return missing_before[ends] - missing_before[ends - window_samples] > 0


def _skip_missing(ring, n_missing):
    """Move a ring's window bookkeeping past ``n_missing`` lost samples; return where they end.

    Shared by :class:`WindowRing` and :class:`BlockRing` (attributes samples_seen,
    next_end, stride_samples, dropped, valid_from): every window ending in the
    gap is dropped and counted, and no window may start before its end.
    """
    gap_end = ring.samples_seen + n_missing
    if ring.next_end <= gap_end:
        lost = (gap_end - ring.next_end) // ring.stride_samples + 1
        ring.dropped += lost
        ring.next_end += lost * ring.stride_samples
    ring.samples_seen = gap_end
    ring.valid_from = gap_end
    return gap_end


class WindowRing(object):
    """The last window of samples, and the schedule of window ends, for the streaming path.

    Keeps every sample twice (columns ``t % W`` and ``t % W + W`` of a
    (n_channels, 2W) buffer) so the window ending at any ``t`` is the slice
    ``[:, t % W : t % W + W]``, each channel's row contiguous: no unwrapping.  Sample indices count
    missing samples too, so window ends line up with the offline path.

    Gap policy: a window that contains any missing sample is not emitted and
    is counted in ``dropped``.
    """

    def __init__(self, window_samples, stride_samples, n_channels, dtype):
        self.window_samples = window_samples
        self.stride_samples = stride_samples
        self._buffer = np.zeros((n_channels, 2 * window_samples), dtype=dtype)
        self.samples_seen = 0        # next sample's index, missing samples included
        self.next_end = window_samples
        self.valid_from = 0          # windows starting before this index contain missing samples
        self.dropped = 0

    def _write(self, samples):
        width = self.window_samples
        if len(samples) > width:
            # Only the last W samples can still be part of a window.
            self.samples_seen += len(samples) - width
            samples = samples[-width:]
        start = self.samples_seen % width
        first = min(len(samples), width - start)
        buffer = self._buffer
        head = samples[:first].T
        buffer[:, start:start + first] = head
        buffer[:, start + width:start + width + first] = head
        rest = len(samples) - first
        if rest:
            tail = samples[first:].T
            buffer[:, :rest] = tail
            buffer[:, width:width + rest] = tail
        self.samples_seen += len(samples)

    def feed(self, samples, windows_out, ends_out):
        """Append ``samples`` (n, n_channels); copy each complete valid window out.

        windows_out : ndarray (capacity, n_channels, W); ends_out : int ndarray (capacity,)
        capacity must be at least ``max_windows(n)``.  Returns the number of windows written.
        """
        count = 0
        position = 0
        total = len(samples)
        width = self.window_samples
        while position < total:
            take = min(total - position, self.next_end - self.samples_seen)
            self._write(samples[position:position + take])
            position += take
            if self.samples_seen == self.next_end:
                if self.next_end - width >= self.valid_from:
                    start = self.next_end % width
                    windows_out[count] = self._buffer[:, start:start + width]
                    ends_out[count] = self.next_end
                    count += 1
                else:
                    self.dropped += 1
                self.next_end += self.stride_samples
        return count

    def max_windows(self, n_samples):
        """Most windows ``n_samples`` more samples can complete."""
        return (n_samples + self.stride_samples - 1) // self.stride_samples + 1

    def skip(self, n_missing):
        """Account for ``n_missing`` samples that never arrived; windows ending in them are dropped."""
        _skip_missing(self, n_missing)


class BlockRing(object):
    """Streaming state when windows are whole blocks (:attr:`WindowFeatures.aligned`).

    Keeps, channels-first, the two samples before the oldest kept block, at
    least the last m - 1 complete blocks and the unfinished one, plus the
    block sums of the complete blocks.  Each block's sums are computed once, when it
    completes, by the same :meth:`WindowFeatures.block_sums` the offline path
    uses; a window adds up its m blocks.  Window kinds read windows as views
    of the kept samples, with scratch arrays from ``workspace`` (the owning
    stream's :class:`Workspace`; default: one of its own).  Sample indices, the
    window schedule and the gap policy are those of :class:`WindowRing`.
    """

    def __init__(self, features, stride_samples, n_channels, dtype, workspace=None):
        if not features.aligned or features.block_samples != stride_samples:
            raise ValueError("BlockRing needs features aligned on the stride")
        self._features = features
        self.window_samples = features.window_samples
        self.stride_samples = stride_samples
        self._n_channels = n_channels
        self._dtype = np.dtype(dtype)
        self._workspace = Workspace() if workspace is None else workspace
        self._buffer = np.zeros((n_channels, 0), dtype=dtype)
        self._inner = np.zeros((features.n_block_sums, n_channels, 0), dtype=dtype)
        self._closed = np.zeros_like(self._inner)
        self._first_block = 0        # absolute index of the block at buffer column 2
        self._filled = 0             # samples kept after the two leading ones
        self._summed = 0             # kept blocks whose sums are known
        self.samples_seen = 0
        self.next_end = self.window_samples
        self.valid_from = 0
        self.dropped = 0
        self._reserve(stride_samples)

    ROOM_STRIDES = 16

    def _make_room(self, n_samples):
        """Room for ``n_samples`` more: forget blocks no window still needs, grow if that is not enough."""
        if 2 + self._filled + n_samples <= self._buffer.shape[1]:
            return
        complete = self._filled // self.stride_samples
        self._forget(complete - (self._features.blocks_per_window - 1))
        self._reserve(n_samples)

    def _reserve(self, n_samples):
        # Grows only when a block larger than any before arrives.  Room for
        # ROOM_STRIDES strides beyond the window, so moving the kept samples
        # to the front (_forget) happens once every so many blocks, not every block.
        width = self.stride_samples
        columns = 2 + self.window_samples + max(n_samples, self.ROOM_STRIDES * width)
        if columns > self._buffer.shape[1]:
            buffer = np.zeros((self._n_channels, columns), dtype=self._dtype)
            kept = min(self._buffer.shape[1], 2 + self._filled)
            buffer[:, :kept] = self._buffer[:, :kept]
            self._buffer = buffer
            blocks = columns // width + 1
            for name in ("_inner", "_closed"):
                old = getattr(self, name)
                new = np.zeros(old.shape[:2] + (blocks,), dtype=self._dtype)
                new[:, :, :self._summed] = old[:, :, :self._summed]
                setattr(self, name, new)

    def max_windows(self, n_samples):
        """Most windows ``n_samples`` more samples can complete."""
        return (n_samples + self.stride_samples - 1) // self.stride_samples + 1

    def feed(self, samples, out, ends_out):
        """Append ``samples`` (n, n_channels) µV; compute each complete valid window's features.

        out : ndarray (capacity, n_features); ends_out : int ndarray (capacity,);
        capacity at least ``max_windows(n)``.  Returns the number of windows written (raw features).
        """
        width = self.stride_samples
        n_new = len(samples)
        self._make_room(n_new)
        buffer = self._buffer
        buffer[:, 2 + self._filled:2 + self._filled + n_new] = samples.T
        self._filled += n_new
        self.samples_seen += n_new
        complete = self._filled // width
        if complete > self._summed:
            self._features.block_sums(buffer[:, self._summed * width:2 + complete * width], complete - self._summed,
                                      self._inner[:, :, self._summed:complete],
                                      self._closed[:, :, self._summed:complete], self._workspace)
            self._summed = complete
        count = 0
        if self.next_end <= self.samples_seen:
            due = (self.samples_seen - self.next_end) // width + 1
            # Python integers: one window per block in real time, where numpy's small-array calls
            # would cost more than the arithmetic.
            ends = [end for end in range(self.next_end, self.next_end + due * width, width)
                    if end - self.window_samples >= self.valid_from]
            self.next_end += due * width
            count = len(ends)
            self.dropped += due - count
            if count:
                starts = np.array([(end - self.window_samples) // width - self._first_block for end in ends],
                                  dtype=np.intp)
                windows = None
                if self._features.needs_windows:
                    if count == 1:      # the usual real-time case: a slice, no strided view to build
                        first = 2 + int(starts[0]) * width
                        windows = buffer[None, :, first:first + self.window_samples]
                    else:
                        # Consecutive windows (ends are one stride apart): a view, no copy.
                        all_windows, _ = offline_windows(buffer[:, 2:2 + self._filled], self.window_samples, width)
                        windows = all_windows[int(starts[0]):int(starts[0]) + count]
                ends_out[:count] = ends
                self._features.compute_from_blocks(self._inner, self._closed, starts, windows, out[:count],
                                                   self._workspace)
        return count

    def _forget(self, n_blocks):
        """Drop the oldest ``n_blocks`` kept blocks (no window still to come reads them)."""
        if n_blocks <= 0:
            return
        n_blocks = min(n_blocks, self._summed)
        shift = n_blocks * self.stride_samples
        buffer = self._buffer
        buffer[:, :2 + self._filled - shift] = buffer[:, shift:2 + self._filled].copy()
        self._filled -= shift
        kept = self._summed - n_blocks
        self._inner[:, :, :kept] = self._inner[:, :, n_blocks:self._summed].copy()
        self._closed[:, :, :kept] = self._closed[:, :, n_blocks:self._summed].copy()
        self._summed = kept
        self._first_block += n_blocks

    def skip(self, n_missing):
        """Account for ``n_missing`` samples that never arrived; windows ending in them are dropped."""
        gap_end = _skip_missing(self, n_missing)
        # Start over at the block holding gap_end: every earlier block is in no
        # window still to come, and the samples of that block before gap_end
        # (left as they are) only reach windows that are dropped.
        self._first_block = gap_end // self.stride_samples
        self._filled = gap_end - self._first_block * self.stride_samples
        self._summed = 0


def fit_normalisation(features):
    """Per-feature mean and standard deviation of training features (n_windows, n_features).

    A feature that is constant over the training set (std ~ 0, e.g. zero
    crossings of a dead channel) gets std 1 so normalising never divides by zero;
    its normalised value is then just the offset from the training mean.
    Returns (mean, std), float64 arrays (n_features,).
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise UsageError("fit_normalisation needs features of shape (n_windows >= 2, n_features), but got {}".format(
            features.shape))
    if not np.all(np.isfinite(features)):
        raise UsageError("fit_normalisation got NaN or infinite features")
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std = np.where(std > 1e-9 * (1.0 + np.abs(mean)), std, 1.0)
    return mean, std


def check_normalisation(mean, std, n_features, where):
    """Validate stored normalisation; returns float64 (mean, std) or raises ConfigError."""
    try:
        mean = check_real_array("normalisation mean", mean)
        std = check_real_array("normalisation std", std)
    except UsageError as error:
        raise ConfigError("{}: normalisation is not numeric: {}".format(where, error)) from error
    if mean.shape != (n_features,) or std.shape != (n_features,):
        raise ConfigError("{}: normalisation must have {} means and stds (one per feature), but got {} and {}".format(
            where, n_features, mean.shape, std.shape))
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise ConfigError("{}: normalisation has non-finite values or non-positive stds".format(where))
    return mean, std
