"""``neurohand bench libemg``: our window features against LibEMG's, on the same windows.

It also holds the classifier comparison: :func:`lda_comparison` fits our
numpy LDA (train/classes.py) and LibEMG's standard one on the same features
(used for docs/training.md's NinaPro figures and tests/workstation/test_libemg_compare.py).

LibEMG (https://libemg.github.io/libemg/, PyPI ``libemg``) is the reference
feature library of the myoelectric-control field.  This benchmark feeds the
very same windows to :class:`~neurohand.decoder.features.WindowFeatures` and to
``libemg.feature_extractor.FeatureExtractor().extract_features`` and reports,
for the five features both compute, how far apart the values are and how long
each takes.

Workload: a simulated 16-channel 10 kHz nerve recording
(:mod:`neurohand.firmware_bridge.virtual.simulator`, quantised to int16 counts and
scaled back to µV, as the chip sends it), band-passed and notched by the
default raw :class:`~neurohand.decoder.pipeline.FeaturePipeline` filter, cut
into 100 ms windows every 20 ms: an array (n_windows, 16, 1000), float64, µV,
C-contiguous, handed to both libraries.

Definitions (read from LibEMG 2.0.3's ``feature_extractor.py``; ``x`` one
channel of one window, ``d[i] = x[i+1] - x[i]``):

====  ===============================================  ==========================================
name  LibEMG                                           ours, with the setting that matches
====  ===============================================  ==========================================
MAV   mean |x|                                         same
RMS   sqrt(mean x^2)                                   same
WL    sum |d|                                          same
ZC    diff(sign(x)) == +-2, no threshold               x[i] x[i+1] < 0 and |d[i]| >= T; T = 0
SSC   (x[i]-x[i-1])(x[i]-x[i+1]) >= SSC_threshold      product > 0 and product >= T^2, so T^2 is
      (µV^2, default 0.0)                              SSC_threshold, except that at 0 LibEMG also
                                                       counts a product of exactly 0 (a flat step)
====  ===============================================  ==========================================

So the main comparison runs ours with ``threshold_uv = 0`` against LibEMG's
defaults (ZC has no threshold in LibEMG); flat steps, where SSC may differ,
are counted and reported (``ssc_flat_steps``).  A second SSC comparison uses
our default threshold (0.5 µV) against ``SSC_threshold = 0.25`` µV^2, which is
the same rule exactly.  ZC at a non-zero threshold has no LibEMG counterpart.

LibEMG is not a dependency of neurohand: it pulls ~65 packages (GUI, audio,
device SDKs).  Where it cannot be imported, :func:`run` says why and measures
nothing.  Timing, in two cases: all windows in one call (offline), and one
window per call (the runtime's streaming case, where fixed per-call costs
dominate); the two libraries alternate repeat by repeat, and the report gives
medians with [min, max], because the machine is shared.

Running it with LibEMG (a separate venv: LibEMG 2.0.3 pins ``numpy<2.0``, which
the workstation constraints' numpy 2.x excludes; ~65 packages, ~1 GB)::

    python3 -m venv ~/libemg-venv
    ~/libemg-venv/bin/pip install libemg==2.0.3 pytest
    # neurohand itself, editable, without touching the tree: reuse .venv's finder
    cp .venv/lib/python3.11/site-packages/__editable__*neurohand* ~/libemg-venv/lib/python3.11/site-packages/
    ~/libemg-venv/bin/python -m neurohand.deploy bench libemg      # --json: one line
    ~/libemg-venv/bin/python -m pytest -q -p no:cacheprovider tests/workstation/test_libemg_compare.py
"""
import contextlib
import sys
import time

import numpy as np

SIGNAL_RATE = 10000.0
N_CHANNELS = 16
WINDOW_S = 0.1
STRIDE_S = 0.02
SEED = 7
OUR_NAMES = ["mav", "rms", "wl", "zc", "ssc"]
LIBEMG_NAMES = ["MAV", "RMS", "WL", "ZC", "SSC"]
# Windows timed one per call (the streaming case).
SINGLE_WINDOW_CALLS = 100
# Our pipeline's default zc/ssc threshold, for the second SSC comparison.
DEFAULT_THRESHOLD_UV = 0.5


def libemg_status():
    """Whether LibEMG imports here: dict with importable (bool), version (str or None), reason (str or None).

    The reason tells "not installed" (no ``libemg`` package) apart from an
    installed LibEMG that fails to import (one of its many dependencies is
    missing or broken), with the exception's own message.  Anything LibEMG
    prints while importing goes to stderr.
    """
    try:
        # LibEMG prints on import (e.g. "Bluepy not installed..."); stdout must stay one JSON document.
        with contextlib.redirect_stdout(sys.stderr):
            from libemg.feature_extractor import FeatureExtractor  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an import can fail in any way; the report must say how
        import importlib.util
        if importlib.util.find_spec("libemg") is None:
            reason = "not installed: {}".format(error)
        else:
            reason = "installed but not importable: {}: {}".format(type(error).__name__, error)
        return {"importable": False, "version": None, "reason": reason}
    return {"importable": True, "version": _installed_version("libemg"), "reason": None}


def _installed_version(distribution):
    try:
        # Guarded: Python 3.8+; a Jetson's 3.6 reports no version (it has no LibEMG either).
        from importlib.metadata import version  # novermin
    except ImportError:
        return "unknown (no importlib.metadata)"
    try:
        return version(distribution)
    except Exception as error:  # noqa: BLE001 - a version is informative only
        return "unknown ({})".format(error)


def simulated_windows(seconds):
    """Filtered windows of a simulated recording.

    Returns (windows, description): windows ndarray (n_windows, 16, 1000),
    float64, µV, C-contiguous; description a dict for the report.
    Needs scipy (filter design), as LibEMG does.
    """
    from neurohand.decoder.dsp import FilterChain
    from neurohand.decoder.features import offline_windows
    from neurohand.decoder.pipeline import FeaturePipeline
    from neurohand.firmware_bridge.virtual.simulator import SCALE_UV, NerveSimulator, SimulatorConfig

    simulator = NerveSimulator.from_config(SimulatorConfig(seconds, n_channels=N_CHANNELS, rate=SIGNAL_RATE,
                                                           seed=SEED, difficulty="easy"))
    n_samples = simulator.config.n_samples
    # What the chip sends: int16 counts, back to µV.
    signals = simulator.signals(0, n_samples).astype(np.float64) * SCALE_UV
    pipeline = FeaturePipeline.design(SIGNAL_RATE, N_CHANNELS, {"window_s": WINDOW_S, "stride_s": STRIDE_S})
    filtered = FilterChain(pipeline.sos, N_CHANNELS, pipeline.car).process(signals)
    channels_first = np.ascontiguousarray(filtered.T)
    windows, _ = offline_windows(channels_first, pipeline.window_samples, pipeline.stride_samples)
    windows = np.ascontiguousarray(windows)    # an ordinary array, as LibEMG's own windowing returns
    description = {
        "source": "simulator seed {}, {:g} s, int16 counts x {} µV".format(SEED, seconds, SCALE_UV),
        "filter": pipeline.to_config()["filter"],
        "signal_rate_hz": SIGNAL_RATE,
        "window_samples": pipeline.window_samples,
        "stride_samples": pipeline.stride_samples,
        "windows_shape": list(windows.shape),
        "windows_rms_uv": round(float(np.sqrt(np.mean(windows * windows))), 3),
    }
    return windows, description


def ours_extractor(window_samples, threshold_uv):
    """Our :class:`WindowFeatures` for mav, rms, wl, zc, ssc, raw (no log), float64."""
    from neurohand.decoder.features import WindowFeatures
    return WindowFeatures(OUR_NAMES, SIGNAL_RATE, window_samples, N_CHANNELS, [], threshold_uv, log=False,
                          log_epsilon=1e-6, dtype="float64")


def ours_by_feature(extractor, windows):
    """Our features as {name: ndarray (n_windows, n_channels)} (columns are feature-major)."""
    values = extractor.compute(windows).reshape(len(windows), len(OUR_NAMES), N_CHANNELS)
    return {name: values[:, index, :] for index, name in enumerate(OUR_NAMES)}


def libemg_by_feature(extractor, windows, ssc_threshold):
    """LibEMG's features as {our name: ndarray (n_windows, n_channels)}."""
    # LibEMG asserts type(SSC_threshold) == float.
    values = extractor.extract_features(LIBEMG_NAMES, windows, {"SSC_threshold": float(ssc_threshold)})
    return {ours: np.asarray(values[theirs], dtype=np.float64) for ours, theirs in zip(OUR_NAMES, LIBEMG_NAMES)}


def differences(ours, reference):
    """How far ``ours`` is from ``reference`` (same shape).

    Returns dict: max_abs_diff; max_rel_diff (|ours - ref| / |ref| over entries
    where ref != 0, or inf where ref == 0 but ours is not); n_values;
    n_different (entries not exactly equal).
    """
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise ValueError("shapes differ: ours {} vs reference {}".format(ours.shape, reference.shape))
    gap = np.abs(ours - reference)
    scale = np.abs(reference)
    nonzero = scale > 0
    relative = np.divide(gap, scale, out=np.zeros_like(gap), where=nonzero)
    max_rel = float(np.max(relative)) if relative.size else 0.0
    if np.any(gap[~nonzero] > 0):
        max_rel = float("inf")
    return {
        "max_abs_diff": float(np.max(gap)) if gap.size else 0.0,
        "max_rel_diff": max_rel,
        "n_values": int(gap.size),
        "n_different": int(np.count_nonzero(gap)),
    }


def flat_steps(windows):
    """Number of inner samples whose slope product (x[i]-x[i-1])(x[i]-x[i+1]) is exactly 0."""
    steps = windows[:, :, 1:] - windows[:, :, :-1]
    return int(np.count_nonzero(steps[:, :, :-1] * steps[:, :, 1:] == 0))


def libemg_lda_decisions(train_features, train_classes, test_features):
    """LibEMG's standard classifier, ``EMGClassifier("LDA")`` (scikit-learn's ``LinearDiscriminantAnalysis()``
    with its defaults), fitted on one set of features and run on another: decided class per test row."""
    from libemg.emg_predictor import EMGClassifier

    classifier = EMGClassifier("LDA")
    classifier.fit(feature_dictionary={"training_features": np.asarray(train_features, dtype=np.float64),
                                       "training_labels": np.asarray(train_classes)})
    decided, _ = classifier.run(np.asarray(test_features, dtype=np.float64))
    return np.asarray(decided).astype(np.int64)


def lda_comparison(train_features, train_classes, test_features, test_classes):
    """Our numpy LDA (train/classes.py, shrinkage 0 and empirical priors: LibEMG's settings) against
    LibEMG's on the same features.

    Returns dict: ours and libemg (accuracy, balanced_accuracy per step) and
    agreement (share of test rows where the two decide the same class)."""
    from neurohand.train import classes

    ours = classes.LDAClassifier(shrinkages=0.0).fit([(train_features, train_classes)]).predict(test_features)
    theirs = libemg_lda_decisions(train_features, train_classes, test_features)
    labels = np.union1d(np.union1d(ours, theirs), test_classes)
    result = {"agreement": float(np.mean(ours == theirs)), "n_test": int(len(ours))}
    for name, decided in (("ours", ours), ("libemg", theirs)):
        confusion = classes.confusion_matrix(test_classes, decided, labels)
        result[name] = {"accuracy": classes.accuracy(confusion),
                        "balanced_accuracy": classes.balanced_accuracy(confusion)}
    return result


def _seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _speed(ours, theirs, repeats, calls):
    """Timing of two functions, ms per call (median and [min, max]), and libemg / ours.

    The two run alternately, one repeat each in turn, and the ratio is the
    median of the per-repeat ratios: load from other processes then falls on
    both rather than on whichever happened to run second.
    """
    our_times, their_times = [], []
    for _ in range(repeats):
        our_times.append(_seconds(ours))
        their_times.append(_seconds(theirs))
    ratios = [theirs_time / ours_time for ours_time, theirs_time in zip(our_times, their_times)]
    per_call = 1e3 / calls
    return {
        "ours_ms": round(float(np.median(our_times)) * per_call, 4),
        "ours_ms_spread": [round(min(our_times) * per_call, 4), round(max(our_times) * per_call, 4)],
        "libemg_ms": round(float(np.median(their_times)) * per_call, 4),
        "libemg_ms_spread": [round(min(their_times) * per_call, 4), round(max(their_times) * per_call, 4)],
        "libemg_over_ours": round(float(np.median(ratios)), 3),
        "libemg_over_ours_spread": [round(min(ratios), 3), round(max(ratios), 3)],
    }


def _json_number(value):
    # JSON has no infinity; say it in words rather than emit an invalid document.
    return value if np.isfinite(value) else "inf (nonzero where LibEMG gives 0)"


def run(quick):
    """Compare on a few seconds of simulated data (``quick``: a fraction of a second, fewer repeats).

    Returns a JSON-able dict: always ``quick``, ``libemg_importable``,
    ``libemg_version``, ``libemg_unavailable_reason``; where LibEMG imports,
    also ``workload``, ``definitions``, ``features`` (per feature: max_abs_diff,
    max_rel_diff, n_values, n_different), ``ssc_flat_steps``,
    ``ssc_at_default_threshold`` and ``speed`` (``batch``: all windows in one
    call; ``per_window``: one window per call, as the runtime does; each with
    ours_ms, libemg_ms (per call, median), their [min, max] spreads and
    libemg_over_ours (median of per-repeat ratios) with its spread).
    """
    status = libemg_status()
    result = {
        "quick": bool(quick),
        "libemg_importable": status["importable"],
        "libemg_version": status["version"],
        "libemg_unavailable_reason": status["reason"],
    }
    if not status["importable"]:
        return result
    from libemg.feature_extractor import FeatureExtractor

    seconds = 0.5 if quick else 5.0
    repeats = 2 if quick else 15
    windows, result["workload"] = simulated_windows(seconds)
    theirs_extractor = FeatureExtractor()
    ours = ours_extractor(windows.shape[2], 0.0)

    our_values = ours_by_feature(ours, windows)
    their_values = libemg_by_feature(theirs_extractor, windows, 0.0)
    features = {}
    for name in OUR_NAMES:
        entry = differences(our_values[name], their_values[name])
        entry["max_rel_diff"] = _json_number(entry["max_rel_diff"])
        features[name] = entry
    result["features"] = features
    result["ssc_flat_steps"] = flat_steps(windows)

    at_default = ours_by_feature(ours_extractor(windows.shape[2], DEFAULT_THRESHOLD_UV), windows)["ssc"]
    theirs_at_default = libemg_by_feature(theirs_extractor, windows, DEFAULT_THRESHOLD_UV ** 2)["ssc"]
    entry = differences(at_default, theirs_at_default)
    entry["max_rel_diff"] = _json_number(entry["max_rel_diff"])
    entry["settings"] = "ours threshold_uv={:g}, LibEMG SSC_threshold={:g}".format(
        DEFAULT_THRESHOLD_UV, DEFAULT_THRESHOLD_UV ** 2)
    result["ssc_at_default_threshold"] = entry

    result["definitions"] = {
        "ours": "WindowFeatures(['mav','rms','wl','zc','ssc'], threshold_uv=0, log=False, float64)",
        "libemg": "FeatureExtractor().extract_features(['MAV','RMS','WL','ZC','SSC'], windows, "
                  "{'SSC_threshold': 0.0})",
        "zc": "LibEMG counts strict sign changes with no threshold; ours with threshold 0 is the same rule",
        "ssc": "LibEMG counts product >= SSC_threshold (µV^2), ours product > 0 and >= T^2: equal except "
               "products of exactly 0 when both thresholds are 0 (see ssc_flat_steps)",
    }

    batch = {"what": "all 5 features of all {} windows in one call".format(len(windows))}
    batch.update(_speed(lambda: ours.compute(windows), lambda: libemg_by_feature(theirs_extractor, windows, 0.0),
                        repeats, 1))
    # The runtime computes one window per 20 ms block: per-call overheads count there.
    singles = [windows[index:index + 1] for index in range(min(len(windows), SINGLE_WINDOW_CALLS))]

    def ours_singles():
        for single in singles:
            ours.compute(single)

    def theirs_singles():
        for single in singles:
            libemg_by_feature(theirs_extractor, single, 0.0)
    per_window = {"what": "one window per call (the streaming case), per window, over {} calls".format(
        len(singles))}
    per_window.update(_speed(ours_singles, theirs_singles, repeats, len(singles)))
    result["speed"] = {"repeats": repeats, "batch": batch, "per_window": per_window}
    return result
