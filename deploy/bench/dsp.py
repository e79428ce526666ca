"""``neurohand bench dsp`` and ``neurohand bench features``: per-block cost of the runtime DSP.

The workload is the runtime's: 20 ms blocks of 200 samples x 16 channels at
10 kHz, the default pipeline (band-pass 20-3000 Hz order 4, notches at 50,
100, 150 Hz: 7 sections; 100 ms windows every 20 ms; mav, rms, wl, zc, ssc,
4 band powers).  Signals are synthetic (seeded noise plus 50 Hz hum): the
cost does not depend on the content.

Timing figures are per block in microseconds: each repeat streams the blocks
once and takes the 50th and 99th percentile; the report gives the median over
repeats and the [min, max] spread, because this machine is shared.

What is timed is the runtime's one filter implementation, the numpy
``FilterChain``, on every machine.  Where scipy imports, ``scipy.signal.sosfilt``
(state carried in ``zi``) is timed beside it as a reference, called here
directly: no runtime path runs it.
"""
import time

import numpy as np

SIGNAL_RATE = 10000.0
N_CHANNELS = 16
BLOCK_SAMPLES = 200
# The default chain at 10 kHz (design_chain(10000, [20, 3000], 4, 50, 3, 30)),
# used only where scipy is absent (a device) so the bench still runs there.
DEFAULT_SOS_10KHZ = [
    [0.16365276602625728, 0.32730553205251456, 0.16365276602625728, 1.0, 0.3212610707844702, 0.06407791168157072],
    [1.0, 2.0, 1.0, 1.0, 0.45226248133867136, 0.4692228248347472],
    [1.0, -2.0, 1.0, 1.0, -1.9767417903387292, 0.9769003424859944],
    [1.0, -2.0, 1.0, 1.0, -1.9903325987348166, 0.9904901743019544],
    [0.9994766751888079, -1.997966987567486, 0.9994766751888079, 1.0, -1.997966987567486, 0.9989533503776158],
    [0.9989538975423421, -1.9939653804297088, 0.9989538975423421, 1.0, -1.9939653804297088, 0.9979077950846842],
    [0.998431665916719, -1.9880011816839496, 0.998431665916719, 1.0, -1.9880011816839496, 0.9968633318334379],
]


def _scipy_available():
    try:
        import scipy.signal  # noqa: F401
    except ImportError:
        return False
    return True


def _signals(n_samples, seed=0):
    """Seeded test signal, (n_samples, 16) µV: noise, 50 Hz hum and a slow offset."""
    random = np.random.RandomState(seed)
    t = np.arange(n_samples) / SIGNAL_RATE
    hum = 30.0 * np.sin(2 * np.pi * 50.0 * t)[:, None]
    return random.normal(0.0, 20.0, (n_samples, N_CHANNELS)) + hum + 5.0


def _blocks(signals):
    return [signals[start:start + BLOCK_SAMPLES] for start in range(0, len(signals) - BLOCK_SAMPLES + 1,
                                                                      BLOCK_SAMPLES)]


def _time_per_block(make_step, blocks, repeats):
    """Median over repeats of per-block p50/p99 (µs), with [min, max] spreads."""
    p50s, p99s = [], []
    for _ in range(repeats):
        step = make_step()
        times = np.empty(len(blocks))
        for index, block in enumerate(blocks):
            start = time.perf_counter()
            step(block)
            times[index] = time.perf_counter() - start
        p50s.append(float(np.percentile(times, 50)) * 1e6)
        p99s.append(float(np.percentile(times, 99)) * 1e6)
    return {
        "p50_us": round(float(np.median(p50s)), 1),
        "p99_us": round(float(np.median(p99s)), 1),
        "p50_us_spread": [round(min(p50s), 1), round(max(p50s), 1)],
        "p99_us_spread": [round(min(p99s), 1), round(max(p99s), 1)],
        "blocks": len(blocks),
        "repeats": repeats,
    }


def _default_sos():
    if _scipy_available():
        from neurohand.decoder.filter_design import design_chain
        sos, _ = design_chain(SIGNAL_RATE, [20.0, 3000.0], 4, 50.0, 3, 30.0)
        return sos, "designed"
    return np.array(DEFAULT_SOS_10KHZ), "stored"


def run_dsp(quick):
    """Streaming filter chain (numpy, the runtime's) vs scipy.sosfilt as a reference: agreement and per-block cost."""
    from neurohand.decoder.dsp import FilterChain, sosfilt_reference

    seconds = 1.0 if quick else 10.0
    repeats = 2 if quick else 7
    signals = _signals(int(seconds * SIGNAL_RATE))
    blocks = _blocks(signals)
    sos, source = _default_sos()
    result = {
        "workload": "{} blocks of {} samples x {} channels at {:g} Hz, {} SOS sections ({})".format(
            len(blocks), BLOCK_SAMPLES, N_CHANNELS, SIGNAL_RATE, len(sos), source),
        "quick": bool(quick),
    }

    def make_numpy():
        return FilterChain(sos, N_CHANNELS).process
    result["numpy_block"] = _time_per_block(make_numpy, blocks, repeats)

    # Why the block formulation: the plain per-sample recursion, one block.
    start = time.perf_counter()
    sosfilt_reference(sos, blocks[0], np.zeros((len(sos), 2, N_CHANNELS)))
    result["per_sample_loop_one_block_us"] = round((time.perf_counter() - start) * 1e6, 1)

    if not _scipy_available():
        result["scipy"] = "not importable: no comparison"
        return result
    from scipy.signal import sosfilt

    def make_scipy():
        return _sosfilt_step(sosfilt, sos)
    result["scipy_block"] = _time_per_block(make_scipy, blocks, repeats)
    result["numpy_over_scipy_p50"] = round(result["numpy_block"]["p50_us"] / result["scipy_block"]["p50_us"], 3)

    expected = sosfilt(sos, signals[:len(blocks) * BLOCK_SAMPLES], axis=0)
    chain = FilterChain(sos, N_CHANNELS)
    streamed = np.concatenate([chain.process(block).copy() for block in blocks])
    result["max_abs_diff_numpy_vs_scipy"] = float(np.max(np.abs(streamed - expected)))
    result["max_abs_output"] = float(np.max(np.abs(expected)))
    return result


def _sosfilt_step(sosfilt, sos):
    """The reference filter, block by block: ``scipy.signal.sosfilt`` with its state carried in ``zi``."""
    zi = np.zeros((len(sos), 2, N_CHANNELS))

    def step(block):
        filtered, zi[...] = sosfilt(sos, block, axis=0, zi=zi)
        return filtered
    return step


def run_features(quick):
    """Streaming feature step (filter + windows + features + normalisation) per 20 ms block.

    ``raw_<dtype>_numpy`` is the runtime's stream.  ``raw_<dtype>_scipy``, where
    scipy imports, is a reference: the same step with ``scipy.signal.sosfilt``
    as the filter (see :func:`_sosfilt_feature_step`).
    """
    from neurohand.decoder.pipeline import FeaturePipeline

    seconds = 1.0 if quick else 10.0
    repeats = 2 if quick else 7
    signals = _signals(int(seconds * SIGNAL_RATE))
    blocks = _blocks(signals)
    result = {"quick": bool(quick), "scipy_importable": _scipy_available()}
    for dtype in ("float64", "float32"):
        pipeline = _raw_pipeline(dtype)
        features, _ = pipeline.transform(signals[:20000])
        pipeline.fit_normalisation(features)
        result["raw_{}_numpy".format(dtype)] = _time_per_block(lambda: pipeline.stream().push, blocks, repeats)
        if _scipy_available():
            result["raw_{}_scipy".format(dtype)] = _time_per_block(lambda: _sosfilt_feature_step(pipeline), blocks,
                                                                   repeats)
        result["n_features_raw"] = pipeline.n_features

    envelope = FeaturePipeline.design(100.0, 10, {"mode": "envelope"})
    random = np.random.RandomState(1)
    envelope_signals = np.abs(random.normal(0.0, 1.0, (int(seconds * 6000), 10)))
    features, _ = envelope.transform(envelope_signals)
    envelope.fit_normalisation(features)
    # One NinaPro-style block per stride: 1 sample of 10 channels at 100 Hz.
    envelope_blocks = [envelope_signals[i:i + 1] for i in range(len(envelope_signals) // 10)]
    result["envelope_float64_1_sample_blocks"] = _time_per_block(lambda: envelope.stream().push, envelope_blocks,
                                                                 repeats)
    return result


def _sosfilt_feature_step(pipeline):
    """Reference step: ``scipy.signal.sosfilt`` (zi carried), then the stream of ``pipeline`` minus its filter.

    The stream comes from the same config with no coefficients stored, so its
    chain is the identity (one copy of the block); everything after the
    filter is the runtime's code.  Timing only: no runtime path filters this way.
    """
    from scipy.signal import sosfilt
    from neurohand.decoder.pipeline import FeaturePipeline

    config = pipeline.to_config()
    config["sos"], config["filter"] = [], None
    push = FeaturePipeline.from_config(config).stream().push
    filter_block = _sosfilt_step(sosfilt, pipeline.sos)

    def step(block):
        return push(filter_block(block))
    return step


def _raw_pipeline(dtype):
    from neurohand.decoder.pipeline import FeaturePipeline, CONFIG_FORMAT, CONFIG_VERSION, RAW_DEFAULTS

    if _scipy_available():
        return FeaturePipeline.design(SIGNAL_RATE, N_CHANNELS, {"dtype": dtype})
    # Device without scipy: the same pipeline from stored coefficients.
    config = {
        "format": CONFIG_FORMAT, "version": CONFIG_VERSION, "signal_rate": SIGNAL_RATE,
        "n_channels": N_CHANNELS, "mode": "raw", "dtype": dtype, "window_samples": 1000, "stride_samples": 200,
        "car": False, "sos": DEFAULT_SOS_10KHZ, "features": list(RAW_DEFAULTS["features"]),
        "bandpower_bands_hz": [[20.0, 70.0], [70.0, 244.9], [244.9, 857.2], [857.2, 3000.0]],
        "threshold_uv": RAW_DEFAULTS["threshold_uv"], "log": True, "log_epsilon": RAW_DEFAULTS["log_epsilon"],
        "normalisation": None,
    }
    return FeaturePipeline.from_config(config)
