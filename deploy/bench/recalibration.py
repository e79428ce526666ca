"""Day two: how a decoder decays over days and what recalibration recovers (``neurohand bench recalibration``).

Five simulated patients x six sessions (``simulate --patient K --session N``,
realistic preset, :data:`SESSION_S` seconds each, 16 channels at 10 kHz).  Every
session is cut the same way::

    0 s ............ 30 / 60 / 120 s ..... 150 s (FULL_S) .... 190 s (SESSION_S)
    |-- recalibration data (its start) --|                   |-- scored: last 40 s --|
    |-------------- full session (from-scratch reference) ---|

Day 1 (session 0): a decoder trained from scratch on the full session.  On each
later day (sessions 1..5), all scored on the same last :data:`HELD_OUT_S` seconds,
which no decoder ever trains on:

- ``unchanged``: the day-1 decoder as it is (the decay per day);
- ``init_from_Ns``: ``neurohand train --init-from DAY1`` on the first N s of the day;
- ``on_device_Ns``: the day-1 run bundled (deploy.bundle.make_bundle), then
  ``neurohand recalibrate`` (deploy/recalibrate.py, numpy, closed form) on the first N s;
- ``scratch_Ns``: trained from scratch on the first N s;
- ``full``: trained from scratch on the full session (the first FULL_S s).

Scoring decodes the held-out block causally from rest (the filters and the RNN
state start at zero, as ``neurohand evaluate`` decodes a test segment) with the
numpy ONNX backend the device runs, in each decoder's own normalisation and label
scaling (R^2 does not depend on the label scaling).  Every run uses the time
split (:data:`SPLIT`); its internal test block is part of the N seconds and the
bench does not use its figure.

The headline figures (issue 17): ``fraction_of_full`` = mean R^2 of a
recalibration over patients and days / mean R^2 of ``full`` over the same
patients and days (a ratio of means: single days' full-session R^2 can be near
zero, where a ratio per day means nothing; the median of the per-day ratios is
kept beside it), ``margin_over_scratch_60s`` = mean R^2 of init_from_60s minus
that of scratch_60s.  Targets: init_from_60s >= 0.9, on_device_60s >= 0.8,
margin >= 0.1.

``run(quick)`` is the bench target; ``--quick`` does one patient, sessions 0-1,
short recordings and one epoch per run, to check the set-up (figures not meaningful).
``--jobs N`` measures N patients side by side, each in a fresh interpreter read
back as JSON: the figures are those of ``--jobs 1`` (tests/workstation/
test_recalibration_bench.py checks it), only the time differs.  Run as
``python -m neurohand.deploy.bench.recalibration`` it also takes ``--seconds``
(e.g. 60 alone: the headline figures at about 40 % of the cost) and
``--finetune JSON``: training settings for the init-from runs only, to measure
another fine-tuning recipe against the same from-scratch runs (these never change).
"""
import json
import os
import shutil
import sys
import tempfile
import time

SESSION_S = 190.0
FULL_S = 150.0
HELD_OUT_S = 40.0
SECONDS = (30, 60, 120)
PATIENTS = 5
SESSIONS = 6
CHANNELS = 16
RATE_HZ = 10000.0
DIFFICULTY = "realistic"
# One split for every run: contiguous time blocks (a full session's repetitions would otherwise pick the
# repetition split, which trains on two of five repetitions); validation 15 % for early stopping.
SPLIT = {"method": "time", "validation_fraction": 0.15, "test_fraction": 0.1}
# Training budgets in epochs only, so that the figures do not depend on the machine's load: from scratch the
# trainer's raw defaults with at most 15 epochs (patience 5), fine-tuning its FINETUNE_DEFAULTS with at most
# 12.  Chosen so that the whole benchmark takes about 40 minutes of CPU (it reports cpu_s and wall_s).
SCRATCH_TRAINING = {"epochs": 15, "patience": 5}
FINETUNE_TRAINING = {"epochs": 12}
# The headline sizes (60 s) with everything else as small as it goes: figures mean nothing.
QUICK = {"patients": 1, "sessions": 2, "session_s": 80.0, "full_s": 60.0, "held_out_s": 20.0, "seconds": (60,),
         "epochs": 1}
TARGETS = {"init_from_60s": 0.9, "on_device_60s": 0.8, "margin_over_scratch_60s": 0.1}


# --- data ---------------------------------------------------------------------------

def simulate(path, patient, session, seconds, channels=CHANNELS, rate_hz=RATE_HZ):
    """Session ``session`` of patient ``patient``, as ``neurohand simulate --patient --session`` writes it."""
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig, write_recording

    config = SimulatorConfig(seconds, n_channels=channels, rate=rate_hz, seed=patient, session=session,
                             difficulty=DIFFICULTY)
    write_recording(path, config)
    return path


def crop(source, path, stop_s):
    """Write the first ``stop_s`` seconds of recording ``source`` to ``path`` (signals, labels, events)."""
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter, open_recording

    with open_recording(source) as rec:
        stop = int(round(stop_s * rec.signal_rate))
        if stop > rec.n_samples:
            raise ValueError("{} holds {:g} s, fewer than {:g}".format(source, rec.duration_s, stop_s))
        metadata = dict(rec.metadata, cropped_s=[0.0, float(stop_s)])
        streams = {name: {"rate": s.rate, "names": list(s.names)} for name, s in rec.label_streams.items()}
        scale = None if rec.dtype == "float32" else [float(v) for v in rec.scale_uv]
        with RecordingWriter(path, rec.signal_rate, rec.channel_names, dtype=rec.dtype, scale_uv=scale,
                             metadata=metadata, label_streams=streams) as writer:
            writer.append_signals(rec.read_signals(0, stop))
            for name, stream in rec.label_streams.items():
                rows = int(round(stop_s * stream.rate))
                writer.append_labels(name, stream.data[:rows])
            for event in rec.events:
                if event.sample < stop:
                    writer.add_event(event.sample, event.kind, event.value)
    return path


class HeldOut(object):
    """The scored block of one session: the last ``seconds`` of the recording, decoded from rest.

    Raw features are computed once per pipeline design and reused by every decoder of that day."""

    def __init__(self, path, seconds):
        from neurohand.train import dataset

        self.recording = dataset.load_recording(path)
        n = self.recording.n_samples
        self.start = n - int(round(seconds * self.recording.signal_rate))
        self.stop = n
        self._features = {}

    def features(self, pipeline):
        """(raw features, window ends) of the block for ``pipeline``'s design."""
        config = pipeline.to_config()
        config.pop("normalisation", None)
        key = json.dumps(config, sort_keys=True)
        if key not in self._features:
            features, ends = pipeline.transform(self.recording.signals[self.start:self.stop])
            self._features[key] = (features, ends + self.start)
        return self._features[key]


def score(decoder_dir, held_out):
    """Mean R^2 (and r) of the decoder in ``decoder_dir`` (a run directory or a bundle: config.json and
    model.onnx) on the held-out block, decoded causally with the numpy backend."""
    import numpy as np
    from neurohand.decoder.backends import create_backend
    from neurohand.decoder.pipeline import FeaturePipeline
    from neurohand.train import dataset, metrics

    with open(os.path.join(decoder_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    pipeline = FeaturePipeline.from_config(config["pipeline"], where="{} pipeline".format(decoder_dir))
    features, ends = held_out.features(pipeline)
    features = pipeline.normalise(features).astype(np.float32)
    rec = held_out.recording
    rows = dataset.label_rows(ends, rec.signal_rate, rec.labels.rate, len(rec.labels.data), rec.path)
    scaling = dataset.LabelScaling.from_config(config["labels"]["scaling"])
    truth = scaling.apply(np.asarray(rec.labels.data, dtype=np.float64)[rows])
    backend = create_backend("numpy", os.path.join(decoder_dir, "model.onnx"))
    # A decoder with a movement-class head gives its class scores after the positions: only positions are scored.
    n_positions = getattr(backend, "n_positions", backend.n_outputs)
    try:
        state = backend.initial_state()
        outputs = []
        for row in features:
            out, state = backend.step(row, state)
            outputs.append(np.array(out[:n_positions], dtype=np.float64))
    finally:
        backend.close()
    result = metrics.score(truth, np.array(outputs))
    return {"mean_r2": result["mean_r2"], "mean_r": result["mean_pearson_r"]}


# --- decoders -----------------------------------------------------------------------

def train(paths, out, training, init_from=None):
    """A run trained on ``paths`` into ``out`` (in this process, one thread); its summary."""
    from neurohand.train import trainer

    config = {"training": dict(training), "split": dict(SPLIT)}
    if init_from is not None:
        config.pop("split")         # a fine-tuning run keeps the earlier run's split settings (SPLIT)
    return trainer.train_run(paths, out, config, seed=0, device="cpu", progress=False, threads=1, force=True,
                             init_from=init_from, light=True)


def recalibrate_available():
    """(function, None) where deploy/recalibrate.py provides ``recalibrate``, else (None, why not)."""
    try:
        from neurohand.deploy.recalibrate import recalibrate
    except ImportError as exc:
        return None, "neurohand.deploy.recalibrate is not available ({})".format(exc)
    return recalibrate, None


# --- the benchmark ------------------------------------------------------------------

def _settings(quick):
    if quick:
        epochs = QUICK["epochs"]
        return {"patients": QUICK["patients"], "sessions": QUICK["sessions"], "session_s": QUICK["session_s"],
                "full_s": QUICK["full_s"], "held_out_s": QUICK["held_out_s"], "seconds": list(QUICK["seconds"]),
                "scratch_training": dict(SCRATCH_TRAINING, epochs=epochs),
                "finetune_training": dict(FINETUNE_TRAINING, epochs=epochs), "channels": CHANNELS,
                "rate_hz": RATE_HZ}
    return {"patients": PATIENTS, "sessions": SESSIONS, "session_s": SESSION_S, "full_s": FULL_S,
            "held_out_s": HELD_OUT_S, "seconds": list(SECONDS), "scratch_training": dict(SCRATCH_TRAINING),
            "finetune_training": dict(FINETUNE_TRAINING), "channels": CHANNELS, "rate_hz": RATE_HZ}


def _check_finetune(finetune):
    """The fine-tuning overrides of ``--finetune`` (a JSON object of training settings), checked early."""
    from neurohand.firmware_bridge.shared.errors import UsageError
    if isinstance(finetune, str):
        try:
            finetune = json.loads(finetune)
        except ValueError as exc:
            raise UsageError("--finetune must be a JSON object of training settings: {}".format(exc)) from None
    if not isinstance(finetune, dict):
        raise UsageError("--finetune must be a JSON object of training settings, but got {!r}".format(finetune))
    from neurohand.train.trainer import FINETUNE_SETTINGS, TRAINING_DEFAULTS
    unknown = sorted(set(finetune) - set(TRAINING_DEFAULTS) - set(FINETUNE_SETTINGS))
    if unknown:
        raise UsageError("--finetune: unknown training settings {} (known: {})".format(
            ", ".join(unknown), ", ".join(sorted(set(TRAINING_DEFAULTS) | set(FINETUNE_SETTINGS)))))
    return finetune


def _say(text):
    print("recalibration: {}".format(text), file=sys.stderr, flush=True)


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def run(quick, patients=None, sessions=None, jobs=1, progress=True, finetune=None, overrides=None):
    """The benchmark (see the module's docstring); a JSON-able dict.

    patients, sessions : override the counts (the defaults: 5 and 6, or QUICK's)
    jobs : patients measured side by side in this many processes (each one thread; the figures do not
    depend on it, the wall time does)
    finetune : training settings merged over the fine-tuning runs' (FINETUNE_TRAINING, over the trainer's
    FINETUNE_DEFAULTS) to measure other fine-tuning choices; the from-scratch runs are never changed
    overrides : settings replaced as a whole (tests: tiny sessions, fewer channels)"""
    settings = _settings(quick)
    if patients is not None:
        settings["patients"] = patients
    if sessions is not None:
        settings["sessions"] = sessions
    if finetune:
        settings["finetune_training"].update(_check_finetune(finetune))
    settings.update(overrides or {})
    _, unavailable = recalibrate_available()
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    work = [(patient, settings, progress) for patient in range(settings["patients"])]
    if jobs > 1 and len(work) > 1:
        # Fresh interpreters fed and read as JSON (nothing in neurohand pickles, not even its own
        # workers: tests/device/test_security.py); threads only wait for them.
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(min(jobs, len(work))) as pool:
            measured = list(pool.map(_patient_job_in_process, work))
    else:
        measured = [_patient_job(item) for item in work]
    rows = [row for rows_p, _ in measured for row in rows_p]
    try:
        result = summarise(rows, [day1 for _, day1 in measured], settings, unavailable)
    except Exception:
        # An hour of measurements is not thrown away for a bug in the bookkeeping.
        handle, path = tempfile.mkstemp(prefix="neurohand-recalibration-rows-", suffix=".json")
        with os.fdopen(handle, "w") as out:
            json.dump({"measured": measured, "settings": settings}, out, default=str)
        _say("summarising failed; the measured rows are in {}".format(path))
        raise
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["cpu_s"] = round(_cpu_seconds() - cpu_started, 1)
    result["jobs"] = jobs
    result["quick"] = bool(quick)
    if progress:
        _say("done in {:.0f} s ({:.0f} s of CPU)".format(result["wall_s"], result["cpu_s"]))
    return result


def _cpu_seconds():
    """CPU seconds of this process and its finished children (the pool's workers)."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_JOB_CODE = ("import json, sys; from neurohand.deploy.bench.recalibration import _patient_job; "
             "print(json.dumps(_patient_job(json.loads(sys.argv[1]))))")


def _patient_job_in_process(item):
    """:func:`_patient_job` in a fresh interpreter of this Python; its last line of output is the result."""
    import subprocess
    completed = subprocess.run([sys.executable, "-c", _JOB_CODE, json.dumps(list(item))],
                               stdout=subprocess.PIPE, universal_newlines=True)
    if completed.returncode != 0:
        raise RuntimeError("measuring patient {} failed (exit status {})".format(item[0], completed.returncode))
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _patient_job(item):
    """One patient in a folder of its own, removed afterwards (a pool worker's task)."""
    patient, settings, progress = item
    recalibrate, _ = recalibrate_available()
    folder = tempfile.mkdtemp(prefix="neurohand-recalibration-")
    try:
        return _patient(folder, patient, settings, recalibrate, progress)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _patient(folder, patient, settings, recalibrate, progress):
    """Day 1 and the later days of one patient: (rows, one per later day; the day-1 row)."""
    from neurohand.deploy.bundle import make_bundle

    base = os.path.join(folder, "p{}".format(patient))
    os.makedirs(base)
    session0 = simulate(os.path.join(base, "s0.nh"), patient, 0, settings["session_s"], settings["channels"],
                        settings["rate_hz"])
    full0 = crop(session0, os.path.join(base, "s0_full.nh"), settings["full_s"])
    day1_dir = os.path.join(base, "day1")
    summary, train_s = _timed(train, [full0], day1_dir, settings["scratch_training"])
    day1 = {"patient": patient, "session": 0, "train_s": round(train_s, 1), "epochs": summary["epochs_run"],
            "within_day": score(day1_dir, HeldOut(session0, settings["held_out_s"]))}
    bundle_dir = os.path.join(base, "day1_bundle")
    make_bundle(day1_dir, bundle_dir)
    if progress:
        _say("patient {} day 1: R2 {:.3f} on its own last {:g} s ({:.0f} s to train)".format(
            patient, day1["within_day"]["mean_r2"], settings["held_out_s"], train_s))
    rows = []
    for session in range(1, settings["sessions"]):
        rows.append(_day(base, patient, session, settings, day1_dir, bundle_dir, recalibrate, progress))
    return rows, day1


def _day(base, patient, session, settings, day1_dir, bundle_dir, recalibrate, progress):
    """Every decoder of one later day, scored on its held-out block."""
    folder = os.path.join(base, "s{}".format(session))
    os.makedirs(folder)
    path = simulate(os.path.join(folder, "session.nh"), patient, session, settings["session_s"], settings["channels"],
                    settings["rate_hz"])
    held = HeldOut(path, settings["held_out_s"])
    row = {"patient": patient, "session": session, "unchanged": score(day1_dir, held)}
    full = crop(path, os.path.join(folder, "full.nh"), settings["full_s"])
    summary, seconds = _timed(train, [full], os.path.join(folder, "full"), settings["scratch_training"])
    row["full"] = dict(score(os.path.join(folder, "full"), held), train_s=round(seconds, 1),
                       epochs=summary["epochs_run"])
    for n in settings["seconds"]:
        part = crop(path, os.path.join(folder, "first{}.nh".format(n)), n)
        run_dir = os.path.join(folder, "scratch{}".format(n))
        summary, seconds = _timed(train, [part], run_dir, settings["scratch_training"])
        row["scratch_{}s".format(n)] = dict(score(run_dir, held), train_s=round(seconds, 1),
                                            epochs=summary["epochs_run"])
        run_dir = os.path.join(folder, "init{}".format(n))
        summary, seconds = _timed(train, [part], run_dir, settings["finetune_training"], init_from=day1_dir)
        row["init_from_{}s".format(n)] = dict(score(run_dir, held), train_s=round(seconds, 1),
                                              epochs=summary["epochs_run"], best_epoch=summary["best_epoch"])
        if recalibrate is not None:
            out = os.path.join(folder, "device{}".format(n))
            try:
                report, seconds = _timed(recalibrate, bundle_dir, part, out)
                row["on_device_{}s".format(n)] = dict(score(out, held), recalibrate_s=round(seconds, 2),
                                                      ridge_lambda=report.get("lambda"))
            except Exception as exc:    # noqa: BLE001 - recorded per day; the benchmark goes on
                row["on_device_{}s".format(n)] = {"mean_r2": None, "mean_r": None,
                                                  "error": "{}: {}".format(type(exc).__name__, exc)}
    shutil.rmtree(folder, ignore_errors=True)
    if progress:
        _say("patient {} session {}: unchanged {:.3f}, full {:.3f}, {}".format(
            patient, session, row["unchanged"]["mean_r2"], row["full"]["mean_r2"], ", ".join(
                "{} {}".format(k, "n/a" if row[k]["mean_r2"] is None else "{:.3f}".format(row[k]["mean_r2"]))
                for k in sorted(row) if k.endswith("s") and k not in ("patient", "session"))))
    return row


def _mean(values):
    import numpy as np
    values = [v for v in values if v is not None and np.isfinite(v)]
    return round(float(np.mean(values)), 4) if values else None


def summarise(rows, day1_rows, settings, on_device_unavailable=None):
    """The JSON of the benchmark from its rows (one per patient and later day); see the module's docstring."""
    import numpy as np

    names = ["unchanged", "full"] + ["{}_{}s".format(kind, n) for n in settings["seconds"]
                                     for kind in ("init_from", "on_device", "scratch")]
    names = [name for name in names if any(name in row for row in rows)]
    mean_r2 = {name: _mean([row[name]["mean_r2"] for row in rows if name in row]) for name in names}
    mean_r = {name: _mean([row[name]["mean_r"] for row in rows if name in row]) for name in names}
    full = mean_r2.get("full")
    fraction, fraction_median = {}, {}
    for name in names:
        if name == "full" or mean_r2[name] is None:
            continue
        fraction[name] = round(mean_r2[name] / full, 3) if full else None
        ratios = [row[name]["mean_r2"] / row["full"]["mean_r2"] for row in rows
                  if name in row and row[name]["mean_r2"] is not None and row["full"]["mean_r2"]]
        fraction_median[name] = round(float(np.median(ratios)), 3) if ratios else None
    margins = {}
    for n in settings["seconds"]:
        a, b = mean_r2.get("init_from_{}s".format(n)), mean_r2.get("scratch_{}s".format(n))
        margins["init_from_{}s".format(n)] = None if a is None or b is None else round(a - b, 4)
        c = mean_r2.get("on_device_{}s".format(n))
        margins["on_device_{}s".format(n)] = None if c is None or b is None else round(c - b, 4)
    decay = []
    for session in sorted({row["session"] for row in rows}):
        mine = [row for row in rows if row["session"] == session]
        entry = {"session": session, "day": session + 1, "patients": len(mine),
                 "unchanged_r2": _mean([r["unchanged"]["mean_r2"] for r in mine]),
                 "unchanged_r": _mean([r["unchanged"]["mean_r"] for r in mine]),
                 "full_r2": _mean([r["full"]["mean_r2"] for r in mine]),
                 "full_r": _mean([r["full"]["mean_r"] for r in mine])}
        for name in ("init_from_60s", "on_device_60s", "scratch_60s"):
            if any(name in r for r in mine):
                entry[name + "_r2"] = _mean([r[name]["mean_r2"] for r in mine if name in r])
        entry["unchanged_fraction_of_full"] = (round(entry["unchanged_r2"] / entry["full_r2"], 3)
                                               if entry["full_r2"] else None)
        decay.append(entry)
    day1 = {"session": 0, "day": 1, "patients": len(day1_rows),
            "within_day_r2": _mean([r["within_day"]["mean_r2"] for r in day1_rows]),
            "within_day_r": _mean([r["within_day"]["mean_r"] for r in day1_rows])}
    on_device = fraction.get("on_device_60s")
    margin = margins.get("init_from_60s")
    targets = [
        {"name": "fraction_of_full.init_from_60s", "value": fraction.get("init_from_60s"),
         "target": ">= {:g}".format(TARGETS["init_from_60s"])},
        {"name": "fraction_of_full.on_device_60s", "value": on_device,
         "target": ">= {:g}".format(TARGETS["on_device_60s"])},
        {"name": "margin_over_scratch_60s", "value": margin, "target": ">= {:g}".format(TARGETS["margin_over_scratch_60s"])},
    ]
    for target, key in zip(targets, ("init_from_60s", "on_device_60s", "margin_over_scratch_60s")):
        target["pass"] = None if target["value"] is None else bool(target["value"] >= TARGETS[key])
    result = {
        "fraction_of_full": {"init_from_60s": fraction.get("init_from_60s"), "on_device_60s": on_device},
        "margin_over_scratch_60s": margin,
        "targets": targets,
        "fraction_of_full_all": fraction,
        "fraction_of_full_median_per_day": fraction_median,
        "margin_over_scratch": margins,
        "mean_r2": mean_r2, "mean_r": mean_r,
        "decay": {"day1": day1, "later_days": decay},
        "rows": rows, "day1_rows": day1_rows,
        "settings": _described(settings),
        "about": "R2 and r: mean over the 5 fingers on each later day's last held_out_s seconds (never trained on), "
                 "then the mean over patients and days; fraction_of_full: that mean over the same mean of 'full' "
                 "(from scratch on the first full_s seconds of the day); margin: init_from minus scratch on the "
                 "same seconds",
    }
    if on_device_unavailable is not None:
        result["on_device"] = None
        result["on_device_reason"] = on_device_unavailable
    return result


def _described(settings):
    described = {"channels": CHANNELS, "rate_hz": RATE_HZ}     # rows measured before these were settings
    described.update(settings)
    described.update(difficulty=DIFFICULTY, split=SPLIT, finetune_defaults=_finetune_defaults())
    return described


def _finetune_defaults():
    from neurohand.train.trainer import FINETUNE_DEFAULTS
    return dict(FINETUNE_DEFAULTS)


def render(result):
    """(headline rows, markdown lines) for bench/results.md, in deploy/bench/report.py's renderer shape."""
    def num(value, digits=3):
        return "—" if value is None else "{:.{}f}".format(value, digits)

    s = result["settings"]
    headline = []
    for target in result["targets"]:
        headline.append((target["name"], num(target["value"]), target["target"],
                         "—" if target["pass"] is None else ("pass" if target["pass"] else "MISSED")))
    lines = ["{} simulated patients x {} sessions ({}, {:g} s each, {} channels at {:g} kHz); day 1 = session 0, "
             "trained from scratch on its first {:g} s; every later day scored on its last {:g} s, which no decoder "
             "trains on. Wall time {:.0f} s.{}".format(
                 s["patients"], s["sessions"], s["difficulty"], s["session_s"], s["channels"], s["rate_hz"] / 1000.0,
                 s["full_s"], s["held_out_s"], result.get("wall_s") or 0,
                 " QUICK: figures not meaningful." if result.get("quick") else ""), ""]
    lines += ["| target | value | goal | |", "|---|---|---|---|"]
    lines += ["| {} | {} | {} | {} |".format(*row) for row in headline]
    lines += ["", "Mean R² (mean r) over patients and later days:", "",
              "| decoder | " + " | ".join("{:g} s".format(n) for n in s["seconds"]) + " |",
              "|---|" + "---|" * len(s["seconds"])]
    for kind in ("init_from", "on_device", "scratch"):
        cells = []
        for n in s["seconds"]:
            name = "{}_{}s".format(kind, n)
            cells.append("{} ({})".format(num(result["mean_r2"].get(name)), num(result["mean_r"].get(name), 2))
                         if result["mean_r2"].get(name) is not None else "—")
        lines.append("| {} | {} |".format(kind.replace("_", "-"), " | ".join(cells)))
    lines += ["", "Full session from scratch ({:g} s): {} ({}); day-1 decoder unchanged: {} ({}).".format(
        s["full_s"], num(result["mean_r2"].get("full")), num(result["mean_r"].get("full"), 2),
        num(result["mean_r2"].get("unchanged")), num(result["mean_r"].get("unchanged"), 2))]
    if result.get("on_device_reason"):
        lines += ["", "On-device recalibration not measured: {}".format(result["on_device_reason"])]
    day1 = result["decay"]["day1"]
    lines += ["", "Decay of the unchanged day-1 decoder (mean over patients; full = from scratch on that day):", "",
              "| day | unchanged R² | unchanged r | full R² | full r | init-from 60 s R² | on-device 60 s R² |",
              "|---|---|---|---|---|---|---|",
              "| 1 (its own day) | {} | {} | | | | |".format(num(day1["within_day_r2"]), num(day1["within_day_r"], 2))]
    for entry in result["decay"]["later_days"]:
        lines.append("| {} | {} | {} | {} | {} | {} | {} |".format(
            entry["day"], num(entry["unchanged_r2"]), num(entry["unchanged_r"], 2), num(entry["full_r2"]),
            num(entry["full_r"], 2), num(entry.get("init_from_60s_r2")), num(entry.get("on_device_60s_r2"))))
    return headline, lines


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m neurohand.deploy.bench.recalibration",
                                     description="the recalibration benchmark (JSON on stdout)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--sessions", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seconds", default=None, metavar="N[,N...]",
                        help="the seconds of each new day to recalibrate with (default 30,60,120; the headline "
                             "figures need 60)")
    parser.add_argument("--finetune", default=None, metavar="JSON",
                        help="training settings for the fine-tuning (init-from) runs only, e.g. "
                             "'{\"learning_rate\": 3e-3}'; the from-scratch runs keep theirs")
    args = parser.parse_args(argv)
    overrides = {}
    if args.seconds is not None:
        try:
            overrides["seconds"] = [int(part) for part in args.seconds.split(",")]
        except ValueError:
            parser.error("--seconds must be whole seconds separated by commas, e.g. 60 or 30,60")
        if any(n < 20 for n in overrides["seconds"]):
            parser.error("--seconds: at least 20 (what recalibrate needs)")
    from neurohand.firmware_bridge.shared.errors import UsageError
    try:
        result = run(args.quick, args.patients, args.sessions, args.jobs, finetune=args.finetune, overrides=overrides)
    except UsageError as exc:
        parser.error(str(exc))
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
