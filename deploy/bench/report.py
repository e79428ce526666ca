"""The results of ``neurohand bench``: machine description, JSON document and bench/results.md.

The document (``results.json``)::

    {"format": "neurohand-bench-results", "version": 1,
     "command": "neurohand bench all", "quick": false, "complete": true,
     "target_order": [names in the order they ran],
     "started_utc": "2026-11-28T16:30:00Z", "finished_utc": "..." | null,
     "machine": describe_machine(),
     "targets": {name: {"status": "ok" | "failed" | "pending",
                        "seconds": wall-clock seconds of the target | null,
                        "result": the target's dict (status ok),
                        "error": "what went wrong" (status failed)}}}

It is rewritten after every target, so an interrupted run keeps what it had
measured (``complete`` false, the rest ``pending``).  ``results.md`` is always
rendered from that document by :func:`render_markdown`: one "side by side"
table of the headline figures, then a section per target.  Ratios are written
"alternative time / our time", so above 1 means neurohand is faster.

Standard library only: this module runs on the device too.
"""
import json
import os
import platform
import subprocess
import sys
import time

from neurohand.firmware_bridge.shared.atomic import write_atomic, write_json_atomic

RESULTS_FORMAT = "neurohand-bench-results"
RESULTS_VERSION = 1
JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PACKAGES = ("numpy", "scipy", "torch", "onnxruntime", "onnx")

# Published figures quoted next to ours (checked against the papers' abstracts).
NGUYEN_2021 = ("Nguyen, Drealan, Luu, Jiang, Xu, Cheng, Zhao, Keefer & Yang, \"A portable, self-contained "
               "neuroprosthetic hand with deep learning-based finger control\", J. Neural Eng. 18(5), 2021, "
               "doi:10.1088/1741-2552/ac2a8d")
BRAND_2024 = ("Ali, Bodkin, Rigotti-Thompson, ... Pandarinath, \"BRAND: a platform for closed-loop experiments "
              "with deep network models\", J. Neural Eng. 21(2):026046, 2024, doi:10.1088/1741-2552/ad3b3a")


# --- machine ------------------------------------------------------------------------

def _read_lines(path):
    try:
        with open(path) as handle:
            return handle.read().splitlines()
    except OSError:
        return []


def _cpu_model():
    for line in _read_lines("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        # x86 says "model name"; many ARM kernels (the Jetson's) say "Hardware" or nothing useful.
        if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def _memory_mib():
    values = {}
    for line in _read_lines("/proc/meminfo"):
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key in ("MemTotal", "MemAvailable") and fields:
            values[key] = round(int(fields[0]) / 1024.0)        # kB -> MiB
    return values.get("MemTotal"), values.get("MemAvailable")


def _os_name():
    for line in _read_lines("/etc/os-release"):
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def package_version(name):
    """Installed version of distribution ``name`` without importing it (None if absent)."""
    try:
        from importlib.metadata import version, PackageNotFoundError  # novermin (3.8+; guarded)
    except ImportError:
        return _package_version_36(name)
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _package_version_36(name):
    # Python 3.6 (the Jetson): no importlib.metadata.  Importing torch there just for its
    # version would cost seconds and memory, and pkg_resources warns about namespace
    # packages, so read the version from the installed metadata folder's name.
    prefix = name.lower().replace("-", "_") + "-"
    for entry in sys.path:
        if not os.path.isdir(entry):
            continue
        for folder in os.listdir(entry):
            lowered = folder.lower()
            if lowered.startswith(prefix) and lowered.endswith((".dist-info", ".egg-info")):
                return folder[len(prefix):].rsplit(".", 1)[0].split("-")[0]
    return None


def _git_commit(directory):
    try:
        output = subprocess.run(["git", "-C", directory, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, universal_newlines=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if output.returncode != 0:
        return None
    return output.stdout.strip() or None


def describe_machine():
    """What the figures were measured on: dict of CPU, memory, OS, Python, package versions, load.

    ``load_average`` is (1, 5, 15)-minute load at the time of the call: the
    machine may be shared, and the figures must be read with it.
    """
    from neurohand.deploy.version import __version__

    total_mib, available_mib = _memory_mib()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        usable = None
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_total_mib": total_mib,
        "memory_available_mib": available_mib,
        "os": _os_name(),
        "kernel": platform.release(),
        "architecture": platform.machine(),
        "python": "{} {}".format(platform.python_implementation(), platform.python_version()),
        "packages": {name: package_version(name) for name in PACKAGES},
        "neurohand": __version__,
        "git_commit": _git_commit(source),
        "load_average": load_average(),
    }


def repeat_spread(values, scale=1.0, digits=1):
    """{"median", "min", "max"} of repeated measurements, times ``scale``, rounded to ``digits``."""
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    return {"median": round(median * scale, digits), "min": round(ordered[0] * scale, digits),
            "max": round(ordered[-1] * scale, digits)}


def load_average():
    """[1, 5, 15]-minute load average, or None where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


# --- document -----------------------------------------------------------------------

def utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_document(command, quick, names, machine):
    """A results document with every target in ``names`` pending."""
    return {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION, "command": command, "quick": bool(quick),
        "complete": False, "started_utc": utc_now(), "finished_utc": None, "machine": machine,
        "target_order": list(names),
        "targets": {name: {"status": "pending", "seconds": None} for name in names},
    }


def start_update(directory, command, names):
    """The existing results document in ``directory``, with ``names`` set to pending for re-measuring.

    The update is recorded (when, which targets, the load average) so a reader
    knows these figures come from a later run than the rest.
    """
    from neurohand.firmware_bridge.shared.checks import load_json_file
    from neurohand.firmware_bridge.shared.errors import UsageError

    path = os.path.join(directory, "results.json")
    if not os.path.isfile(path):
        raise UsageError("--update needs earlier results, but {!r} does not exist".format(path))
    document = load_json_file(path, "benchmark results", error=UsageError)
    if document.get("format") != RESULTS_FORMAT or not isinstance(document.get("targets"), dict):
        raise UsageError("{!r} is not a neurohand benchmark results file".format(path))
    document.setdefault("updates", []).append({
        "command": command + " --update", "targets": list(names), "started_utc": utc_now(),
        "git_commit": describe_machine().get("git_commit"), "load_average_start": load_average()})
    order = document.setdefault("target_order", sorted(document["targets"]))
    for name in names:
        document["targets"][name] = {"status": "pending", "seconds": None}
        if name not in order:
            order.append(name)
    return document


def check_results_directory(directory, names, quick, force=False, update=False, inputs=()):
    """Refuse, before anything is measured, a --results-dir whose files cannot or must not be replaced.

    Rewriting results.json and results.md is the command's job (atomically,
    after every target), but never over a folder or a kernel file, and not
    over what would cost a measurement without ``--force``: files that are no
    neurohand benchmark results, results of targets this run would drop (use
    ``--update``), or a full run's results under a ``--quick`` one.  Creates
    nothing; returns the directory as given.
    """
    from neurohand.firmware_bridge.shared.checks import load_json_file
    from neurohand.firmware_bridge.shared.errors import NeurohandError, UsageError
    from neurohand.firmware_bridge.shared.outputs import check_output_path

    name = "--results-dir"
    check_output_path(name, directory, inputs=inputs, force=True, directory=True)
    json_path, markdown_path = os.path.join(directory, JSON_NAME), os.path.join(directory, MARKDOWN_NAME)
    if not os.path.isdir(directory):
        return directory
    for path in (json_path, markdown_path):
        check_output_path("{} file".format(name), path, inputs=inputs, force=True)
    existing = None
    if os.path.lexists(json_path):
        try:
            existing = load_json_file(json_path, "benchmark results", error=UsageError)
        except NeurohandError:
            existing = None
        if not (isinstance(existing, dict) and existing.get("format") == RESULTS_FORMAT
                and isinstance(existing.get("targets"), dict)):
            existing = None
            if not force:
                raise UsageError("{} {!r}: {} is not a neurohand benchmark results file; pass --force to "
                                 "replace it".format(name, directory, JSON_NAME))
    elif os.path.lexists(markdown_path) and not force:
        raise UsageError("{} {!r}: {} exists without the {} it is rendered from; pass --force to replace "
                         "it".format(name, directory, MARKDOWN_NAME, JSON_NAME))
    if existing is None or update or force:
        return directory
    dropped = sorted(target for target, entry in existing["targets"].items()
                     if target not in names and isinstance(entry, dict) and entry.get("status") == "ok")
    if dropped:
        raise UsageError("{} {!r} holds results of {} that this run would drop; re-measure some targets with "
                         "--update, or pass --force to replace them".format(name, directory, ", ".join(dropped)))
    if quick and not existing.get("quick"):
        raise UsageError("{} {!r} holds the results of a full run, which a --quick run would replace with "
                         "figures that mean nothing; pass --force to replace them".format(name, directory))
    return directory


def write_results(directory, document):
    """Write ``results.json`` and ``results.md`` into ``directory``; returns both paths."""
    json_path = os.path.join(directory, JSON_NAME)
    markdown_path = os.path.join(directory, MARKDOWN_NAME)
    write_json_atomic(json_path, document, allow_nan=True)
    write_atomic(markdown_path, render_markdown(document))
    return json_path, markdown_path


# --- formatting helpers -------------------------------------------------------------

def _num(value, digits=1):
    """A number for a table: fixed digits, thousands grouped; '—' for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, int):
            return "{:,}".format(value)
        return "{:,.{}f}".format(value, digits)
    return str(value)


def _spread(median, low_high, digits=1, unit=""):
    """'median [min–max] unit' from a median and a [min, max] pair (either may be None)."""
    text = _num(median, digits)
    if low_high:
        text += " [{}–{}]".format(_num(low_high[0], digits), _num(low_high[1], digits))
    return text + unit


def _ms(value):
    """Milliseconds with about three significant digits (LibEMG timings span 0.1 to 100 ms)."""
    if value is None:
        return "—"
    digits = 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3 if abs(value) >= 0.1 else 4
    return "{:.{}f}".format(value, digits)


def _ms_spread(median, low_high):
    return "{} [{}–{}] ms".format(_ms(median), _ms(low_high[0]), _ms(low_high[1]))


def _ratio(numerator, denominator, digits=2):
    if not numerator or not denominator:
        return "—"
    return "{:.{}f}×".format(numerator / denominator, digits)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return lines


def _flatten(value, prefix=""):
    """[(dotted key, value)] of the scalars and lists in a nested dict."""
    if isinstance(value, dict):
        items = []
        for key in sorted(value):
            items.extend(_flatten(value[key], "{}.{}".format(prefix, key) if prefix else str(key)))
        return items
    if isinstance(value, list):
        return [(prefix, json.dumps(value))]
    return [(prefix, value)]


def _generic(result):
    """Every figure of a target without a dedicated renderer, as a key/value table."""
    return _table(["key", "value"], [(key, _num(value, 3)) for key, value in _flatten(result)])


# --- per-target renderers: result -> (headline rows, section lines) -----------------
# Headline columns: what, neurohand, alternative, alternative / neurohand.

def _parser(result):
    figure = _spread(result.get("realtime_multiple"), [result.get("realtime_multiple_min"),
                                                        result.get("realtime_multiple_max")], 0, "×")
    headline = [("chip-frame parsing, multiple of real time (default stream, {} B/s)".format(
        _num(result.get("stream_bytes_per_s"), 0)), figure,
        "goal ≥ {}×".format(result.get("goal_realtime_multiple")),
        _ratio(result.get("realtime_multiple"), result.get("goal_realtime_multiple"), 1) + " the goal")]
    rows = [("real-time multiple, median [min–max] over {} repeats".format(result.get("repeats")), figure),
            ("bytes per second", _num(result.get("bytes_per_s"), 0)),
            ("frames per second", _num(result.get("frames_per_s"), 0)),
            ("frame size, chunk size (bytes)", "{}, {}".format(result.get("frame_bytes"), result.get("chunk_bytes"))),
            ("frames per repeat", _num(result.get("frames_per_repeat"), 0)),
            ("meets the goal", _num(result.get("meets_goal")))]
    return headline, _table(["measure", "value"], rows)


def _block(entry, key="p50"):
    if not entry:
        return "—"
    return _spread(entry.get(key + "_us"), entry.get(key + "_us_spread"), 1, " µs")


def _dsp(result):
    ours, scipy = result.get("numpy_block"), result.get("scipy_block")
    lines = ["Workload: {}.".format(result.get("workload", "—")), ""]
    rows = [("neurohand FilterChain (numpy)", _block(ours), _block(ours, "p99"))]
    if scipy:
        rows.append(("scipy.signal.sosfilt with zi", _block(scipy), _block(scipy, "p99")))
    rows.append(("plain per-sample loop, one block", _num(result.get("per_sample_loop_one_block_us")) + " µs", "—"))
    lines += _table(["per 20 ms block", "p50", "p99"], rows)
    headline = []
    if scipy:
        ratio = _ratio(scipy["p50_us"], ours["p50_us"])
        lines += ["", "sosfilt / ours (p50): {}; max |ours − sosfilt| = {:.3g} µV on outputs up to {:.3g} "
                      "µV.".format(ratio, result["max_abs_diff_numpy_vs_scipy"], result["max_abs_output"])]
        headline.append(("filter chain, 20 ms block of 200 × 16 (p50); max abs difference {:.1e} µV".format(
            result["max_abs_diff_numpy_vs_scipy"]), _block(ours), "scipy.signal.sosfilt " + _block(scipy), ratio))
    else:
        lines += ["", "scipy: {}".format(result.get("scipy", "not measured"))]
    return headline, lines


def _libemg_lines(libemg):
    """Section lines and headline rows of the LibEMG comparison inside ``features``."""
    if not libemg.get("libemg_importable"):
        lines = ["LibEMG was not measured: {}.".format(libemg.get("libemg_unavailable_reason"))]
        cost = libemg.get("install_cost")
        if cost:
            lines.append("Why it is not installed here: {}".format(cost.get("explanation", "")))
        return [("window features vs LibEMG", "—", "LibEMG not measured", "—")], lines
    lines = ["LibEMG {} ({}), same windows: {}.".format(
        libemg.get("libemg_version"), libemg.get("ran_in", "in process"),
        json.dumps((libemg.get("workload") or {}).get("windows_shape"))), ""]
    rows = []
    for name in ("mav", "rms", "wl", "zc", "ssc"):
        entry = libemg["features"][name]
        rows.append((name.upper(), entry["n_values"], entry["n_different"], "{:.3g}".format(entry["max_abs_diff"]),
                     entry["max_rel_diff"] if isinstance(entry["max_rel_diff"], str)
                     else "{:.3g}".format(entry["max_rel_diff"])))
    lines += _table(["feature", "values", "different", "max abs diff", "max rel diff"], rows)
    speed = libemg["speed"]
    lines += [""]
    speed_rows = []
    for key in ("batch", "per_window"):
        entry = speed[key]
        speed_rows.append((entry["what"], _ms_spread(entry["ours_ms"], entry["ours_ms_spread"]),
                           _ms_spread(entry["libemg_ms"], entry["libemg_ms_spread"]),
                           _spread(entry["libemg_over_ours"], entry["libemg_over_ours_spread"], 2, "×")))
    lines += _table(["case ({} repeats, alternating)".format(speed["repeats"]), "neurohand", "LibEMG",
                     "LibEMG / neurohand"], speed_rows)
    different = sum(libemg["features"][name]["n_different"] for name in libemg["features"])
    equal = "equal on all values" if different == 0 else "{} values differ".format(different)
    headline = [("MAV, RMS, WL, ZC, SSC, {} ({})".format(speed[key]["what"], equal),
                 _ms(speed[key]["ours_ms"]) + " ms", "LibEMG {} ms".format(_ms(speed[key]["libemg_ms"])),
                 _spread(speed[key]["libemg_over_ours"], speed[key]["libemg_over_ours_spread"], 2, "×"))
                for key in ("batch", "per_window")]
    return headline, lines


def _features(result):
    rows = []
    for key in sorted(result):
        entry = result[key]
        if isinstance(entry, dict) and "p50_us" in entry:
            rows.append((key, entry.get("blocks"), _block(entry), _block(entry, "p99")))
    lines = ["Our streaming feature step per block (filter, windows, {} features, normalisation):".format(
        result.get("n_features_raw", "—")), ""]
    lines += _table(["variant", "blocks", "p50", "p99"], rows)
    headline = []
    if "raw_float64_numpy" in result:
        headline.append(("feature step per 20 ms block, 16 ch, {} features (p50)".format(result.get("n_features_raw")),
                         _block(result["raw_float64_numpy"]), "—", "—"))
    rhythm = result.get("decode_step_in_rhythm")
    if rhythm:
        lines += ["", "The window frame's decode step (stream push and numpy RNN step) with the chip's frames "
                      "pushed on their {} ms schedule, against the same frames back to back (p50 / p99, µs; the "
                      "pause between frames leaves the caches to other work, docs/latency.md):".format(
                          _num(rhythm["frame_period_ms"])), ""]
        lines += _table(["frames", "window push", "RNN step", "decode step"],
                        [(mode.replace("_", " "),) + tuple("{} / {}".format(_num(rhythm[mode][part]["p50_us"]),
                                                                            _num(rhythm[mode][part]["p99_us"]))
                                                           for part in ("window_push", "rnn_step", "decode_step"))
                         for mode in ("in_rhythm", "back_to_back")])
        lines += ["", "In rhythm / back to back, decode step: {} at p50, {} at p99.".format(
            _ratio(rhythm["in_rhythm"]["decode_step"]["p50_us"], rhythm["back_to_back"]["decode_step"]["p50_us"]),
            _ratio(rhythm["in_rhythm"]["decode_step"]["p99_us"], rhythm["back_to_back"]["decode_step"]["p99_us"]))]
    libemg = result.get("libemg")
    if libemg is not None:
        libemg_headline, libemg_lines = _libemg_lines(libemg)
        lines += ["", "### Against LibEMG", ""] + libemg_lines
        headline += libemg_headline
    return headline, lines


def _backends(result):
    rows = []
    for step in ("rnn_step", "decode_step"):
        for name, entry in sorted((result.get(step) or {}).items()):
            rows.append((step, name, _num(entry["p50_us"]) + " µs",
                         _spread(entry["p99_us"], entry.get("p99_us_range"), 1, " µs"),
                         _num(entry["max_us"]) + " µs"))
    lines = []
    model = result.get("model")
    if model:
        lines += ["Model: {} {} × {}, {} features -> {} outputs; decode step: {}.".format(
            model.get("cell"), model.get("num_layers"), model.get("hidden_size"), model.get("n_features"),
            model.get("n_outputs"), result.get("decode_step_is", "—")), ""]
    lines += _table(["step", "backend", "p50", "p99 [range over repeats]", "max"], rows)
    for name, reason in sorted((result.get("skipped") or {}).items()):
        lines.append("")
        lines.append("Skipped {}: {}".format(name, reason))
    headline = []
    rnn = result.get("rnn_step") or {}
    if "numpy" in rnn:
        for other in ("torch", "onnxruntime"):
            if other in rnn:
                headline.append(("RNN step (p50), numpy backend vs {}".format(other),
                                 _num(rnn["numpy"]["p50_us"]) + " µs",
                                 "{} {} µs".format(other, _num(rnn[other]["p50_us"])),
                                 _ratio(rnn[other]["p50_us"], rnn["numpy"]["p50_us"])))
    decode = result.get("decode_step") or {}
    for name in sorted(decode):
        headline.append(("whole decode step per 20 ms block, {} (p99)".format(name),
                         _num(decode[name]["p99_us"]) + " µs", "target ≤ 1000 µs", "—"))
    return headline, lines


def _decoding(result):
    headline, lines = [], []
    for name in sorted(result.get("datasets", {})):
        entry = result["datasets"][name]
        lines += ["### {}".format(name), ""]
        if "skipped" in entry:
            lines.append("Not measured: {}".format(entry["skipped"]))
            lines.append("")
            continue
        lines.append("{}. Test split: {} steps, {:.0f} s.".format(entry.get("what", ""), entry.get("test_steps"),
                                                                  entry.get("test_seconds") or 0))
        lines.append("")
        # Ours first, then the network baseline, then the classic decoders (JSON keys come back sorted).
        ranks = {"rnn": 0, "tcn": 1, "wiener": 2, "kalman": 3}
        order = sorted(entry["scores"], key=lambda decoder: (ranks.get(decoder, len(ranks)), decoder))
        described = {"tcn": "tcn (temporal convolutional network, Bai et al. 2018)"}
        rows = [(described.get(decoder, decoder), _num(entry["scores"][decoder].get("mean_r2"), 3),
                 _num(entry["scores"][decoder].get("mean_pearson_r"), 3),
                 _num(entry["scores"][decoder].get("mean_rmse"), 3)) for decoder in order]
        lines += _table(["decoder", "mean R²", "mean r", "RMSE (0..1 labels)"], rows)
        training = entry.get("training", {})
        lines += ["", "Training: {} epochs (best {}, stopped by {}), {:.0f} s in the trainer, {:.0f} s wall-clock "
                      "including start-up and export; budget {}.".format(
                          training.get("epochs_run"), training.get("best_epoch"), training.get("stopped"),
                          training.get("train_seconds") or 0, training.get("wall_seconds") or 0,
                          training.get("budget", "—")), ""]
        tcn = entry["scores"].get("tcn")
        if tcn:
            tcn_training = tcn.get("training") or {}
            lines += ["The TCN (train/tcn.py) trained on the same features and split with the RNN's recipe, budget "
                      "and seed ({}): {} epochs (best {}, stopped by {}), {:.0f} s.".format(
                          tcn.get("seed"), tcn_training.get("epochs_run"), tcn_training.get("best_epoch"),
                          tcn_training.get("stopped"), tcn_training.get("train_seconds") or 0), ""]
        classes = entry.get("classes") or {}
        if classes:
            # The RNN's class head first, then the LDA on Hudgins' set (lda_td) and on the RNN's features.
            names = sorted(classes, key=lambda decoder: (decoder != "rnn", decoder != "lda_td", decoder))
            described = {"rnn": "rnn (class head)", "lda_td": "LDA, Hudgins' time-domain set",
                         "lda": "LDA, the RNN's features"}
            lines += ["Movement classes (rest counts as a class; trials decided by majority vote from "
                      "{:g} s after onset):".format(classes[names[0]].get("delay_s") or 0.3), ""]
            lines += _table(["classifier", "balanced accuracy", "accuracy", "movement trials right"],
                            [(described.get(c, c), _num(classes[c].get("balanced_accuracy"), 3),
                              _num(classes[c].get("accuracy"), 3), _num(classes[c].get("trial_accuracy"), 3))
                             for c in names])
            lines.append("")
            if "rnn" in classes and "lda_td" in classes:
                headline.append(("balanced accuracy of movement classes, {}: RNN class head vs LDA".format(name),
                                 _num(classes["rnn"].get("balanced_accuracy"), 3),
                                 _num(classes["lda_td"].get("balanced_accuracy"), 3), "—"))
        scores = entry["scores"]
        rnn = scores.get("rnn", {}).get("mean_r2")
        for baseline, what in (("tcn", "TCN"), ("wiener", "Wiener filter"), ("kalman", "Kalman filter")):
            if baseline in scores:
                other = scores[baseline].get("mean_r2")
                headline.append(("test mean R², {}: RNN vs {}".format(name, what),
                                 _num(rnn, 3), _num(other, 3),
                                 "RNN − {} = {:+.3f}".format(baseline, rnn - other)
                                 if rnn is not None and other is not None else "—"))
        headline.append(("training time, {}".format(name), "{:.1f} s".format(training.get("train_seconds") or 0),
                         "—", "—"))
    if result.get("tcn") is False:
        lines += ["The TCN was left out (--no-tcn).", ""]
    if result.get("notes"):
        lines += ["Notes: {}".format(result["notes"])]
    return headline, lines


def _latency(result):
    citations = ["Published figures, for scale (different hardware, data and definitions of latency):", "",
                 "* 50–120 ms control latency of the Jetson Nano neuroprosthetic hand: " + NGUYEN_2021 + ".",
                 "* under 8 ms from neural data input to RNN decoder prediction in BRAND: " + BRAND_2024 + "."]
    if not result.get("available"):
        reason = result.get("reason", "not measured")
        return ([("end-to-end latency p99 (replay --realtime)", "not available yet", "Jetson Nano hand 50–120 ms; "
                  "BRAND < 8 ms", "—")], ["Not measured: {}.".format(reason), ""] + citations)
    latency = result["latency_us"]
    rows = [("p50", _num(latency.get("p50"), 0) + " µs"), ("p99", _num(latency.get("p99"), 0) + " µs"),
            ("max", _num(latency.get("max"), 0) + " µs"),
            ("frames", ", ".join("{} {}".format(key, value)
                                 for key, value in sorted((result.get("frames") or {}).items()))),
            ("replayed", "{:.0f} s".format(result.get("seconds") or 0)),
            ("mean R² of the replayed decoding", _num(result.get("mean_r2"), 3)),
            # Skips (older windows dropped when the loop fell behind) and safety events (e.g. data
            # timeouts) show how much the machine's load reached the loop.
            ("decoder skips, safety events", "{}, {}".format(_num(result.get("skips")),
                                                             _num(result.get("safety_events")))),
            ("load average before, after the replay", "{}; {}".format(
                ", ".join(str(v) for v in result.get("load_average_before") or []) or "—",
                ", ".join(str(v) for v in result.get("load_average_after") or []) or "—"))]
    # Both places of the virtual devices, side by side: in processes of their own (as hardware, the
    # figure to quote) and as threads competing with the decoder for the interpreter lock.
    for mode, spread in sorted((result.get("devices") or {}).items()):
        figures = spread.get("latency_us") or {}
        rows.append(("devices as {}: p50, p99 (median of runs, min..max), max (largest)".format(
            "processes" if mode == "process" else "threads"), "{} µs, {} µs ({}..{}), {} µs".format(
            _num((figures.get("p50") or {}).get("median"), 0), _num((figures.get("p99") or {}).get("median"), 0),
            _num((figures.get("p99") or {}).get("min"), 0), _num((figures.get("p99") or {}).get("max"), 0),
            _num((figures.get("max") or {}).get("max"), 0))))
    # --compare-with: the same replays with another checkout's code, alternating with this one's.
    for mode, spread in sorted((result.get("reference_devices") or {}).items()):
        figures = spread.get("latency_us") or {}
        rows.append(("the code of {}, devices as {}: p50, p99, max; this / that at p50, p99".format(
            result.get("compare_with"), "processes" if mode == "process" else "threads"),
            "{} µs, {} µs, {} µs; {}, {}".format(
                _num((figures.get("p50") or {}).get("median"), 0), _num((figures.get("p99") or {}).get("median"), 0),
                _num((figures.get("max") or {}).get("max"), 0), _num((result.get("ratio_p50") or {}).get(mode), 2),
                _num((result.get("ratio_p99") or {}).get(mode), 2))))
    goal = result.get("goal", {})
    rows.append(("goal", "p99 ≤ {} ms and max ≤ {} ms: {}".format(goal.get("p99_ms"), goal.get("max_ms"),
                                                                  "met" if goal.get("met") else "NOT met")))
    lines = ["What is measured: {}.".format(result.get("what", "—")), ""]
    lines += _table(["measure", "value"], rows) + [""] + citations
    p99_ms = latency["p99"] / 1000.0
    # Compute latency is compared only with compute latency (BRAND, whose figure is for 1,024 channels
    # at 30 kHz); the Jetson Nano hand's 50-120 ms is the delay a person feels, which the
    # intent-to-command lag measures (docs/latency.md), so it gets no ratio here.
    headline = [("compute latency p99 (chip bytes in -> hand command) over {:.0f} s of replay --realtime".format(
                    result.get("seconds") or 0),
                 "{:.2f} ms".format(p99_ms), "not comparable with the felt 50–120 ms of the Jetson Nano hand "
                 "(see the intent-to-command lag)", "—"),
                ("compute latency max", "{:.2f} ms".format(latency["max"] / 1000.0),
                 "BRAND < 8 ms to the RNN output (2024; 1,024 channels at 30 kHz)",
                 _ratio(8.0, latency["max"] / 1000.0, 1))]
    return headline, lines


def _replay(result):
    runs = result.get("runs") or {}
    rows = []
    for name in ("jobs2_auto", "jobs1_auto", "jobs2_numpy", "jobs1_numpy"):
        run = runs.get(name)
        if run is None:
            continue
        speed = run["speed_x"]
        worker = run.get("feature_worker_dsp_s")
        rows.append(("--jobs {} --backend {}{}".format(run["jobs"], run["backend_asked"],
                                                       " (default)" if name == result.get("default") else ""),
                     run.get("backend"), _spread(speed["median"], [speed["min"], speed["max"]], 1, "×"),
                     _spread(run["wall_s"]["median"], [run["wall_s"]["min"], run["wall_s"]["max"]], 2, " s"),
                     "—" if worker is None else _num(worker["median"], 2) + " s", _num(run.get("mean_r2"), 4)))
    lines = ["What is measured: {}; {} repeat(s), alternating. Speed: replayed seconds over the seconds of the "
             "decode loop; wall: the whole command (start-up, bundle, scoring).".format(
                 result.get("what", "—"), result.get("repeats")), ""]
    lines += _table(["command", "backend", "speed (real time ×)", "wall", "child's DSP time", "mean R²"], rows)
    lines += ["", "Same scores with one and two processes: {}. Load average before, after: {}; {}.".format(
        "yes" if result.get("same_scores") else "NO",
        ", ".join(str(v) for v in result.get("load_average_before") or []) or "—",
        ", ".join(str(v) for v in result.get("load_average_after") or []) or "—"),
        "Goal: at least {:g}× real time by default: {}.".format(result.get("goal_x"),
                                                              "met" if result.get("met") else "NOT met")]
    headline = []
    default = runs.get(result.get("default"))
    if default:
        headline.append(("replay --fast, multiple of real time (default stream, {})".format(
            result.get("default").replace("_", ", ")), _num(default["speed_x"]["median"], 1) + "×",
            "goal ≥ {:g}×".format(result.get("goal_x")),
            "{}× the goal".format(_num(default["speed_x"]["median"] / result.get("goal_x"), 2))))
    one = runs.get("jobs1_auto")
    if one and result.get("default") != "jobs1_auto":
        headline.append(("replay --fast in one process (--jobs 1)", _num(one["speed_x"]["median"], 1) + "×",
                         "—", "—"))
    return headline, lines


def _footprint(result):
    rows = []
    for name in ("python_bare", "import_numpy", "cli_parser", "device_step"):
        entry = (result.get("scenarios") or {}).get(name)
        if entry is None:
            continue
        rows.append((name, entry["what"], _spread(entry["wall_ms"]["median"],
                                                  [entry["wall_ms"]["min"], entry["wall_ms"]["max"]], 0, " ms"),
                     _spread(entry["cpu_ms"]["median"], [entry["cpu_ms"]["min"], entry["cpu_ms"]["max"]], 0, " ms"),
                     _num(entry["peak_rss_mib"]["median"], 1) + " MiB", entry["modules"],
                     ", ".join(entry["heavy_modules"]) or "none"))
    lines = _table(["scenario", "what", "wall", "CPU", "peak RSS", "modules", "heavy modules"], rows)
    device_path = result.get("device_path", {})
    lines += ["", "Device path free of {}: {}.".format(", ".join(device_path.get("forbidden", [])),
                                                        _num(device_path.get("ok")))]
    bundle = result.get("bundle")
    if bundle:
        lines.append("Bundle ({}): {} bytes, {} bytes as .tar.gz.".format(bundle.get("model"),
                                                                         _num(bundle.get("total_bytes"), 0),
                                                                         _num(bundle.get("archive_gz_bytes"), 0)))
    default = result.get("default_size_bundle") or {}
    if "total_bytes" in default:
        lines.append("Default-size bundle (GRU 2 × 128): {} bytes, {} bytes as .tar.gz.".format(
            _num(default["total_bytes"], 0), _num(default.get("archive_gz_bytes"), 0)))
    elif default.get("skipped"):
        lines.append("Default-size bundle: skipped ({}).".format(default["skipped"]))
    headline = []
    scenarios = result.get("scenarios") or {}
    if "device_step" in scenarios:
        step = scenarios["device_step"]
        ratios = result.get("ratios", {}).get("device_step", {})
        headline.append(("device runtime peak RSS (load bundle, one decode step, no torch)",
                         _num(step["peak_rss_mib"]["median"]) + " MiB",
                         "python -c 'import numpy' {} MiB".format(
                             _num(scenarios["import_numpy"]["peak_rss_mib"]["median"])),
                         "{}× numpy".format(_num(ratios.get("peak_rss_vs_import_numpy"), 2))))
        headline.append(("device runtime start-up to first decode step (wall)",
                         _num(step["wall_ms"]["median"], 0) + " ms",
                         "python -c 'import numpy' {} ms".format(
                             _num(scenarios["import_numpy"]["wall_ms"]["median"], 0)),
                         "{}× numpy".format(_num(ratios.get("wall_vs_import_numpy"), 2))))
    if "total_bytes" in default:
        headline.append(("default-size bundle (GRU 2 × 128)", "{} kB".format(_num(default["total_bytes"] / 1000.0, 0)),
                         "—", "—"))
    return headline, lines


def _generic_renderer(result):
    return [], _generic(result)


# Explicit registry: target name -> renderer.  A target without one gets the key/value table.
def _recalibration(result):
    # The bench renders its own tables (deploy/bench/recalibration.py); imported only when there is one.
    if "settings" not in result:        # not the bench's own document (e.g. an older or partial one)
        return _generic_renderer(result)
    from neurohand.deploy.bench import recalibration
    return recalibration.render(result)


RENDERERS = {
    "parser": _parser,
    "dsp": _dsp,
    "features": _features,
    "backends": _backends,
    "decoding": _decoding,
    "latency": _latency,
    "replay": _replay,
    "footprint": _footprint,
    "recalibration": _recalibration,
}


def render_markdown(document):
    """bench/results.md from a results document (see the module docstring)."""
    machine = document.get("machine", {})
    lines = ["# neurohand benchmark results", "",
             "Written by `{}` (started {}, finished {}){}. How to rerun and what each target measures: "
             "[README.md](README.md); every figure, with its spread: [results.json](results.json).".format(
                 document.get("command"), document.get("started_utc"), document.get("finished_utc") or "not finished",
                 "; QUICK RUN: figures not meaningful" if document.get("quick") else ""), ""]
    if not document.get("complete"):
        lines += ["**Incomplete run**: targets still pending are marked below.", ""]
    for update in document.get("updates") or []:
        lines += ["Re-measured later by `{}`: {} (started {}, load average {} at start, {} at the end, commit {}).".format(
            update.get("command"), ", ".join(update.get("targets") or []), update.get("started_utc"),
            ", ".join(str(v) for v in update.get("load_average_start") or []) or "unknown",
            ", ".join(str(v) for v in update.get("load_average_end") or []) or "unknown",
            update.get("git_commit") or "unknown"), ""]
    lines += ["## Machine", ""]
    packages = machine.get("packages") or {}
    load = machine.get("load_average")
    rows = [("CPU", machine.get("cpu_model")),
            ("cores (logical, usable)", "{}, {}".format(machine.get("logical_cpus"), machine.get("usable_cpus"))),
            ("memory", "{} MiB ({} MiB available at start)".format(_num(machine.get("memory_total_mib"), 0),
                                                                  _num(machine.get("memory_available_mib"), 0))),
            ("OS", "{} (kernel {}, {})".format(machine.get("os"), machine.get("kernel"), machine.get("architecture"))),
            ("Python", machine.get("python")),
            ("packages", ", ".join("{} {}".format(name, packages[name] or "absent") for name in sorted(packages))),
            ("neurohand", "{} (commit {})".format(machine.get("neurohand"), machine.get("git_commit") or "unknown")),
            ("load average at start (1, 5, 15 min)", ", ".join(str(v) for v in load) if load else "unknown")]
    end_load = document.get("load_average_end")
    if end_load:
        rows.append(("load average at the end", ", ".join(str(v) for v in end_load)))
    lines += _table(["", ""], rows)
    lines += ["", "The machine may have been shared with other work while measuring: read the load average with "
                  "the figures. Figures are medians over repeats with [min–max] across repeats; ratios are "
                  "alternative / neurohand, so above 1× means neurohand is faster.", ""]

    headline, sections = [], []
    # JSON objects are written with sorted keys: the run's order is kept in target_order.
    for name in document.get("target_order") or sorted(document.get("targets", {})):
        entry = document["targets"][name]
        sections += ["## {}".format(name), ""]
        status = entry.get("status")
        if status == "pending":
            sections += ["Pending: not measured (the run did not get this far).", ""]
            continue
        if status == "failed":
            sections += ["**Failed** after {:.0f} s: {}".format(entry.get("seconds") or 0, entry.get("error")), ""]
            continue
        renderer = RENDERERS.get(name, _generic_renderer)
        rows, section = renderer(entry["result"])
        headline += [(name,) + tuple(row) for row in rows]
        sections += section + ["", "(measured in {:.1f} s)".format(entry.get("seconds") or 0), ""]
    lines += ["## Side by side", ""]
    lines += _table(["target", "measure", "neurohand", "alternative", "alternative / neurohand"], headline) + [""]
    return "\n".join(lines + sections).rstrip("\n") + "\n"
