"""Bundles: built from a run directory, verified on every load, self-tested."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from neurohand.deploy import selftest
from neurohand.deploy.bundle import load_bundle, make_bundle
from neurohand.firmware_bridge.shared.errors import BundleError, UsageError

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    shutil.copyfile(os.path.join(DATA, "golden_gru.onnx"), str(path / "model.onnx"))
    (path / "config.json").write_text(json.dumps({"pipeline": {"mode": "test"}, "model": {"cell": "gru"}}))
    return path


@pytest.fixture
def bundle_path(run_dir, tmp_path):
    out = tmp_path / "bundle"
    make_bundle(str(run_dir), str(out))
    return out


def neurohand(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def test_bundle_holds_model_config_golden_vectors_and_manifest(bundle_path):
    names = sorted(os.listdir(str(bundle_path)))
    assert names == ["config.json", "golden.npz", "manifest.json", "model.onnx"]
    bundle = load_bundle(str(bundle_path))
    assert bundle.config["io"] == bundle.manifest["io"]
    features, outputs = bundle.golden_vectors()
    assert features.shape[2] == bundle.config["io"]["n_features"]
    assert outputs.shape[2] == bundle.config["io"]["n_outputs"]
    assert np.all((outputs >= 0) & (outputs <= 1))
    assert "numpy" in bundle.manifest["produced_by"]


def test_golden_outputs_are_the_numpy_backend_reference(bundle_path):
    from neurohand.decoder.backends import create_backend
    bundle = load_bundle(str(bundle_path))
    features, outputs = bundle.golden_vectors()
    backend = create_backend("numpy", bundle.model_path)
    state = backend.initial_state()
    for step in range(features.shape[1]):
        result, state = backend.step(features[1, step], state)
        np.testing.assert_array_equal(result, outputs[1, step])


@pytest.mark.parametrize("damage", ["modify", "truncate", "remove"])
@pytest.mark.parametrize("name", ["model.onnx", "config.json", "golden.npz"])
def test_damaged_file_is_refused_by_name(bundle_path, name, damage):
    path = bundle_path / name
    if damage == "modify":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    else:
        path.unlink()
    with pytest.raises(BundleError) as error:
        load_bundle(str(bundle_path))
    assert name in str(error.value)


def test_corrupt_manifest_is_refused(bundle_path):
    (bundle_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest"):
        load_bundle(str(bundle_path))


def test_existing_output_and_incomplete_run_are_usage_errors(run_dir, bundle_path, tmp_path):
    with pytest.raises(UsageError, match="not empty; pass --force"):
        make_bundle(str(run_dir), str(bundle_path))
    (run_dir / "model.onnx").unlink()
    with pytest.raises(UsageError, match="model.onnx"):
        make_bundle(str(run_dir), str(tmp_path / "other"))
    assert not any(name.startswith(".bundle-") for name in os.listdir(str(tmp_path)))


def test_selftest_passes_and_is_recorded_for_this_device(bundle_path):
    result = neurohand("selftest", bundle_path, "--backend", "numpy", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["max_abs_error"] == 0.0
    assert report["steps"] > 0 and report["step_us"]["p99"] > 0
    bundle = load_bundle(str(bundle_path))
    assert selftest.require_passed_selftest(bundle, "numpy")["device"] == selftest.device_id()
    with pytest.raises(BundleError, match=r"not been self-tested on this device with backend 'onnxruntime' "
                                          r"\(passed here: numpy\)"):
        selftest.require_passed_selftest(bundle, "onnxruntime")


def test_selftest_fails_when_backend_disagrees_with_golden_vectors(bundle_path):
    bundle = load_bundle(str(bundle_path))

    class OffByOne(object):
        name = "numpy"

        def __init__(self, backend):
            self.inner, self.n_features, self.n_outputs = backend, backend.n_features, backend.n_outputs

        def initial_state(self):
            return self.inner.initial_state()

        def step(self, features, state):
            outputs, state = self.inner.step(features, state)
            return outputs + 2e-4, state

        def state_arrays(self, state):
            return self.inner.state_arrays(state)

    from neurohand.decoder.backends import create_backend
    report = selftest.run_selftest(bundle, OffByOne(create_backend("numpy", bundle.model_path)))
    assert not report["passed"]
    assert report["max_abs_error"] == pytest.approx(2e-4, rel=1e-2)
    assert report["states_checked"] and report["max_abs_error_state"] == 0.0
    selftest.record_result(bundle, report)
    with pytest.raises(BundleError, match="FAILED"):
        selftest.require_passed_selftest(bundle, "numpy")


def test_selftest_steps_on_a_thread_of_its_own_and_raises_its_errors(bundle_path):
    """As ``neurohand run`` steps on its decoder thread, not on the thread that made the backend."""
    import threading
    from neurohand.decoder.backends import create_backend
    bundle = load_bundle(str(bundle_path))

    class Watched(object):
        name = "numpy"

        def __init__(self, backend, fail_at=None):
            self.inner, self.n_features, self.n_outputs = backend, backend.n_features, backend.n_outputs
            self.threads, self.fail_at, self.steps = set(), fail_at, 0

        def initial_state(self):
            self.threads.add(threading.get_ident())
            return self.inner.initial_state()

        def step(self, features, state):
            self.threads.add(threading.get_ident())
            self.steps += 1
            if self.steps == self.fail_at:
                raise RuntimeError("invalid device context")
            return self.inner.step(features, state)

        def state_arrays(self, state):
            self.threads.add(threading.get_ident())
            return self.inner.state_arrays(state)

    watched = Watched(create_backend("numpy", bundle.model_path))
    assert selftest.run_selftest(bundle, watched)["passed"]
    assert len(watched.threads) == 1 and threading.get_ident() not in watched.threads
    with pytest.raises(RuntimeError, match="invalid device context"):
        selftest.run_selftest(bundle, Watched(create_backend("numpy", bundle.model_path), fail_at=3))


def test_selftest_record_does_not_carry_over_to_changed_bundle(bundle_path, tmp_path, run_dir):
    assert neurohand("selftest", bundle_path, "--backend", "numpy").returncode == 0
    other = tmp_path / "other"
    (run_dir / "config.json").write_text(json.dumps({"pipeline": {"mode": "changed"}}))
    make_bundle(str(run_dir), str(other))
    shutil.copytree(str(bundle_path / "selftest"), str(other / "selftest"))
    with pytest.raises(BundleError, match="other bundle content"):
        selftest.require_passed_selftest(load_bundle(str(other)), "numpy")


def test_cli_errors_are_one_line(tmp_path):
    result = neurohand("selftest", tmp_path / "nothing")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = neurohand("bundle", tmp_path / "nothing", "--out", tmp_path / "b")
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("version", ["8.2.1.8", "10.3.0"])
def test_tensorrt_build_selftest_and_rebuilt_engine_needs_a_new_selftest(bundle_path, monkeypatch, capsys, version):
    """build-engine and selftest through the CLI on the fake TensorRT of each API version."""
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from fake_tensorrt import FakeGpuStack
    finally:
        sys.path.pop(0)
    from neurohand.deploy.cli.main import main
    FakeGpuStack(version).install(monkeypatch)
    assert main(["build-engine", str(bundle_path)]) == 0
    assert "engine built with TensorRT {}".format(version) in capsys.readouterr().out
    assert main(["selftest", str(bundle_path), "--backend", "tensorrt", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["backend"] == "tensorrt" and report["max_abs_error"] <= 1e-4
    bundle = load_bundle(str(bundle_path))
    assert report["engine_sha256"] == bundle.engine_digest() is not None
    selftest.require_passed_selftest(bundle, "tensorrt")
    # Rebuilding (here: in fp16, a different engine) invalidates the record.
    os.remove(bundle.engine_path)
    assert main(["build-engine", str(bundle_path), "--fp16"]) == 0
    with pytest.raises(BundleError, match="rebuilt after its self-test"):
        selftest.require_passed_selftest(bundle, "tensorrt")
    assert main(["selftest", str(bundle_path), "--backend", "tensorrt"]) == 0
    assert "tolerance 0.01" in capsys.readouterr().out
    selftest.require_passed_selftest(bundle, "tensorrt")


@pytest.mark.parametrize("version", ["8.2.1.8", "10.3.0"])
def test_the_loop_free_export_travels_in_the_bundle_and_builds_the_engine(run_dir, tmp_path, monkeypatch, capsys,
                                                                          version):
    shutil.copyfile(os.path.join(DATA, "golden_gru_plain.onnx"), str(run_dir / "model_plain.onnx"))
    out = str(tmp_path / "with-plain")
    manifest = make_bundle(str(run_dir), out)
    assert "model_plain.onnx" in manifest["files"]
    bundle = load_bundle(out)
    assert bundle.plain_model_path == os.path.join(out, "model_plain.onnx")
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from fake_tensorrt import FakeGpuStack
    finally:
        sys.path.pop(0)
    from neurohand.deploy.cli.main import main
    stack = FakeGpuStack(version)
    stack.install(monkeypatch)
    stack.gpu.rnn_loop_fails = True          # as some TensorRT 8.x builds do with the GRU's loop
    assert main(["build-engine", out]) == 0
    printed = capsys.readouterr().out
    expected_graph = "plain" if version.startswith("8.") else "rnn"
    assert "{} graph".format(expected_graph) in printed
    assert ("did not build" in printed) == version.startswith("8.")
    assert main(["selftest", out, "--backend", "tensorrt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]
    # The loop-free file is as protected as the others: a changed byte is refused by name.
    path = os.path.join(out, "model_plain.onnx")
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    data[200] ^= 1
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    with pytest.raises(BundleError, match="model_plain.onnx"):
        load_bundle(out)


def test_a_bundle_without_the_loop_free_export_has_none(bundle_path):
    assert load_bundle(str(bundle_path)).plain_model_path is None


def test_selftest_checks_the_recurrent_state_as_well_as_the_outputs(bundle_path):
    """A backend whose outputs match but whose state drifts (as an FP16 engine's can) fails."""
    bundle = load_bundle(str(bundle_path))
    features, _ = bundle.golden_vectors()
    states = bundle.golden_states()
    assert states is not None and states.shape[0] == features.shape[0] and features.shape[1] == 250

    class StateDrift(object):
        name = "numpy"

        def __init__(self, backend):
            self.inner, self.n_features, self.n_outputs = backend, backend.n_features, backend.n_outputs

        def initial_state(self):
            return self.inner.initial_state()

        def step(self, features, state):
            return self.inner.step(features, state)

        def state_arrays(self, state):
            return [a + 3e-4 for a in self.inner.state_arrays(state)]

    from neurohand.decoder.backends import create_backend
    report = selftest.run_selftest(bundle, StateDrift(create_backend("numpy", bundle.model_path)))
    assert not report["passed"] and report["max_abs_error_outputs"] == 0.0
    assert report["max_abs_error_state"] == pytest.approx(3e-4, rel=1e-2)
    honest = selftest.run_selftest(bundle, create_backend("numpy", bundle.model_path))
    assert honest["passed"] and honest["max_abs_error"] == 0.0 and honest["steps"] == 3 * 250


def test_a_bundle_made_before_golden_states_still_self_tests_on_its_outputs(bundle_path, tmp_path):
    from neurohand.deploy.bundle import Bundle
    from neurohand.decoder.backends import create_backend
    bundle = load_bundle(str(bundle_path))
    features, outputs = bundle.golden_vectors()
    old = tmp_path / "old"
    shutil.copytree(str(bundle_path), str(old))
    np.savez(str(old / "golden.npz"), features=features, outputs=outputs)      # as bundles were written before
    older = Bundle(str(old), bundle.manifest, bundle.config)
    assert older.golden_states() is None
    report = selftest.run_selftest(older, create_backend("numpy", bundle.model_path))
    assert report["passed"] and report["states_checked"] is False and report["max_abs_error_state"] is None
