"""Signal -> feature-vector pipeline: design on the workstation, run on the device.

Stages (data contracts between them)::

    samples (n, n_channels) µV
      -> FilterChain    (optional CAR, band-pass, mains notches; causal, carried state; float64)
      -> windows        (n_windows, n_channels, window_samples) every stride_samples;
                        offline: strided views, streaming: WindowRing, or per-block
                        sums shared by overlapping windows (BlockRing) when windows are whole strides
      -> WindowFeatures (n_windows, n_features), log-compressed amplitude features
      -> normalisation  (per-feature mean/std fitted on training features)

:meth:`FeaturePipeline.design` needs scipy (filter design) and runs at training
time; :meth:`FeaturePipeline.to_config` stores everything, SOS coefficients
included, as plain JSON; :meth:`FeaturePipeline.from_config` rebuilds it with
numpy only and validates it (a device refuses to start on a bad config).
Offline (:meth:`FeaturePipeline.transform`) and streaming (:class:`FeatureStream`)
filter with the same numpy :class:`FilterChain` on every machine; scipy designs
the filter, it never runs it (docs/dsp.md, "What runs where").

Two modes: ``"raw"`` (broadband µV, e.g. 10 kHz from the chip) and
``"envelope"`` (data already rectified and smoothed, e.g. NinaPro DB1's
100 Hz RMS EMG: no band-pass and no notch, window statistics only).

Gap policy (samples the chip link reports missing, see docs/dsp.md):
missing samples still occupy their place on the sample axis, so window ends
keep matching the chip's sample index; a window containing any missing sample
is not emitted and is counted; the filter state is carried across the gap
(the filter sees the samples either side spliced together), because restarting
it from rest would feed the high-pass the electrode's offset as a step, a far
larger transient than the splice.
"""
import copy
import math
import numbers

import numpy as np

from neurohand.decoder.dsp import FilterChain, validate_sos
from neurohand.decoder.features import (
    FEATURES, BlockRing, WindowFeatures, WindowRing, Workspace, check_normalisation, fit_normalisation, offline_windows,
    windows_touching_missing)
from neurohand.firmware_bridge.shared.checks import check_int, check_number, check_option
from neurohand.firmware_bridge.shared.errors import ConfigError, NeurohandError, UsageError

CONFIG_FORMAT = "neurohand-feature-pipeline"
CONFIG_VERSION = 1
MODES = ("raw", "envelope")
DTYPES = ("float64", "float32")

RAW_DEFAULTS = {
    "mode": "raw",
    "dtype": "float64",
    "window_s": 0.1,
    "stride_s": 0.02,
    # Upper edge: 3 kHz, or 0.45 x the sampling rate where that is lower (only
    # when band_hz is not given; a given band is checked, never adjusted).
    "band_hz": [20.0, 3000.0],
    "band_order": 4,
    "notch_hz": 50.0,
    "notch_harmonics": 3,
    "notch_q": 30.0,
    "car": False,
    "features": ["mav", "rms", "wl", "zc", "ssc", "bandpower"],
    # Absent: 4 log-spaced bands spanning the band-pass (see _resolve_band_power).
    "bandpower_bands_hz": None,
    "threshold_uv": 0.5,
    "log": True,
    "log_epsilon": 1e-6,
}
ENVELOPE_DEFAULTS = {
    "mode": "envelope",
    "dtype": "float64",
    "window_s": 0.2,
    "stride_s": 0.01,
    "car": False,
    "features": ["mean", "std"],
    "bandpower_bands_hz": None,
    "threshold_uv": 0.0,
    "log": False,
    "log_epsilon": 1e-6,
}
FILTER_KEYS = ("band_hz", "band_order", "notch_hz", "notch_harmonics", "notch_q")

# Upper bounds on sizes, so a damaged or hand-edited config is refused at
# start-up instead of allocating absurd buffers (a window of 10**12 samples
# asked for 7 TiB).  Far above any real use: the chip link carries 64 channels,
# and a 0.1 s window at 10 kHz is 1000 samples.
MAX_CHANNELS = 4096
MAX_WINDOW_SAMPLES = 1 << 20        # also the largest stride; 105 s at 10 kHz
# One window, n_channels x window_samples values (32 MiB in float64): the
# streaming path keeps a few such buffers.
MAX_WINDOW_VALUES = 1 << 22


def _resolve_settings(signal_rate, n_channels, settings):
    """Defaults overridden by ``settings``; unknown keys are refused, not skipped."""
    settings = dict(settings or {})
    mode = check_option("mode", settings.get("mode", "raw"), MODES)
    defaults = RAW_DEFAULTS if mode == "raw" else ENVELOPE_DEFAULTS
    allowed = sorted(set(RAW_DEFAULTS) if mode == "raw" else set(ENVELOPE_DEFAULTS))
    for key in settings:
        if key not in defaults:
            if mode == "envelope" and key in FILTER_KEYS:
                raise UsageError("setting {!r} does not apply in envelope mode (the data is already "
                                 "rectified: no band-pass or notch)".format(key))
            check_option("settings key", key, allowed)
    resolved = copy.deepcopy(defaults)
    resolved.update(copy.deepcopy(settings))
    if mode == "raw" and "band_hz" not in settings:
        resolved["band_hz"] = [20.0, min(3000.0, 0.45 * signal_rate)]
    check_option("dtype", resolved["dtype"], DTYPES)
    if not isinstance(resolved["features"], (list, tuple)):
        raise UsageError("features must be a list of names, but got {!r}".format(resolved["features"]))
    if resolved["bandpower_bands_hz"] is None and any(name in resolved["features"]
                                                      for name in ("bandpower", "bandpower_welch")):
        band = resolved.get("band_hz") or [0.05 * signal_rate, 0.45 * signal_rate]
        edges = np.geomspace(band[0], band[1], 5)
        resolved["bandpower_bands_hz"] = [[round(float(low), 1), round(float(high), 1)]
                                          for low, high in zip(edges[:-1], edges[1:])]
    return resolved


def _samples(name, seconds, signal_rate, minimum):
    seconds = check_number(name, seconds, minimum=0.0, exclusive_minimum=True)
    count = int(round(seconds * signal_rate))
    if count < minimum:
        raise UsageError("{} = {} s is {} samples at {} Hz; at least {} needed".format(
            name, seconds, count, signal_rate, minimum))
    return count


class FeaturePipeline(object):
    """Filters + windowed features + normalisation, fully described by :meth:`to_config`.

    Build it with :meth:`design` (workstation) or :meth:`from_config` (device);
    the constructor only stores an already validated configuration.

    Attributes: signal_rate (Hz), n_channels, mode, dtype, window_samples,
    stride_samples, n_features, feature_names, sos (n_sections, 6),
    normalisation ((mean, std) or None).
    """

    def __init__(self, config, sos, features, normalisation):
        self._config = config
        self.signal_rate = config["signal_rate"]
        self.n_channels = config["n_channels"]
        self.mode = config["mode"]
        self.dtype = np.dtype(config["dtype"])
        self.window_samples = config["window_samples"]
        self.stride_samples = config["stride_samples"]
        self.car = config["car"]
        self.sos = sos
        self._features = features
        self.n_features = features.n_features
        self.normalisation = normalisation

    @property
    def feature_names(self):
        return self._features.feature_names

    @property
    def window_features(self):
        """The :class:`WindowFeatures` both paths call: windows (k, n_channels, W) -> raw features (k, n_features)."""
        return self._features

    # ------------------------------------------------------------------ building
    @classmethod
    def design(cls, signal_rate, n_channels, settings=None):
        """Design a pipeline for ``n_channels`` sampled at ``signal_rate`` Hz (workstation: scipy).

        settings : dict overriding the defaults (:data:`RAW_DEFAULTS` or,
        with ``{"mode": "envelope"}``, :data:`ENVELOPE_DEFAULTS`).
        Raises UsageError on any value that cannot work.
        """
        signal_rate = check_number("signal_rate", signal_rate, minimum=0.0, exclusive_minimum=True)
        n_channels = check_int("n_channels", n_channels, minimum=1, maximum=MAX_CHANNELS)
        resolved = _resolve_settings(signal_rate, n_channels, settings)
        if resolved["mode"] == "raw":
            from neurohand.decoder.filter_design import design_chain
            sos, description = design_chain(signal_rate, resolved["band_hz"], resolved["band_order"],
                                            resolved["notch_hz"], resolved["notch_harmonics"], resolved["notch_q"])
        else:
            sos, description = np.zeros((0, 6)), {"band_hz": None, "band_order": None, "notch_hz": [],
                                                  "notch_q": None}
        if resolved["car"] and n_channels < 2:
            raise UsageError("car (common-average reference) needs at least 2 channels, but n_channels is 1")
        window_samples = _samples("window_s", resolved["window_s"], signal_rate, 1)
        stride_samples = _samples("stride_s", resolved["stride_s"], signal_rate, 1)
        config = {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "signal_rate": signal_rate,
            "n_channels": n_channels,
            "mode": resolved["mode"],
            "dtype": resolved["dtype"],
            "window_samples": window_samples,
            "stride_samples": stride_samples,
            "car": bool(resolved["car"]),
            "filter": description,
            "sos": sos.tolist(),
            "features": list(resolved["features"]),
            "bandpower_bands_hz": resolved["bandpower_bands_hz"] or [],
            "threshold_uv": check_number("threshold_uv", resolved["threshold_uv"], minimum=0.0),
            "log": bool(resolved["log"]),
            "log_epsilon": check_number("log_epsilon", resolved["log_epsilon"], minimum=0.0,
                                        exclusive_minimum=True),
            "normalisation": None,
        }
        return cls._build(config, "designed pipeline", error=UsageError)

    @classmethod
    def from_config(cls, config, expected_channels=None, where="feature pipeline config"):
        """Rebuild from :meth:`to_config` output (numpy only) and validate it.

        expected_channels : int or None; when given, a config for another
        channel count is refused (the chip and the model must agree).
        Raises ConfigError naming ``where`` on anything inconsistent, on a
        value of the wrong type (never ignored) and on sizes beyond
        :data:`MAX_CHANNELS`, :data:`MAX_WINDOW_SAMPLES` (window and stride)
        and :data:`MAX_WINDOW_VALUES` (n_channels x window_samples).
        """
        if not isinstance(config, dict):
            raise ConfigError("{}: expected a JSON object, but got {}".format(where, type(config).__name__))
        if config.get("format") != CONFIG_FORMAT:
            raise ConfigError("{}: format must be {!r}, but got {!r}".format(where, CONFIG_FORMAT, config.get("format")))
        if config.get("version") != CONFIG_VERSION:
            raise ConfigError("{}: version {!r} is not supported (this runtime reads version {})".format(
                where, config.get("version"), CONFIG_VERSION))
        missing = [key for key in ("signal_rate", "n_channels", "mode", "dtype", "window_samples", "stride_samples",
                                   "car", "sos", "features", "bandpower_bands_hz", "threshold_uv", "log",
                                   "log_epsilon", "normalisation") if key not in config]
        if missing:
            raise ConfigError("{}: missing keys {}".format(where, missing))
        config = copy.deepcopy(config)
        pipeline = cls._build(config, where, error=ConfigError)
        if expected_channels is not None and pipeline.n_channels != expected_channels:
            raise ConfigError("{}: made for {} channels, but the signal has {}".format(
                where, pipeline.n_channels, expected_channels))
        return pipeline

    @classmethod
    def _build(cls, config, where, error):
        try:
            signal_rate = check_number("signal_rate", config["signal_rate"], minimum=0.0, exclusive_minimum=True)
            n_channels = check_int("n_channels", config["n_channels"], minimum=1, maximum=MAX_CHANNELS)
            mode = check_option("mode", config["mode"], MODES)
            check_option("dtype", config["dtype"], DTYPES)
            window_samples = check_int("window_samples", config["window_samples"], minimum=1,
                                       maximum=MAX_WINDOW_SAMPLES)
            check_int("stride_samples", config["stride_samples"], minimum=1, maximum=MAX_WINDOW_SAMPLES)
            if n_channels * window_samples > MAX_WINDOW_VALUES:
                raise UsageError("window_samples x n_channels = {} x {} = {} values per window; at most {} "
                                 "are supported".format(window_samples, n_channels, window_samples * n_channels,
                                                        MAX_WINDOW_VALUES))
            if not isinstance(config["car"], bool) or not isinstance(config["log"], bool):
                raise UsageError("car and log must be true or false")
            if not isinstance(config["features"], list) or not all(isinstance(f, str) for f in config["features"]):
                raise UsageError("features must be a list of names, but got {!r}".format(config["features"]))
            sos = validate_sos(config["sos"], where)
            _check_filter_description(config.get("filter"), signal_rate)
            if mode == "envelope" and len(sos):
                raise UsageError("envelope mode takes no filter, but {} sections are stored".format(len(sos)))
            if config["car"] and n_channels < 2:
                raise UsageError("car needs at least 2 channels")
            features = WindowFeatures(
                config["features"], signal_rate, window_samples, n_channels, config["bandpower_bands_hz"],
                check_number("threshold_uv", config["threshold_uv"], minimum=0.0), config["log"],
                check_number("log_epsilon", config["log_epsilon"], minimum=0.0, exclusive_minimum=True),
                config["dtype"], stride_samples=config["stride_samples"])
            normalisation = None
            if config["normalisation"] is not None:
                stored = config["normalisation"]
                if not isinstance(stored, dict) or "mean" not in stored or "std" not in stored:
                    raise UsageError("normalisation must be null or {\"mean\": [...], \"std\": [...]}")
                normalisation = check_normalisation(stored["mean"], stored["std"], features.n_features, where)
        except NeurohandError as problem:
            if isinstance(problem, error):
                raise
            raise error("{}: {}".format(where, problem)) from problem
        return cls(config, sos, features, normalisation)

    def to_config(self):
        """Everything needed to rebuild this pipeline, as a JSON-able dict (plain lists and numbers)."""
        config = copy.deepcopy(self._config)
        config["sos"] = self.sos.tolist()
        config["normalisation"] = None if self.normalisation is None else {
            "mean": self.normalisation[0].tolist(), "std": self.normalisation[1].tolist()}
        config["feature_names"] = self.feature_names
        return config

    # ------------------------------------------------------------------ offline
    def transform(self, signals, missing=None, gaps=None, batch_windows=None):
        """Raw (un-normalised) features of a whole recording.

        Filters with the same :class:`FilterChain` the stream runs (numpy, on
        every machine), so offline features match the device's.

        Parameters
        ----------
        signals : ndarray, shape (n_samples, n_channels), µV
        missing : optional bool ndarray (n_samples,): True marks a sample that
            never arrived (its row in ``signals`` is ignored)
        gaps : optional list of (index, n_missing): ``n_missing`` samples were
            lost just before row ``index`` of ``signals`` (rows are received
            samples only); what a recording of the chip's SampleGap events gives
        batch_windows : windows computed per batch (memory); None: 128 when
            the windows are whole strides (block sums), else 64

        Returns
        -------
        features : ndarray (n_windows, n_features), ``dtype``; windows holding a missing sample left out
        ends : int64 ndarray (n_windows,), index after each window's last sample
            (on the axis that counts missing samples)
        """
        signals, received, missing = self._received_samples(signals, missing, gaps)
        full = self._filter_onto_axis(signals, received, missing)
        windows, ends = offline_windows(full[:, 2:], self.window_samples, self.stride_samples)
        if received is not None:
            selected = np.flatnonzero(~windows_touching_missing(missing, ends, self.window_samples))
            ends = ends[selected]
        else:
            selected = np.arange(len(ends))
        return self._features_in_batches(full, windows, selected, batch_windows), ends

    def _received_samples(self, signals, missing, gaps):
        """Check ``transform``'s inputs; return (received rows of ``signals``, their positions, missing mask).

        Positions (on the full axis that counts missing samples) and the mask
        are None when nothing is missing.
        """
        signals = self._check_block(signals, "signals")
        if missing is not None and gaps is not None:
            raise UsageError("give missing or gaps, not both")
        if gaps is not None:
            received, missing = _expand_gaps(len(signals), gaps)
        elif missing is not None:
            missing = np.asarray(missing, dtype=bool)
            if missing.shape != (len(signals),):
                raise UsageError("missing must be a bool array of shape ({},), but got {}".format(
                    len(signals), missing.shape))
            received = np.flatnonzero(~missing)
            signals = signals[received]
        else:
            received = None
        # Checked after dropping missing rows: those may hold NaN and are never filtered.
        if not np.isfinite(np.sum(signals)):
            raise UsageError("signals contain NaN or infinite values (mark lost samples with missing= or gaps=)")
        return signals, received, missing

    def _filter_onto_axis(self, signals, received, missing):
        """Filter the received samples as one spliced signal; place them on the full sample axis.

        Returns (n_channels, 2 + n_total) in ``dtype``: channels-first and
        contiguous, the layout WindowFeatures works in.  The two leading
        columns are the "samples before the first block" that block sums read
        (only for terms no window uses); missing samples stay 0 (no window uses
        them either).
        """
        filtered = FilterChain(self.sos, self.n_channels, self.car).process(signals)
        n_total = len(missing) if received is not None else len(filtered)
        full = np.zeros((self.n_channels, 2 + n_total), dtype=self.dtype)
        if received is not None:
            full[:, 2 + received] = filtered.T
        else:
            full[:, 2:] = filtered.T
        return full

    def _features_in_batches(self, full, windows, selected, batch_windows):
        """Features of the windows ``selected`` (indices into ``windows``), computed batch by batch."""
        features = np.empty((len(selected), self.n_features), dtype=self.dtype)
        workspace = Workspace()
        if batch_windows is None:
            # Block sums keep a few scratch copies of the batch's samples, so 128 windows, not more
            # (a 60 s, 16-channel, 10 kHz transform peaked at 262 MB with 128, 315 MB with 256, and
            # was no faster; 2026-12-07); a batch of whole windows is n_channels x W values each: 64.
            batch_windows = 128 if self._features.aligned else 64
        # Batches of consecutive windows: a contiguous run stays a strided view (no copy) and
        # shares its blocks; a gap starts a new batch.
        breaks = np.flatnonzero(np.diff(selected) != 1) + 1
        position = 0
        for run in np.split(selected, breaks):
            for start in range(0, len(run), batch_windows):
                batch = run[start:start + batch_windows]
                target = features[position:position + len(batch)]
                position += len(batch)
                self._batch_features(full, windows, batch, target, workspace)
        return features

    def _batch_features(self, full, windows, batch, target, workspace):
        """Features of consecutive windows ``batch`` into ``target`` (len(batch), n_features)."""
        computer = self._features
        chunk = windows[batch[0]:batch[-1] + 1]
        if computer.aligned:
            # Window i starts at block i (its start, i * stride, is a block boundary).
            first, stop = batch[0], batch[-1] + computer.blocks_per_window
            width = computer.block_samples
            inner, closed = computer.block_sums(full[:, first * width:2 + stop * width], stop - first,
                                                workspace=workspace)
            computer.compute_from_blocks(inner, closed, batch - first, chunk, target, workspace)
        else:
            computer.compute(chunk, out=target, workspace=workspace)

    def fit_normalisation(self, features):
        """Store per-feature mean/std of training ``features`` (n_windows, n_features); returns self."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise UsageError("features must have shape (n_windows, {}), but got {}".format(
                self.n_features, features.shape))
        self.normalisation = fit_normalisation(features)
        return self

    def normalise(self, features, out=None):
        """(features - mean) / std, in ``dtype``; shape (n_windows, n_features)."""
        if self.normalisation is None:
            raise UsageError("normalisation is not fitted: call fit_normalisation(training_features) first")
        mean, std = self.normalisation
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise UsageError("features must have shape (n_windows, {}), but got {}".format(
                self.n_features, features.shape))
        if out is None:
            out = np.empty(features.shape, dtype=self.dtype)
        np.subtract(features, mean.astype(self.dtype), out=out)
        out /= std.astype(self.dtype)
        return out

    def stream(self, normalised=True):
        """A new :class:`FeatureStream` starting at sample 0 with the filter at rest."""
        if normalised and self.normalisation is None:
            raise ConfigError("this pipeline has no normalisation: fit_normalisation() before streaming "
                              "(or stream(normalised=False) for raw features)")
        return FeatureStream(self, normalised)

    def _check_block(self, block, name):
        if (block.__class__ is np.ndarray and block.ndim == 2 and block.shape[1] == self.n_channels
                and block.dtype.kind in "fiu"):
            return block        # the usual case, in four attribute reads (each issubdtype costs a microsecond)
        if not isinstance(block, np.ndarray) or block.ndim != 2 or block.shape[1] != self.n_channels:
            shape = getattr(block, "shape", type(block).__name__)
            raise UsageError("{} must be an ndarray of shape (n_samples, {}), but got {}".format(
                name, self.n_channels, shape))
        if not (np.issubdtype(block.dtype, np.floating) or np.issubdtype(block.dtype, np.integer)):
            raise UsageError("{} must hold real numbers, but has dtype {}".format(name, block.dtype))
        return block


def _check_filter_description(description, signal_rate):
    """The human-readable design record must agree with the rate: a config edited for another rate is refused.

    Its form is what :func:`design_chain` writes: band_hz null or [low, high],
    notch_hz a list (empty without notches), band_order null or an integer,
    notch_q null or a number.  A value of another type is refused, not ignored.
    """
    if description is None:
        return
    if not isinstance(description, dict):
        raise UsageError("filter must be an object describing the design, but got {!r}".format(description))
    nyquist = signal_rate / 2.0
    band = description.get("band_hz")
    if band is not None and (not isinstance(band, (list, tuple)) or len(band) != 2):
        raise UsageError("filter.band_hz must be null or a pair [low, high] in Hz, but got {!r}".format(band))
    notches = description.get("notch_hz")
    if notches is not None and not isinstance(notches, (list, tuple)):
        raise UsageError("filter.notch_hz must be a list of notch frequencies in Hz, but got {!r}".format(notches))
    for key, edges in (("band_hz", band), ("notch_hz", notches)):
        for edge in edges or []:
            if isinstance(edge, bool) or not isinstance(edge, numbers.Real) or not 0.0 < edge < nyquist:
                raise UsageError("filter.{} cut-off {!r} Hz is not between 0 and Nyquist ({} Hz)".format(
                    key, edge, nyquist))
    if band is not None and not band[0] < band[1]:
        raise UsageError("filter.band_hz low edge must be below the high edge, but got {!r}".format(band))
    order = description.get("band_order")
    if order is not None:
        check_int("filter.band_order", order, minimum=1)
    quality = description.get("notch_q")
    if quality is not None:
        check_number("filter.notch_q", quality, minimum=0.0, exclusive_minimum=True)


def _expand_gaps(n_received, gaps):
    """Received-sample gaps -> (received row positions on the full axis, missing mask of the full axis)."""
    lost_before = np.zeros(n_received + 1, dtype=np.int64)
    previous = 0
    for gap in gaps:
        try:
            index, n_missing = gap
        except (TypeError, ValueError):
            raise UsageError("each gap must be (index, n_missing), but got {!r}".format(gap)) from None
        index = check_int("gap index", index, minimum=previous, maximum=n_received)
        n_missing = check_int("gap n_missing", n_missing, minimum=0)
        lost_before[index] += n_missing
        previous = index
    offsets = np.cumsum(lost_before)
    received = np.arange(n_received) + offsets[:n_received]
    missing = np.ones(n_received + int(offsets[-1]), dtype=bool)
    missing[received] = False
    return received, missing


class FeatureStream(object):
    """Block-by-block features for the runtime loop; made by :meth:`FeaturePipeline.stream`.

    ``push(block)`` -> (features (k, n_features), ends (k,)) for the k windows
    the block completes, normalised unless the stream was made with
    ``normalised=False``; ``push_gap(n)`` records ``n`` missing samples.
    Buffers are allocated here, once; they grow only if a block larger than
    any before arrives.  ``counters`` is a dict: blocks, samples_received,
    samples_missing, gaps, windows_emitted, windows_dropped_for_gaps.
    """

    def __init__(self, pipeline, normalised):
        self._pipeline = pipeline
        self._features = pipeline._features
        self._normalised = normalised
        self._workspace = Workspace()
        # The same FilterChain as transform: offline and streamed features come from one filter.
        self._chain = FilterChain(pipeline.sos, pipeline.n_channels, pipeline.car)
        if self._features.aligned:
            self._ring = BlockRing(self._features, pipeline.stride_samples, pipeline.n_channels, pipeline.dtype,
                                   self._workspace)
        else:
            self._ring = WindowRing(pipeline.window_samples, pipeline.stride_samples, pipeline.n_channels,
                                    pipeline.dtype)
        if normalised:
            self._mean = pipeline.normalisation[0].astype(pipeline.dtype)
            self._std = pipeline.normalisation[1].astype(pipeline.dtype)
        self._capacity = 0
        self._reserve(self._ring.max_windows(pipeline.stride_samples))
        self.counters = {"blocks": 0, "samples_received": 0, "samples_missing": 0, "gaps": 0,
                         "windows_emitted": 0, "windows_dropped_for_gaps": 0}

    def _reserve(self, n_windows):
        if n_windows > self._capacity:
            pipeline = self._pipeline
            if not self._features.aligned:    # a BlockRing keeps no window copies
                self._windows = np.zeros((n_windows, pipeline.n_channels, pipeline.window_samples),
                                         dtype=pipeline.dtype)
            self._ends = np.zeros(n_windows, dtype=np.int64)
            self._out = np.zeros((n_windows, pipeline.n_features), dtype=pipeline.dtype)
            self._capacity = n_windows

    @property
    def samples_seen(self):
        """Index of the next sample on the stream's axis (received + missing so far)."""
        return self._ring.samples_seen

    def push(self, block):
        """Filter ``block`` (n, n_channels) µV and return features of the windows it completes.

        Returns (features (k, n_features) ``dtype``, ends int64 (k,)); fresh arrays.
        """
        self._pipeline._check_block(block, "block")
        # One reduction, no temporary: a NaN would poison the carried filter state for good.
        # (np.add.reduce and math.isfinite: np.sum and np.isfinite's wrappers cost more than the sum.)
        if not math.isfinite(np.add.reduce(block, axis=None)):
            raise UsageError("block contains NaN or infinite values; report lost samples with push_gap()")
        filtered = self._chain.process(block)
        self._reserve(self._ring.max_windows(len(block)))
        dropped_before = self._ring.dropped
        if self._features.aligned:
            count = self._ring.feed(filtered, self._out, self._ends)
            out = self._out[:count]
        else:
            count = self._ring.feed(filtered, self._windows, self._ends)
            out = self._out[:count]
            if count:
                self._features.compute(self._windows[:count], out=out, workspace=self._workspace)
        if count:
            if self._normalised:
                out -= self._mean
                out /= self._std
        counters = self.counters
        counters["blocks"] += 1
        counters["samples_received"] += len(block)
        counters["windows_emitted"] += count
        counters["windows_dropped_for_gaps"] += self._ring.dropped - dropped_before
        return out.copy(), self._ends[:count].copy()

    def push_gap(self, n_missing):
        """Record ``n_missing`` samples that never arrived (the chip parser's SampleGap.missing_samples).

        Windows containing them are dropped (counted); the filter state is carried.
        """
        if isinstance(n_missing, bool) or not isinstance(n_missing, numbers.Integral) or n_missing < 0:
            raise UsageError("n_missing must be a non-negative integer, but got {!r}".format(n_missing))
        if n_missing == 0:
            return
        dropped_before = self._ring.dropped
        self._ring.skip(int(n_missing))
        self.counters["gaps"] += 1
        self.counters["samples_missing"] += int(n_missing)
        self.counters["windows_dropped_for_gaps"] += self._ring.dropped - dropped_before


__all__ = ["FeaturePipeline", "FeatureStream", "RAW_DEFAULTS", "ENVELOPE_DEFAULTS", "FEATURES"]
