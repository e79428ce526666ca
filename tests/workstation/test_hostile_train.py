"""Hostile inputs to import, train and evaluate (issue 14): every one is refused in one line, before any
work where it concerns an output path, and never with a traceback, an overwritten input or code run
from a checkpoint.

1. low-rate envelope tables (window/stride defaults fitted to the rate; values that do not fit refused,
   naming values that do)
2. envelopes that dip below zero under log compression (the channels and the fix named)
3. damaged, truncated, foreign and crafted checkpoints for ``train --resume``
4. NinaPro files with unexpected variable types, shapes or values
5. output paths: an input, an existing file or run without --force, unwritable or odd paths
"""
import io
import json
import os
import pickle
import shutil
import warnings
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_io = pytest.importorskip("scipy.io")
pytest.importorskip("onnxruntime")

from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.firmware_bridge.recording.file_format import RecordingWriter, open_recording  # noqa: E402
from neurohand.firmware_bridge.shared.errors import ConfigError, NeurohandError, UsageError  # noqa: E402
from neurohand.train import importers, trainer  # noqa: E402
from test_import import CSV, fake_ninapro  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402

ONE_EPOCH = dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], epochs=1))


def cli_error(capsys, *args):
    """Run the CLI in-process; assert exit status 2 and one stderr line; return that line."""
    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 2, args
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def write_config(path, config):
    path.write_text(json.dumps(config))
    return str(path)


def envelope_recording(path, signals, rate=100.0, names=None, repetitions=True):
    """A recording of the given envelope ``signals`` (n, n_channels) with one smooth label."""
    n, n_channels = signals.shape
    labels = (0.5 + 0.4 * np.sin(np.arange(n) / rate))[:, None]
    with RecordingWriter(str(path), rate, names or ["emg{}".format(i + 1) for i in range(n_channels)],
                         dtype="float32", metadata={"signal_kind": "envelope"},
                         label_streams={"fingers": {"rate": rate, "names": ["f0"]}}) as w:
        w.append_signals(signals.astype(np.float32))
        w.append_labels("fingers", labels.astype(np.float32))
        if repetitions:
            period = int(3 * rate)
            for k in range(min(10, n // period)):
                w.add_event(k * period, "repetition", k + 1)
                w.add_event(k * period + int(2 * rate), "repetition", 0)
    return str(path)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return str(make_recording(tmp_path_factory.mktemp("rec") / "r.nhr", seconds=40.0))


@pytest.fixture(scope="module")
def one_epoch_run(recording, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "run")
    trainer.train_run([recording], run_dir, ONE_EPOCH, seed=1, progress=False)
    return run_dir


# --- 1. low sample rates ------------------------------------------------------------

@pytest.mark.parametrize("rate, window, stride, fitted", [
    (100.0, 20, 2, []),                       # NinaPro DB1: the defaults as they are
    (10.0, 4, 1, ["window_s", "stride_s"]),   # 0.02 s is no sample, 0.2 s only 2
    (20.0, 4, 1, ["stride_s"]),
    (30.0, 6, 1, []),                         # 0.6 samples of stride round to 1 as they are
    (5.0, 4, 1, ["window_s", "stride_s"]),
    (1.0, 4, 1, ["window_s", "stride_s"]),
])
def test_envelope_defaults_are_fitted_to_the_rate(rate, window, stride, fitted):
    settings = trainer.resolve_settings({}, "envelope")
    pipeline, choice = trainer.fit_windows(settings, {}, rate)
    assert (choice["window_samples"], choice["stride_samples"]) == (window, stride)
    assert choice["window_s"] == pytest.approx(window / rate) and choice["stride_s"] == pytest.approx(stride / rate)
    assert choice["fitted_to_rate"] == fitted
    if not fitted:
        # Nothing to fit: the settings (and so the digest that --resume checks) stay as they were.
        assert pipeline == settings["pipeline"]
    else:
        assert "raised from the default" in trainer.describe_windows(choice)


def test_raw_defaults_at_a_low_rate_are_whole_samples_too():
    settings = trainer.resolve_settings({}, "raw")
    _, choice = trainer.fit_windows(settings, {}, 20.0)
    assert (choice["window_samples"], choice["stride_samples"]) == (4, 1)
    _, choice = trainer.fit_windows(settings, {}, 10000.0)
    assert (choice["window_samples"], choice["stride_samples"], choice["fitted_to_rate"]) == (1000, 200, [])


@pytest.mark.parametrize("rate", [10.0, 5.0])
def test_a_10_hz_envelope_table_trains_and_says_what_it_chose(rate, tmp_path, capsys):
    path = make_recording(tmp_path / "slow.nhr", seconds=90.0, rate=rate)
    capsys.readouterr()
    config = write_config(tmp_path / "tiny.json", TINY_CONFIG)
    assert cli.main(["train", str(path), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet",
                     "--config", config]) == 0
    out = capsys.readouterr().out
    assert "features: window {:g} s (4 samples), stride {:g} s (1 sample)".format(4 / rate, 1 / rate) in out, out
    with open(tmp_path / "run" / "metrics.json") as handle:
        features = json.load(handle)["features"]
    assert features["window_samples"] == 4 and features["stride_samples"] == 1
    assert set(features["fitted_to_rate"]) == {"window_s", "stride_s"}
    with open(tmp_path / "run" / "config.json") as handle:
        pipeline = json.load(handle)["pipeline"]
    assert (pipeline["window_samples"], pipeline["stride_samples"]) == (4, 1)


@pytest.mark.parametrize("pipeline, named", [
    ({"stride_s": 0.02}, "pipeline stride_s = 0.02 s is 0 samples at 10 Hz"),
    ({"window_s": 0.04}, "pipeline window_s = 0.04 s is 0 samples at 10 Hz"),
    ({"window_s": 0.2, "stride_s": 0.001}, "pipeline stride_s = 0.001 s is 0 samples"),
])
def test_user_windows_that_are_no_sample_are_refused_naming_values_that_fit(pipeline, named, tmp_path, capsys):
    path = make_recording(tmp_path / "slow.nhr", seconds=60.0, rate=10.0)
    config = write_config(tmp_path / "c.json", {"pipeline": pipeline})
    err = cli_error(capsys, "train", path, "--out", tmp_path / "run", "--config", config)
    assert named in err and "multiple of 0.1 s" in err and "window_s 0.4, stride_s 0.1" in err, err
    assert not os.path.exists(tmp_path / "run")


# --- 2. negative envelopes under log compression --------------------------------------

def _positive(n=4000, n_channels=4, seed=0):
    return np.random.default_rng(seed).random((n, n_channels)) * 0.05 + 0.01


def _dip_everywhere(signals):
    signals[:, 2] -= 0.06
    return signals, ["emg3"], ["emg1", "emg2", "emg4"]


def _two_channels(signals):
    signals[:, 0] -= 0.2
    signals[1000:1200, 3] = -0.5
    return signals, ["emg1", "emg4"], ["emg2", "emg3"]


def _test_split_only(signals):
    # Repetition 5 (a test repetition) only: training and validation features are finite, so only
    # a check of every split catches it (it would otherwise end as a NaN test score).
    signals[4 * 300 + 50:4 * 300 + 150, 1] = -0.3
    return signals, ["emg2"], ["emg1", "emg3", "emg4"]


@pytest.mark.parametrize("damage", [_dip_everywhere, _two_channels, _test_split_only])
def test_negative_envelopes_train_and_the_warning_names_the_channels(damage, tmp_path):
    signals, bad, good = damage(_positive())
    path = envelope_recording(tmp_path / "neg.nhr", signals)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train_run([path], str(tmp_path / "run"), ONE_EPOCH, seed=0, progress=False)
    messages = [str(w.message) for w in caught if "below zero" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    for name in bad:
        assert name + " (" in messages[0], messages[0]
    for name in good:
        assert name + " (" not in messages[0], messages[0]
    # numpy's "invalid value in log" never shows: the features are finite, not NaN.
    assert not [w for w in caught if "invalid value" in str(w.message)]
    assert (tmp_path / "run" / "model.onnx").is_file()


def test_nan_samples_are_named(tmp_path):
    signals = _positive()
    signals[100:103, 3] = np.nan
    path = envelope_recording(tmp_path / "nan.nhr", signals)
    with pytest.raises(UsageError, match=r"emg4 \(3 samples\)"):
        trainer.train_run([path], str(tmp_path / "run2"), ONE_EPOCH, seed=0, progress=False)


# --- 3. checkpoints -----------------------------------------------------------------

class _Payload(object):
    """Unpickling this creates ``marker``: what an attacker's code would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _torch_bytes(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _valid(run_dir):
    with open(os.path.join(run_dir, "checkpoint.pt"), "rb") as handle:
        return handle.read()


def _document(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)


def _edited(run_dir, edit):
    document = _document(run_dir)
    edit(document)
    return _torch_bytes(document)


UNPICKLED_NOTHING = "it was not loaded (unpickling it could run code)"
CHECKPOINTS = {   # case -> (content of checkpoint.pt, what the one line says)
    "truncated": (lambda run, marker: _valid(run)[:len(_valid(run)) // 2], "damaged, truncated"),
    "empty": (lambda run, marker: b"", "damaged, truncated"),
    "random bytes": (lambda run, marker: bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
                     UNPICKLED_NOTHING),
    "text": (lambda run, marker: b"not a checkpoint\n", UNPICKLED_NOTHING),
    "flipped byte": (lambda run, marker: (lambda b: b[:300] + bytes([b[300] ^ 0xFF]) + b[301:])(_valid(run)),
                     UNPICKLED_NOTHING),
    "plain pickle that runs code": (lambda run, marker: pickle.dumps({"format": _Payload(marker)}),
                                    UNPICKLED_NOTHING),
    "torch file that runs code": (lambda run, marker: _torch_bytes({"format": trainer.CHECKPOINT_FORMAT,
                                                                    "model": _Payload(marker)}), UNPICKLED_NOTHING),
    "foreign tensor": (lambda run, marker: _torch_bytes(torch.zeros(3)), "not a neurohand training checkpoint"),
    "foreign state dict": (lambda run, marker: _torch_bytes({"weight": torch.zeros(3)}),
                           "not a neurohand training checkpoint"),
    "zip of text": (lambda run, marker: (lambda buf: (zipfile.ZipFile(buf, "w").writestr("a.txt", "x"),
                                                      buf.getvalue())[1])(io.BytesIO()), "damaged, truncated"),
    "other version": (lambda run, marker: _edited(run, lambda d: d.update(format_version=99)), "format version 99"),
    "missing entries": (lambda run, marker: _edited(run, lambda d: d.pop("optimizer")), "lacks optimizer"),
    "weights not tensors": (lambda run, marker: _edited(run, lambda d: d.update(model={"w": [1, 2]})),
                            "model must map parameter names to tensors"),
    "weights of another model": (lambda run, marker: _edited(
        run, lambda d: d.update(model={k: torch.zeros(2, 2) for k in d["model"]})), "does not fit this model"),
    "state of wrong types": (lambda run, marker: _edited(run, lambda d: d["state"].update(epoch="1")),
                             "training state 'epoch' is '1', not an integer"),
    "history of wrong types": (lambda run, marker: _edited(run, lambda d: d["state"]["history"].update(lr=["x"])),
                               "training history must hold"),
    "optimizer of another model": (lambda run, marker: _edited(
        run, lambda d: d.update(optimizer={"state": {}, "param_groups": []})), "does not fit this model and optimiser"),
    "optimizer moments of wrong shape": (lambda run, marker: _edited(
        run, lambda d: d["optimizer"]["state"][0].update(exp_avg=torch.zeros(1))),
        "optimiser state 'exp_avg' does not fit"),
    "elapsed time NaN": (lambda run, marker: _edited(run, lambda d: d["state"].update(elapsed_s=float("nan"))),
                         "training state out of range"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_a_bad_checkpoint_is_one_line_and_never_runs_code(case, recording, one_epoch_run, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, run_dir)
    marker = str(tmp_path / "code-ran")
    build, message = CHECKPOINTS[case]
    content = build(one_epoch_run, marker)
    with open(os.path.join(run_dir, "checkpoint.pt"), "wb") as handle:
        handle.write(content)
    # The run's own settings (the epoch limit may grow on resume), so only the checkpoint can be refused.
    config = write_config(tmp_path / "c.json", dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], epochs=2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = cli_error(capsys, "train", recording, "--out", run_dir, "--resume", "--quiet", "--seed", 1,
                        "--config", config)
    assert message in err, err
    assert not os.path.exists(marker), "unpickling ran code"
    # Nothing of the run was replaced by the refused resume.
    assert _valid(run_dir) == content


def test_a_directory_as_checkpoint(one_epoch_run, tmp_path):
    os.mkdir(str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ConfigError, match="not a file"):
        trainer.load_checkpoint(str(tmp_path / "checkpoint.pt"))


def test_the_intact_checkpoint_still_resumes(recording, one_epoch_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, run_dir)
    config = dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], epochs=2))
    summary = trainer.train_run([recording], run_dir, config, seed=1, progress=False, resume=True)
    assert summary["epochs_run"] == 2


# --- 4. NinaPro files ---------------------------------------------------------------

N = 600


def _sparse():
    import scipy.sparse
    return scipy.sparse.csr_matrix(np.ones((N, 10)))


NINAPRO = {
    "emg as a cell array": ({"emg": np.array([[np.ones(3)], [np.ones(2)]], dtype=object)}, "emg .*cell array"),
    "emg as a struct": ({"emg": {"a": np.ones(3)}}, "emg .*struct"),
    "emg as text": ({"emg": "hello"}, "emg .*char array"),
    "emg complex": ({"emg": np.ones((N, 10)) * (1 + 1j)}, "emg .*complex"),
    "emg sparse": ({"emg": "sparse"}, "emg must be a numeric matrix"),
    "emg beyond float32": ({"emg": np.full((N, 10), 1e300)}, "emg has values beyond the float32 range"),
    "emg inf": ({"emg": np.where(np.arange(N)[:, None] == 7, np.inf, np.ones((N, 10)))}, "first at sample 7"),
    "emg without samples": ({"emg": np.zeros((0, 10))}, "emg must be a \\(samples, channels\\) matrix"),
    "emg without channels": ({"emg": np.zeros((N, 0))}, "emg must be a \\(samples, channels\\) matrix"),
    "emg 3-d": ({"emg": np.zeros((N, 10, 2))}, "emg must be a \\(samples, channels\\) matrix"),
    "glove with 21 columns": ({"glove": np.zeros((N, 21))}, "22 CyberGlove columns"),
    "glove a vector": ({"glove": np.zeros(N)}, "22 CyberGlove columns"),
    "glove too short": ({"glove": np.zeros((N - 5, 22))}, "glove has 595 samples but emg has 600"),
    "glove as text": ({"glove": "abc"}, "glove .*char array"),
    "glove beyond float32": ({"glove": np.full((N, 22), -1e39)}, "glove has values beyond the float32 range"),
    "restimulus float with NaN": ({"restimulus": np.where(np.arange(N) == 5, np.nan, 1.0)[:, None]},
                                  "restimulus .*NaN .*sample 5"),
    "restimulus fractional": ({"restimulus": np.full((N, 1), 1.5)}, "restimulus must hold whole numbers"),
    "restimulus huge": ({"restimulus": np.full((N, 1), 1e30)}, "restimulus must hold whole numbers up to 2\\*\\*53"),
    "restimulus as text": ({"restimulus": "abc"}, "restimulus .*char array"),
    "restimulus as a cell": ({"restimulus": np.array([[np.ones(3)], [np.ones(2)]], dtype=object)},
                             "restimulus .*cell array"),
    "restimulus a matrix": ({"restimulus": np.zeros((N // 2, 2))}, "restimulus must be a vector"),
    "rerepetition too long": ({"rerepetition": np.zeros((N + 1, 1))}, "rerepetition has 601 samples"),
    "frequency as text": ({"frequency": "fast"}, "frequency must be one finite number"),
    "frequency NaN": ({"frequency": np.nan}, "frequency must be one finite number"),
    "frequency absurd": ({"frequency": 1e300}, "sample rate in the file must be at most"),
    "frequency negative": ({"frequency": -100.0}, "sample rate in the file must be greater than 0"),
}


@pytest.mark.parametrize("case", sorted(NINAPRO))
def test_a_ninapro_file_with_unexpected_contents_is_one_line(case, tmp_path, capsys):
    extra, message = NINAPRO[case]
    if isinstance(extra.get("emg"), str) and extra["emg"] == "sparse":
        extra = {"emg": _sparse()}
    fake_ninapro(str(tmp_path / "bad.mat"), n=N, extra=extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # an overflow or cast warning means a value got through
        with pytest.raises(NeurohandError, match=message) as caught:
            importers.import_ninapro(str(tmp_path / "bad.mat"), str(tmp_path / "bad.nhr"))
    assert "\n" not in str(caught.value)
    assert not os.path.exists(tmp_path / "bad.nhr")


@pytest.mark.parametrize("content, message", [
    (b"", "cannot read"),
    (b"not a mat file at all", "cannot read"),
    (bytes(range(256)) * 8, "cannot read"),
    (b"MATLAB 5.0 MAT-file".ljust(128, b" "), "cannot read"),          # a header and nothing after it
    (b"MATLAB 7.3 MAT-file".ljust(512, b" ") + b"\x89HDF\r\n\x1a\n", "v7.3"),
    (b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "v7.3"),
])
def test_a_file_that_is_no_v5_mat_file_is_one_line(content, message, tmp_path, capsys):
    (tmp_path / "x.mat").write_bytes(content)
    err = cli_error(capsys, "import", "ninapro", tmp_path / "x.mat", "--out", tmp_path / "x.nhr")
    assert message in err
    assert not os.path.exists(tmp_path / "x.nhr")


def test_a_truncated_mat_file_and_missing_variables(tmp_path, capsys):
    fake_ninapro(str(tmp_path / "full.mat"))
    data = (tmp_path / "full.mat").read_bytes()
    (tmp_path / "cut.mat").write_bytes(data[:len(data) // 2])
    cli_error(capsys, "import", "ninapro", tmp_path / "cut.mat", "--out", tmp_path / "cut.nhr")
    fake_ninapro(str(tmp_path / "none.mat"), drop=("emg", "glove", "restimulus", "rerepetition"))
    err = cli_error(capsys, "import", "ninapro", tmp_path / "none.mat", "--out", tmp_path / "none.nhr")
    assert "emg, glove, restimulus, rerepetition" in err


@pytest.mark.parametrize("row, message", [
    ("0,1e300,0,1,0.5,0.5,0", "beyond the float32 range"),
    ("0,1,0,1,1e39,0.5,0", "label column 'finger_a'"),
    ("0,1,0,1,0.5,0.5,1e30", "whole numbers up to 2\\*\\*53"),
])
def test_csv_values_out_of_range_are_refused_not_warned(row, message, tmp_path):
    (tmp_path / "t.csv").write_text(CSV + row + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UsageError, match=message):
            importers.import_csv(str(tmp_path / "t.csv"), str(tmp_path / "t.nhr"), 100, ["emg*"], ["finger_*"],
                                 ["rep=repetition"])
    assert not os.path.exists(tmp_path / "t.nhr")


def test_an_input_file_name_that_is_not_utf8_still_imports(tmp_path):
    # The recording's metadata is UTF-8; a Latin-1 file name (b"\xe9" = e-acute) keeps its readable part.
    from neurohand.firmware_bridge.recording.file_format import open_recording
    name = os.path.join(os.fsencode(str(tmp_path)), b"sess\xe9.csv")
    with open(name, "w") as handle:
        handle.write(CSV)
    importers.import_csv(os.fsdecode(name), str(tmp_path / "t.nhr"), 100, ["emg*"], ["finger_*"],
                         ["rep=repetition"])
    with open_recording(str(tmp_path / "t.nhr")) as rec:
        assert rec.metadata["source_file"] == "sess\ufffd.csv"


# --- 5. output paths ----------------------------------------------------------------

def _import_ninapro(source, out, *more):
    return ["import", "ninapro", source, "--out", out] + list(more)


def _import_csv(source, out, *more):
    return ["import", "csv", source, "--out", out, "--rate", "100", "--signals", "emg*", "--labels",
            "finger_*"] + list(more)


@pytest.fixture(params=["ninapro", "csv"])
def source(request, tmp_path):
    """(input file, function building the import command line) for each importer."""
    if request.param == "ninapro":
        fake_ninapro(str(tmp_path / "in.mat"))
        return str(tmp_path / "in.mat"), _import_ninapro
    (tmp_path / "in.csv").write_text(CSV)
    return str(tmp_path / "in.csv"), _import_csv


def test_import_never_writes_over_its_input(source, tmp_path, capsys):
    path, command = source
    before = open(path, "rb").read()
    os.symlink(path, str(tmp_path / "link"))
    for out in (path, str(tmp_path / "link"), os.path.join(str(tmp_path), ".", os.path.basename(path))):
        for force in ((), ("--force",)):
            err = cli_error(capsys, *command(path, out, *force))
            assert "is an input of this command" in err
    assert open(path, "rb").read() == before


def test_import_replaces_an_existing_output_only_with_force(source, tmp_path, capsys):
    path, command = source
    (tmp_path / "old.nhr").write_bytes(b"precious")
    err = cli_error(capsys, *command(path, tmp_path / "old.nhr"))
    assert "already exists; pass --force" in err
    assert (tmp_path / "old.nhr").read_bytes() == b"precious"
    assert cli.main([str(a) for a in command(path, tmp_path / "old.nhr", "--force")]) == 0
    with open_recording(str(tmp_path / "old.nhr")) as rec:
        assert rec.n_samples > 0


@pytest.mark.parametrize("out, message", [
    ("/proc/neurohand-test.nhr", "inside /proc"),
    ("", "empty path"),
    ("/dev/null", "not a regular file"),
    ("{tmp}", "is a directory"),
    ("{tmp}/missing/x.nhr", "does not exist"),
])
def test_import_refuses_odd_outputs_before_reading_the_input(out, message, tmp_path, capsys):
    # The input is garbage: an output error must come first, before any reading.
    (tmp_path / "garbage.mat").write_bytes(b"garbage")
    (tmp_path / "garbage.csv").write_text("garbage")
    out = out.format(tmp=tmp_path)
    for command in (_import_ninapro(tmp_path / "garbage.mat", out),
                    _import_csv(tmp_path / "garbage.csv", out, "--force")):
        err = cli_error(capsys, *command)
        assert "--out" in err and message in err, err
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


@pytest.mark.parametrize("out, message", [
    ("/proc/neurohand-run", "inside /proc"),
    ("", "empty path"),
    ("/dev/null", "not a directory"),
    ("{recording}", "not a directory"),
    ("{tmp}/afile", "not a directory"),
    ("{tmp}/full", "not empty; pass --force"),
    ("{tmp}/afile/run", "afile' exists and is not a directory"),
])
def test_train_refuses_odd_run_directories_before_loading_data(out, message, recording, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    out = out.format(tmp=tmp_path, recording=recording)
    # A garbage recording: the --out error must come before it is read.
    (tmp_path / "garbage.nhr").write_bytes(b"garbage")
    for rec in (recording, str(tmp_path / "garbage.nhr")):
        err = cli_error(capsys, "train", rec, "--out", out, "--quiet")
        assert message in err, err
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_train_run_files_never_replace_an_input(recording, one_epoch_run, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, run_dir)
    # A --config that happens to be where the run writes config.json, and a recording named like a run file.
    config = write_config(tmp_path / "run" / "config.json", ONE_EPOCH)
    err = cli_error(capsys, "train", recording, "--out", run_dir, "--config", config, "--force", "--quiet")
    assert "config.json" in err and "input" in err
    shutil.copy(recording, os.path.join(str(tmp_path), "model.onnx"))
    err = cli_error(capsys, "train", tmp_path / "model.onnx", "--out", tmp_path, "--force", "--quiet")
    assert "model.onnx" in err and "input" in err
    os.remove(os.path.join(run_dir, "report.png"))
    os.mkdir(os.path.join(run_dir, "report.png"))
    err = cli_error(capsys, "train", recording, "--out", run_dir, "--force", "--quiet")
    assert "report.png" in err and "not a regular file" in err


def test_train_over_an_existing_run_needs_force(recording, one_epoch_run, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, run_dir)
    before = _valid(run_dir)
    err = cli_error(capsys, "train", recording, "--out", run_dir, "--quiet")
    assert "already holds a run" in err and "--resume" in err and "--force" in err
    assert _valid(run_dir) == before
    summary = trainer.train_run([recording], run_dir, ONE_EPOCH, seed=2, progress=False, force=True)
    assert summary["seed"] == 2 and _valid(run_dir) != before


def test_train_creates_missing_parent_directories(tmp_path):
    nested = str(tmp_path / "runs" / "a" / "b")
    assert trainer.check_run_dir(nested, resume=False) == nested
    assert not os.path.exists(str(tmp_path / "runs"))
    with pytest.raises(UsageError, match="inside /proc"):
        trainer.check_run_dir("/proc/neurohand/a/b", resume=False)
