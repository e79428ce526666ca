"""The TensorRT backend against fakes of TensorRT 8.2 and 10.x and of pycuda.

No GPU here: tests/device/fake_tensorrt.py implements both documented APIs
(each without the other's methods) over fake device memory, and its engine
computes the decoder with numpy.  These tests prove the version handling,
the buffer handling and the on-GPU state ping-pong; real-GPU numerics are the
on-device self-test's job.
"""
import json
import os

import numpy as np
import pytest

from fake_tensorrt import FakeCudaError, FakeGpuStack
from neurohand.decoder.backends import create_backend
from neurohand.decoder.backends.base import BackendUnavailableError
from neurohand.decoder.backends.tensorrt_backend import (
    BindingsApi, TensorRTBackend, TensorsApi, build_engine, select_api)
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
VERSIONS = {"8.2.1.8": BindingsApi, "10.3.0": TensorsApi}
TOLERANCE = 1e-5


def golden(cell):
    path = os.path.join(DATA, "golden_{}.onnx".format(cell))
    with np.load(os.path.join(DATA, "golden_{}.npz".format(cell)), allow_pickle=False) as arrays:
        return path, {key: arrays[key] for key in arrays.files}


@pytest.fixture(params=sorted(VERSIONS))
def fake(request, monkeypatch):
    stack = FakeGpuStack(request.param)
    stack.install(monkeypatch)
    return stack


def run_all(backend, features):
    state = backend.initial_state()
    outputs = []
    for row in features:
        positions, state = backend.step(row, state)
        outputs.append(positions)
    return np.array(outputs), state


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_parity_with_torch_and_numpy(fake, cell):
    path, reference = golden(cell)
    backend = create_backend("tensorrt", path)
    assert isinstance(backend.api, VERSIONS[fake.trt.__version__])
    outputs, state = run_all(backend, reference["features"])
    assert np.max(np.abs(outputs - reference["positions"])) <= TOLERANCE
    expected, expected_state = run_all(create_backend("numpy", path), reference["features"])
    assert np.max(np.abs(outputs - expected)) <= 1e-6
    final = backend.state_arrays(state)
    assert np.max(np.abs(final[0] - reference["h_final"])) <= TOLERANCE
    if cell == "lstm":
        assert np.max(np.abs(final[1] - reference["c_final"])) <= TOLERANCE
    backend.close()


def test_state_stays_on_the_gpu(fake):
    path, reference = golden("lstm")
    backend = create_backend("tensorrt", path)
    state = backend.initial_state()
    before = dict(fake.gpu.copies)
    executions = fake.gpu.executions
    for row in reference["features"][:10]:
        _, state = backend.step(row, state)
    # Per step: features in, positions out; h and c never cross the bus.
    assert fake.gpu.copies["htod"] - before["htod"] == 10
    assert fake.gpu.copies["dtoh"] - before["dtoh"] == 10
    assert fake.gpu.executions - executions == 10


def test_stale_or_foreign_state_is_refused(fake):
    path, reference = golden("gru")
    backend = create_backend("tensorrt", path)
    first = backend.initial_state()
    _, second = backend.step(reference["features"][0], first)
    with pytest.raises(UsageError, match="stale"):
        backend.step(reference["features"][1], first)
    with pytest.raises(UsageError, match="this backend"):
        backend.step(reference["features"][1], (np.zeros((2, 1, 8), np.float32),))
    backend.step(reference["features"][1], second)


def test_auto_prefers_tensorrt(fake):
    backend = create_backend("auto", golden("gru")[0])
    assert backend.name == "tensorrt" and backend.selected_by == "auto picked tensorrt"


def test_build_engine_writes_engine_and_metadata_then_loads_it(fake, tmp_path):
    path = golden("gru")[0]
    engine_path = str(tmp_path / "model.engine")
    metadata = build_engine(path, engine_path, workspace_mb=64)
    assert metadata["tensorrt_version"] == fake.trt.__version__
    assert metadata["gpu_name"] == "Fake NVIDIA Tegra X1"
    assert metadata["api"] == VERSIONS[fake.trt.__version__].name
    assert metadata["fp16"] is False and metadata["workspace_mb"] == 64
    with open(engine_path + ".json") as handle:
        assert json.load(handle) == metadata
    assert not fake.gpu.context_stack                     # the build's context was popped
    backend = create_backend("tensorrt", path, engine_path=engine_path)
    assert backend.engine_source.startswith("loaded")
    assert backend._engine.header["workspace"] == 64 << 20
    backend.close()
    backend.close()                                      # idempotent
    assert not fake.gpu.memory and not fake.gpu.context_stack


def test_engine_is_built_and_cached_when_absent(fake, tmp_path):
    engine_path = str(tmp_path / "cache.engine")
    backend = create_backend("tensorrt", golden("gru")[0], engine_path=engine_path)
    assert backend.engine_source.startswith("built") and os.path.exists(engine_path)
    assert backend._engine.header["workspace"] == 256 << 20


def test_engine_of_another_model_version_or_gpu_is_refused(fake, tmp_path, monkeypatch):
    engine_path = str(tmp_path / "gru.engine")
    build_engine(golden("gru")[0], engine_path)
    with pytest.raises(ConfigError, match="different model"):
        create_backend("tensorrt", golden("lstm")[0], engine_path=engine_path)
    with pytest.raises(ConfigError, match="fp16"):
        create_backend("tensorrt", golden("gru")[0], engine_path=engine_path, fp16=True)
    with open(engine_path + ".json") as handle:
        metadata = json.load(handle)
    metadata["gpu_name"] = "NVIDIA GeForce RTX 3090"
    with open(engine_path + ".json", "w") as handle:
        json.dump(metadata, handle)
    with pytest.raises(ConfigError, match="built for GPU 'NVIDIA GeForce RTX 3090'"):
        create_backend("tensorrt", golden("gru")[0], engine_path=engine_path)
    assert not fake.gpu.context_stack                     # the refused load popped its context
    metadata["gpu_name"] = "Fake NVIDIA Tegra X1"
    with open(engine_path + ".json", "w") as handle:
        json.dump(metadata, handle)
    other = FakeGpuStack("10.3.0" if fake.trt.__version__.startswith("8") else "8.2.1.8")
    other.install(monkeypatch)
    with pytest.raises(ConfigError, match="built with TensorRT"):
        create_backend("tensorrt", golden("gru")[0], engine_path=engine_path)


def test_fp16_engine_runs_close_to_fp32(fake):
    path, reference = golden("gru")
    outputs, _ = run_all(create_backend("tensorrt", path, fp16=True), reference["features"])
    error = np.max(np.abs(outputs - reference["positions"]))
    assert 0 < error <= 5e-3


def test_failed_enqueue_raises(fake, monkeypatch):
    path, reference = golden("gru")
    backend = create_backend("tensorrt", path)
    method = "execute_async_v2" if isinstance(backend.api, BindingsApi) else "execute_async_v3"
    monkeypatch.setattr(backend._context, method, lambda *args, **kwargs: False)
    with pytest.raises(RuntimeError, match="enqueue"):
        backend.step(reference["features"][0], backend.initial_state())


def test_version_selection():
    assert select_api(FakeGpuStack("8.2.1.8").trt) is BindingsApi
    assert select_api(FakeGpuStack("10.3.0").trt) is TensorsApi
    with pytest.raises(BackendUnavailableError, match="too old"):
        select_api(FakeGpuStack("7.1.3").trt)
    stripped = FakeGpuStack("10.3.0").trt
    del stripped.IExecutionContext.execute_async_v3
    with pytest.raises(BackendUnavailableError, match="neither"):
        select_api(stripped)


def test_fakes_have_only_their_own_api():
    old, new = FakeGpuStack("8.2.1.8").trt, FakeGpuStack("10.3.0").trt
    for name in ("execute_async_v3", "set_tensor_address"):
        assert hasattr(new.IExecutionContext, name) and not hasattr(old.IExecutionContext, name)
    assert hasattr(old.IExecutionContext, "execute_async_v2") and not hasattr(new.IExecutionContext,
                                                                               "execute_async_v2")
    for name in ("num_bindings", "get_binding_index", "binding_is_input"):
        assert hasattr(old.ICudaEngine, name) and not hasattr(new.ICudaEngine, name)
    assert hasattr(new.ICudaEngine, "num_io_tensors") and not hasattr(old.ICudaEngine, "num_io_tensors")
    assert not hasattr(old, "MemoryPoolType") and not hasattr(old, "TensorIOMode")
    with pytest.raises(AttributeError):
        new.IBuilderConfig().max_workspace_size = 1 << 20
    assert not hasattr(old.IBuilderConfig(), "set_memory_pool_limit")


def test_fake_refuses_misuse(monkeypatch):
    stack = FakeGpuStack("8.2.1.8")
    stack.install(monkeypatch)
    cuda = stack.driver
    with pytest.raises(FakeCudaError, match="no currently active context"):
        cuda.mem_alloc(16)
    cuda.init()
    cuda.Device(0).make_context()
    device = cuda.mem_alloc(16)
    with pytest.raises(FakeCudaError, match="pagelocked"):
        cuda.memcpy_htod_async(device, np.zeros(4, np.float32), cuda.Stream())
    with pytest.raises(FakeCudaError, match="bytes"):
        cuda.memcpy_htod_async(device, cuda.pagelocked_empty(8, np.float32), cuda.Stream())
    # Copies happen at synchronize, as on a stream.
    host = cuda.pagelocked_empty(4, np.float32)
    host[:] = [1, 2, 3, 4]
    back = cuda.pagelocked_empty(4, np.float32)
    back[:] = 0
    stream = cuda.Stream()
    cuda.memcpy_htod_async(device, host, stream)
    cuda.memcpy_dtoh_async(back, device, stream)
    assert not back.any()
    stream.synchronize()
    assert back.tolist() == [1, 2, 3, 4]
    # The engine refuses h_in and h_out in one buffer, and wrong binding counts.
    path = golden("gru")[0]
    trt = stack.trt
    builder = trt.Builder(trt.Logger())
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt.Logger())
    with open(path, "rb") as handle:
        onnx_bytes = handle.read()
    assert not parser.parse(onnx_bytes) and "Explicit Batch" in str(parser.get_error(0))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    assert trt.OnnxParser(network, trt.Logger()).parse(onnx_bytes)
    config = builder.create_builder_config()
    assert builder.build_serialized_network(network, config) is None     # no workspace set
    config.max_workspace_size = 1 << 20
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    sizes = [4 * int(np.prod(engine.get_binding_shape(i))) for i in range(engine.num_bindings)]
    buffers = [int(cuda.mem_alloc(size)) for size in sizes]
    h_in, h_out = engine.get_binding_index("h_in"), engine.get_binding_index("h_out")
    buffers[h_out] = buffers[h_in]
    with pytest.raises(FakeCudaError, match="alias"):
        context.execute_async_v2(buffers, stream.handle)
    with pytest.raises(TypeError):
        context.execute_async_v2(buffers[:-1], stream.handle)
    assert not hasattr(context, "execute_async_v3")
