"""``neurohand bench latency``: end-to-end latency of ``neurohand replay --realtime``.

What is timed is what ``replay --realtime`` reports: from the chip's bytes
arriving at the runtime to the hand command written, through a virtual chip
and a virtual hand on pseudo-terminals, the runtime loop of ``neurohand run``
in between (deploy/replay.py).  Steps, each the user's command in a fresh
interpreter, in a temporary directory removed afterwards::

    one simulated session (seed 1) of 150 s + S+1.5 s, cut in two recordings
        (deploy/demo.py write_session_parts): train.rec, then held-out.rec
    neurohand train train.rec --out run --seed 0 --quiet --json [--max-minutes M]
    neurohand bundle run --out bundle
    neurohand selftest bundle --json
    neurohand replay bundle held-out.rec --realtime --devices D --seconds S --json   (R times per D)

The held-out part continues the training session (same simulated nerve and
electrodes, later in time) and was never trained on; another seed would be
another patient, whom a per-patient decoder cannot decode.

Both places of the virtual devices (``--devices``, replay_realtime's ``devices``), side by
side, alternating so that a change of the machine's load hits both alike:
``process`` (the chip and the hand in processes of their own, as hardware:
the default, and the figure the goal is judged on) and ``thread`` (threads of
the decoding process, competing with it for the interpreter lock).  The
measured quantity is the same in both; only the contention differs.

``compare_with`` (``--compare-with DIR``): DIR is another checkout of the
project (e.g. the code before a change, from ``git archive``).  Every replay
then runs twice, once with this code and once with DIR's (its
``decoder/``, ``firmware_bridge/``, ``train/`` and ``deploy/`` folders, put
first on ``PYTHONPATH`` as the ``neurohand`` namespace), on the same bundle
and recording, in alternating order: the old and the new code side by side in
one run, under the same load.  The result gains ``compare_with`` and
``reference_devices`` (as ``devices``), and ``ratio_p50``, ``ratio_p99`` per mode
(this / DIR, medians over the repeats).

S is 600 s (the issue's 10-minute replay; ``quick``: 20 s, with 1 training
epoch), R is 1 (``repeats``).  One replay gives tens of thousands of commands,
so p99 and max are order statistics of one long run; with R > 1 each mode
reports the median of its runs with their spread (min, max).

Next to it, published figures for scale (bench_report.py cites them): 50-120 ms
for the Jetson Nano neuroprosthetic hand (Nguyen et al. 2021) and under 8 ms
from neural data to RNN prediction in BRAND (Ali et al. 2024).  The goal of
this project on a 2-core workstation (issue 18): p99 <= 1 ms and max <= 5 ms,
on a quiet machine, devices in processes of their own.

Output: ``{"available": true, "devices": {"process": {"latency_us": {"p50",
"p90", "p99", "max": {median, min, max}}, "skips", "safety_events": {median,
min, max}, "runs": [one dict per replay: latency_us, skips, safety_events,
safety_by_kind, frames, mean_r2, stop_reason, wall_s, load_average_before,
load_average_after]}, "thread": {...}}, "default_devices": "process",
"latency_us": {"p50", "p90", "p99": medians over the default's runs, "max":
the largest, "count": all}, "frames", "mean_r2", "seconds", "commands",
"backend" (its first run's), "safety_events", "skips" (summed over its runs),
"goal": {"p99_ms", "max_ms", "met"}, "load_average_before",
"load_average_after", ...}``.
"""
import json
import os
import shutil
import sys
import tempfile

from neurohand.deploy.bench.report import load_average, repeat_spread
from neurohand.deploy.bench.decoding import json_output, neurohand_command, run_step as _run_step
from neurohand.deploy.flash import PACKAGE_FOLDERS

REPLAY_SECONDS, QUICK_REPLAY_SECONDS = 600.0, 20.0
REPEATS = 1
# Real-time replay keeps 0.5 s of the recording in reserve (deploy/replay.py); 1.5 s is ample.
RECORDING_MARGIN_S = 1.5
TRAIN_SECONDS, QUICK_TRAIN_SECONDS = 150.0, 40.0
GOAL_P99_MS, GOAL_MAX_MS = 1.0, 5.0
SESSION_SEED = 1
#: Where the virtual devices run, the default (judged against the goal) first.
DEVICE_MODES = ("process", "thread")


def run_step(command, what, environment=None):
    return _run_step(command, what, target="latency", environment=environment)


def simulate_session(train_path, held_out_path, train_seconds, held_out_seconds, target="latency"):
    """One simulated patient (seed 1): the first ``train_seconds`` to train on, the rest held out."""
    from neurohand.deploy.demo import write_session_parts
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig

    print("  {}: simulating a {:g} s session ...".format(target, train_seconds + held_out_seconds), file=sys.stderr,
          flush=True)
    total = train_seconds + held_out_seconds
    write_session_parts(SimulatorConfig(total, n_channels=16, rate=10000.0, seed=SESSION_SEED, difficulty="easy"),
                        [(train_path, 0.0, train_seconds), (held_out_path, train_seconds, total)])


#: The folders that make up the ``neurohand`` namespace: the ones ``neurohand flash`` copies.
SOURCE_FOLDERS = PACKAGE_FOLDERS


def check_checkout(path):
    """``path`` as an absolute checkout root with the project's source folders, else UsageError."""
    from neurohand.firmware_bridge.shared.errors import UsageError

    root = os.path.abspath(path)
    missing = [folder for folder in SOURCE_FOLDERS if not os.path.isdir(os.path.join(root, folder))]
    if missing:
        raise UsageError("--compare-with {!r} is not a neurohand checkout: it has no {} folder".format(
            path, "/, ".join(missing) + "/"))
    return root


def reference_environment(checkout, work):
    """The environment that makes ``neurohand`` the code of ``checkout`` (for the replays of --compare-with).

    A ``neurohand`` folder of links to the checkout's source folders, first on
    PYTHONPATH: the namespace package is then found there before this
    installation (an editable install's finder comes after the path).
    """
    package = os.path.join(work, "reference", "neurohand")
    os.makedirs(package)
    for folder in SOURCE_FOLDERS:
        os.symlink(os.path.join(checkout, folder), os.path.join(package, folder))
    environment = dict(os.environ)
    paths = [os.path.dirname(package)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def replay_command(bundle, recording, seconds, devices):
    """``neurohand replay BUNDLE RECORDING --realtime --devices DEVICES --seconds S --json`` in a fresh
    interpreter; :func:`replay_summary` checks the summary says the devices asked for."""
    return neurohand_command("replay", bundle, recording, "--realtime", "--devices", devices, "--seconds",
                             str(seconds), "--json")


def replay_summary(stdout, devices):
    summary = json_output(stdout, "neurohand replay")
    if summary.get("devices") != devices:
        raise RuntimeError("asked for the virtual devices as {!r}, the replay ran them as {!r}".format(
            devices, summary.get("devices")))
    if not summary["latency_us"].get("count"):
        raise RuntimeError("replay --realtime measured no latency: {}".format(json.dumps(summary)[:500]))
    return summary


def run_entry(summary, wall_s, before, after):
    """What one replay contributes to the result."""
    keys = ("latency_us", "skips", "safety_events", "safety_by_kind", "frames", "mean_r2", "commands",
            "stop_reason", "backend", "seconds")
    entry = {key: summary.get(key) for key in keys}
    entry.update({"wall_s": round(wall_s, 1), "load_average_before": before, "load_average_after": after})
    return entry


def summarise_devices(runs):
    """The spread of each figure over the runs of one devices mode (``runs``: run_entry dicts)."""
    latency = {key: repeat_spread([r["latency_us"][key] for r in runs])
               for key in ("p50", "p90", "p99", "max")}
    return {"latency_us": latency, "skips": repeat_spread([r["skips"] or 0 for r in runs], digits=0),
            "safety_events": repeat_spread([r["safety_events"] or 0 for r in runs], digits=0), "runs": runs}


def headline_latency(runs):
    """One latency_us for a mode's runs: median p50, p90, p99; the largest max; every command counted."""
    def median(values):
        return repeat_spread(values)["median"]
    return {"p50": median([r["latency_us"]["p50"] for r in runs]),
            "p90": median([r["latency_us"]["p90"] for r in runs]),
            "p99": median([r["latency_us"]["p99"] for r in runs]),
            "max": max(r["latency_us"]["max"] for r in runs),
            "count": sum(r["latency_us"]["count"] for r in runs)}


def run(quick, max_minutes=None, replay_seconds=None, repeats=None, devices=DEVICE_MODES, compare_with=None):
    """The ``latency`` target; ``replay_seconds`` overrides S, ``repeats`` R, ``devices`` the modes
    compared (the first is judged against the goal), ``compare_with`` another checkout to replay
    side by side; see the module docstring."""
    seconds = replay_seconds or (QUICK_REPLAY_SECONDS if quick else REPLAY_SECONDS)
    repeats = repeats or REPEATS
    devices = tuple(devices)
    reference = None if compare_with is None else check_checkout(compare_with)
    work = tempfile.mkdtemp(prefix="neurohand-bench-latency-")
    try:
        codes = [("this", None)]
        if reference is not None:
            codes.append(("reference", reference_environment(reference, work)))
        train_rec, held_out = os.path.join(work, "train.rec"), os.path.join(work, "held-out.rec")
        run_dir, bundle = os.path.join(work, "run"), os.path.join(work, "bundle")
        train_seconds = QUICK_TRAIN_SECONDS if quick else TRAIN_SECONDS
        simulate_session(train_rec, held_out, train_seconds, seconds + RECORDING_MARGIN_S)
        train = ["train", train_rec, "--out", run_dir, "--seed", 0, "--quiet", "--json"]
        if quick:
            train += ["--epochs", 1]
        elif max_minutes is not None:
            train += ["--max-minutes", max_minutes]
        run_step(neurohand_command(*train), "training the decoder to replay")
        run_step(neurohand_command("bundle", run_dir, "--out", bundle), "bundling")
        selftest, _ = run_step(neurohand_command("selftest", bundle, "--json"), "self-testing the bundle")
        first_load = load_average()
        all_runs = {code: {mode: [] for mode in devices} for code, _ in codes}
        for repeat in range(repeats):
            for mode in devices:
                # Alternating which code goes first, so a drift of the machine's load hits both alike.
                for code, environment in (codes if repeat % 2 == 0 else codes[::-1]):
                    before = load_average()
                    stdout, wall = run_step(replay_command(bundle, held_out, seconds, mode),
                                            "replaying {:g} s in real time, devices in {}{}{} ({}/{})".format(
                                                seconds, "their own processes" if mode == "process" else "threads",
                                                "" if mode == "process" else " of the decoding process",
                                                "" if environment is None else ", the code of " + reference,
                                                repeat + 1, repeats), environment)
                    all_runs[code][mode].append(run_entry(replay_summary(stdout, mode), wall, before,
                                                          load_average()))
        last_load = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = all_runs["this"]
    by_devices = {mode: summarise_devices(runs[mode]) for mode in devices}
    default = devices[0]
    chosen = runs[default]
    latency = headline_latency(chosen)
    met = latency["p99"] <= GOAL_P99_MS * 1000.0 and latency["max"] <= GOAL_MAX_MS * 1000.0
    compared = {}
    if reference is not None:
        reference_devices = {mode: summarise_devices(all_runs["reference"][mode]) for mode in devices}
        compared = {"compare_with": reference, "reference_devices": reference_devices}
        for figure in ("p50", "p99"):
            compared["ratio_" + figure] = {mode: repeat_spread([
                new["latency_us"][figure] / old["latency_us"][figure]
                for new, old in zip(runs[mode], all_runs["reference"][mode])], digits=3)["median"]
                for mode in devices}
    for mode in devices:
        for label, spreads in (("", by_devices), (" (" + str(reference) + ")", compared.get("reference_devices"))):
            if spreads is None:
                continue
            spread = spreads[mode]["latency_us"]
            print("  latency, devices {}{}: p50 {} us, p99 {} us (runs {}..{}), max {} us (largest), over {} x {:g} s"
                  .format(mode, label, spread["p50"]["median"], spread["p99"]["median"], spread["p99"]["min"],
                          spread["p99"]["max"], spread["max"]["max"], repeats, seconds), file=sys.stderr)
    result = {
        "available": True, "quick": bool(quick),
        "what": "chip bytes in -> hand command written, neurohand replay --realtime through a virtual chip and "
                "a virtual hand on pseudo-terminals ({}), held-out continuation of the simulated training "
                "session (seed {}); {} run(s) of {:g} s per mode, medians of the runs (max: the largest)".format(
                    "in processes of their own" if default == "process" else "threads of the decoding process",
                    SESSION_SEED, repeats, seconds),
        "devices": by_devices, "default_devices": default, "repeats": repeats,
        "latency_us": latency, "frames": chosen[0]["frames"], "mean_r2": chosen[0]["mean_r2"],
        "seconds": chosen[0]["seconds"], "commands": chosen[0]["commands"], "backend": chosen[0]["backend"],
        "safety_events": sum(r["safety_events"] or 0 for r in chosen), "skips": sum(r["skips"] or 0 for r in chosen),
        "safety_by_kind": chosen[0]["safety_by_kind"], "stop_reason": chosen[0]["stop_reason"],
        "replay_wall_s": round(sum(r["wall_s"] for r in chosen), 1),
        "selftest_backend": json_output(selftest, "neurohand selftest").get("backend"),
        "train_budget": "1 epoch (quick)" if quick else (
            "{:g} min".format(max_minutes) if max_minutes is not None else "trainer defaults"),
        "goal": {"p99_ms": GOAL_P99_MS, "max_ms": GOAL_MAX_MS, "met": bool(met)},
        "load_average_before": first_load, "load_average_after": last_load,
    }
    result.update(compared)
    return result
