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

The whole decode step (stream push and one numpy RNN step of the default
size, :func:`time_decode_step`) is in ``features``' output as ``decode_step``,
with its operation counts, numpy call counts and a Jetson Nano estimate
(:func:`estimate_decode_step`; an estimate, docs/latency.md).  Run as
``python -m neurohand.deploy.bench.dsp decode-step [--estimate]
[--compare-with OLD_CHECKOUT]`` it times this checkout alone or side by side
with another checkout's ``decoder/`` package.
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
    # The whole decode step (stream push + numpy RNN step), its arithmetic and numpy calls counted,
    # and what that suggests for a Jetson Nano (an estimate: docs/latency.md).
    decode = time_decode_step(*((40, 2) if quick else (200, 7)))
    decode["estimate"] = estimate_decode_step(decode)
    result["decode_step"] = decode
    # The same step as the real-time loop meets it: frames on the chip's 2-ms schedule against back to back.
    result["decode_step_in_rhythm"] = time_decode_step_in_rhythm(*((10, 1) if quick else (100, 3)))
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


def _raw_pipeline(dtype, designed=True):
    from neurohand.decoder.pipeline import FeaturePipeline, CONFIG_FORMAT, CONFIG_VERSION, RAW_DEFAULTS

    if designed and _scipy_available():
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


# ---------------------------------------------------------------- the whole decode step
# The decoder the runtime steps once per window, at the default size (train/model.py: GRU, 2 x 128,
# no input projection; 5 outputs).  Random weights: the cost does not depend on their values.
DEFAULT_CELL, DEFAULT_HIDDEN, DEFAULT_LAYERS, DEFAULT_OUTPUTS = "gru", 128, 2, 5


def random_rnn_weights(n_features, hidden=DEFAULT_HIDDEN, layers=DEFAULT_LAYERS, n_outputs=DEFAULT_OUTPUTS, seed=0):
    """:class:`~neurohand.decoder.onnx_weights.RnnWeights` of a GRU with seeded random weights (no ONNX, no torch)."""
    from neurohand.decoder.onnx_weights import RnnWeights

    random = np.random.RandomState(seed)

    def matrix(*shape):
        return (random.standard_normal(shape) * 0.1).astype(np.float32)
    gates = 3 * hidden
    stack = [(matrix(gates, n_features if index == 0 else hidden), matrix(gates, hidden), matrix(gates),
              matrix(gates)) for index in range(layers)]
    return RnnWeights(DEFAULT_CELL, n_features, n_outputs, hidden, None, stack,
                      (matrix(n_outputs, hidden), matrix(n_outputs)), {})


def decode_step_parts(dtype="float64", n_blocks=200):
    """(pipeline, backend, blocks): the default raw pipeline normalised on 1 s of signal, a default-size
    numpy GRU, and ``n_blocks`` 20 ms blocks of another signal (the first 10 fill the first window)."""
    from neurohand.decoder.backends.numpy_backend import NumpyBackend

    # The stored coefficients (the default design at 10 kHz): the same pipeline with or without scipy.
    pipeline = _raw_pipeline(dtype, designed=False)
    features, _ = pipeline.transform(_signals(int(SIGNAL_RATE)))
    pipeline.fit_normalisation(features)
    blocks = _blocks(_signals(max(n_blocks, 20) * BLOCK_SAMPLES, seed=1))
    return pipeline, NumpyBackend(random_rnn_weights(pipeline.n_features)), blocks


def _over_repeats(figures, names):
    """Per-repeat percentiles (one tuple per repeat, in the order of ``names``) as the bench reports them:
    {name_us: median over repeats} plus [min, max] spreads of p50 and p99, in µs to 0.1."""
    result = {}
    for column, name in enumerate(names):
        values = [repeat[column] for repeat in figures]
        result[name + "_us"] = round(float(np.median(values)), 1)
        if name in ("p50", "p99"):
            result[name + "_us_spread"] = [round(min(values), 1), round(max(values), 1)]
    return result


def time_decode_step(blocks_per_repeat=200, repeats=7, dtype="float64"):
    """The whole decode step per 20 ms block, and its parts, in µs (p50, p99; median over repeats, spread).

    One step is what the runtime does when a frame completes a window, on a
    200-sample block: ``stream.push`` (filter chain, block sums, window
    features, normalisation) then the numpy RNN step of the window's
    features (:mod:`neurohand.decoder.backends.numpy_backend`).  The stream
    and the RNN are timed apart too, on the same blocks, and the filter chain
    alone (``filter``, the push's first part).  ``prepare`` is the next step's
    recurrent half, which the runtime computes after the command is written
    (``Backend.prepare``), so the step does not include it; the work per
    stride is the step plus it.  Keys: decode_step, stream_push, rnn_step,
    prepare, filter: {p50_us, p99_us, p5_us, p50_us_spread, p99_us_spread}
    (medians over repeats); blocks, repeats, dtype, n_features, model.
    """
    import time as _time

    from neurohand.decoder.dsp import FilterChain

    pipeline, backend, blocks = decode_step_parts(dtype, min(blocks_per_repeat + 10, 200))
    parts = {"decode_step": [], "stream_push": [], "rnn_step": [], "prepare": [], "filter": []}
    # The runtime computes the next step's recurrent half once a command is on its way
    # (Backend.prepare): after the step, outside it.  A checkout from before has none.
    prepare = getattr(backend, "prepare", None) or (lambda state: None)
    for _ in range(repeats):
        push = pipeline.stream().push
        state = backend.initial_state()
        for block in blocks[:10]:                    # fill the first window
            push(block)
        times = np.empty((blocks_per_repeat, 4))
        for index in range(blocks_per_repeat):
            block = blocks[10 + index % (len(blocks) - 10)]
            start = _time.perf_counter()
            features, _ = push(block)
            pushed = _time.perf_counter()
            for row in features:
                state = backend.step(row, state)[1]
            done = _time.perf_counter()
            prepare(state)
            prepared = _time.perf_counter()
            times[index] = (done - start, pushed - start, done - pushed, prepared - done)
        for column, name in enumerate(("decode_step", "stream_push", "rnn_step", "prepare")):
            parts[name].append(tuple(np.percentile(times[:, column], q) * 1e6 for q in (50, 99, 5)))
        # The filter chain alone, on the same blocks (its share of the push).
        process = FilterChain(pipeline.sos, pipeline.n_channels).process
        filter_times = np.empty(blocks_per_repeat)
        for index in range(blocks_per_repeat):
            block = blocks[10 + index % (len(blocks) - 10)]
            start = _time.perf_counter()
            process(block)
            filter_times[index] = _time.perf_counter() - start
        parts["filter"].append(tuple(np.percentile(filter_times, q) * 1e6 for q in (50, 99, 5)))
    # p5: the step with (almost) nothing else running on its core, the floor of a loaded machine.
    result = {name: _over_repeats(figures, ("p50", "p99", "p5")) for name, figures in parts.items()}
    result["blocks"] = blocks_per_repeat
    result["repeats"] = repeats
    result["dtype"] = dtype
    result["n_features"] = pipeline.n_features
    result["model"] = "{} {} x {}, {} features -> {} outputs, random weights".format(
        DEFAULT_CELL, DEFAULT_LAYERS, DEFAULT_HIDDEN, pipeline.n_features, DEFAULT_OUTPUTS)
    return result


def time_decode_step_in_rhythm(blocks_per_repeat=100, repeats=3, frame_samples=20, dtype="float64"):
    """The decode step as the real-time loop meets it, against the same work back to back, in µs.

    The runtime pushes each chip frame (``frame_samples`` samples, 2 ms at the
    default 20) as it arrives and decodes when a frame completes a window, once
    every 20 ms; between those frames the decoding's code and data go unused.
    Here the frames of the same blocks are pushed either on the chip's schedule
    (each one at its due time, sleeping in between: ``in_rhythm``) or one after
    another with no pause (``back_to_back``), alternating per repeat, and the
    window frames are timed: ``window_push`` (its stream push), ``rnn_step``
    and ``decode_step`` (both).  On a machine whose caches other work empties
    within milliseconds (a shared virtual machine: docs/latency.md) the
    in-rhythm figures are several times the back-to-back ones; their ratio
    (``ratio_p50``, ``ratio_p99``: in rhythm / back to back) says how much of
    a step's cost the pause adds.  Keys per mode: {part: {p50_us, p99_us,
    p50_us_spread, p99_us_spread}}, windows (timed per repeat); frame_period_ms,
    frame_samples, blocks, repeats.
    """
    import time as _time

    if BLOCK_SAMPLES % frame_samples:
        raise ValueError("frame_samples must divide the {}-sample block".format(BLOCK_SAMPLES))
    pipeline, backend, blocks = decode_step_parts(dtype, min(blocks_per_repeat + 10, 200))
    period_s = frame_samples / SIGNAL_RATE
    frames = [block[i:i + frame_samples] for block in blocks[10:] for i in range(0, BLOCK_SAMPLES, frame_samples)]
    frames = [frames[index % len(frames)] for index in range(blocks_per_repeat * BLOCK_SAMPLES // frame_samples)]
    prepare = getattr(backend, "prepare", None) or (lambda state: None)
    parts = ("window_push", "rnn_step", "decode_step")
    figures = {mode: {part: [] for part in parts} for mode in ("in_rhythm", "back_to_back")}
    windows = {}
    for index in range(2 * repeats):
        mode = ("in_rhythm", "back_to_back")[index % 2]
        push = pipeline.stream().push
        state = backend.initial_state()
        for block in blocks[:10]:               # fill the first window
            push(block)
        times = []
        due = _time.perf_counter()
        for frame in frames:
            if mode == "in_rhythm":
                due += period_s
                pause = due - _time.perf_counter()
                if pause > 0:
                    _time.sleep(pause)
            start = _time.perf_counter()
            features, _ = push(frame)
            pushed = _time.perf_counter()
            if len(features):
                for row in features:
                    state = backend.step(row, state)[1]
                done = _time.perf_counter()
                times.append((pushed - start, done - pushed, done - start))
                prepare(state)
        windows[mode] = len(times)
        times = np.array(times)
        for column, part in enumerate(parts):
            figures[mode][part].append((np.percentile(times[:, column], 50) * 1e6,
                                        np.percentile(times[:, column], 99) * 1e6))
    result = {}
    for mode, by_part in figures.items():
        result[mode] = {part: _over_repeats(runs, ("p50", "p99")) for part, runs in by_part.items()}
        result[mode]["windows"] = windows[mode]
    for figure in ("p50", "p99"):
        result["ratio_" + figure] = {
            part: round(result["in_rhythm"][part][figure + "_us"] / result["back_to_back"][part][figure + "_us"], 2)
            for part in parts}
    result.update(frame_period_ms=round(period_s * 1e3, 3), frame_samples=frame_samples, blocks=blocks_per_repeat,
                  repeats=repeats, dtype=dtype)
    return result


def compare_decode_steps(reference, rounds=3, blocks=200, repeats=5):
    """The decode step of this checkout and of ``reference`` (another checkout's root), side by side.

    Each round times both, in fresh interpreters, one after the other (the
    order alternating), so a change of the machine's load hits both alike.
    Returns {"this": [round results], "reference": [...], "ratio_p50",
    "ratio_p99", "ratio_p5": medians over rounds of this / reference per
    part, "this_median", "reference_median": medians over rounds}.  Both
    sides run this checkout's benchmark code; only the decoder/ package
    differs (``--decoder-from``).
    """
    import json
    import subprocess
    import sys

    runs = {"this": [], "reference": []}
    for index in range(rounds):
        order = ("reference", "this") if index % 2 == 0 else ("this", "reference")
        for side in order:
            command = [sys.executable, "-m", "neurohand.deploy.bench.dsp", "decode-step", "--blocks", str(blocks),
                       "--repeats", str(repeats)]
            if side == "reference":
                command += ["--decoder-from", reference]
            output = subprocess.run(command, stdout=subprocess.PIPE, check=True, universal_newlines=True).stdout
            runs[side].append(json.loads(output))
    result = dict(runs)
    for figure in ("p50", "p99", "p5"):
        result["ratio_" + figure] = {
            part: round(float(np.median([new[part][figure + "_us"] / old[part][figure + "_us"]
                                         for new, old in zip(runs["this"], runs["reference"])])), 3)
            for part in ("decode_step", "stream_push", "rnn_step", "filter")}
    for side in ("this", "reference"):
        result[side + "_median"] = {
            part: {figure: round(float(np.median([run[part][figure + "_us"] for run in runs[side]])), 1)
                   for figure in ("p50", "p99", "p5")}
            for part in ("decode_step", "stream_push", "rnn_step", "filter")}
    return result


def main(argv=None):
    """``python -m neurohand.deploy.bench.dsp decode-step``: one timing of the decode step, as JSON."""
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(prog="python -m neurohand.deploy.bench.dsp")
    parser.add_argument("what", choices=["decode-step"])
    parser.add_argument("--blocks", type=int, help="20 ms blocks per repeat (default 200; --rhythm 100)")
    parser.add_argument("--repeats", type=int, help="repeats (default 7; --rhythm 3 of each mode)")
    parser.add_argument("--decoder-from", metavar="DIR",
                        help="time the decoder/ package of another checkout DIR (e.g. the code before a change, "
                             "from `git archive`) with this benchmark; it must be imported before anything else")
    parser.add_argument("--compare-with", metavar="DIR",
                        help="time this checkout and DIR's decoder/ side by side, alternating, in fresh interpreters")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--estimate", action="store_true",
                        help="add operation counts, numpy call counts and the Jetson Nano estimate")
    parser.add_argument("--rhythm", action="store_true",
                        help="time the window frames' decode step with the chip's 2-ms frames pushed on their "
                             "schedule and back to back, alternating (the cost of the pause between them); "
                             "see docs/latency.md")
    options = parser.parse_args(argv)
    for name in ("blocks", "repeats", "rounds"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            parser.error("--{} must be at least 1".format(name))
    if options.rhythm and (options.compare_with or options.estimate):
        parser.error("--rhythm times one checkout; leave out --compare-with and --estimate")
    if options.compare_with:
        result = compare_decode_steps(options.compare_with, options.rounds, options.blocks or 200,
                                      options.repeats or 5)
        result["load_average_after"] = list(os.getloadavg())
        print(json.dumps(result))
        return
    if options.decoder_from:
        import neurohand.decoder
        # Every neurohand.decoder.* module is imported from there from now on (none is imported yet).
        neurohand.decoder.__path__ = [os.path.join(os.path.abspath(options.decoder_from), "decoder")]
    if options.rhythm:
        result = time_decode_step_in_rhythm(options.blocks or 100, options.repeats or 3)
    else:
        result = time_decode_step(options.blocks or 200, options.repeats or 7)
    if options.estimate:
        result["estimate"] = estimate_decode_step(result)
    import neurohand.decoder.features
    result["decoder_from"] = os.path.dirname(os.path.dirname(os.path.abspath(neurohand.decoder.features.__file__)))
    result["load_average"] = list(os.getloadavg())
    print(json.dumps(result))



# ---------------------------------------------------------------- what a decode step costs, and the Nano
# The Jetson Nano's CPU (docs/jetson.md): 4 Cortex-A57 cores, 1.43 GHz (1479 MHz in MAXN).
NANO_CLOCK_HZ = 1.43e9
# Peak of one A57 core in float64: one 128-bit NEON multiply-add (2 doubles) per cycle, 4 flops a
# cycle (Cortex-A57 Software Optimization Guide, ARM UAN 0015B: two FP/ASIMD pipelines; LLVM's
# AArch64SchedA57.td has a Q-form FMLA occupy both).  Published, not measured here.
NANO_FLOPS_PER_CYCLE_F64 = 4.0
# How many times longer an A57 core takes than this workstation's core, assumed, as a range
# (low, high): for interpreted work (Python bytecode and numpy's fixed cost per call) the clock
# ratio (2.6 / 1.43 = 1.8) times an IPC ratio of 2.2-3.3 for branchy interpreter code between a
# current 5-wide x86 core and the 3-wide A57 of 2012; for numpy's arithmetic loops (BLAS, FFT,
# ufuncs over a few thousand values) the ratio of peak float64 throughput (16 flops a cycle at
# 2.6 GHz with AVX2/AVX-512 FMA against 4 at 1.43 GHz: 7.3), taken as 4-8 because neither side
# reaches its peak at these sizes.  Measure on a Nano to replace them (docs/latency.md).
NANO_SLOWDOWN_INTERPRETED = (4.0, 6.0)
NANO_SLOWDOWN_ARITHMETIC = (4.0, 8.0)


def decode_step_operations(pipeline, weights, chunk_samples=None):
    """Arithmetic of one decode step, counted from the sizes (not measured).

    One stride block of ``pipeline.stride_samples`` x ``n_channels`` through
    the filter chain's block formulation (decoder/dsp.py) and the block sums,
    the window features of the one window it completes, normalisation, and
    one step of the RNN ``weights`` (:class:`~neurohand.decoder.onnx_weights.RnnWeights`).
    Returns {stage: {"macs", "flops", ...}, "total": {...}}: ``macs`` are the
    multiply-adds of matrix products, ``flops`` every floating-point
    operation (a multiply-add counts 2; comparisons, abs and log count 1; an
    FFT of N real values 2.5 N log2 N, the usual convention).
    """
    from neurohand.decoder.dsp import DEFAULT_CHUNK_SAMPLES

    n = pipeline.stride_samples
    channels = pipeline.n_channels
    width = pipeline.window_samples
    features = pipeline.window_features
    length = chunk_samples or DEFAULT_CHUNK_SAMPLES
    states = 2 * len(pipeline.sos)
    stages = {}

    def chunk_macs(r):
        # y = H x + G s; s' = F x + A s for r samples (H as a dense r x r product)
        return channels * (r * r + r * states + states * r + states * states)
    full, rest = divmod(n, length)
    macs = full * chunk_macs(length) + (chunk_macs(rest) if rest else 0)
    chunks = full + (1 if rest else 0)
    adds = chunks * channels * states + n * channels          # s' = Fx + As, y += Gs
    stages["filter"] = {"macs": macs, "flops": 2 * macs + adds,
                        "recursion_macs": 5 * len(pipeline.sos) * n * channels,
                        "note": "block formulation, {}-sample chunks; the per-sample recursion would need "
                                "recursion_macs (5 per section and sample) but runs one sample at a time".format(length)}
    per_sample = {"mav": 2, "rms": 2, "wl": 3, "zc": 5, "ssc": 4}    # e.g. zc: x[t-1] x[t], < 0, |step| >= T, and, sum
    block_ops = sum(per_sample.get(name, 0) for name in features.names) * n * channels
    stages["block_sums"] = {"macs": 0, "flops": block_ops}
    window_ops = 0
    if "bandpower" in features.names:
        low, high = features.bin_span
        window_ops += width * channels                                # taper
        window_ops += int(round(2.5 * width * np.log2(width))) * channels   # real FFT
        window_ops += 2 * 2 * (high - low) * channels                 # squares and band sums
    window_ops += (features.blocks_per_window - 1) * features.n_block_sums * channels   # window totals
    window_ops += 4 * pipeline.n_features + 2 * pipeline.n_features   # finish and log; normalise
    stages["window_features"] = {"macs": 0, "flops": window_ops}
    hidden = weights.hidden_size
    gates = 3 if weights.cell == "gru" else 4
    rnn_macs = 0
    inputs = weights.n_features if weights.projection is None else weights.projection[1].shape[0]
    if weights.projection is not None:
        rnn_macs += weights.projection[1].shape[0] * weights.n_features
    for _ in range(weights.num_layers):
        rnn_macs += gates * hidden * (inputs + hidden)
        inputs = hidden
    rnn_macs += weights.n_outputs * hidden
    elementwise = weights.num_layers * 12 * hidden + 4 * weights.n_outputs   # biases, gates, tanh, blend
    stages["rnn"] = {"macs": rnn_macs, "flops": 2 * rnn_macs + elementwise,
                     "weight_bytes": 4 * rnn_macs, "note": "float32; every weight read once per step"}
    stages["total"] = {"macs": sum(stage["macs"] for stage in stages.values()),
                       "flops": sum(stage["flops"] for stage in stages.values())}
    return stages


class _CountingNumpy(object):
    """Stands in for ``np`` in a module: counts every call of a numpy function, ufunc or ufunc method."""

    def __init__(self, module, counts, prefix="np"):
        self._module = module
        self._counts = counts
        self._prefix = prefix

    def __getattr__(self, name):
        value = getattr(self._module, name)
        label = "{}.{}".format(self._prefix, name)
        if isinstance(value, type(np)):
            return _CountingNumpy(value, self._counts, label)
        if isinstance(value, np.ufunc):
            return _CountingUfunc(value, self._counts, label)
        if callable(value) and not isinstance(value, type):
            counts = self._counts

            def counted(*args, **kwargs):
                counts[label] = counts.get(label, 0) + 1
                return value(*args, **kwargs)
            return counted
        return value


class _CountingUfunc(object):
    def __init__(self, ufunc, counts, label):
        self._ufunc = ufunc
        self._counts = counts
        self._label = label

    def __call__(self, *args, **kwargs):
        self._counts[self._label] = self._counts.get(self._label, 0) + 1
        return self._ufunc(*args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self._ufunc, name)
        if not callable(value):
            return value
        label = "{}.{}".format(self._label, name)
        counts = self._counts

        def counted(*args, **kwargs):
            counts[label] = counts.get(label, 0) + 1
            return value(*args, **kwargs)
        return counted


def count_numpy_calls(step, steps=20):
    """Numpy calls per ``step()`` call from the decoder's modules, measured by counting them.

    Calls of ``np.*`` functions, ufuncs and ufunc methods made in
    decoder/{dsp,features,pipeline}.py and the numpy backend (their ``np``
    replaced by a counting stand-in for the measurement), plus ndarray
    methods (copy, reshape, view, ...; seen by a profile hook).  Indexing
    and slicing are not counted.  Returns ({name: calls per step}, total per step).
    """
    import sys
    from neurohand.decoder import dsp, features, pipeline
    from neurohand.decoder.backends import numpy_backend

    modules = [dsp, features, pipeline, numpy_backend]
    counts = {}
    originals = [module.np for module in modules]

    def profile(frame, event, arg):
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), np.ndarray):
            label = "ndarray." + arg.__name__
            counts[label] = counts.get(label, 0) + 1
    try:
        for module in modules:
            module.np = _CountingNumpy(np, counts)
        sys.setprofile(profile)
        for _ in range(steps):
            step()
    finally:
        sys.setprofile(None)
        for module, original in zip(modules, originals):
            module.np = original
    per_step = {name: round(count / float(steps), 2) for name, count in sorted(counts.items())}
    return per_step, round(sum(counts.values()) / float(steps), 1)


def per_call_cost_us(repeats=3000):
    """This machine's fixed cost of one small numpy call (a ufunc on 16 values into a given array), µs, p5 and p50."""
    import time as _time

    a = np.ones(16)
    out = np.empty(16)
    times = np.empty(repeats)
    for index in range(repeats):
        start = _time.perf_counter()
        np.multiply(a, a, out=out)
        times[index] = _time.perf_counter() - start
    return round(float(np.percentile(times, 5)) * 1e6, 3), round(float(np.percentile(times, 50)) * 1e6, 3)


def nano_estimate(times_us, calls, call_cost_us, operations):
    """The decode step on one Cortex-A57 core of a Jetson Nano, estimated (never measured), in µs.

    times_us : {stage: time measured here}, stages "filter", "features" (the
        rest of the stream push) and "rnn"
    calls : {stage: numpy calls per step}, as :func:`count_numpy_calls`
    call_cost_us : this machine's fixed cost of one numpy call
    operations : :func:`decode_step_operations`

    Each stage's time here is split into its calls' fixed cost (calls x
    call_cost_us) and the rest (the arithmetic); the first is scaled by
    :data:`NANO_SLOWDOWN_INTERPRETED`, the second by
    :data:`NANO_SLOWDOWN_ARITHMETIC` (low and high ends).  ``floor_us`` is the
    arithmetic alone at the A57's assumed float64 peak, a bound no code
    beats.
    """
    flops_of = {"filter": operations["filter"]["flops"],
                "features": operations["block_sums"]["flops"] + operations["window_features"]["flops"],
                "rnn": operations["rnn"]["flops"]}
    peak = NANO_CLOCK_HZ * NANO_FLOPS_PER_CYCLE_F64
    stages = {}
    for stage in ("filter", "features", "rnn"):
        fixed = min(times_us[stage], calls[stage] * call_cost_us)
        arithmetic = times_us[stage] - fixed
        stages[stage] = {
            "here_us": round(times_us[stage], 1), "numpy_calls": calls[stage],
            "fixed_cost_here_us": round(fixed, 1),
            "nano_us": [round(fixed * NANO_SLOWDOWN_INTERPRETED[i] + arithmetic * NANO_SLOWDOWN_ARITHMETIC[i], 1)
                        for i in (0, 1)],
            "floor_us": round(flops_of[stage] / peak * 1e6, 1)}
    total = [round(sum(stages[stage]["nano_us"][i] for stage in stages), 1) for i in (0, 1)]
    return {"stages": stages, "decode_step_nano_us": total,
            "floor_us": round(sum(stage["floor_us"] for stage in stages.values()), 1),
            "assumptions": {"clock_hz": NANO_CLOCK_HZ, "flops_per_cycle_f64": NANO_FLOPS_PER_CYCLE_F64,
                            "slowdown_interpreted": list(NANO_SLOWDOWN_INTERPRETED),
                            "slowdown_arithmetic": list(NANO_SLOWDOWN_ARITHMETIC),
                            "call_cost_us": call_cost_us},
            "is": "an estimate from counts and assumed ratios, not a measurement on a Nano"}


def estimate_decode_step(timing, dtype="float64"):
    """Operation counts, numpy call counts and the Nano estimate for :func:`time_decode_step`'s ``timing``."""
    from neurohand.decoder.dsp import FilterChain

    pipeline, backend, blocks = decode_step_parts(dtype)
    stream = pipeline.stream()
    for block in blocks[:10]:
        stream.push(block)
    chain = FilterChain(pipeline.sos, pipeline.n_channels)
    state = [backend.initial_state()]
    features = np.zeros(pipeline.n_features, dtype=np.float32)
    position = [10]

    def push():
        stream.push(blocks[position[0] % len(blocks)])
        position[0] += 1

    def rnn():
        state[0] = backend.step(features, state[0])[1]
    filter_calls, filter_total = count_numpy_calls(lambda: chain.process(blocks[0]))
    push_calls, push_total = count_numpy_calls(push)
    rnn_calls, rnn_total = count_numpy_calls(rnn)
    operations = decode_step_operations(pipeline, backend._weights)
    call_cost = per_call_cost_us()
    times = {"filter": timing["filter"]["p50_us"],
             "features": max(timing["stream_push"]["p50_us"] - timing["filter"]["p50_us"], 0.0),
             # The whole RNN's work: the step and its recurrent half computed ahead (prepare).
             "rnn": timing["rnn_step"]["p50_us"] + timing.get("prepare", {}).get("p50_us", 0.0)}
    calls = {"filter": filter_total, "features": round(push_total - filter_total, 1), "rnn": rnn_total}
    return {"operations": operations,
            "numpy_calls": {"filter": filter_total, "stream_push": push_total, "rnn_step": rnn_total,
                            "stream_push_by_name": push_calls, "rnn_step_by_name": rnn_calls},
            "call_cost_us": {"p5": call_cost[0], "p50": call_cost[1]},
            "nano": nano_estimate(times, calls, call_cost[1], operations)}


if __name__ == "__main__":
    main()
