"""Hostile bundles and self-test records (issue 14): what ``run``'s gate and a bundle's opening refuse.

A bundle directory and its self-test records are files anyone with write access
to the device can change; the manifest covers the bundled files, not the
records, the engine or what else lies in the folder.  Each refusal is one line.
"""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from neurohand.deploy import selftest
from neurohand.deploy.bundle import load_bundle, make_bundle, open_bundle_backend, sha256_of
from neurohand.firmware_bridge.shared.errors import BundleError, ConfigError, UsageError

DATA = os.path.join(os.path.dirname(__file__), "data")
RUN_DIR = os.path.join(DATA, "replay_run")


def neurohand(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def assert_one_line_error(result):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def ort_available():
    try:
        import onnxruntime
    except ImportError:
        return False
    return onnxruntime is not None


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A bundle of the replay fixture (5 labels, 5 outputs), never changed: tests work on copies."""
    path = str(tmp_path_factory.mktemp("hostile") / "bundle")
    make_bundle(RUN_DIR, path)
    return path


@pytest.fixture
def bundle_path(pristine, tmp_path):
    path = str(tmp_path / "bundle")
    shutil.copytree(pristine, path)
    return path


def rewrite(bundle_path, name, data):
    """Replace a bundled file and make the manifest agree, as someone forging a bundle would."""
    with open(os.path.join(bundle_path, name), "wb") as handle:
        handle.write(data)
    manifest_path = os.path.join(bundle_path, "manifest.json")
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["files"][name] = {"sha256": sha256_of(os.path.join(bundle_path, name)),
                               "bytes": os.path.getsize(os.path.join(bundle_path, name))}
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)


def rewrite_golden(bundle_path, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    rewrite(bundle_path, "golden.npz", buffer.getvalue())


def golden(bundle_path):
    return load_bundle(bundle_path).golden_vectors()


# --- item 1: a self-test that tests nothing ------------------------------------------------------

def _few(features, outputs):
    return {"zero steps": (features[:, :0], outputs[:, :0]),
            "one step": (features[:, :1], outputs[:, :1]),
            "99 steps": (features[:, :99], outputs[:, :99]),
            "one sequence": (features[1:2], outputs[1:2]),
            "no sequence": (features[:0], outputs[:0]),
            "all-zero features": (np.zeros_like(features), outputs),
            "NaN features": (np.where(np.arange(features.shape[1])[None, :, None] == 5, np.nan, features), outputs),
            "infinite outputs": (features, outputs + np.inf)}


@pytest.mark.parametrize("case", sorted(_few(np.zeros((3, 250, 1)), np.zeros((3, 250, 1)))))
def test_golden_vectors_too_short_or_degenerate_are_refused_and_record_nothing(bundle_path, case):
    features, outputs = golden(bundle_path)
    features, outputs = _few(features, outputs)[case]
    rewrite_golden(bundle_path, features=features.astype(np.float32), outputs=outputs.astype(np.float32))
    result = neurohand("selftest", bundle_path, "--backend", "numpy")
    assert_one_line_error(result)
    assert "golden" in result.stderr
    assert not os.path.isdir(os.path.join(bundle_path, "selftest")) or \
        os.listdir(os.path.join(bundle_path, "selftest")) == []
    with pytest.raises(BundleError, match="not been self-tested"):
        selftest.require_passed_selftest(load_bundle(bundle_path), "numpy")


def test_bundles_made_with_100_step_golden_vectors_still_self_test(bundle_path):
    """Bundles made before GOLDEN_STEPS was 250 hold 3 x 100 steps (and no states): still accepted."""
    features, outputs = golden(bundle_path)
    rewrite_golden(bundle_path, features=features[:, :100], outputs=outputs[:, :100])
    result = neurohand("selftest", bundle_path, "--backend", "numpy", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 300
    assert selftest.require_passed_selftest(load_bundle(bundle_path), "numpy")["passed"] is True


def test_nan_outputs_fail_the_selftest_with_a_strict_json_record(bundle_path):
    from neurohand.decoder.backends import create_backend
    bundle = load_bundle(bundle_path)

    class NanBackend(object):
        name = "numpy"

        def __init__(self, inner):
            self.inner, self.n_features, self.n_outputs = inner, inner.n_features, inner.n_outputs

        def initial_state(self):
            return self.inner.initial_state()

        def step(self, features, state):
            outputs, state = self.inner.step(features, state)
            return outputs * np.nan, state

        def state_arrays(self, state):
            return self.inner.state_arrays(state)

    report = selftest.run_selftest(bundle, NanBackend(create_backend("numpy", bundle.model_path)))
    assert report["passed"] is False and report["max_abs_error"] is None
    json.dumps(report, allow_nan=False)
    selftest.record_result(bundle, report)
    with pytest.raises(BundleError, match="FAILED"):
        selftest.require_passed_selftest(bundle, "numpy")


def _forgeries():
    """(name, change): each turns a passing record into one the gate must refuse."""
    def setter(key, value):
        def change(record):
            record[key] = value
        return change

    def remover(key):
        def change(record):
            record.pop(key, None)
        return change
    return [
        ("passed string", setter("passed", "yes")), ("passed 1", setter("passed", 1)),
        ("zero steps", setter("steps", 0)), ("fewer steps", setter("steps", 10)),
        ("steps as float", setter("steps", 750.0)), ("steps as bool", setter("steps", True)),
        ("no steps", remover("steps")), ("loose tolerance", setter("tolerance", 1.0)),
        ("fp16 tolerance for numpy", lambda r: r.update(fp16=True, tolerance=1e-2)),
        ("zero tolerance", setter("tolerance", 0)), ("error above tolerance", setter("max_abs_error", 0.5)),
        ("negative error", setter("max_abs_error", -1.0)), ("error as string", setter("max_abs_error", "0")),
        ("no error", remover("max_abs_error")), ("outputs error above", setter("max_abs_error_outputs", 0.5)),
        ("state unchecked", setter("states_checked", False)), ("state error None", setter("max_abs_error_state", None)),
        ("other device", setter("device", "another-jetson")), ("other bundle", setter("bundle_digest", "0" * 64)),
        ("other backend", setter("backend", "onnxruntime")),
    ]


@pytest.mark.parametrize("name, change", _forgeries(), ids=[name for name, _ in _forgeries()])
def test_a_forged_or_inconsistent_record_is_not_a_passed_selftest(bundle_path, name, change):
    assert neurohand("selftest", bundle_path, "--backend", "numpy").returncode == 0
    bundle = load_bundle(bundle_path)
    path = selftest.record_path(bundle, "numpy")
    with open(path) as handle:
        record = json.load(handle)
    selftest.require_passed_selftest(bundle, "numpy")          # as written, it passes
    change(record)
    with open(path, "w") as handle:
        json.dump(record, handle)
    with pytest.raises(BundleError) as error:
        selftest.require_passed_selftest(bundle, "numpy")
    assert "neurohand selftest" in one_line(error) or "FAILED" in str(error.value)


def _with(keys, token):
    """A change writing ``token`` (a bare word strict JSON lacks) as the value at ``keys`` of the record."""
    def change(record):
        target = record
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = "@@token@@"
        return json.dumps(record).replace('"@@token@@"', token)
    return change


def _text(text):
    return lambda record: text


DAMAGED = [
    ("NaN error", _with(["max_abs_error"], "NaN")), ("infinite error", _with(["max_abs_error"], "Infinity")),
    ("NaN state error", _with(["max_abs_error_state"], "NaN")),
    ("-Infinity latency", _with(["step_us", "p50"], "-Infinity")), ("NaN tolerance", _with(["tolerance"], "NaN")),
    ("empty", _text("")), ("cut", _text("{")), ("array", _text("[]")), ("null", _text("null")),
    ("string", _text('"passed"')), ("binary", _text("\x00\x01")), ("trailing garbage", _text('{"passed": true} x')),
]


@pytest.mark.parametrize("name, damage", DAMAGED, ids=[name for name, _ in DAMAGED])
def test_a_damaged_or_nan_record_is_not_a_passed_selftest(bundle_path, name, damage):
    assert neurohand("selftest", bundle_path, "--backend", "numpy").returncode == 0
    bundle = load_bundle(bundle_path)
    path = selftest.record_path(bundle, "numpy")
    with open(path) as handle:
        record = json.load(handle)
    with open(path, "w") as handle:
        handle.write(damage(record))
    with pytest.raises(BundleError) as error:
        selftest.require_passed_selftest(bundle, "numpy")
    assert "self-test record" in one_line(error)
    with pytest.raises(BundleError):
        selftest.selftested_backend(bundle)


def test_the_run_gate_refuses_a_nan_record_in_one_line(bundle_path, tmp_path):
    assert neurohand("selftest", bundle_path, "--backend", "numpy").returncode == 0
    path = selftest.record_path(load_bundle(bundle_path), "numpy")
    with open(path) as handle:
        text = handle.read()
    with open(path, "w") as handle:
        handle.write(text.replace('"max_abs_error": 0.0', '"max_abs_error": NaN'))
    result = neurohand("run", "--bundle", bundle_path, "--chip", str(tmp_path / "no-chip"), "--hand", "none",
                       "--backend", "numpy", "--duration", "1")
    assert_one_line_error(result)
    assert "NaN" in result.stderr and "self-test record" in result.stderr


# --- item 2: one record per backend ------------------------------------------------------------

def test_each_backend_keeps_its_own_record_and_auto_takes_the_first_that_passed(bundle_path):
    bundle = load_bundle(bundle_path)
    with pytest.raises(BundleError) as error:
        selftest.selftested_backend(bundle)
    assert "neurohand selftest" in one_line(error) and "no backend has passed" in str(error.value)
    if ort_available():
        assert neurohand("selftest", bundle_path, "--backend", "onnxruntime").returncode == 0
        assert selftest.selftested_backend(bundle) == "onnxruntime"     # the only one that passed
    assert neurohand("selftest", bundle_path, "--backend", "numpy").returncode == 0
    assert selftest.selftested_backend(bundle) == "numpy"               # first in the auto order that passed
    if not ort_available():
        return
    selftest.require_passed_selftest(bundle, "onnxruntime")              # not erased by the later self-test
    # Testing ONNX Runtime again does not take numpy's place either.
    assert neurohand("selftest", bundle_path, "--backend", "onnxruntime").returncode == 0
    assert selftest.selftested_backend(bundle) == "numpy"
    assert sorted(selftest.passed_backends(bundle)) == ["numpy", "onnxruntime"]
    # A failed numpy record: auto falls back to the backend that passed, never to the failed one.
    path = selftest.record_path(bundle, "numpy")
    with open(path) as handle:
        record = json.load(handle)
    record.update(passed=False, max_abs_error=0.5)
    with open(path, "w") as handle:
        json.dump(record, handle)
    assert selftest.selftested_backend(bundle) == "onnxruntime"


def test_run_with_backend_auto_drives_the_hand_only_with_a_backend_that_passed(bundle_path, tmp_path):
    from neurohand.deploy.cli.run import backend_for_run
    result = neurohand("run", "--bundle", bundle_path, "--chip", str(tmp_path / "no-chip"), "--hand", "none",
                       "--duration", "1")
    assert_one_line_error(result)
    assert "no backend has passed the self-test" in result.stderr
    assert neurohand("selftest", bundle_path, "--backend", "numpy").returncode == 0
    # ONNX Runtime comes first in the auto order and may be available here; it was not self-tested.
    assert backend_for_run(bundle_path, "auto") == "numpy"
    assert backend_for_run(bundle_path, "onnxruntime") == "onnxruntime"   # named: the gate decides later
    assert backend_for_run(bundle_path, "auto", skip_selftest_check=True) == "auto"


def test_a_format_1_record_speaks_for_its_backend_only(bundle_path):
    assert neurohand("selftest", bundle_path, "--backend", "numpy").returncode == 0
    bundle = load_bundle(bundle_path)
    record_path = selftest.record_path(bundle, "numpy")
    legacy = os.path.join(bundle.selftest_dir, selftest.device_id() + ".json")
    with open(record_path) as handle:
        record = json.load(handle)
    for key in ("format", "format_version"):
        record.pop(key)
    os.remove(record_path)
    with open(legacy, "w") as handle:
        json.dump(record, handle)
    assert selftest.require_passed_selftest(bundle, "numpy")["backend"] == "numpy"
    with pytest.raises(BundleError, match="not been self-tested on this device with backend 'onnxruntime'"):
        selftest.require_passed_selftest(bundle, "onnxruntime")
    assert selftest.selftested_backend(bundle) == "numpy"
    # A record of the new format takes its backend's place.
    record.update(passed=False, max_abs_error=0.5, format=selftest.RECORD_FORMAT,
                  format_version=selftest.RECORD_FORMAT_VERSION)
    with open(record_path, "w") as handle:
        json.dump(record, handle)
    with pytest.raises(BundleError, match="FAILED"):
        selftest.require_passed_selftest(bundle, "numpy")


# --- item 3: a model whose outputs are not the bundle's labels ----------------------------------

def test_a_run_whose_labels_do_not_match_the_model_is_not_bundled(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN_DIR, str(run))
    config = json.loads((run / "config.json").read_text())
    config["labels"]["names"] = config["labels"]["names"][:3]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError) as error:
        make_bundle(str(run), str(tmp_path / "bundle"))
    assert "5 outputs but there are 3 labels" in one_line(error)
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("backend", ["numpy", "onnxruntime"])
def test_a_swapped_model_with_another_output_count_is_refused_when_opened(bundle_path, backend):
    if backend == "onnxruntime" and not ort_available():
        pytest.skip("onnxruntime is not installed")
    with open(os.path.join(DATA, "golden_lstm.onnx"), "rb") as handle:      # 5 features, 6 outputs; 5 labels
        rewrite(bundle_path, "model.onnx", handle.read())
    # The forger makes the feature count agree, and leaves the outputs as the labels say.
    with open(os.path.join(bundle_path, "config.json")) as handle:
        config = json.load(handle)
    config["io"]["n_features"] = 5
    rewrite(bundle_path, "config.json", json.dumps(config).encode())
    with open(os.path.join(bundle_path, "manifest.json")) as handle:
        manifest = json.load(handle)
    manifest["io"]["n_features"] = 5
    with open(os.path.join(bundle_path, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    bundle = load_bundle(bundle_path)
    with pytest.raises(BundleError) as error:
        open_bundle_backend(bundle, backend)
    assert "gives 6 outputs" in one_line(error)
    result = neurohand("selftest", bundle_path, "--backend", backend)
    assert_one_line_error(result)


def test_a_swapped_model_refused_with_the_fake_tensorrt_as_well(bundle_path, monkeypatch):
    from neurohand.decoder import backends
    real = backends.create_backend

    def six_outputs(name, onnx_path, **options):
        backend = real("numpy", onnx_path)
        backend.n_outputs = 6
        return backend
    monkeypatch.setattr(backends, "create_backend", six_outputs)
    for name in ("tensorrt", "auto", "numpy"):
        with pytest.raises(BundleError, match="gives 6 outputs"):
            open_bundle_backend(load_bundle(bundle_path), name)


@pytest.mark.parametrize("change", ["labels", "io", "both"])
def test_a_config_whose_labels_or_io_disagree_is_refused_when_loaded(bundle_path, change):
    with open(os.path.join(bundle_path, "config.json")) as handle:
        config = json.load(handle)
    if change in ("labels", "both"):
        config["labels"]["names"].append("wrist")
    if change in ("io", "both"):
        config["io"]["n_outputs"] = 6
    rewrite(bundle_path, "config.json", json.dumps(config).encode())
    with pytest.raises(BundleError) as error:
        load_bundle(bundle_path)
    one_line(error)
    assert_one_line_error(neurohand("selftest", bundle_path, "--backend", "numpy"))


@pytest.mark.parametrize("labels", [{"names": "thumb"}, {"names": [1, 2, 3, 4, 5]}, {"names": []}, ["thumb"], 7])
def test_malformed_labels_are_refused_when_loaded(bundle_path, labels):
    with open(os.path.join(bundle_path, "config.json")) as handle:
        config = json.load(handle)
    config["labels"] = labels
    rewrite(bundle_path, "config.json", json.dumps(config).encode())
    with pytest.raises(BundleError, match="labels"):
        load_bundle(bundle_path)


# --- item 5: links and special files inside a bundle ---------------------------------------------

def _link_model_outside(bundle_path, tmp_path):
    outside = str(tmp_path / "outside.onnx")
    shutil.move(os.path.join(bundle_path, "model.onnx"), outside)
    os.symlink(outside, os.path.join(bundle_path, "model.onnx"))        # same bytes: the manifest matches


def _link_extra(bundle_path, tmp_path):
    os.symlink("/etc/passwd", os.path.join(bundle_path, "notes.txt"))


def _link_engine_folder(bundle_path, tmp_path):
    os.makedirs(str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), os.path.join(bundle_path, "engine"))


def _link_selftest_record(bundle_path, tmp_path):
    os.makedirs(os.path.join(bundle_path, "selftest"))
    os.symlink(str(tmp_path / "forged.json"), os.path.join(bundle_path, "selftest", selftest.device_id() + ".numpy.json"))


def _relative_link(bundle_path, tmp_path):
    os.symlink("model.onnx", os.path.join(bundle_path, "model_plain.onnx"))


def _fifo(bundle_path, tmp_path):
    os.mkfifo(os.path.join(bundle_path, "pipe"))


@pytest.mark.parametrize("make", [_link_model_outside, _link_extra, _link_engine_folder, _link_selftest_record,
                                  _relative_link, _fifo])
def test_links_and_special_files_inside_a_bundle_are_refused(bundle_path, tmp_path, make):
    make(bundle_path, tmp_path)
    with pytest.raises(BundleError) as error:
        load_bundle(bundle_path)
    assert "neither a file nor a folder" in one_line(error) or "symbolic link" in str(error.value)
    assert_one_line_error(neurohand("selftest", bundle_path, "--backend", "numpy"))


def test_the_bundle_folder_itself_may_be_a_link(bundle_path, tmp_path):
    """The device's INSTALL_DIR/current is a link to the release: that is not a link inside the bundle."""
    current = str(tmp_path / "current")
    os.symlink(bundle_path, current)
    assert neurohand("selftest", current, "--backend", "numpy").returncode == 0
    selftest.require_passed_selftest(load_bundle(current), "numpy")


# --- item 7: ONNX Runtime's refusals and the outputs of bundle / build-engine ----------------------

def _ort_refused_models():
    with open(os.path.join(DATA, "golden_gru.onnx"), "rb") as handle:
        data = handle.read()
    position = data.find(b"\x0a\x08features\x12")
    elem_type = data.find(b"\x08\x01", position)                      # the features input's float32
    return {
        "unknown op": data.replace(b"\x22\x07Squeeze", b"\x22\x07Squeezf"),
        "another unknown op": data.replace(b"\x22\x06Concat", b"\x22\x06Concaq"),
        "double input": data[:elem_type] + b"\x08\x0b" + data[elem_type + 2:],
    }


@pytest.mark.parametrize("case", sorted(_ort_refused_models()))
def test_a_model_onnx_runtime_refuses_is_one_line_naming_the_file(tmp_path, case):
    if not ort_available():
        pytest.skip("onnxruntime is not installed")
    from neurohand.decoder.backends import create_backend
    path = str(tmp_path / "model.onnx")
    with open(path, "wb") as handle:
        handle.write(_ort_refused_models()[case])
    with pytest.raises(ConfigError) as error:
        create_backend("onnxruntime", path)
    message = one_line(error)
    assert path in message and "ONNX Runtime cannot" in message and len(message) < 600
    # Through a bundle (made with the numpy backend, which reads the weights only) and the CLI.
    run = tmp_path / "run"
    shutil.copytree(RUN_DIR, str(run))
    shutil.copyfile(path, str(run / "model.onnx"))
    make_bundle(str(run), str(tmp_path / "bundle"))
    result = neurohand("selftest", tmp_path / "bundle", "--backend", "onnxruntime")
    assert_one_line_error(result)
    assert "model.onnx" in result.stderr


def test_bundle_out_follows_the_output_path_rule(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(RUN_DIR, run)
    for out in (run, os.path.join(run, "bundle")):
        with pytest.raises(UsageError, match="input of this command"):
            make_bundle(run, out, force=True)
    assert sorted(os.listdir(run)) == ["config.json", "model.onnx"]
    # An empty folder is filled; a non-empty one needs --force.
    empty = tmp_path / "empty"
    empty.mkdir()
    make_bundle(run, str(empty))
    load_bundle(str(empty))
    result = neurohand("bundle", run, "--out", empty)
    assert_one_line_error(result)
    assert "--force" in result.stderr
    (empty / "selftest").mkdir()
    (empty / "selftest" / "old-record.json").write_text("{}")
    assert neurohand("bundle", run, "--out", empty, "--force").returncode == 0
    load_bundle(str(empty))
    assert not (empty / "selftest").exists()                # the old bundle was replaced, not merged
    assert not [name for name in os.listdir(str(tmp_path)) if name.startswith(".bundle")]
    # --force never deletes a folder that is not a bundle, nor one holding the run.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = neurohand("bundle", run, "--out", precious, "--force")
    assert_one_line_error(result)
    assert (precious / "thesis.tex").read_text() == "years of work"
    holder = tmp_path / "holder"
    shutil.copytree(str(empty), str(holder))
    shutil.copytree(run, str(holder / "run"))
    result = neurohand("bundle", holder / "run", "--out", holder, "--force")
    assert_one_line_error(result)
    assert (holder / "run" / "model.onnx").exists()
    # A file, a missing parent: one line before any work.
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "missing" / "bundle"):
        assert_one_line_error(neurohand("bundle", run, "--out", out))


def test_build_engine_checks_its_output_before_building(bundle_path):
    os.makedirs(os.path.join(bundle_path, "engine", "model.plan"))       # a folder where the engine goes
    result = neurohand("build-engine", bundle_path)
    assert_one_line_error(result)
    assert "model.plan" in result.stderr and "directory" in result.stderr
