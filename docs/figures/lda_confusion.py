"""LibEMG's standard classifier on NinaPro DB1 S2E1, as a confusion matrix: docs/figures/lda_confusion.png.

    .venv/bin/neurohand import ninapro S2_A1_E1.mat --out s2e1.nh
    LIBEMG_VENV/bin/python docs/figures/lda_confusion.py s2e1.nh docs/figures/lda_confusion.png

(LIBEMG_VENV: see deploy/bench/libemg.py.)  The trainer's windows and split
(0.2 s every 20 ms, test repetitions 2, 5, 7, as train/trainer.py prepares them), the
classes from the ``movement`` events (train/classes.py).  Where LibEMG imports,
its FeatureExtractor computes Hudgins' set (MAV, ZC, SSC, WL) of every window
and its ``EMGClassifier("LDA")`` decides; elsewhere ours do, with LibEMG's
settings (no shrinkage, empirical priors), and the title says so.
"""
import contextlib
import sys

import numpy as np

from neurohand.train import classes, dataset, splits

HTD = ("MAV", "ZC", "SSC", "WL")
# The trainer's envelope windows (train/trainer.py MODE_DEFAULTS); only the windows matter here, so torch,
# which the trainer imports and a LibEMG venv lacks, is not needed.
WINDOWS = {"mode": "envelope", "window_s": 0.2, "stride_s": 0.02}


def main(recording, out):
    rec = dataset.load_recording(recording)
    pipeline = classes.hudgins_pipeline(WINDOWS, rec.signal_rate, len(rec.channel_names))
    _, segments = splits.plan_split(rec.n_samples, rec.events, splits.check_split_settings({}),
                                    dataset.guard_samples(pipeline), source=recording)
    steps_per_s = dataset.steps_per_second(pipeline)
    width = pipeline.window_samples
    truth, windows = {"train": [], "test": []}, {"train": [], "test": []}
    for segment in segments:
        if segment.split not in truth or segment.stop - segment.start < width:
            continue
        ends = dataset.segment_windows(pipeline, rec, segment)[1]
        truth[segment.split].append(classes.step_classes(rec.events, ends))
        index = ends[:, None] - width + np.arange(width)[None, :]
        windows[segment.split].append(np.ascontiguousarray(rec.signals[index].transpose(0, 2, 1)))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from libemg.feature_extractor import FeatureExtractor
        from neurohand.deploy.bench.libemg import libemg_lda_decisions

        def features(block):
            values = FeatureExtractor().extract_features(list(HTD), block, {"SSC_threshold": 0.0})
            return np.hstack([values[name] for name in HTD])

        def decide(train_x, train_y, test_x):
            return libemg_lda_decisions(train_x, train_y, test_x)
        who = "LibEMG EMGClassifier('LDA') on LibEMG's HTD features"
    except ImportError:
        def features(block):
            return pipeline.window_features.compute(block)

        def decide(train_x, train_y, test_x):
            return classes.LDAClassifier(shrinkages=0.0).fit([(train_x, train_y)]).predict(test_x)
        who = "neurohand LDA (LibEMG's settings) on Hudgins' TD features"
    train_x = np.concatenate([features(w) for w in windows["train"]])
    decided = decide(train_x, np.concatenate(truth["train"]), np.concatenate([features(w) for w in windows["test"]]))
    cuts = np.cumsum([0] + [len(t) for t in truth["test"]])
    result = classes.score_classes(truth["test"], [decided[a:b] for a, b in zip(cuts[:-1], cuts[1:])], steps_per_s,
                                   classes=np.union1d(np.concatenate(truth["test"]), decided))
    classes.plot_confusion(out, result["confusion"], result["class_names"], title=(
        "{} (MAV, ZC, SSC, WL)\nNinaPro DB1 S2E1, 0.2 s windows every 20 ms, test repetitions 2, 5, 7: "
        "accuracy {:.3f}, balanced {:.3f}, per trial {:.3f}".format(
            who, result["accuracy"], result["balanced_accuracy"], result["trial_accuracy"])))
    print({key: result[key] for key in ("accuracy", "balanced_accuracy", "trial_accuracy", "rest_trial_accuracy")})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
