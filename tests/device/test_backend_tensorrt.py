"""The TensorRT backend against fakes of TensorRT 8.2 and 10.x and of pycuda.

No GPU here: tests/device/fake_tensorrt.py implements both documented APIs
(each without the other's methods) over fake device memory, and its engine
computes the decoder with numpy.  These tests prove the version handling,
the buffer handling and the on-GPU state ping-pong; real-GPU numerics are the
on-device self-test's job.

The fake's CUDA contexts are per thread, as pycuda's: every test here ends
with nothing released outside its context and every context destroyed (the
``fake`` fixture checks), and the backend is stepped from another thread as
``neurohand run`` does.
"""
import gc
import json
import os
import re

import numpy as np
import pytest

from fake_tensorrt import FakeCudaError, FakeGpuStack
from neurohand.decoder.backends import create_backend
from neurohand.decoder.backends import tensorrt_backend
from neurohand.decoder.backends.base import BackendUnavailableError
from neurohand.decoder.backends.tensorrt_backend import (
    BindingsApi, TensorRTBackend, TensorsApi, build_engine, select_api)
from neurohand.deploy.selftest import on_own_thread
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
    yield stack
    gc.collect()
    assert stack.gpu.errors == []          # nothing was released outside its CUDA context
    assert not stack.gpu.live_contexts     # and every context was destroyed


def on_thread(function, *args):
    """``function(*args)`` on a new thread (like ``neurohand run``'s decoder thread); its result, or its error."""
    return on_own_thread(lambda: function(*args), "test-decoder")


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
    with create_backend("tensorrt", path) as backend:
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
    with create_backend("tensorrt", path) as backend:
        first = backend.initial_state()
        _, second = backend.step(reference["features"][0], first)
        with pytest.raises(UsageError, match="stale"):
            backend.step(reference["features"][1], first)
        with pytest.raises(UsageError, match="this backend"):
            backend.step(reference["features"][1], (np.zeros((2, 1, 8), np.float32),))
        backend.step(reference["features"][1], second)


def test_auto_prefers_tensorrt(fake):
    with create_backend("auto", golden("gru")[0]) as backend:
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
    with create_backend("tensorrt", golden("gru")[0], engine_path=engine_path) as backend:
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
    assert other.gpu.errors == [] and not other.gpu.live_contexts


def test_fp16_engine_runs_close_to_fp32(fake):
    path, reference = golden("gru")
    with create_backend("tensorrt", path, fp16=True) as backend:
        outputs, _ = run_all(backend, reference["features"])
    error = np.max(np.abs(outputs - reference["positions"]))
    assert 0 < error <= 5e-3


def test_failed_enqueue_raises(fake):
    path, reference = golden("gru")
    with create_backend("tensorrt", path) as backend:
        method = "execute_async_v2" if isinstance(backend.api, BindingsApi) else "execute_async_v3"
        # Not monkeypatch: its undo would store the bound method on the execution context, a
        # cycle that keeps it alive past close().
        setattr(backend._context, method, lambda *args, **kwargs: False)
        try:
            with pytest.raises(RuntimeError, match="enqueue"):
                backend.step(reference["features"][0], backend.initial_state())
        finally:
            delattr(backend._context, method)


def test_version_selection():
    assert select_api(FakeGpuStack("8.2.1.8").trt) is BindingsApi
    assert select_api(FakeGpuStack("9.3.0").trt) is BindingsApi
    assert select_api(FakeGpuStack("10.3.0").trt) is TensorsApi
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
    # TF32 since 7.1, on by default; 11 dropped the precision flags and EXPLICIT_BATCH.
    newest = FakeGpuStack("11.0.0").trt
    for trt in (old, new, newest):
        assert trt.IBuilderConfig().get_flag(trt.BuilderFlag.TF32)
    assert hasattr(old.BuilderFlag, "FP16") and hasattr(new.BuilderFlag, "FP16")
    assert not hasattr(newest.BuilderFlag, "FP16") and not hasattr(newest.BuilderFlag, "INT8")
    assert not hasattr(newest.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")


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
    allocations = [cuda.mem_alloc(size) for size in sizes]     # freed when dropped, as in pycuda
    buffers = [int(allocation) for allocation in allocations]
    h_in, h_out = engine.get_binding_index("h_in"), engine.get_binding_index("h_out")
    buffers[h_out] = buffers[h_in]
    with pytest.raises(FakeCudaError, match="alias"):
        context.execute_async_v2(buffers, stream.handle)
    with pytest.raises(TypeError):
        context.execute_async_v2(buffers[:-1], stream.handle)
    assert not hasattr(context, "execute_async_v3")


# --- CUDA context: threads, teardown, one context per build and run ------------------

@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_steps_from_another_thread_as_run_does(fake, cell):
    """``neurohand run``: backend made and first state taken on the main thread (load_decoder,
    DecodeStage), steps and the fault handler's fresh state on the decoder thread, close on the
    main thread.  pycuda's context stack is per thread: a context left current on the main thread
    is not current on the decoder thread."""
    path, reference = golden(cell)
    backend = create_backend("tensorrt", path)
    state = backend.initial_state()

    def decode(state):
        outputs = []
        for row in reference["features"]:
            positions, state = backend.step(row, state)
            outputs.append(positions)
        final = backend.state_arrays(state)
        state = backend.initial_state()                    # what DecodeStage._fault does
        again, _ = backend.step(reference["features"][0], state)
        return np.array(outputs), final, again, list(fake.gpu.context_stack)

    outputs, final, again, left_current = on_thread(decode, state)
    assert np.max(np.abs(outputs - reference["positions"])) <= TOLERANCE
    assert np.max(np.abs(final[0] - reference["h_final"])) <= TOLERANCE
    assert np.max(np.abs(again - reference["positions"][0])) <= TOLERANCE
    assert left_current == [] and not fake.gpu.context_stack       # current nowhere between calls
    backend.close()
    assert not fake.gpu.memory and not fake.gpu.live_contexts and fake.gpu.errors == []


def test_close_releases_everything_in_the_context_then_destroys_it(fake):
    path, reference = golden("lstm")
    backend = create_backend("tensorrt", path)
    _, state = backend.step(reference["features"][0], backend.initial_state())
    backend.close()
    # Engine, execution context, runtime, stream, device and page-locked buffers were all
    # released with the context current (else the fake records it), and the context is gone.
    assert fake.gpu.errors == []
    assert not fake.gpu.memory and not fake.gpu.live_contexts and not fake.gpu.context_stack
    assert fake.gpu.contexts_created == 1
    backend.close()                                        # idempotent
    with pytest.raises(UsageError, match="after close"):
        backend.step(reference["features"][1], state)
    with pytest.raises(UsageError, match="after close"):
        backend.initial_state()


def test_close_on_another_thread_also_destroys_the_context(fake):
    backend = create_backend("tensorrt", golden("gru")[0])
    backend.step(golden("gru")[1]["features"][0], backend.initial_state())
    on_thread(backend.close)
    assert fake.gpu.errors == [] and not fake.gpu.live_contexts and not fake.gpu.memory


def test_a_failed_set_up_releases_what_it_made_before_the_context_goes(fake, monkeypatch):
    def mismatch(self, weights):
        raise ConfigError("TensorRT engine I/O does not match the ONNX model's")
    monkeypatch.setattr(TensorRTBackend, "_check_io", mismatch)
    with pytest.raises(ConfigError, match="does not match") as excinfo:
        create_backend("tensorrt", golden("gru")[0])
    # Checked while the traceback (and so every frame of the set-up) is still alive.
    assert fake.gpu.errors == [] and not fake.gpu.live_contexts and not fake.gpu.context_stack
    del excinfo


@pytest.mark.parametrize("saved", [True, False])
def test_a_parse_error_frees_the_builder_before_the_context_goes(fake, monkeypatch, tmp_path, saved):
    monkeypatch.setattr(fake.trt.OnnxParser, "parse", lambda self, model, path=None: False)
    with pytest.raises(ConfigError, match="parser rejected") as excinfo:
        if saved:
            build_engine(golden("gru")[0], str(tmp_path / "model.engine"))
        else:
            create_backend("tensorrt", golden("gru")[0])
    assert fake.gpu.errors == [] and not fake.gpu.live_contexts and not fake.gpu.context_stack
    del excinfo


@pytest.mark.parametrize("saved", [True, False])
def test_build_then_run_uses_one_context(fake, tmp_path, saved):
    path, reference = golden("gru")
    engine_path = str(tmp_path / "model.engine") if saved else None
    with create_backend("tensorrt", path, engine_path=engine_path) as backend:
        assert backend.engine_source.startswith("built")
        assert fake.gpu.contexts_created == 1 and len(fake.gpu.live_contexts) == 1
        outputs, _ = run_all(backend, reference["features"])
    assert np.max(np.abs(outputs - reference["positions"])) <= TOLERANCE
    assert fake.gpu.contexts_created == 1 and not fake.gpu.live_contexts


# --- precision and versions ----------------------------------------------------------

def test_fp32_engines_are_built_without_tf32(fake, monkeypatch):
    trt = fake.trt
    assert trt.IBuilderConfig().get_flag(trt.BuilderFlag.TF32)         # TensorRT's default: on
    path, reference = golden("gru")
    with create_backend("tensorrt", path) as backend:
        assert backend._engine.header["tf32"] is False and backend._engine.header["fp16"] is False
        outputs, _ = run_all(backend, reference["features"])
    assert np.max(np.abs(outputs - reference["positions"])) <= TOLERANCE
    # What it prevents: on a TF32 GPU the same "FP32" engine misses the self-test's tolerance.
    monkeypatch.setattr(tensorrt_backend, "_clear_tf32", lambda trt, config: None)
    with create_backend("tensorrt", path) as backend:
        assert backend._engine.header["tf32"] is True
        outputs, _ = run_all(backend, reference["features"])
    assert np.max(np.abs(outputs - reference["positions"])) > 1e-4


@pytest.mark.parametrize("version", ["7.1.3", "11.0.0"])
def test_unsupported_tensorrt_majors_are_refused_before_any_cuda(version, monkeypatch, tmp_path):
    stack = FakeGpuStack(version)
    stack.install(monkeypatch)
    message = "TensorRT {} is not supported; neurohand supports TensorRT 8.x (JetPack 4.6), 9.x and 10.x".format(
        version)
    with pytest.raises(BackendUnavailableError) as excinfo:
        select_api(stack.trt)
    assert str(excinfo.value) == message
    path = golden("gru")[0]
    with pytest.raises(BackendUnavailableError, match=re.escape(message)):
        create_backend("tensorrt", path)
    with pytest.raises(BackendUnavailableError, match=re.escape(message)):
        build_engine(path, str(tmp_path / "model.engine"))
    assert stack.gpu.contexts_created == 0
    with create_backend("auto", path) as backend:
        assert backend.name != "tensorrt" and message in backend.selected_by


# --- the fake is as strict as pycuda and TensorRT ------------------------------------

def test_fake_context_stack_is_per_thread():
    stack = FakeGpuStack("10.3.0")
    cuda, gpu = stack.driver, stack.gpu
    cuda.init()
    context = cuda.Device(0).make_context()               # current on this thread only
    device = cuda.mem_alloc(16)
    host = cuda.pagelocked_empty(4, np.float32)
    stream = cuda.Stream()

    def copy(host, stream):
        cuda.memcpy_htod_async(device, host, stream)
        stream.synchronize()

    with pytest.raises(FakeCudaError, match="invalid device context"):
        on_thread(copy, host, stream)

    def pushed_copy(host, stream):
        context.push()
        try:
            copy(host, stream)
        finally:
            context.pop()
    on_thread(pushed_copy, host, stream)
    assert gpu.copies["htod"] == 1
    context.pop()
    with pytest.raises(FakeCudaError, match="invalid device context"):
        copy(host, stream)
    # Releasing without the context: free() raises, a destructor records.
    with pytest.raises(FakeCudaError, match="without its CUDA context current"):
        device.free()
    del host
    gc.collect()
    assert gpu.errors == ["page-locked host buffer of 16 bytes released without its CUDA context current "
                          "on thread MainThread"]
    del gpu.errors[:]
    context.push()
    device.free()
    with pytest.raises(FakeCudaError, match="freed twice"):
        device.free()
    del stream
    context.detach()                                       # current: destroyed, and popped
    assert gpu.errors == [] and not gpu.live_contexts and not gpu.context_stack
    with pytest.raises(FakeCudaError, match="invalid"):
        context.push()


def build_by_hand(trt, path):
    """A serialized engine, built with the calling thread's current context."""
    builder = trt.Builder(trt.Logger())
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    with open(path, "rb") as handle:
        assert trt.OnnxParser(network, trt.Logger()).parse(handle.read())
    config = builder.create_builder_config()
    config.max_workspace_size = 1 << 20
    return builder.build_serialized_network(network, config)


def test_fake_complains_about_tensorrt_objects_outliving_their_context():
    stack = FakeGpuStack("8.2.1.8")
    cuda, trt, gpu = stack.driver, stack.trt, stack.gpu
    cuda.init()
    with pytest.raises(FakeCudaError, match="invalid device context"):
        trt.Builder(trt.Logger())          # the real one would quietly use a second (primary) context
    context = cuda.Device(0).make_context()
    runtime = trt.Runtime(trt.Logger())
    engine = runtime.deserialize_cuda_engine(build_by_hand(trt, golden("gru")[0]))
    execution = engine.create_execution_context()
    stream = cuda.Stream()
    engine_bindings = engine.num_bindings
    buffers = [cuda.mem_alloc(4 * int(np.prod(engine.get_binding_shape(i)))) for i in range(engine_bindings)]
    context.pop()
    with pytest.raises(FakeCudaError, match="invalid device context"):
        execution.execute_async_v2([int(b) for b in buffers], stream.handle)
    del execution
    assert gpu.errors == ["IExecutionContext released without its CUDA context current on thread MainThread"]
    del gpu.errors[:]
    context.push()
    context.detach()                       # destroyed while the engine and the rest are alive
    assert len(gpu.errors) == 1
    assert gpu.errors[0].startswith("context destroyed while objects made in it were alive: ICudaEngine, Runtime, "
                                    "device allocation")
    del engine
    assert gpu.errors[1:] == ["ICudaEngine released after its CUDA context was destroyed"]
    del runtime, stream, buffers[:]        # each complains the same way
    assert len(gpu.errors) == 2 + 2 + engine_bindings
    del gpu.errors[:]
    # Detached on a thread that neither made it nor has it current, pycuda leaks it.
    context = cuda.Device(0).make_context()
    context.pop()
    on_thread(context.detach)
    assert gpu.errors == ["context detached on a thread that neither made it nor had it current: leaked"]


# --- the loop-free graph: TensorRT 8.x makes a GRU/LSTM node a loop, and some 8.x builds fail in it --

def plain(cell):
    return os.path.join(DATA, "golden_{}_plain.onnx".format(cell))


def decode_all(backend, features):
    state = backend.initial_state()
    outputs = []
    for row in features:
        positions, state = backend.step(row, state)
        outputs.append(positions)
    return np.stack(outputs), backend.state_arrays(state)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_an_engine_built_from_the_loop_free_graph_decodes_like_torch(fake, tmp_path, cell):
    path, reference = golden(cell)
    engine_path = str(tmp_path / "plain.engine")
    metadata = build_engine(path, engine_path, plain_path=plain(cell), graph="plain")
    assert metadata["graph"] == "plain" and metadata["graph_sha256"] != metadata["onnx_sha256"]
    with create_backend("tensorrt", path, engine_path=engine_path) as backend:
        assert backend.engine_source.startswith("loaded")
        positions, state = decode_all(backend, reference["features"])
    assert np.max(np.abs(positions - reference["positions"])) < 1e-4
    assert np.max(np.abs(state[0] - reference["h_final"])) < 1e-4


def test_auto_falls_back_to_the_loop_free_graph_where_the_rnn_build_fails(fake, tmp_path):
    path, reference = golden("gru")
    fake.gpu.rnn_loop_fails = True
    major = int(fake.trt.__version__.split(".")[0])
    engine_path = str(tmp_path / "auto.engine")
    if major != 8:
        assert build_engine(path, engine_path, plain_path=plain("gru"))["graph"] == "rnn"    # only 8.x fails
        return
    with pytest.raises(ConfigError, match="could not build"):
        build_engine(path, engine_path, plain_path=plain("gru"), graph="rnn")
    with pytest.raises(ConfigError, match="could not build"):
        build_engine(path, engine_path)                           # no loop-free graph to fall back on
    metadata = build_engine(path, engine_path, plain_path=plain("gru"))
    assert metadata["graph"] == "plain" and "did not build" in metadata["fallback"]
    with create_backend("tensorrt", path, engine_path=engine_path) as backend:
        positions, _ = decode_all(backend, reference["features"])
    assert np.max(np.abs(positions - reference["positions"])) < 1e-4


def test_a_loop_free_graph_of_another_model_or_a_missing_one_is_refused(fake, tmp_path):
    with pytest.raises(ConfigError, match="another model"):
        build_engine(golden("gru")[0], str(tmp_path / "x.engine"), plain_path=plain("lstm"), graph="plain")
    with pytest.raises(ConfigError, match="not a loop-free export"):
        build_engine(golden("gru")[0], str(tmp_path / "x.engine"), plain_path=golden("gru")[0], graph="plain")
    with pytest.raises(UsageError, match="lacks"):
        build_engine(golden("gru")[0], str(tmp_path / "x.engine"), graph="plain")
    assert not os.path.exists(str(tmp_path / "x.engine"))
