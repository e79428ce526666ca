"""``neurohand recalibrate``: re-fit a bundle to a new session on the device, numpy only (docs/recalibration.md).

A decoder meets different signals on another day (electrodes shift, units
come and go, gains change).  This re-fits, from a short labelled session,
the two parts of the bundle that a closed-form fit can change safely:

1. the feature normalisation (per-feature mean and standard deviation of the
   new session's features, computed by the bundle's own streaming pipeline);
2. the output layer ``positions = sigmoid(W h + b)`` on the last recurrent
   layer's states ``h``, by ridge regression toward the old layer::

       minimise  (1/n) sum_t |y_t - sigmoid(W h_t + b)|^2 + lambda |W - W_old|^2

   solved by Gauss-Newton: each pass linearises the sigmoid at the current
   fit and solves the resulting weighted ridge in closed form (one
   (H+1) x (H+1) system per output).  ``y`` are the session's labels in the
   bundle's label scaling (0..1), at each window's end, as training and
   ``replay`` align them.

The recurrent layers are left as they are.  With a movement-class head
(onnx_weights.RnnWeights.class_names: the output layer's rows past
``n_positions`` are class scores) only the position rows are re-fitted; the
class rows are written back exactly as they were (the session's labels are
positions; there is nothing to fit them to).  The first ``seconds`` of the
session are used; their last :data:`HELD_OUT_FRACTION` is held out to choose
lambda (``ridge="auto"``) and to report R² before (the old bundle unchanged)
and after; the bundle written is then fitted on all of them with that lambda.
The new bundle is written with :func:`neurohand.deploy.bundle.write_bundle`
(fresh golden vectors, manifest) and self-tested with the numpy backend in
its staging folder before it appears at ``out``; the old bundle is only read.
"""
import copy
import hashlib
import os
import sys
import time

import numpy as np

# recording_patient lives below train/ and deploy/ (training runs record the patient with it); it stays
# importable from here, where it was first written.
from neurohand.firmware_bridge.recording.patient import recording_patient
from neurohand.firmware_bridge.shared.checks import check_number
from neurohand.firmware_bridge.shared.errors import BundleError, UsageError

#: Fraction of the used seconds at their end held out for lambda and the reported R².
HELD_OUT_FRACTION = 0.2
#: Least recording used, seconds: below it the held-out tail (4 s) is too short to choose lambda on.
MIN_SECONDS = 20.0
#: A fit needs at least this many decoder steps per parameter of one output (H + 1).
MIN_STEPS_PER_PARAMETER = 2
#: A label moves if its scaled range (0..1 units) over a part reaches this; below it in the part
#: used to fit, the output keeps its old row (nothing to learn from).
MIN_LABEL_RANGE = 0.05
#: An output is scored on the held-out tail if its label's range there reaches this: the R² of
#: a finger that barely moves over a few seconds is noise (a tiny SS_tot).
MIN_SCORED_RANGE = 0.25
#: Lambda candidates for "auto", as multiples of the mean diagonal of the weighted Gram matrix.
AUTO_LAMBDAS = tuple(10.0 ** k for k in range(3, -6, -1))
#: Gauss-Newton passes of a fit (each: one linearisation, one closed-form solve per output).
FINAL_PASSES = 4
#: Largest difference between the written model's outputs and the fitted ones (float32 arithmetic),
#: over the session's first steps (the layer is the same at every step: a prefix proves it).
WRITE_CHECK_TOLERANCE = 1e-4
WRITE_CHECK_STEPS = 500


class Progress(object):
    """One line per stage on stderr when enabled, with the elapsed time."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, message):
        if self.enabled:
            print("recalibrate: [{:5.1f} s] {}".format(time.perf_counter() - self.started, message),
                  file=sys.stderr, flush=True)


def _check_ridge(ridge):
    if isinstance(ridge, str):
        if ridge == "auto":
            return ridge
        try:
            ridge = float(ridge)
        except ValueError:
            raise UsageError("--ridge must be auto or a number > 0, but got {!r}".format(ridge)) from None
    return check_number("--ridge", ridge, minimum=0.0, exclusive_minimum=True)


def _sha256_file(path, chunk_bytes=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the session's features and labels ------------------------------------------

def session_features(pipeline, recording, stop):
    """Unnormalised features of samples [0, stop) as the runtime computes them: (features, ends).

    The recording's frames and gaps go through a fresh ``pipeline.stream()``
    as the decode stage feeds them (windows touching a gap are dropped).
    """
    from neurohand.deploy.runtime.replay_source import recording_items
    from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap
    stream = pipeline.stream(normalised=False)
    block = pipeline.stride_samples * max(1, int(round(0.5 * pipeline.signal_rate / pipeline.stride_samples)))
    scale = np.asarray(recording.scale_uv, dtype=np.float64)
    features, ends = [], []
    for event, _ in recording_items(recording, block, 0, stop):
        if isinstance(event, SampleFrame):
            samples = event.samples.astype(np.float64) * scale
            if not np.all(np.isfinite(samples)):
                bad = int(np.flatnonzero(~np.all(np.isfinite(samples), axis=1))[0])
                raise UsageError("{}: the signals hold NaN or infinite values (first at {:.2f} s); a session "
                                 "to recalibrate on must be clean".format(
                                     recording.path, (stream.samples_seen + bad) / float(recording.signal_rate)))
            rows, row_ends = stream.push(samples)
            features.append(rows)
            ends.append(row_ends)
        elif isinstance(event, SampleGap):
            stream.push_gap(event.missing_samples)
    if not features:
        return np.zeros((0, pipeline.n_features)), np.zeros(0, dtype=np.int64)
    return np.concatenate(features), np.concatenate(ends)


def normalised(pipeline_dtype, raw, mean, std):
    """``(raw - mean) / std`` in the pipeline's dtype, as FeatureStream computes it, as float32 for the model."""
    dtype = np.dtype(pipeline_dtype)
    out = np.subtract(raw.astype(dtype), mean.astype(dtype))
    out /= std.astype(dtype)
    return out.astype(np.float32)


def hidden_states(weights, features):
    """Run the decoder over ``features`` (n, n_features) float32 from a zero state.

    Returns (hidden float64 (n, H): the last recurrent layer's h after each
    step, positions float64 (n, n_outputs)): what the numpy backend computes.
    """
    from neurohand.decoder.backends.base import zero_state
    from neurohand.decoder.backends.numpy_backend import NumpyRnn
    rnn = NumpyRnn(weights)
    state, spare = list(zero_state(weights)), list(zero_state(weights))
    n = len(features)
    hidden = np.empty((n, weights.hidden_size), dtype=np.float64)
    positions = np.empty((n, weights.n_outputs), dtype=np.float32)
    for step in range(n):
        rnn.run(features[step], state, positions[step], spare)
        state, spare = spare, state
        hidden[step] = state[0][-1, 0]
    return hidden, positions.astype(np.float64)


# --- the fit --------------------------------------------------------------------

def _sigmoid(values):
    return 0.5 * (1.0 + np.tanh(0.5 * values))


def _objective(design, targets, theta, theta_old, lam):
    residual = targets - _sigmoid(design.dot(theta))
    penalty = theta[:-1] - theta_old[:-1]
    return float(np.mean(residual ** 2) + lam * np.dot(penalty, penalty))


def _linearised(design, targets, theta):
    """The Gauss-Newton system at ``theta`` for one output: (Gram (p, p), right side (p,)), both over n.

    Linearising sigmoid(x.theta) around the current activations ``a`` with
    slopes ``g = s (1 - s)``, the step ``d`` minimising the data term solves
    ``(X' G^2 X / n) d = X' G (y - s) / n``.
    """
    fitted = _sigmoid(design.dot(theta))
    slope = fitted * (1.0 - fitted)
    weighted = design * slope[:, None]
    return weighted.T.dot(weighted) / len(design), weighted.T.dot(targets - fitted) / len(design)


def _step(gram, gradient, theta, theta_old, lam):
    """Solve the penalised Gauss-Newton system for the step from ``theta`` (bias unpenalised)."""
    size = len(theta)
    penalty = np.ones(size)
    penalty[-1] = 0.0       # the bias is not pulled toward the old one
    matrix = gram.copy()
    # A whisper of ridge on every coefficient keeps the system solvable where a state never varies.
    matrix[np.diag_indices(size)] += lam * penalty + 1e-10 * (np.trace(gram) / size + 1e-12)
    right = gradient - lam * penalty * (theta - theta_old)
    try:
        return np.linalg.solve(matrix, right)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, right, rcond=None)[0]


def _gauss_newton(design, targets, theta, theta_old, lam, passes):
    """``passes`` Gauss-Newton steps on one output's objective; a step that does not lower it is halved."""
    current = _objective(design, targets, theta, theta_old, lam)
    for _ in range(passes):
        gram, gradient = _linearised(design, targets, theta)
        step = _step(gram, gradient, theta, theta_old, lam)
        for _ in range(6):
            candidate = theta + step
            value = _objective(design, targets, candidate, theta_old, lam)
            if value <= current:
                theta, current = candidate, value
                break
            step = step * 0.5
        else:
            break
    return theta


def _design(hidden):
    return np.hstack([hidden, np.ones((len(hidden), 1))])


def _old_theta(head_weight, head_bias):
    return np.hstack([head_weight, head_bias[:, None]]).astype(np.float64)


def fit_head(hidden, targets, head_weight, head_bias, lam, refit=None, passes=FINAL_PASSES):
    """The ridge-to-old output layer for states ``hidden`` (n, H) and ``targets`` (n, n_outputs) in 0..1.

    Minimises (1/n) sum |y - sigmoid(W h + b)|^2 + lam |W - W_old|^2 per
    output with ``passes`` Gauss-Newton steps from the old layer.
    refit : bool (n_outputs,), the outputs to fit (default all); the others
        keep the old layer's row (their labels do not move: nothing to learn).
    Returns (weight (n_outputs, H), bias (n_outputs,)) float64.
    """
    design = _design(hidden)
    theta = _old_theta(head_weight, head_bias)
    for output in range(theta.shape[0]):
        if refit is None or refit[output]:
            theta[output] = _gauss_newton(design, targets[:, output], theta[output], theta[output].copy(), lam,
                                          passes)
    return theta[:, :-1], theta[:, -1]


def fit_position_rows(hidden, targets, head_weight, head_bias, n_positions, lam, refit=None):
    """The whole output layer with its first ``n_positions`` rows re-fitted by :func:`fit_head`.

    targets : (n, n_positions) positions in 0..1.  Rows from ``n_positions`` on
    (a class head's scores) are the old values exactly: float32 -> float64 ->
    float32 gives back the same bits, so the file keeps them as they were.
    Returns (weight (n_outputs, H), bias (n_outputs,)) float64.
    """
    weight, bias = np.array(head_weight, dtype=np.float64), np.array(head_bias, dtype=np.float64)
    weight[:n_positions], bias[:n_positions] = fit_head(hidden, targets, head_weight[:n_positions],
                                                        head_bias[:n_positions], lam, refit)
    return weight, bias


def predict(hidden, weight, bias):
    """Positions sigmoid(W h + b), float64 (n, n_outputs)."""
    return _sigmoid(hidden.dot(weight.T) + bias)


def held_out_r2(truth, prediction, scored):
    """R² per output (nan where not ``scored``) and their mean (nan if none is scored)."""
    from neurohand.deploy.replay import r2_scores
    scores = np.where(scored, r2_scores(truth, prediction), np.nan)
    return scores, (float(np.mean(scores[scored])) if np.any(scored) else float("nan"))


def lambda_candidates(hidden, head_weight, head_bias):
    """The lambdas "auto" tries: :data:`AUTO_LAMBDAS` times the mean diagonal of the states' Gram
    matrix weighted by the old layer's sigmoid slopes (the data term's curvature), largest first."""
    design = _design(hidden)
    fitted = _sigmoid(design.dot(_old_theta(head_weight, head_bias).T))
    slopes = np.mean(fitted * (1.0 - fitted), axis=1)
    scale = float(np.mean(np.sum((design[:, :-1] * slopes[:, None]) ** 2, axis=0)) / len(design)) or 1.0
    return [scale * factor for factor in AUTO_LAMBDAS]


def choose_lambda(hidden_fit, targets_fit, hidden_held, truth_held, head_weight, head_bias, ridge, refit, scored,
                  judged=None):
    """Fit on the first part, score on the held-out one.

    "auto": every candidate takes one Gauss-Newton step from the old layer
    (one linearisation, one solve per candidate), and the one with the least
    squared error on the held-out tail, summed over the outputs ``judged``
    (default: ``scored``) wins: a pooled error, as the R² of a finger over a
    few seconds is too noisy to choose by.  R² is reported for ``scored``.  Returns (lambda, R² per output of the full fit
    at that lambda on the held-out part, table of [lambda, mean held-out R²]
    of the one-step fits).
    """
    judged = scored if judged is None else judged
    if ridge == "auto":
        design, held = _design(hidden_fit), _design(hidden_held)
        old = _old_theta(head_weight, head_bias)
        systems = [_linearised(design, targets_fit[:, o], old[o]) if refit[o] else None for o in range(len(old))]
        table, best = [], None
        for lam in lambda_candidates(hidden_fit, head_weight, head_bias):
            theta = np.array([old[o] + _step(systems[o][0], systems[o][1], old[o], old[o], lam) if refit[o]
                              else old[o] for o in range(len(old))])
            prediction = _sigmoid(held.dot(theta.T))
            error = float(np.sum((truth_held[:, judged] - prediction[:, judged]) ** 2))
            table.append([lam, held_out_r2(truth_held, prediction, scored)[1]])
            if best is None or error < best[1]:
                best = (lam, error)
        ridge = best[0]
    else:
        table = None
    weight, bias = fit_head(hidden_fit, targets_fit, head_weight, head_bias, ridge, refit)
    scores, mean = held_out_r2(truth_held, predict(hidden_held, weight, bias), scored)
    return ridge, scores, table if table is not None else [[ridge, mean]]


# --- the model files --------------------------------------------------------------

def plain_head_names(plain_bytes, head_weight, head_bias, path):
    """(weight, bias) initializer names of the output layer in a loop-free export.

    Found by structure -- the Gemm (transB=1) whose output the Sigmoid making
    ``positions`` reads -- and checked by value against model.onnx's layer, so
    a plain graph that is not the same model is refused rather than left stale.
    """
    from neurohand.decoder import onnx_weights
    model = onnx_weights.parse_onnx(plain_bytes)
    sigmoid = [n for n in model.nodes if n.op_type == "Sigmoid" and onnx_weights.OUTPUT_POSITIONS in n.outputs]
    gemm = [n for n in model.nodes if sigmoid and n.op_type == "Gemm" and sigmoid[0].inputs[:1] == n.outputs[:1]]
    if len(sigmoid) != 1 or len(gemm) != 1 or len(gemm[0].inputs) != 3 or gemm[0].attributes.get("transB") != 1:
        raise BundleError("{!r} does not end in a Gemm and Sigmoid making {!r}; it cannot be recalibrated".format(
            path, onnx_weights.OUTPUT_POSITIONS))
    names = gemm[0].inputs[1], gemm[0].inputs[2]
    for name, expected in zip(names, (head_weight, head_bias)):
        value = model.initializers.get(name)
        if value is None or value.shape != expected.shape or not np.array_equal(value, expected):
            raise BundleError("{!r}: its output layer {!r} is not the one in model.onnx (another model); it "
                              "cannot be recalibrated".format(path, name))
    return names


def _model_files(bundle, weight, bias, old_weight, old_bias):
    """{bundle file name: new bytes} with the output layer replaced in model.onnx (and model_plain.onnx)."""
    from neurohand.decoder import onnx_edit, onnx_weights
    from neurohand.deploy.bundle import MODEL, PLAIN_MODEL
    files = {}
    with open(bundle.model_path, "rb") as handle:
        files[MODEL] = onnx_edit.replace_initializers(handle.read(), {
            onnx_weights.HEAD_WEIGHT: weight.astype(np.float32), onnx_weights.HEAD_BIAS: bias.astype(np.float32)})
    if bundle.plain_model_path is not None:
        with open(bundle.plain_model_path, "rb") as handle:
            plain = handle.read()
        weight_name, bias_name = plain_head_names(plain, old_weight, old_bias, bundle.plain_model_path)
        files[PLAIN_MODEL] = onnx_edit.replace_initializers(plain, {
            weight_name: weight.astype(np.float32), bias_name: bias.astype(np.float32)})
    return files


# --- checks of the session ----------------------------------------------------------

def check_patient(bundle, recording):
    """The patient check: a dict {session, bundle, checked, note}; UsageError naming both when they differ.

    The session's patient is :func:`recording_patient`'s; the bundle's is its
    config.json ``patient`` (written by ``neurohand train`` from its recordings,
    or by an earlier recalibration).  Where either does not say, nothing can be
    checked: the recalibration goes on as before, and ``note`` says so.
    """
    recorded = recording_patient(recording.metadata)
    trained = bundle.config.get("patient")
    if recorded is not None and trained is not None and str(recorded) != str(trained):
        raise UsageError("{} is a session of patient {}, but bundle {!r} was made for patient {}; recalibrate "
                         "only with a session of the same patient".format(
                             recording.path, recorded, bundle.path, trained))
    checked = recorded is not None and trained is not None
    if checked:
        note = "session and bundle are of patient {}".format(trained)
    elif trained is None:
        note = ("the bundle does not name its patient (made before training runs recorded it, or trained on "
                "several patients' sessions): another patient's session cannot be detected")
    else:
        note = ("the session does not name its patient (collect --subject names it): another patient's session "
                "cannot be detected")
    return {"session": recorded, "bundle": trained, "checked": checked, "note": note}


def moving(labels, minimum=MIN_LABEL_RANGE):
    """bool (n_outputs,): which labels move, their range (0..1 units) reaching ``minimum``."""
    if len(labels) == 0:
        return np.zeros(labels.shape[1], dtype=bool)
    return np.ptp(labels, axis=0) >= minimum


def _check_parts(labels, ends, stop, pipeline, weights, ridge, path):
    """Split the windows ending at ``ends`` into the part fitted and the held-out tail; check both.

    Returns (split sample, settled, fit, held, refit, judged, scored):
    boolean masks over the windows (settled: after the warm-up; held: no
    sample shared with the fit part) and over the outputs (refit: moves in the
    fit part; judged: moves in the tail, lambda is chosen on them; scored:
    moves enough there for an R²).  UsageError naming what is missing.
    """
    from neurohand.deploy.replay import WARMUP_S
    rate = pipeline.signal_rate
    split = int(round((1.0 - HELD_OUT_FRACTION) * stop))
    settled = ends >= WARMUP_S * rate
    fit = settled & (ends <= split)
    held = ends - pipeline.window_samples >= split
    needed = MIN_STEPS_PER_PARAMETER * (weights.hidden_size + 1)
    if np.count_nonzero(fit) < needed or np.count_nonzero(held) < 2:
        raise UsageError("{}: {} decoder steps to fit and {} held out; a model with {} hidden units needs at "
                         "least {} to fit (gaps in the recording drop steps): use a longer session".format(
                             path, int(np.count_nonzero(fit)), int(np.count_nonzero(held)), weights.hidden_size,
                             needed))
    refit = moving(labels[fit])
    judged = moving(labels[held])
    scored = moving(labels[held], MIN_SCORED_RANGE)
    if not np.any(refit):
        raise UsageError("{}: the labels do not move in the part used to fit (0-{:.0f} s; range under {:g} of "
                         "the trained range): there is nothing to recalibrate on".format(
                             path, split / rate, MIN_LABEL_RANGE))
    if ridge == "auto" and not np.any(judged):
        raise UsageError("{}: the labels do not move in the held-out tail ({:.0f}-{:.0f} s), so lambda cannot be "
                         "chosen there: use a longer session (--seconds) or give --ridge".format(
                             path, split / rate, stop / rate))
    return split, settled, fit, held, refit, judged, scored


def _used_samples(recording, seconds):
    rate = float(recording.signal_rate)
    available = recording.n_samples / rate
    if seconds is None:
        used = available
    else:
        used = check_number("--seconds", seconds, minimum=0.0, exclusive_minimum=True)
        if used > available + 1e-9:
            raise UsageError("--seconds {:g}: {} holds only {:.1f} s".format(used, recording.path, available))
    if used < MIN_SECONDS:
        raise UsageError("{}: {:.1f} s of session to use; recalibration needs at least {:g} s ({:g} s to fit, "
                         "{:g} s held out), and 60 s or more is better".format(
                             recording.path, used, MIN_SECONDS, MIN_SECONDS * (1 - HELD_OUT_FRACTION),
                             MIN_SECONDS * HELD_OUT_FRACTION))
    return int(round(used * rate))


# --- the command ------------------------------------------------------------------

def recalibrate(bundle_path, recording_path, out_path, seconds=None, ridge="auto", force=False, progress=False):
    """Write a recalibrated copy of BUNDLE ``bundle_path`` at ``out_path`` from a labelled session.

    Parameters
    ----------
    bundle_path : the bundle to start from (only read: it is the rollback)
    recording_path : a recording (``neurohand collect``/``simulate``) with the
        bundle's channels, rate and label stream
    out_path : the new bundle folder (new or empty; an existing bundle only
        with ``force``); neither the old bundle, nor inside it, nor the recording
    seconds : use the first ``seconds`` of the recording (None: all of it)
    ridge : "auto" (chosen on the held-out tail) or lambda > 0
    progress : print one line per stage on stderr

    Returns a dict: out, lambda, r2_before, r2_after (mean over outputs on the
    held-out tail: old bundle unchanged vs re-fitted on the part before it),
    per-output lists r2_before_outputs / r2_after_outputs, seconds_used,
    held_out_s, elapsed_s, lambdas (auto: [lambda, held-out mean R²] per
    candidate), selftest (the new bundle's numpy self-test report).

    Raises UsageError / BundleError / RecordingError (one line) on a bad
    bundle or session; nothing is then left at ``out_path``.
    """
    from neurohand.decoder import onnx_weights
    from neurohand.decoder.features import fit_normalisation
    from neurohand.deploy.bundle import check_bundle_output, write_bundle
    from neurohand.deploy.replay import LabelTruth, check_fits
    from neurohand.deploy.session import load_decoder
    from neurohand.firmware_bridge.recording.file_format import open_recording

    started = time.perf_counter()
    say = Progress(progress)
    ridge = _check_ridge(ridge)
    bundle_path, recording_path, out_path = os.fspath(bundle_path), os.fspath(recording_path), os.fspath(out_path)
    decoder = load_decoder(bundle_path, "numpy")
    try:
        bundle, pipeline = decoder.bundle, decoder.pipeline
        check_bundle_output(out_path, ("bundle", bundle_path), inputs=(recording_path,), force=force)
        with open_recording(recording_path) as recording:
            check_fits(decoder, recording)
            patient_check = check_patient(bundle, recording)
            truth = LabelTruth(recording, bundle.config.get("labels"), recording.path)
            stop = _used_samples(recording, seconds)
            weights = onnx_weights.load_rnn_weights(bundle.model_path)
            # The windows a gap-free session gives: every check of the labels before the long work.
            nominal = np.arange(pipeline.window_samples, stop + 1, pipeline.stride_samples)
            _check_parts(truth.at(nominal), nominal, stop, pipeline, weights, ridge, recording_path)
            say("features of the first {:.1f} s of {}".format(stop / pipeline.signal_rate, recording_path))
            raw, ends = session_features(pipeline, recording, stop)
    finally:
        decoder.close()
    rate = pipeline.signal_rate
    names = truth.names
    labels = truth.at(ends)
    lead = _lead_steps(bundle.config, pipeline)
    targets = labels[np.minimum(np.arange(len(labels)) + lead, len(labels) - 1)]
    split, settled, fit, held, refit, judged, scored = _check_parts(
        labels, ends, stop, pipeline, weights, ridge, recording_path)

    old_mean, old_std = pipeline.normalisation
    head_weight, head_bias = weights.head
    say(patient_check["note"])
    # With a class head, outputs[:n_positions] are the positions and the rest class scores: only the
    # position rows are re-fitted (the session's labels are positions); the class rows stay as they are.
    n_positions = weights.n_positions
    position_weight, position_bias = head_weight[:n_positions], head_bias[:n_positions]
    say("{} decoder steps; the old bundle on the held-out tail".format(len(raw)))
    _, before = hidden_states(weights, normalised(pipeline.dtype, raw, old_mean, old_std))
    before = before[:, :n_positions]
    r2_before, mean_before = held_out_r2(labels[held], before[held], scored)

    say("normalisation, states and output layer fitted on 0-{:.0f} s".format(split / rate))
    mean, std = fit_normalisation(raw[ends <= split])
    states, _ = hidden_states(weights, normalised(pipeline.dtype, raw, mean, std))
    lam, r2_after, table = choose_lambda(states[fit], targets[fit], states[held], labels[held],
                                         position_weight, position_bias, ridge, refit, scored, judged)
    mean_after = float(np.mean(r2_after[scored])) if np.any(scored) else float("nan")

    say("lambda {:.3g}: held-out R2 {:.3f} -> {:.3f}; final fit on all {:.0f} s".format(
        lam, mean_before, mean_after, stop / rate))
    mean, std = fit_normalisation(raw)
    states, _ = hidden_states(weights, normalised(pipeline.dtype, raw, mean, std))
    weight, bias = fit_position_rows(states[settled], targets[settled], head_weight, head_bias, n_positions, lam,
                                     refit)
    fitted = predict(states, weight, bias)

    config = copy.deepcopy(bundle.config)
    config["pipeline"]["normalisation"] = {"mean": mean.tolist(), "std": std.tolist()}
    patient = patient_check["session"] if patient_check["session"] is not None else patient_check["bundle"]
    if patient is not None:
        config["patient"] = patient
    summary = {
        "out": os.path.abspath(out_path), "lambda": float(lam),
        "r2_before": mean_before, "r2_after": mean_after,
        "r2_before_outputs": _floats(r2_before), "r2_after_outputs": _floats(r2_after), "label_names": names,
        "kept_outputs": [name for name, flag in zip(names, refit) if not flag],
        "seconds_used": stop / rate, "held_out_s": (stop - split) / rate, "steps": int(len(raw)),
        "ridge": "auto" if ridge == "auto" else "given", "lambdas": table, "target_lead_steps": lead,
        "kept_class_rows": list(weights.class_names), "patient": patient_check,
    }
    config["recalibration"] = {
        "from_bundle": {"path": os.path.abspath(bundle_path), "digest": bundle.digest},
        "session": {"path": os.path.abspath(recording_path), "sha256": _sha256_file(recording_path),
                    "patient": patient_check["session"]},
        "refitted": ["pipeline.normalisation", onnx_weights.HEAD_WEIGHT, onnx_weights.HEAD_BIAS],
        "patient_check": {key: patient_check[key] for key in ("session", "bundle", "checked")},
        "previous": bundle.config.get("recalibration"),
        "unix_time": time.time(),
    }
    config["recalibration"].update((key, summary[key]) for key in (
        "lambda", "ridge", "r2_before_outputs", "r2_after_outputs", "kept_outputs", "seconds_used", "held_out_s",
        "steps", "target_lead_steps", "kept_class_rows"))
    config["recalibration"].update(r2_before=_floats([mean_before])[0], r2_after=_floats([mean_after])[0],
                                   lambdas=[[lam_, _floats([r2])[0]] for lam_, r2 in table])

    say("writing and self-testing the new bundle")
    files = _model_files(bundle, weight, bias, head_weight, head_bias)
    outcome = {}

    def check(staging):
        outcome["selftest"] = _check_new_bundle(staging, raw, fitted)

    write_bundle(files, config, out_path, ("bundle", bundle_path), force=force, inputs=(recording_path,),
                 check=check)
    summary["selftest"] = outcome["selftest"]
    summary["elapsed_s"] = time.perf_counter() - started
    say("done: {}".format(out_path))
    return summary


def _floats(values):
    return [float(v) if np.isfinite(v) else None for v in values]


def _lead_steps(config, pipeline):
    """Decoder steps the bundle was trained to lead its labels by (training target_lead_s), 0 if none."""
    training = (config.get("settings") or {}).get("training") or {}
    lead_s = training.get("target_lead_s") or 0.0
    if isinstance(lead_s, bool) or not isinstance(lead_s, (int, float)) or not 0.0 <= lead_s < 10.0:
        return 0
    return int(round(lead_s * pipeline.signal_rate / pipeline.stride_samples))


def _check_new_bundle(path, raw, fitted):
    """Self-test the written bundle (numpy backend) and check it computes the fitted outputs; its report.

    BundleError when either fails: write_bundle then removes it.
    """
    from neurohand.deploy.selftest import record_result, run_selftest
    from neurohand.deploy.session import load_decoder
    decoder = load_decoder(path, "numpy")
    try:
        report = run_selftest(decoder.bundle, decoder.backend)
        if not report["passed"]:
            raise BundleError("the recalibrated bundle failed its self-test (max error {}); nothing was "
                              "written".format(report["max_abs_error"]))
        mean, std = decoder.pipeline.normalisation
        features = normalised(decoder.pipeline.dtype, raw, mean, std)
        state = decoder.backend.initial_state()
        worst = 0.0
        for step in range(min(len(features), WRITE_CHECK_STEPS)):
            outputs, state = decoder.backend.step(features[step], state)
            worst = max(worst, float(np.max(np.abs(outputs - fitted[step]))))
        if not worst <= WRITE_CHECK_TOLERANCE:
            raise BundleError("the recalibrated bundle's model differs from the fit by {:.3g} (more than {:g}); "
                              "nothing was written".format(worst, WRITE_CHECK_TOLERANCE))
        report["max_abs_error_vs_fit"] = worst
        record_result(decoder.bundle, report)
    finally:
        decoder.close()
    return report
