"""``neurohand bench footprint``: memory and start-up of the device runtime, and bundle size.

Each scenario runs in a fresh interpreter (``sys.executable -c CODE``), so
nothing imported by the bench itself (or by pytest) is counted::

    python_bare           python -c pass                      (interpreter floor)
    import_numpy          python -c "import numpy"            (the device's one big dependency)
    cli_parser            build the full ``neurohand`` parser (what ``neurohand --help`` costs)
    device_step           parser + runtime modules + hand drivers, load and verify a bundle,
                          default 16-channel 10 kHz feature pipeline (numpy DSP), numpy
                          backend, one window through DSP/features and one RNN step;
                          scipy is forbidden here even where it is installed (the device
                          path runs the numpy filter chain everywhere)

Per scenario and repeat: wall time from launch to exit (interpreter start-up
included), CPU time of the child (user + system, from RUSAGE_CHILDREN; less
disturbed by other load on a shared machine than wall time), peak resident
memory (VmHWM from /proc/self/status, read by the child as its last act), the
number of modules loaded and any heavy ones (torch, scipy, onnx, ...).
Scenarios are interleaved round-robin over the repeats so that drift in
machine load hits all of them alike; medians with min/max are reported, and
ratios against both baselines of the same run.

Output (``run(quick)``)::

    {"scenarios": {name: {"what", "wall_ms": {"median","min","max"}, "cpu_ms": {...},
                          "peak_rss_mib": {...}, "modules", "heavy_modules": [...]}},
     "ratios": {name: {"peak_rss_vs_python_bare", "peak_rss_vs_import_numpy",
                       "wall_vs_python_bare", "wall_vs_import_numpy"}},
     "device_path": {"forbidden": ["torch", "scipy"], "forbidden_found": {scenario: [...]}, "ok": bool},
     "bundle": {"files": {name: bytes}, "total_bytes", "archive_gz_bytes", "model"},
     "default_size_bundle": {...} | {"skipped": "why"},
     "repeats", "python", "numpy", "machine", "quick", "skipped": {scenario: "why"}}

The small model is tests/device/data/golden_gru.onnx (a few kB of weights);
its input width is smaller than the pipeline's 144 features, so the step gets
the first ``n_features`` of the feature row.  The weights of the default-size
model (GRU 2 x 128) add under 1 MiB; ``default_size_bundle`` measures that
bundle where torch can export one (workstation, not quick).
"""
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from neurohand.deploy.bench.report import repeat_spread

# Top-level packages that must not, or should not, load on the device path.
HEAVY_MODULES = ("torch", "scipy", "onnx", "onnxruntime", "tensorrt", "pycuda", "matplotlib", "pandas",
                 "sklearn", "tqdm", "tensorflow", "jax", "numba", "IPython")
FORBIDDEN_ON_DEVICE = ("torch", "scipy")
BASELINES = ("python_bare", "import_numpy")
PIPELINE_KEY = "default_10k_16ch"      # in tests/device/data/pipelines.json
SMALL_MODEL = "golden_gru.onnx"
_MARKER = "__neurohand_footprint__"

_CLI = "from neurohand.deploy.cli.main import build_parser\nbuild_parser()\n"
_DEVICE_STEP = _CLI + """\
import neurohand.deploy.runtime.realtime
import neurohand.firmware_bridge.link
import neurohand.firmware_bridge.hands.registry
import numpy as np
from neurohand.deploy.bundle import load_bundle
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.decoder.backends import create_backend
bundle = load_bundle(sys.argv[1])
pipeline = FeaturePipeline.from_config(bundle.config["pipeline"])
stream = pipeline.stream()
backend = create_backend("numpy", bundle.model_path)
block = np.random.RandomState(0).standard_normal((pipeline.window_samples, pipeline.n_channels)) * 20.0
features, ends = stream.push(block)
if len(features) != 1:
    raise RuntimeError("expected one window, got %d" % len(features))
positions, state = backend.step(features[0, :backend.n_features].astype(np.float32), backend.initial_state())
if not np.all(np.isfinite(positions)):
    raise RuntimeError("non-finite decoder output")
backend.close()
"""

# name -> (what it measures, code, needs the bundle, forbidden top-level modules)
SCENARIOS = {
    "python_bare": ("python -c pass", "pass\n", False, ()),
    "import_numpy": ("python -c 'import numpy'", "import numpy\n", False, ()),
    "cli_parser": ("build the full neurohand argument parser (all subcommands)", _CLI, False,
                   FORBIDDEN_ON_DEVICE),
    "device_step": ("parser, runtime and hand modules, verify and load a bundle, default 16-channel "
                    "pipeline with the numpy DSP, numpy backend, one window and one RNN step",
                    _DEVICE_STEP, True, FORBIDDEN_ON_DEVICE),
}

# Runs in the child after the scenario: peak RSS without importing anything new
# (a json import here would add to the very peak being measured).
_REPORT = """
def _neurohand_report():
    peak_kib = None
    try:
        with open('/proc/self/status') as handle:
            for line in handle:
                if line.startswith('VmHWM:'):
                    peak_kib = int(line.split()[1])
    except OSError:
        pass
    if peak_kib is None:
        import resource
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    sys.stdout.write('\\n%s %d\\n' % (MARKER, peak_kib))
    sys.stdout.write('\\n'.join(sorted(sys.modules)) + '\\n')
_neurohand_report()
"""


def child_source(code):
    """The full ``-c`` program for a scenario's ``code``."""
    return "import sys\nMARKER = {!r}\n{}{}".format(_MARKER, code, _REPORT)


def measure_once(code, args=(), cwd=None):
    """Run ``code`` in a fresh interpreter; return one sample.

    Returns dict: wall_s (launch to exit), cpu_s (child user + system),
    peak_rss_kib (VmHWM), modules (sorted list of sys.modules keys).
    Raises RuntimeError with the child's stderr if it fails (a bug, not noise).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", child_source(code)] + list(args), cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = child.communicate()
    wall_s = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError("footprint scenario failed (exit {}): {}".format(child.returncode, err.strip()[-2000:]))
    lines = out.splitlines()
    try:
        index = max(i for i, line in enumerate(lines) if line.startswith(_MARKER + " "))
    except ValueError:
        raise RuntimeError("footprint scenario printed no report; stderr: {}".format(err.strip()[-2000:]))
    return {
        "wall_s": wall_s,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_kib": int(lines[index].split()[1]),
        "modules": [line for line in lines[index + 1:] if line],
    }


def heavy_modules(modules):
    """Sorted top-level names from HEAVY_MODULES present in ``modules`` (names like 'scipy.signal')."""
    tops = set(name.split(".", 1)[0] for name in modules)
    return sorted(tops.intersection(HEAVY_MODULES))


def measure_scenarios(names, repeats, bundle_path=None, cwd=None):
    """Measure SCENARIOS ``names`` ``repeats`` times each, interleaved; return {name: summary}."""
    samples = dict((name, []) for name in names)
    for _ in range(repeats):
        for name in names:
            what, code, needs_bundle, _ = SCENARIOS[name]
            samples[name].append(measure_once(code, [bundle_path] if needs_bundle else [], cwd=cwd))
    summary = {}
    for name in names:
        runs = samples[name]
        modules = set()
        for run_sample in runs:
            modules.update(run_sample["modules"])
        summary[name] = {
            "what": SCENARIOS[name][0],
            "wall_ms": repeat_spread([r["wall_s"] for r in runs], 1e3),
            "cpu_ms": repeat_spread([r["cpu_s"] for r in runs], 1e3),
            "peak_rss_mib": repeat_spread([r["peak_rss_kib"] for r in runs], 1.0 / 1024, 2),
            "modules": max(len(r["modules"]) for r in runs),
            "heavy_modules": heavy_modules(modules),
        }
    return summary


def ratios(summary):
    """Each non-baseline scenario's medians over both baselines' medians."""
    result = {}
    for name, figures in summary.items():
        if name in BASELINES:
            continue
        entry = {}
        for baseline in BASELINES:
            if baseline in summary:
                base = summary[baseline]
                entry["peak_rss_vs_" + baseline] = round(
                    figures["peak_rss_mib"]["median"] / base["peak_rss_mib"]["median"], 2)
                entry["wall_vs_" + baseline] = round(figures["wall_ms"]["median"] / base["wall_ms"]["median"], 2)
        result[name] = entry
    return result


def bundle_size(onnx_path, pipeline_config, directory, model_note):
    """Make a bundle from ``onnx_path`` under ``directory``; return (bundle path, size figures).

    Sizes: every bundled file and the manifest in bytes, their total, and the
    gzip'd tar that ``neurohand flash`` ships (engine/ and selftest/ are made
    on the device and not shipped).
    """
    from neurohand.deploy.bundle import make_bundle

    run_dir = os.path.join(directory, "run")
    os.makedirs(run_dir)
    shutil.copyfile(onnx_path, os.path.join(run_dir, "model.onnx"))
    with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump({"pipeline": pipeline_config, "model": {"source": model_note}}, handle)
    out = os.path.join(directory, "bundle")
    make_bundle(run_dir, out)
    files = dict((name, os.path.getsize(os.path.join(out, name))) for name in sorted(os.listdir(out)))
    archive = os.path.join(directory, "bundle.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for name in sorted(files):
            tar.add(os.path.join(out, name), arcname=name)
    return out, {"files": files, "total_bytes": sum(files.values()),
                 "archive_gz_bytes": os.path.getsize(archive), "model": model_note}


def trained_pipeline_config(data_dir):
    """The default 16-channel, 10 kHz pipeline config with an identity normalisation.

    The stored reference config has none (it is fitted on training data); a
    bundle's config always has one, and the stream needs it.
    """
    with open(os.path.join(data_dir, "pipelines.json"), encoding="utf-8") as handle:
        config = json.load(handle)[PIPELINE_KEY]
    n_features = len(config["feature_names"])
    config["normalisation"] = {"mean": [0.0] * n_features, "std": [1.0] * n_features}
    return config


def default_data_dir():
    """tests/device/data of the source tree this package runs from, or None (installed copy)."""
    import neurohand.deploy
    root = os.path.dirname(os.path.dirname(os.path.abspath(neurohand.deploy.__file__)))
    path = os.path.join(root, "tests", "device", "data")
    return path if os.path.isfile(os.path.join(path, SMALL_MODEL)) else None


def _default_size_bundle(directory, pipeline_config):
    """Size of a bundle of the default-size model (random weights: size depends on shape only)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return {"skipped": "exporting the default-size model needs torch (workstation)"}
    from neurohand.deploy.bench import backends as backend_bench
    from neurohand.decoder.pipeline import FeaturePipeline
    n_features = FeaturePipeline.from_config(pipeline_config).n_features
    model_dir = os.path.join(directory, "export")
    os.makedirs(model_dir)
    path, config = backend_bench._export_default_model(model_dir, n_features)
    note = "default size: {} {} x {} on {} features, random weights".format(
        config.cell, config.num_layers, config.hidden_size, n_features)
    return bundle_size(path, pipeline_config, os.path.join(directory, "sized"), note)[1]


def run(quick, data_dir=None, default_size=None):
    """The ``neurohand bench footprint`` target.

    quick : fewer repeats (2 instead of 7), no default-size export
    data_dir : folder holding golden_gru.onnx and pipelines.json
        (default: tests/device/data of the source tree; without it the bundle
        scenarios are skipped and say why)
    default_size : bool or None (None: not quick) -- also measure the default-size bundle
    """
    import numpy as np

    repeats = 2 if quick else 7
    default_size = (not quick) if default_size is None else bool(default_size)
    data_dir = data_dir if data_dir is not None else default_data_dir()
    result = {"repeats": repeats, "quick": bool(quick), "python": platform.python_version(),
              "numpy": np.__version__, "machine": platform.machine(), "skipped": {}}
    names = list(BASELINES) + ["cli_parser"]
    directory = tempfile.mkdtemp(prefix="neurohand-footprint-")
    try:
        bundle_path = None
        if data_dir is None:
            reason = "no tests/device/data next to the package (installed copy); pass data_dir"
            result["skipped"]["device_step"] = reason
            result["bundle"] = {"skipped": reason}
            result["default_size_bundle"] = {"skipped": reason}
        else:
            pipeline_config = trained_pipeline_config(data_dir)
            bundle_path, result["bundle"] = bundle_size(
                os.path.join(data_dir, SMALL_MODEL), pipeline_config, os.path.join(directory, "small"),
                "tests/device/data/{} (golden test GRU)".format(SMALL_MODEL))
            names.append("device_step")
            if default_size:
                result["default_size_bundle"] = _default_size_bundle(directory, pipeline_config)
            else:
                result["default_size_bundle"] = {"skipped": "quick run" if quick else "not asked for"}
        # The children run from an empty folder so nothing in the caller's cwd shadows a module.
        cwd = os.path.join(directory, "cwd")
        os.makedirs(cwd)
        summary = measure_scenarios(names, repeats, bundle_path=bundle_path, cwd=cwd)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result["scenarios"] = summary
    result["ratios"] = ratios(summary)
    found = {}
    for name in names:
        bad = sorted(set(summary[name]["heavy_modules"]).intersection(SCENARIOS[name][3]))
        if bad:
            found[name] = bad
    result["device_path"] = {"forbidden": list(FORBIDDEN_ON_DEVICE), "forbidden_found": found, "ok": not found}
    return result
