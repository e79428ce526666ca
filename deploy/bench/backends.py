"""``neurohand bench backends``: per-step latency of each inference backend.

    {"rnn_step": {"numpy": {"p50_us": ..., "p99_us": ..., ...}, "onnxruntime": {...}, ...},
     "decode_step": {"numpy": {...}, "onnxruntime": {...}},
     "model": {...}, "skipped": {"tensorrt": "why"}, "blas_environment": {"OPENBLAS_CORETYPE": ..., ...}}

``decode_step`` is the whole per-stride step of the runtime: one 20 ms block
(200 samples x 16 channels of simulated nerve signal) through the filter
chain, the window features, normalisation and the RNN step.

Each backend runs ``steps`` stateful steps ``repeats`` times; p50/p99 are
taken per repeat and the median over repeats is reported, with the range over
repeats as the spread (the machine is shared, so single runs are noisy).

The model is the default size: GRU 2 x 128 on the feature pipeline's default
feature count for 16 channels (decoder/pipeline.py), random weights, exported
with train/export.py -- which needs torch, so on a device without torch
:func:`measure_backends` is called with a bundle's model instead.

"""
import os
import shutil
import tempfile
import time

import numpy as np

N_CHANNELS = 16
FALLBACK_FEATURES_PER_CHANNEL = 10
DEFAULT_HIDDEN = 128
DEFAULT_LAYERS = 2


def default_n_features():
    """(n_features, where it came from) for 16 channels with the pipeline's default features."""
    from neurohand.firmware_bridge.shared.errors import NeurohandError

    try:
        from neurohand.decoder.pipeline import FeaturePipeline
        return FeaturePipeline.design(10000.0, N_CHANNELS).n_features, "decoder/pipeline.py defaults, 16 channels"
    except (ImportError, NeurohandError) as exc:       # designing the filters needs scipy
        return (N_CHANNELS * FALLBACK_FEATURES_PER_CHANNEL,
                "assumed 16 channels x 10 features (pipeline unavailable: {})".format(exc))


def measure_step(step, steps, repeats, warmup=50):
    """Time ``step()`` (no arguments) ``steps`` times per repeat.

    Returns {"p50_us", "p99_us", "max_us", "p99_us_range": [lo, hi], "steps", "repeats"}:
    p50/p99/max per repeat, median over repeats.
    """
    for _ in range(warmup):
        step()
    p50, p99, worst = [], [], []
    timings = np.empty(steps, dtype=np.float64)
    clock = time.perf_counter
    for _ in range(repeats):
        for index in range(steps):
            start = clock()
            step()
            timings[index] = clock() - start
        timings_us = timings * 1e6
        p50.append(float(np.percentile(timings_us, 50)))
        p99.append(float(np.percentile(timings_us, 99)))
        worst.append(float(timings_us.max()))
    return {"p50_us": round(float(np.median(p50)), 2), "p99_us": round(float(np.median(p99)), 2),
            "max_us": round(float(np.median(worst)), 2),
            "p99_us_range": [round(min(p99), 2), round(max(p99), 2)],
            "steps": steps, "repeats": repeats}


def _measure_each_backend(names, onnx_path, engine_path, make_step, steps, repeats):
    """measure_step(make_step(backend)) for every backend in ``names`` that is available.

    Returns (results {name: figures}, skipped {name: reason}).
    """
    from neurohand.decoder.backends import BACKENDS, backend_class, create_backend

    results, skipped = {}, {}
    for name in names or list(BACKENDS):
        reason = backend_class(name).unavailable_reason()
        if reason is not None:
            skipped[name] = reason
            continue
        backend = create_backend(name, onnx_path, engine_path=engine_path)
        try:
            results[name] = measure_step(make_step(backend), steps, repeats)
        finally:
            backend.close()
    return results, skipped


def measure_backends(onnx_path, names=None, steps=2000, repeats=5, engine_path=None):
    """Per-step latency of each backend in ``names`` (default: all available) on ``onnx_path``.

    Returns (results {name: measure_step figures}, skipped {name: reason}).
    """
    def make_step(backend):
        features = np.random.RandomState(0).standard_normal(backend.n_features).astype(np.float32)
        holder = [backend.initial_state()]

        def step():
            holder[0] = backend.step(features, holder[0])[1]
        return step

    return _measure_each_backend(names, onnx_path, engine_path, make_step, steps, repeats)


def measure_decode_steps(onnx_path, pipeline, signals_uv, names, steps=2000, repeats=5, engine_path=None):
    """Latency of the whole decode step: one stride block through DSP, features and the RNN.

    ``signals_uv`` (n_samples, n_channels) is cycled through block by block so
    the filter state evolves as on real data.  Returns (results, skipped) as
    :func:`measure_backends`.
    """
    stride = pipeline.stride_samples
    n_blocks = len(signals_uv) // stride
    blocks = [np.ascontiguousarray(signals_uv[i * stride:(i + 1) * stride]) for i in range(n_blocks)]

    def make_step(backend):
        stream = pipeline.stream()
        holder = {"state": backend.initial_state(), "block": 0}

        def step():
            features, _ = stream.push(blocks[holder["block"] % n_blocks])
            holder["block"] += 1
            for row in features:
                holder["state"] = backend.step(row, holder["state"])[1]
        return step

    return _measure_each_backend(names, onnx_path, engine_path, make_step, steps, repeats)


def _default_pipeline_and_signals(seconds):
    """The default 16-channel pipeline, normalised on simulated data, and that data in µV."""
    from neurohand.decoder.pipeline import FeaturePipeline
    from neurohand.firmware_bridge.virtual.simulator import NerveSimulator, SimulatorConfig

    simulator = NerveSimulator.from_config(SimulatorConfig(seconds=seconds, n_channels=N_CHANNELS, seed=0, difficulty="easy"))
    signals = simulator.signals_uv(0, int(seconds * 10000))
    pipeline = FeaturePipeline.design(10000.0, N_CHANNELS)
    features, _ = pipeline.transform(signals)
    pipeline.fit_normalisation(features)
    return pipeline, signals


def _export_default_model(directory, n_features):
    from neurohand.train.model import ModelConfig, build_model
    from neurohand.train.export import export_onnx

    config = ModelConfig(n_features=n_features, n_outputs=5, cell="gru", hidden_size=DEFAULT_HIDDEN,
                         num_layers=DEFAULT_LAYERS)
    path = os.path.join(directory, "bench_model.onnx")
    export_onnx(build_model(config), config, path, check_steps=20)
    return path, config


def blas_environment():
    """The OpenBLAS settings from the environment that change the numpy backend's matrix products.

    numpy 1.19's bundled OpenBLAS takes a generic x86 kernel (``Prescott``) on CPUs newer than it
    knows, which makes a 384 x 128 float32 product 3-4 times slower than ``OPENBLAS_CORETYPE=Haswell``
    on the same machine (docs/backends.md); the Jetson's unit sets ``OPENBLAS_CORETYPE=ARMV8``.
    """
    return {name: os.environ.get(name) for name in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS")}


def run(quick):
    """The ``neurohand bench backends`` target."""
    steps, repeats = (200, 2) if quick else (2000, 7)
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"rnn_step": {}, "skipped": {"all": "exporting the default-size model needs torch "
                                                   "(workstation); on a device, measure a bundle's model "
                                                   "with decoder.backend_bench.measure_backends"}}
    n_features, source = default_n_features()
    directory = tempfile.mkdtemp(prefix="neurohand-bench-")
    try:
        path, config = _export_default_model(directory, n_features)
        results, skipped = measure_backends(path, steps=steps, repeats=repeats,
                                            engine_path=os.path.join(directory, "bench.engine"))
        pipeline, signals = _default_pipeline_and_signals(4.0 if quick else 20.0)
        decode, _ = measure_decode_steps(path, pipeline, signals, [name for name in results if name != "torch"],
                                         steps=steps // 4, repeats=repeats,
                                         engine_path=os.path.join(directory, "bench.engine"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    model = config.to_dict()
    model["n_features_source"] = source
    return {"rnn_step": results, "decode_step": decode, "skipped": skipped, "model": model, "quick": bool(quick),
            "blas_environment": blas_environment(),
            "decode_step_is": "one {}-sample block of {} channels: filter chain, window features, "
                              "normalisation and the RNN step".format(pipeline.stride_samples, N_CHANNELS),
            "target": "decode_step p99_us <= 1000 with numpy and onnxruntime"}
