"""Windowed features, one implementation for the offline and the streaming path.

:class:`WindowFeatures` computes every feature of a batch of windows,
``(n_windows, n_channels, window_samples)`` -> ``(n_windows, n_features)``.
The offline path calls it on strided views of a whole filtered recording
(:func:`offline_windows`); the streaming path keeps the last window of
filtered samples in a :class:`WindowRing` and calls the very same method on
the windows a block completes.  Windows are channels-first with each
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
"""
import numbers

import numpy as np

from neurohand.firmware_bridge.checks import check_number, check_real_array
from neurohand.firmware_bridge.errors import ConfigError, UsageError


class FeatureKind(object):
    """One registry entry: how to compute a feature and how to name/log it.

    function(windows, plan, shared) -> ndarray (n_windows, n_outputs, n_channels);
    windows (n_windows, n_channels, window_samples), shared: intermediates (_Shared)
    amplitude: True when log compression applies (amplitudes and powers, not counts).
    """

    def __init__(self, function, amplitude, per_band=False):
        self.function = function
        self.amplitude = amplitude
        self.per_band = per_band


def _mav(windows, plan, shared):
    return np.mean(np.abs(windows), axis=2)[:, None, :]


def _rms(windows, plan, shared):
    return np.sqrt(np.mean(windows * windows, axis=2))[:, None, :]


def _wl(windows, plan, shared):
    return np.sum(shared.abs_steps(), axis=2)[:, None, :]


def _zc(windows, plan, shared):
    crossing = (windows[:, :, :-1] * windows[:, :, 1:] < 0) & (shared.abs_steps() >= plan.threshold)
    return np.sum(crossing, axis=2, dtype=windows.dtype)[:, None, :]


def _ssc(windows, plan, shared):
    steps = shared.steps()
    # (x[i] - x[i-1]) (x[i] - x[i+1]) = -step[i-1] step[i]
    product = steps[:, :, :-1] * steps[:, :, 1:]
    np.negative(product, out=product)
    change = (product > 0) & (product >= plan.threshold * plan.threshold)
    return np.sum(change, axis=2, dtype=windows.dtype)[:, None, :]


def _bandpower(windows, plan, shared):
    spectrum = np.fft.rfft(windows * plan.taper, axis=2)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    out = np.empty((len(windows), len(plan.band_bins), windows.shape[1]))
    for index, (low_bin, high_bin) in enumerate(plan.band_bins):
        np.sum(power[:, :, low_bin:high_bin], axis=2, out=out[:, index])
    out *= plan.power_scale
    return out


def _mean(windows, plan, shared):
    return np.mean(windows, axis=2)[:, None, :]


def _std(windows, plan, shared):
    return np.std(windows, axis=2)[:, None, :]


def _max(windows, plan, shared):
    return np.max(windows, axis=2)[:, None, :]


def _min(windows, plan, shared):
    return np.min(windows, axis=2)[:, None, :]


class _Shared(object):
    """Intermediates several features use, computed at most once per batch."""

    def __init__(self, windows):
        self._windows = windows
        self._steps = None
        self._abs_steps = None

    def steps(self):
        """x[i+1] - x[i], shape (n_windows, n_channels, W - 1)."""
        if self._steps is None:
            self._steps = self._windows[:, :, 1:] - self._windows[:, :, :-1]
        return self._steps

    def abs_steps(self):
        if self._abs_steps is None:
            self._abs_steps = np.abs(self.steps())
        return self._abs_steps


# Explicit registry: feature name -> kind.  Order within a pipeline follows the
# user's list, not this dict.
FEATURES = {
    "mav": FeatureKind(_mav, amplitude=True),
    "rms": FeatureKind(_rms, amplitude=True),
    "wl": FeatureKind(_wl, amplitude=True),
    "zc": FeatureKind(_zc, amplitude=False),
    "ssc": FeatureKind(_ssc, amplitude=False),
    "bandpower": FeatureKind(_bandpower, amplitude=True, per_band=True),
    "mean": FeatureKind(_mean, amplitude=True),
    "std": FeatureKind(_std, amplitude=True),
    "max": FeatureKind(_max, amplitude=True),
    "min": FeatureKind(_min, amplitude=True),
}
# Fewest samples a window needs for each feature to be defined.
MIN_WINDOW_SAMPLES = {"wl": 2, "zc": 2, "ssc": 3}


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


def band_bins(signal_rate, window_samples, bands_hz):
    """FFT bin ranges [low_bin, high_bin) holding frequencies lo <= f < hi for each band.

    Raises UsageError for a band outside (0, Nyquist] or one that no bin of a
    ``window_samples``-long FFT falls in (the window is too short for it).
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
            raise UsageError("band power band {!r} holds no FFT bin of a {}-sample window ({} Hz apart); "
                             "use a longer window or a wider band".format([low, high], window_samples, resolution))
        bins.append((low_bin, high_bin))
    return bins


class WindowFeatures(object):
    """The window -> feature-vector function shared by both paths.

    Parameters
    ----------
    names : list of str, keys of :data:`FEATURES`, in output order
    signal_rate : float, Hz (of the samples in the windows)
    window_samples : int
    n_channels : int
    bands_hz : list of [low, high] Hz, for "bandpower"
    threshold : float, µV, for "zc" and "ssc"
    log : bool, log-compress amplitude features
    log_epsilon : float, added before the log so silent channels stay finite
    dtype : numpy dtype of windows and output
    """

    def __init__(self, names, signal_rate, window_samples, n_channels, bands_hz, threshold, log, log_epsilon,
                 dtype):
        unknown = [name for name in names if name not in FEATURES]
        if unknown:
            from neurohand.firmware_bridge.checks import check_option
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
        bands_hz = check_bands(bands_hz)
        self.bands_hz = bands_hz if "bandpower" in names else []
        self.band_bins = band_bins(signal_rate, window_samples, self.bands_hz) if self.bands_hz else []
        # Periodic Hann taper against leakage from strong low bands into weak high ones.
        self.taper = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window_samples) / window_samples)
        self.power_scale = 2.0 / (window_samples * float(np.sum(self.taper ** 2)))
        self._layout = []          # (kind, first column, n_outputs)
        column = 0
        for name in self.names:
            kind = FEATURES[name]
            n_outputs = len(self.bands_hz) if kind.per_band else 1
            self._layout.append((kind, column, n_outputs))
            column += n_outputs * n_channels
        self.n_features = column

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

    def compute(self, windows, out=None):
        """Features of a batch of windows.

        windows : ndarray, shape (n_windows, n_channels, window_samples), ``dtype``, µV;
            each channel's samples contiguous (last axis stride = itemsize)
        out : optional ndarray (n_windows, n_features) to fill
        Returns ndarray, shape (n_windows, n_features), ``dtype``; raw (not normalised).
        """
        if out is None:
            out = np.empty((len(windows), self.n_features), dtype=self.dtype)
        shared = _Shared(windows)
        for kind, column, n_outputs in self._layout:
            values = kind.function(windows, self, shared)  # (n_windows, n_outputs, n_channels)
            if self.log and kind.amplitude:
                values = np.log(values + self.log_epsilon)
            out[:, column:column + n_outputs * self.n_channels] = values.reshape(len(windows), -1)
        return out


def window_ends(n_samples, window_samples, stride_samples):
    """End indices (exclusive) of all windows within ``n_samples``: W, W + stride, ...; int64."""
    if n_samples < window_samples:
        return np.zeros(0, dtype=np.int64)
    return np.arange(window_samples, n_samples + 1, stride_samples, dtype=np.int64)


def offline_windows(channels, window_samples, stride_samples):
    """Read-only strided view of every window of ``channels`` (n_channels, n_samples), C-contiguous.

    Returns (windows (n_windows, n_channels, window_samples), ends (n_windows,)).
    """
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
        gap_end = self.samples_seen + n_missing
        if self.next_end <= gap_end:
            lost = (gap_end - self.next_end) // self.stride_samples + 1
            self.dropped += lost
            self.next_end += lost * self.stride_samples
        self.samples_seen = gap_end
        self.valid_from = gap_end


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
