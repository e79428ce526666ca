"""``neurohand bench``: measurements on the current machine, printed as JSON and written as results.

Each target is a function ``run(quick, ...) -> dict`` living next to the code
it measures; this module only names them (:data:`TARGETS`), runs the chosen
ones and hands the results to :mod:`neurohand.deploy.bench.report`.
``quick`` asks for a shorter run (used by tests to check the output's shape,
never its speed).

Output contract: one target with ``--json`` prints exactly that target's
JSON object; several targets (or ``all``) with ``--json`` print the whole
results document (bench_report.py).  Results files (results.json and
results.md) are written when ``--results-dir`` is given, and for a full
(not ``--quick``) ``all`` run in a source checkout to ./bench/; the files are
rewritten after every target (atomically), so an interrupted run keeps what it
measured.  Before anything is measured the folder is checked
(bench_report.check_results_directory): earlier files there are replaced
without ``--force`` only if they are benchmark results this run measures again.
"""
import json
import os
import sys
import time


def _parser(quick, options):
    from neurohand.deploy.bench import chip as chip_bench
    return chip_bench.run(quick)


def _dsp(quick, options):
    from neurohand.deploy.bench import dsp as dsp_bench
    return dsp_bench.run_dsp(quick)


def _features(quick, options):
    from neurohand.deploy.bench import features as features_bench
    return features_bench.run(quick, options.libemg_python)


def _backends(quick, options):
    from neurohand.deploy.bench import backends as backend_bench
    return backend_bench.run(quick)


def _simulate(quick, options):
    from neurohand.deploy.bench import simulator as simulator_bench
    return simulator_bench.run(quick)


def _realism(quick, options):
    from neurohand.deploy.bench import realism as realism_bench
    return realism_bench.run(quick)


def _libemg(quick, options):
    from neurohand.deploy.bench import libemg as libemg_compare
    return libemg_compare.run(quick)


def _decoding(quick, options):
    from neurohand.deploy.bench import decoding as decoding_bench
    return decoding_bench.run(quick, options.ninapro, options.train_minutes, with_tcn=options.tcn)


def _latency(quick, options):
    from neurohand.deploy.bench import latency as latency_bench
    return latency_bench.run(quick, options.train_minutes, options.replay_seconds, compare_with=options.compare_with)


def _replay(quick, options):
    from neurohand.deploy.bench import replay as replay_bench
    return replay_bench.run(quick)


def _recalibration(quick, options):
    from neurohand.deploy.bench import recalibration as recalibration_bench
    return recalibration_bench.run(quick, jobs=options.jobs)


def _lag(quick, options):
    from neurohand.deploy.bench import lag as lag_bench
    return lag_bench.run(quick, options)


def _collect(quick, options):
    from neurohand.deploy.bench import collect as collect_bench
    return collect_bench.run(quick)


def _footprint(quick, options):
    from neurohand.deploy.bench import footprint as footprint_bench
    return footprint_bench.run(quick)


# Explicit registry: target name -> function(quick, options), in the order 'all' runs them.
TARGETS = {
    "parser": _parser,
    "dsp": _dsp,
    "features": _features,
    "backends": _backends,
    "simulate": _simulate,
    "realism": _realism,
    "libemg": _libemg,
    "footprint": _footprint,
    "decoding": _decoding,
    "latency": _latency,
    "replay": _replay,
    "recalibration": _recalibration,
    "collect": _collect,
    "lag": _lag,
}
# Part of 'all' only through another target: libemg is inside 'features'.  recalibration trains about
# 180 decoders (about 40 minutes on one core): run on its own (bench recalibration --update).
# collect plays 2 minutes in real time through the virtual chip and glove and trains twice: on its own too.
# lag trains several decoders on NinaPro to compare the levers that cut the lag (docs/latency.md): on its own too.
NOT_IN_ALL = ("libemg", "recalibration", "collect", "lag")
DEFAULT_RESULTS_DIR = "bench"
DEFAULT_TRAIN_MINUTES = 20.0


class BenchOptions(object):
    """What targets may need besides ``quick`` (validated values)."""

    def __init__(self, libemg_python=None, ninapro=None, train_minutes=DEFAULT_TRAIN_MINUTES, replay_seconds=None,
                 jobs=1, tcn=True, compare_with=None):
        self.compare_with = compare_with
        self.libemg_python = libemg_python
        self.ninapro = ninapro
        self.train_minutes = train_minutes
        self.replay_seconds = replay_seconds
        self.jobs = jobs
        self.tcn = tcn


def register(subparsers):
    parser = subparsers.add_parser(
        "bench", help="measure parsing, DSP, features, backends, decoding, latency, fast replay and footprint on "
                      "this machine",
        description="Measure on this machine, side by side with what users would otherwise pick (scipy, LibEMG, "
                    "PyTorch, Wiener and Kalman filters, published latencies), and print the results. One target "
                    "with --json prints exactly one JSON object; several targets or 'all' print the whole results "
                    "document. Results files (results.json, results.md with the machine description) are written "
                    "into --results-dir DIR when it is given; a full 'all' run (not --quick) writes them to "
                    "./bench/ when the current directory is a source checkout with a bench/ folder, and needs "
                    "--results-dir anywhere else. The files are rewritten after every target. See bench/README.md.",
        epilog="Targets: parser, dsp, features (with LibEMG), backends, decoding, latency, replay (speed of "
               "replay --fast), footprint, simulate, libemg, recalibration (decay over simulated days and "
               "recalibration with 30/60/120 s, docs/training.md). 'all' runs every target except libemg (already "
               "inside features) and recalibration (about 40 minutes on its own); the full run takes "
               "about 30-40 minutes on 2 cores (estimated), 20 of them the latency target's two 10-minute "
               "real-time replays.")
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="what to measure: all (default) or one or more of {}".format(", ".join(TARGETS)))
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    parser.add_argument("--quick", action="store_true",
                        help="short run to check the set-up (figures are not meaningful, never written to ./bench/)")
    parser.add_argument("--results-dir", metavar="DIR", default=None,
                        help="write results.json and results.md here (created if missing); default: ./bench/ for "
                             "a full 'all' run in a source checkout, otherwise not written. Earlier results there "
                             "are replaced (atomically, after every target), but without --force only if they "
                             "are neurohand benchmark results that this run measures again: not results of "
                             "targets it would drop (use --update) nor a full run's under --quick")
    parser.add_argument("--force", action="store_true",
                        help="replace existing output files (results.json and results.md in --results-dir, "
                             "whatever they hold)")
    parser.add_argument("--libemg-python", metavar="PATH", default=None,
                        help="python of a venv with LibEMG installed, for the features comparison (LibEMG needs "
                             "numpy<2; default: $NEUROHAND_LIBEMG_PYTHON, else LibEMG in this interpreter, else "
                             "reported as not installed with the reason)")
    parser.add_argument("--ninapro", metavar="FILE", default=None,
                        help="NinaPro DB1 S2_A1_E1.mat for the decoding target (default: "
                             "../shared/data/ninapro_db1_s2_e1/S2_A1_E1.mat; skipped where absent)")
    parser.add_argument("--train-minutes", type=float, default=DEFAULT_TRAIN_MINUTES, metavar="MIN",
                        help="training time budget per model in the decoding and latency targets, recorded with "
                             "the results (default {:g}; the trainer's early stopping usually ends sooner)".format(
                                 DEFAULT_TRAIN_MINUTES))
    parser.add_argument("--no-tcn", action="store_true",
                        help="decoding target: leave out the temporal convolutional network baseline (it trains "
                             "on each data set with the RNN's recipe and budget, about as long as the RNN again)")
    parser.add_argument("--replay-seconds", type=float, default=None, metavar="S",
                        help="length of the real-time replay of the latency target (default 600, --quick 20)")
    parser.add_argument("--compare-with", metavar="DIR",
                        help="latency target: replay the same bundle with the code of another checkout DIR too (its "
                             "decoder/, firmware_bridge/, train/ and deploy/ folders; e.g. the code before a change, "
                             "from `git archive`), alternating with this one, and report both with their ratios")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="processes for the recalibration target (one patient each, one thread each; default 1: "
                             "its figures do not depend on it, its wall time does)")
    parser.add_argument("--update", action="store_true",
                        help="measure only the TARGETs given and replace their entries in the existing "
                             "results.json/results.md (in --results-dir, else ./bench/), keeping the other targets "
                             "and recording when and under what load each update ran")
    parser.set_defaults(func=run_command)


def target_names(requested):
    """The targets to run, in registry order, from the command line's words (default: all)."""
    from neurohand.firmware_bridge.shared import checks

    if not requested or "all" in requested:
        if len(requested) > 1:
            from neurohand.firmware_bridge.shared.errors import UsageError
            raise UsageError("'all' cannot be combined with other targets, but got {}".format(" ".join(requested)))
        return [name for name in TARGETS if name not in NOT_IN_ALL]
    for name in requested:
        checks.check_option("target", name, ["all"] + list(TARGETS))
    return [name for name in TARGETS if name in requested]


def results_directory(requested_dir, is_all, quick, names=(), force=False, update=False, inputs=()):
    """Where results are written (a directory path) or None (print only); see --help.

    Checked before anything is measured (bench_report.check_results_directory),
    and created if missing: a mistake must not cost a half-hour run.
    """
    from neurohand.deploy.bench.report import check_results_directory
    from neurohand.firmware_bridge.shared.errors import UsageError

    if requested_dir is not None:
        check_results_directory(requested_dir, names, quick, force=force, update=update, inputs=inputs)
        try:
            os.makedirs(requested_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError("--results-dir {!r}: cannot create it ({})".format(
                requested_dir, exc.strerror or exc)) from None
        return requested_dir
    if not is_all or quick:
        return None
    if not os.path.isdir(DEFAULT_RESULTS_DIR):
        raise UsageError("'all' writes its results to ./{0}/ in a source checkout, but there is no {0}/ folder "
                         "in {1}; give --results-dir DIR".format(DEFAULT_RESULTS_DIR, os.getcwd()))
    return check_results_directory(DEFAULT_RESULTS_DIR, names, quick, force=force, update=update, inputs=inputs)


def kept_results(directory, quick):
    """Results of the targets 'all' does not run (NOT_IN_ALL) in an earlier full run's results.json, to carry
    into the new one: {name: entry}, each marked with when it was measured.  Empty where there are none."""
    from neurohand.deploy.bench.report import JSON_NAME, RESULTS_FORMAT
    from neurohand.firmware_bridge.shared.checks import load_json_file
    from neurohand.firmware_bridge.shared.errors import NeurohandError

    path = os.path.join(directory, JSON_NAME)
    if quick or not os.path.isfile(path):
        return {}
    try:
        document = load_json_file(path, "benchmark results")
    except NeurohandError:
        return {}
    if document.get("format") != RESULTS_FORMAT or document.get("quick") or not isinstance(
            document.get("targets"), dict):
        return {}
    kept = {}
    for name in NOT_IN_ALL:
        entry = document["targets"].get(name)
        if isinstance(entry, dict) and entry.get("status") == "ok":
            measured = [u.get("started_utc") for u in document.get("updates") or []
                        if isinstance(u, dict) and name in (u.get("targets") or [])]
            kept[name] = dict(entry, kept_from=entry.get("kept_from") or (measured or [document.get("started_utc")])[-1])
    return kept


def options_from(args):
    from neurohand.deploy.bench.features import libemg_python_from
    from neurohand.firmware_bridge.shared import checks

    if args.ninapro is not None:
        checks.check_file_exists("--ninapro", args.ninapro)
    train_minutes = checks.check_number("--train-minutes", args.train_minutes, minimum=0.0, exclusive_minimum=True)
    replay_seconds = None
    if args.replay_seconds is not None:
        replay_seconds = checks.check_number("--replay-seconds", args.replay_seconds, minimum=2.0)
    jobs = checks.check_int("--jobs", args.jobs, minimum=1, maximum=64)
    compare_with = None
    if args.compare_with is not None:
        from neurohand.deploy.bench.latency import check_checkout
        compare_with = check_checkout(args.compare_with)
    return BenchOptions(libemg_python_from(args.libemg_python), args.ninapro, train_minutes, replay_seconds, jobs,
                        tcn=not args.no_tcn, compare_with=compare_with)


def run_command(args):
    from neurohand.deploy.bench import report as bench_report

    names = target_names(args.targets)
    # Check every user value before measuring anything: a mistake must not cost a half-hour run.
    options = options_from(args)
    command = " ".join(["neurohand bench"] + (args.targets or ["all"]) + (["--quick"] if args.quick else []))
    inputs = [args.ninapro] if args.ninapro is not None else []
    if args.update:
        directory = results_directory(args.results_dir or DEFAULT_RESULTS_DIR, False, args.quick, names,
                                      force=args.force, update=True, inputs=inputs)
        document = bench_report.start_update(directory, command, names)
    else:
        is_all = not args.targets or args.targets == ["all"]
        kept = kept_results(args.results_dir or DEFAULT_RESULTS_DIR, args.quick) if is_all and not args.force else {}
        directory = results_directory(args.results_dir, is_all, args.quick, names + sorted(kept), force=args.force,
                                      inputs=inputs)
        document = bench_report.new_document(command, args.quick, names, bench_report.describe_machine())
        if directory is not None:
            for name, entry in sorted(kept.items()):
                document["targets"][name] = entry
                document["target_order"].append(name)
    first_error = None
    for name in names:
        print("measuring {} ...".format(name), file=sys.stderr, flush=True)
        started = time.perf_counter()
        entry = document["targets"][name]
        try:
            entry["result"] = TARGETS[name](args.quick, options)
            entry["status"] = "ok"
        except Exception as error:          # noqa: BLE001 - recorded; a long run goes on with the next target
            if first_error is None:
                first_error = error
            entry["status"] = "failed"
            entry["error"] = "{}: {}".format(type(error).__name__, error)
            print("bench {} failed: {}".format(name, entry["error"]), file=sys.stderr)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        if directory is not None:
            bench_report.write_results(directory, document)
    if args.update:
        document["updates"][-1].update(finished_utc=bench_report.utc_now(),
                                       load_average_end=bench_report.load_average())
    else:
        document["complete"] = True
        document["finished_utc"] = bench_report.utc_now()
        document["load_average_end"] = bench_report.load_average()
    if directory is not None:
        paths = bench_report.write_results(directory, document)
        print("results written to {} and {}".format(*paths), file=sys.stderr)
    if len(names) == 1:
        if first_error is not None:
            raise first_error           # one target: its error as before (NeurohandError -> one line)
        result = document["targets"][names[0]]["result"]
        print(json.dumps(result, sort_keys=True) if args.json else json.dumps(result, indent=2, sort_keys=True))
        return 0
    if args.json:
        print(json.dumps(document, sort_keys=True))
    else:
        print(bench_report.render_markdown(document))
    return 1 if first_error is not None else 0
