"""Workstation subcommands: import, train, evaluate (see neurohand.deploy.cli.main).

Only the standard library at module level: this module is imported on the
Jetson too, to build the parser; torch is imported inside the handlers."""
import json
import sys


def register(subparsers):
    """Add the workstation subcommands to the ``neurohand`` parser."""
    _register_import(subparsers)
    _register_train(subparsers)
    _register_evaluate(subparsers)


# --- import -------------------------------------------------------------------------

def _register_import(subparsers):
    parser = subparsers.add_parser(
        "import", help="convert a public data set (NinaPro MAT, CSV table) into a recording",
        description="Convert data recorded elsewhere into the neurohand recording format, ready for "
                    "'neurohand train'. Choose the source format as the next word.")
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    sources.required = True
    # nwb and xdf (the lab extra) live with the other lab formats in interop.py.
    from neurohand.deploy.cli import interop
    interop.register_import_sources(sources)

    ninapro = sources.add_parser(
        "ninapro", help="a NinaPro MAT file (emg, glove, restimulus, rerepetition)",
        description="Import a NinaPro MAT file (MATLAB v5; Atzori et al., Sci Data 2014, "
                    "doi:10.1038/sdata.2014.53). EMG becomes float32 signals, the CyberGlove the label "
                    "stream 'glove' (22 channels, same rate), and every change of restimulus / "
                    "rerepetition a 'movement' / 'repetition' event. DB1 (10 channels) is recognised as "
                    "100 Hz RMS EMG; other databases need --rate unless the file states it.")
    ninapro.add_argument("file", metavar="FILE.mat", help="the NinaPro MAT file (e.g. S2_A1_E1.mat)")
    ninapro.add_argument("--out", required=True, metavar="REC", help="recording file to write (never the input)")
    ninapro.add_argument("--force", action="store_true", help="replace an existing --out file")
    ninapro.add_argument("--rate", type=float, default=None, metavar="HZ",
                         help="sample rate in Hz, overriding what the file or its layout says "
                              "(DB1: 100, DB2/DB3/DB7: 2000)")
    ninapro.set_defaults(func=_run_import_ninapro)

    table = sources.add_parser(
        "csv", help="a CSV table with a header row",
        description="Import a CSV table with one header row and one row per sample. Columns are chosen "
                    "by glob patterns over the header names (fnmatch: '*', '?', '[abc]'), e.g. "
                    "--signals 'emg*' --labels 'finger?'. Cells must be numbers.")
    table.add_argument("file", metavar="FILE.csv", help="the CSV file")
    table.add_argument("--out", required=True, metavar="REC", help="recording file to write (never the input)")
    table.add_argument("--force", action="store_true", help="replace an existing --out file")
    table.add_argument("--rate", required=True, type=float, metavar="HZ", help="sample rate of the rows in Hz")
    table.add_argument("--signals", required=True, action="append", metavar="PATTERN",
                       help="glob pattern of the signal columns; repeat for more patterns")
    table.add_argument("--labels", required=True, action="append", metavar="PATTERN",
                       help="glob pattern of the label columns; repeat for more patterns")
    table.add_argument("--events", action="append", default=[], metavar="COLUMN[=KIND]",
                       help="integer column whose changes become events of KIND (default: the column name; "
                            "'repetition' enables the repetition split, 'movement' gives movement classes, 0 = rest, "
                            "which train's class head learns); repeatable")
    table.add_argument("--label-stream", default="labels", metavar="NAME",
                       help="name of the label stream (default: labels; 'fingers' for 0..1 finger positions)")
    table.add_argument("--scale-uv", type=float, default=1.0, metavar="FACTOR",
                       help="microvolts per unit of the signal columns (default: 1)")
    table.add_argument("--signal-kind", choices=["raw", "envelope"], default=None,
                       help="what the signals are, to pick the training defaults (default: guessed from "
                            "the rate: below 1 kHz envelope, else raw)")
    table.add_argument("--delimiter", default=",", metavar="CHAR", help="cell separator (default: ',')")
    table.set_defaults(func=_run_import_csv)


def _print_summary(summary, as_json):
    if as_json:
        print(json.dumps(summary, sort_keys=True))
    else:
        for key in sorted(summary):
            print("{}: {}".format(key, summary[key]))


def _run_import_ninapro(args):
    from neurohand.train import importers
    _print_summary(importers.import_ninapro(args.file, args.out, rate=args.rate, force=args.force), False)


def _run_import_csv(args):
    from neurohand.train import importers
    if len(args.delimiter) != 1:
        from neurohand.firmware_bridge.shared.errors import UsageError
        raise UsageError("--delimiter must be one character, but got {!r}".format(args.delimiter))
    summary = importers.import_csv(args.file, args.out, args.rate, args.signals, args.labels, args.events,
                                   label_stream=args.label_stream, scale_uv=args.scale_uv,
                                   signal_kind=args.signal_kind, delimiter=args.delimiter, force=args.force)
    _print_summary(summary, False)


# --- train --------------------------------------------------------------------------

def _register_train(subparsers):
    parser = subparsers.add_parser(
        "train", help="train a decoder on recordings and export it to ONNX",
        description="Train the recurrent decoder on one or more recordings. Splits each recording without "
                    "leakage (by repetition where it has repetition events, NinaPro's standard test "
                    "repetitions 2, 5, 7; otherwise by time blocks), trains with truncated back-propagation "
                    "through time and early stopping on the validation split, and writes config.json, "
                    "checkpoint.pt, model.onnx, metrics.json and report.png into RUN_DIR. Where the recordings "
                    "have movement events, the decoder also learns their classes (a class head after the "
                    "positions; training setting class_head). Runs under "
                    "torchrun for several processes (DistributedDataParallel).",
        epilog="The defaults depend on the data: 'envelope' (rates below 1 kHz, e.g. NinaPro DB1) or 'raw' "
               "(nerve/EMG at kHz rates, e.g. the simulator); envelope targets lead the signal by 0.15 s "
               "(target_lead_s), which cancels most of the window's delay. See docs/training.md for the config file. "
               "A new day: neurohand train day2.nh --init-from RUN --out RUN2 with 30-120 s of the new day.")
    parser.add_argument("recordings", nargs="+", metavar="REC", help="recording file(s) to train on")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="directory for the run's files "
                        "(created; one that holds files needs --resume to continue its run or --force)")
    parser.add_argument("--force", action="store_true",
                        help="start a new run in a RUN_DIR that holds files, replacing the run files in it")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON file overriding defaults: sections pipeline, model, training, split, labels")
    parser.add_argument("--epochs", type=int, default=None, metavar="N",
                        help="maximum number of epochs (default from the config)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default: 0)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to train: auto = CUDA if available (default)")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="MIN",
                        help="stop training after this many minutes (the best model so far is kept)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from RUN_DIR/checkpoint.pt")
    parser.add_argument("--init-from", metavar="RUN", default=None,
                        help="fine-tune the earlier run RUN on these (short) recordings: its model, pipeline "
                             "settings and label scaling are kept, the feature normalisation is fitted anew, "
                             "training starts from its best weights with a lower learning rate and a pull toward "
                             "them (docs/training.md, 'Recalibration with --init-from')")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch threads per process (default: 1, fastest for this small RNN on a busy CPU); "
                             "with a jointly trained ensemble, N members train side by side instead "
                             "(the same weights on any N)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    parser.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    parser.set_defaults(func=_run_train)


def _run_train(args):
    from neurohand.train import trainer
    summary = trainer.train_command(args)
    if summary is None:          # not rank 0 under torchrun
        return
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print("run: {}".format(summary["run_dir"]))
        print("features: {}".format(summary["features"]["summary"]))
        for split in ("train", "validation", "test"):
            if split in summary["scores"]:
                scores = summary["scores"][split]
                classes = scores.get("classes")
                print("{} mean R2: {:.3f}{}".format(split, scores["mean_r2"], "" if not classes else
                                                    ", class balanced accuracy {:.3f} (accuracy {:.3f})".format(
                                                        classes["balanced_accuracy"], classes["accuracy"])))
        print("epochs: {} (best {}), {:.1f} s".format(summary["epochs_run"], summary["best_epoch"],
                                                     summary["train_seconds"]))


# --- evaluate -----------------------------------------------------------------------

def _register_evaluate(subparsers):
    parser = subparsers.add_parser(
        "evaluate", help="score a trained decoder on recordings' test splits, against Wiener and Kalman filters",
        description="Decode a recording's test split causally, step by step, through the same streaming "
                    "feature code and numpy ONNX backend the device runs, and score it (R², Pearson r, RMSE "
                    "per output). Wiener (ridge on lagged features) and Kalman filters are fitted on the same "
                    "split and features and scored alongside, and where the recording has movement events "
                    "a linear discriminant (LDA) classifies movements on the same windows (accuracy, balanced "
                    "accuracy, per-trial accuracy), next to the run's own class head where it has one. "
                    "With several recordings (sessions), each is "
                    "scored on its own and a table shows held-in sessions (those the run trained on) and "
                    "held-out ones, with R² mean and spread per session, as FALCON reports them.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'neurohand train'")
    parser.add_argument("recordings", nargs="+", metavar="REC", help="recording(s) to score (split as in training)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (mean_r2, r2, lag_ms, baselines, and classes for a run with a class "
                             "head; several recordings: {recordings: [one per REC], sessions: the held-in/held-out "
                             "summary})")
    parser.add_argument("--block-s", type=float, default=0.05, metavar="SECONDS",
                        help="seconds of signal pushed into the stream at a time (default: 0.05)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the baselines (Wiener and Kalman filters, movement-class LDA)")
    parser.add_argument("--tcn", action="store_true",
                        help="also train a temporal convolutional network baseline on the run's budget and recipe "
                             "(takes minutes; one recording only)")
    parser.add_argument("--confusion-png", metavar="PATH", default=None,
                        help="a run with a class head: write its test confusion matrix (rows true, columns decided, "
                             "shares of each true class) as a PNG at PATH, replacing an earlier plot there but never "
                             "an input (one recording; needs matplotlib)")
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args):
    from neurohand.train import evaluate
    result = evaluate.evaluate_command(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return
    if len(args.recordings) > 1:
        print(evaluate.format_sessions_table(result), file=sys.stdout)
        return
    print(evaluate.format_table(result), file=sys.stdout)
