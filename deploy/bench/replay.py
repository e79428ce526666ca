"""``neurohand bench replay``: how many times real time ``neurohand replay --fast`` runs.

The goal (issue 6): at least 100x real time at the default stream (16
channels, 10 kHz, 100 ms windows every 20 ms, GRU 2 x 128).  Side by side in
one run: ``--jobs 1`` (everything in one process) and ``--jobs 2`` (the
features computed in a second process, the default on two CPUs), each with
the backend ``replay`` picks by default (auto) and with numpy, alternating
so that a change of the machine's load hits both alike.  Steps, each the
user's command in a fresh interpreter, in a temporary directory removed
afterwards::

    one simulated session (seed 1): TRAIN_S s to train on, then S s held out
    neurohand train train.rec --out run --seed 0 --epochs 1 --quiet --json
    neurohand bundle run --out bundle
    neurohand replay bundle held-out.rec --fast --jobs J --backend B --json   (R repeats each)

One training epoch is enough: the speed depends on the model's size, not on
its weights (the default architecture is what ``train`` builds).  The speed
is ``replay``'s own ``speed_x``: replayed seconds over the seconds of its
decode loop (start-up, loading the bundle and scoring are left out and
reported apart as the command's wall time).  The decoded scores must be the
same for both ``--jobs`` (checked).

S is 300 s (quick: 20 s), R is 3 (quick: 1).

Output: ``{"available": true, "seconds", "goal_x", "runs": {"jobs2_auto":
{"speed_x": {median, min, max}, "wall_s": ..., "backend", "mean_r2"},
...}, "default": name of the default run, "met": bool, "ratio_jobs2_over_jobs1",
"same_scores": bool, "load_average_before", "load_average_after", ...}``.
"""
import os
import shutil
import sys
import tempfile

from neurohand.deploy.bench.report import load_average, repeat_spread
from neurohand.deploy.bench.decoding import json_output, neurohand_command, run_step as _run_step
from neurohand.deploy.bench.latency import simulate_session

GOAL_X = 100.0
REPLAY_SECONDS, QUICK_REPLAY_SECONDS = 300.0, 20.0
REPEATS, QUICK_REPEATS = 3, 1
TRAIN_S = 40.0
#: (name, --jobs, --backend): the default command first.
RUNS = (("jobs2_auto", 2, "auto"), ("jobs1_auto", 1, "auto"), ("jobs2_numpy", 2, "numpy"),
        ("jobs1_numpy", 1, "numpy"))


def run_step(command, what):
    return _run_step(command, what, target="replay")


def run(quick, replay_seconds=None):
    """The ``replay`` target (see the module docstring); ``replay_seconds`` overrides S."""
    from neurohand.deploy.runtime.feature_worker import default_jobs

    seconds = replay_seconds or (QUICK_REPLAY_SECONDS if quick else REPLAY_SECONDS)
    repeats = QUICK_REPEATS if quick else REPEATS
    work = tempfile.mkdtemp(prefix="neurohand-bench-replay-")
    try:
        train_rec, held_out = os.path.join(work, "train.rec"), os.path.join(work, "held-out.rec")
        run_dir, bundle = os.path.join(work, "run"), os.path.join(work, "bundle")
        simulate_session(train_rec, held_out, TRAIN_S, seconds, target="replay")
        run_step(neurohand_command("train", train_rec, "--out", run_dir, "--seed", 0, "--epochs", 1, "--quiet",
                                   "--json"), "training one epoch (the speed does not depend on the weights)")
        run_step(neurohand_command("bundle", run_dir, "--out", bundle), "bundling")
        before = load_average()
        results = {name: [] for name, _, _ in RUNS}
        for repeat in range(repeats):
            for name, jobs, backend in RUNS:
                stdout, wall = run_step(neurohand_command("replay", bundle, held_out, "--fast", "--jobs", jobs,
                                                          "--backend", backend, "--json"),
                                        "replay --fast --jobs {} --backend {} ({}/{})".format(
                                            jobs, backend, repeat + 1, repeats))
                summary = json_output(stdout, "neurohand replay")
                results[name].append((summary, wall))
        after = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = {}
    for name, jobs, backend in RUNS:
        summaries = [summary for summary, _ in results[name]]
        runs[name] = {"jobs": jobs, "backend_asked": backend, "backend": summaries[0].get("backend"),
                      "speed_x": repeat_spread([s["speed_x"] for s in summaries]),
                      "wall_s": repeat_spread([wall for _, wall in results[name]], digits=2),
                      "mean_r2": summaries[0].get("mean_r2"), "commands": summaries[0].get("commands"),
                      "feature_worker_dsp_s": repeat_spread([s["feature_worker_dsp_s"] for s in summaries], digits=3)
                      if jobs == 2 else None}
    # Two processes compute the same numbers: every repeat, jobs 1 and 2 score alike with each backend.
    same_scores = all(summary["mean_r2"] == other["mean_r2"]
                      for backend in ("auto", "numpy")
                      for (summary, _), (other, _) in zip(results["jobs1_" + backend], results["jobs2_" + backend]))
    default = "jobs{}_auto".format(default_jobs())
    met = runs[default]["speed_x"]["median"] >= GOAL_X
    ratio = runs["jobs2_auto"]["speed_x"]["median"] / runs["jobs1_auto"]["speed_x"]["median"]
    print("  replay: {:g}x real time by default ({}), goal {:g}x".format(
        runs[default]["speed_x"]["median"], default, GOAL_X), file=sys.stderr)
    return {
        "available": True, "quick": bool(quick), "seconds": seconds, "repeats": repeats, "goal_x": GOAL_X,
        "what": "neurohand replay --fast on {:g} s of the held-out continuation of a simulated session "
                "(16 channels, 10 kHz, seed 1), default pipeline and model size".format(seconds),
        "runs": runs, "default": default, "met": bool(met), "ratio_jobs2_over_jobs1": round(ratio, 2),
        "same_scores": bool(same_scores), "load_average_before": before, "load_average_after": after,
    }
