"""TensorRT backend: the decoder as a TensorRT engine on the Jetson's GPU.

Buffers are allocated once: page-locked host buffers for the features and
positions, device buffers for every I/O tensor, and TWO device buffers per
recurrent state tensor (h, and c for an LSTM).  Each step reads the state from
one and writes the next state into the other, then swaps them (ping-pong):
the state never leaves the GPU, so a step costs one small host->device copy,
the engine and one small device->host copy, all queued on one CUDA stream.

Two TensorRT Python APIs are in use in the field, handled by one small adapter
class each; everything else here is shared:

* :class:`BindingsApi` -- TensorRT 8.x (JetPack 4.6 ships 8.2): I/O tensors are
  *bindings* addressed by index (``engine.num_bindings``,
  ``engine.get_binding_index``/``get_binding_name``/``binding_is_input``/
  ``get_binding_shape``/``get_binding_dtype``), run with
  ``context.execute_async_v2(bindings, stream_handle)``; the builder workspace
  is ``config.max_workspace_size``; networks need the EXPLICIT_BATCH flag.
* :class:`TensorsApi` -- TensorRT 10.x: named I/O tensors
  (``engine.num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
  ``get_tensor_shape``, ``get_tensor_dtype``), addresses set with
  ``context.set_tensor_address(name, ptr)``, run with
  ``context.execute_async_v3(stream_handle)``; workspace via
  ``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, n)``; networks
  are always explicit-batch (flags 0).

The CUDA context is created by :meth:`TensorRTBackend.from_onnx` on the
calling thread; call ``step`` from that same thread.

Only fakes of both APIs (tests/device/fake_tensorrt.py) exercise this module
here; real-GPU verification is the on-device self-test with golden vectors.
"""
import hashlib
import os

import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.base import Backend, BackendUnavailableError
from neurohand.firmware_bridge.shared.checks import load_json_file
from neurohand.firmware_bridge.shared.atomic import write_atomic, write_json_atomic
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

ENGINE_METADATA_SUFFIX = ".json"
DEFAULT_WORKSPACE_MB = 256


def import_tensorrt():
    """Return (tensorrt module, pycuda.driver module) or raise BackendUnavailableError."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT is not installed ({}); on a Jetson install JetPack's python3-libnvinfer "
            "(apt install python3-libnvinfer), elsewhere pip install tensorrt".format(exc)) from exc
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailableError(
            "pycuda is not installed ({}); install it with: pip install 'neurohand[jetson]' "
            "(or pip install pycuda)".format(exc)) from exc
    return tensorrt, cuda


class BindingsApi(object):
    """TensorRT 8.x: bindings by index, ``execute_async_v2``."""

    name = "bindings"

    def __init__(self, trt, engine, context):
        self._engine = engine
        self._context = context
        self._trt = trt
        self._bindings = [0] * engine.num_bindings

    @staticmethod
    def supported(trt):
        return (hasattr(trt.ICudaEngine, "get_binding_index")
                and hasattr(trt.IExecutionContext, "execute_async_v2"))

    @staticmethod
    def network_flags(trt):
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)

    @staticmethod
    def set_workspace(trt, config, nbytes):
        config.max_workspace_size = nbytes

    def io_tensors(self):
        """List of (name, is_input, shape tuple, numpy dtype)."""
        engine = self._engine
        return [(engine.get_binding_name(i), bool(engine.binding_is_input(i)),
                 tuple(engine.get_binding_shape(i)), np.dtype(self._trt.nptype(engine.get_binding_dtype(i))))
                for i in range(engine.num_bindings)]

    def set_address(self, name, pointer):
        index = self._engine.get_binding_index(name)
        if index < 0:
            raise ConfigError("TensorRT engine has no binding named {!r}".format(name))
        self._bindings[index] = int(pointer)

    def execute(self, stream):
        return self._context.execute_async_v2(self._bindings, stream.handle)


class TensorsApi(object):
    """TensorRT 10.x (named tensors, ``execute_async_v3``)."""

    name = "tensors"

    def __init__(self, trt, engine, context):
        self._engine = engine
        self._context = context
        self._trt = trt

    @staticmethod
    def supported(trt):
        return (hasattr(trt.ICudaEngine, "num_io_tensors")
                and hasattr(trt.IExecutionContext, "execute_async_v3")
                and hasattr(trt.IExecutionContext, "set_tensor_address"))

    @staticmethod
    def network_flags(trt):
        return 0   # explicit batch is the only mode in 10.x; the flag is deprecated

    @staticmethod
    def set_workspace(trt, config, nbytes):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, nbytes)

    def io_tensors(self):
        engine, trt = self._engine, self._trt
        tensors = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            tensors.append((name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                            tuple(engine.get_tensor_shape(name)),
                            np.dtype(trt.nptype(engine.get_tensor_dtype(name)))))
        return tensors

    def set_address(self, name, pointer):
        if not self._context.set_tensor_address(name, int(pointer)):
            raise ConfigError("TensorRT refused the address of tensor {!r}".format(name))

    def execute(self, stream):
        return self._context.execute_async_v3(stream.handle)


def tensorrt_major(trt):
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise BackendUnavailableError("cannot read the TensorRT version from {!r}".format(trt.__version__))


def select_api(trt):
    """The adapter class for the installed TensorRT: by major version, then by features.

    8.x uses bindings (8.5/8.6 also have named tensors, but 8.2 -- JetPack 4.6 --
    does not, and the bindings API is the one 8.x is known to run well with);
    10.x and later use named tensors, which is all they have.
    """
    major = tensorrt_major(trt)
    if major < 8:
        raise BackendUnavailableError(
            "TensorRT {} is too old; neurohand needs 8.2 or newer (JetPack 4.6)".format(trt.__version__))
    preferred = (BindingsApi, TensorsApi) if major < 10 else (TensorsApi,)
    for api in preferred:
        if api.supported(trt):
            return api
    raise BackendUnavailableError(
        "TensorRT {} has neither the bindings API (execute_async_v2) nor the named-tensor API "
        "(execute_async_v3) this backend knows".format(trt.__version__))


def _sha256_file(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _build_serialized(trt, api, onnx_bytes, fp16, workspace_mb):
    """Parse and build; return the serialized engine (bytes)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(api.network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ConfigError("TensorRT's ONNX parser rejected the model: {}".format("; ".join(errors) or "no detail"))
    config = builder.create_builder_config()
    api.set_workspace(trt, config, int(workspace_mb) << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError("TensorRT could not build an engine (see its log above); "
                          "try a larger workspace_mb than {}".format(workspace_mb))
    return bytes(serialized)


class _CudaContext(object):
    """A CUDA context made current on this thread, popped on close."""

    def __init__(self, cuda):
        cuda.init()
        self.device = cuda.Device(0)
        self._context = self.device.make_context()

    def close(self):
        if self._context is not None:
            self._context.pop()
            self._context = None


def build_engine(onnx_path, engine_path, fp16=False, workspace_mb=DEFAULT_WORKSPACE_MB):
    """Build a TensorRT engine from ``onnx_path`` and save it to ``engine_path``.

    Also writes ``engine_path + ".json"`` with the metadata returned here, so a
    later load can tell whether the engine still belongs to that model and
    TensorRT version.

    Returns
    -------
    dict: tensorrt_version, api ("bindings"|"tensors"), gpu_name, fp16,
    workspace_mb, onnx_sha256, engine_sha256
    """
    trt, cuda = import_tensorrt()
    api = select_api(trt)
    onnx_weights.load_rnn_weights(onnx_path)          # refuse a graph that is not ours, early
    with open(onnx_path, "rb") as handle:
        onnx_bytes = handle.read()
    context = _CudaContext(cuda)
    try:
        serialized = _build_serialized(trt, api, onnx_bytes, fp16, workspace_mb)
        gpu_name = context.device.name()
    finally:
        context.close()
    metadata = {
        "tensorrt_version": str(trt.__version__), "api": api.name, "gpu_name": gpu_name,
        "fp16": bool(fp16), "workspace_mb": int(workspace_mb),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "engine_sha256": hashlib.sha256(serialized).hexdigest(),
    }
    write_atomic(engine_path, serialized)
    write_json_atomic(engine_path + ENGINE_METADATA_SUFFIX, metadata, indent=2)
    return metadata


def _check_engine_metadata(trt, onnx_path, engine_path, fp16, gpu_name):
    """Refuse an engine that belongs to another model, TensorRT version, GPU or precision.

    TensorRT engines are tuned to the GPU they were built on and are not
    portable between TensorRT versions, so either mismatch means: rebuild.
    """
    sidecar = engine_path + ENGINE_METADATA_SUFFIX
    try:
        metadata = load_json_file(sidecar, "TensorRT engine metadata")
    except ConfigError as exc:
        raise ConfigError("TensorRT engine {!r} has no readable metadata ({}); rebuild it with "
                          "build_engine".format(engine_path, exc)) from exc
    problems = []
    # The engine is not in the bundle manifest (it is built on the device): its own digest is
    # what proves the file is the one built (and self-tested), not a damaged or replaced one.
    if metadata.get("engine_sha256") != _sha256_file(engine_path):
        problems.append("the engine file does not match the digest recorded when it was built (damaged or "
                        "replaced)")
    if metadata.get("onnx_sha256") != _sha256_file(onnx_path):
        problems.append("it was built from a different model than {!r}".format(str(onnx_path)))
    if metadata.get("tensorrt_version") != str(trt.__version__):
        problems.append("it was built with TensorRT {} but this is {}".format(
            metadata.get("tensorrt_version"), trt.__version__))
    if metadata.get("gpu_name") != gpu_name:
        problems.append("it was built for GPU {!r} but this is {!r}".format(metadata.get("gpu_name"), gpu_name))
    if bool(metadata.get("fp16")) != bool(fp16):
        problems.append("it was built with fp16={} but fp16={} was asked for".format(metadata.get("fp16"), fp16))
    if problems:
        raise ConfigError("TensorRT engine {!r} cannot be used: {}; delete it or rebuild it with "
                          "build_engine".format(engine_path, "; ".join(problems)))
    return metadata


class _GpuState(object):
    """Token for the recurrent state held on the GPU by one backend.

    Only the token of the latest step is valid: the previous state's buffer is
    overwritten by the next step (ping-pong).
    """

    __slots__ = ("owner", "serial")

    def __init__(self, owner, serial):
        self.owner = owner
        self.serial = serial


class TensorRTBackend(Backend):
    name = "tensorrt"
    install_hint = "JetPack's python3-libnvinfer and pip install pycuda"

    def __init__(self, weights, trt, cuda, api_class, serialized, cuda_context, engine_source):
        super().__init__(weights)
        self._cuda = cuda
        self._cuda_context = cuda_context
        self.engine_source = engine_source
        self.tensorrt_version = str(trt.__version__)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise ConfigError("TensorRT could not load the engine ({}); rebuild it with build_engine "
                              "on this device".format(engine_source))
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        self.api = api_class(trt, engine, self._context)
        self._allocations = []
        self._stream = cuda.Stream()
        self._state_in, self._state_out = weights.state_names
        self._check_io(weights)
        self._host_features = cuda.pagelocked_empty((1, weights.n_features), np.float32)
        self._host_positions = cuda.pagelocked_empty((1, weights.n_outputs), np.float32)
        self._host_zero_state = cuda.pagelocked_empty(weights.state_shape, np.float32)
        self._host_zero_state[...] = 0.0
        self._host_state_readback = cuda.pagelocked_empty(weights.state_shape, np.float32)
        self._device_features = self._alloc(self._host_features.nbytes)
        self._device_positions = self._alloc(self._host_positions.nbytes)
        # Two device buffers per state tensor: [read this step, write this step], swapped after.
        self._device_states = [[self._alloc(self._host_zero_state.nbytes) for _ in range(2)]
                               for _ in self._state_in]
        self.api.set_address(onnx_weights.INPUT_FEATURES, self._device_features)
        self.api.set_address(onnx_weights.OUTPUT_POSITIONS, self._device_positions)
        self._current = 0
        self._serial = 0

    def _alloc(self, nbytes):
        allocation = self._cuda.mem_alloc(nbytes)
        self._allocations.append(allocation)
        return allocation

    def _check_io(self, weights):
        expected = {onnx_weights.INPUT_FEATURES: (True, (1, weights.n_features)),
                    onnx_weights.OUTPUT_POSITIONS: (False, (1, weights.n_outputs))}
        for name in self._state_in:
            expected[name] = (True, weights.state_shape)
        for name in self._state_out:
            expected[name] = (False, weights.state_shape)
        found = {}
        for name, is_input, shape, dtype in self.api.io_tensors():
            if dtype != np.float32:
                raise ConfigError("TensorRT engine tensor {!r} is {}, expected float32".format(name, dtype))
            found[name] = (is_input, shape)
        if found != expected:
            raise ConfigError("TensorRT engine I/O {} does not match the ONNX model's {}; rebuild the engine"
                              .format(sorted(found.items()), sorted(expected.items())))

    @classmethod
    def unavailable_reason(cls):
        try:
            trt, _ = import_tensorrt()
            select_api(trt)
        except BackendUnavailableError as exc:
            return str(exc)
        return None

    @classmethod
    def from_onnx(cls, onnx_path, engine_path=None, fp16=False, workspace_mb=DEFAULT_WORKSPACE_MB):
        """Load ``engine_path`` if it exists (checked against the model), else build.

        With ``engine_path`` given but absent, the engine is built and saved
        there; with None, it is built in memory for this run only.
        """
        trt, cuda = import_tensorrt()
        api = select_api(trt)
        weights = onnx_weights.load_rnn_weights(onnx_path)
        if engine_path is not None and not os.path.exists(engine_path):
            build_engine(onnx_path, engine_path, fp16=fp16, workspace_mb=workspace_mb)
            source = "built and saved to {}".format(engine_path)
        elif engine_path is not None:
            source = "loaded from {}".format(engine_path)
        else:
            source = "built in memory"
        context = _CudaContext(cuda)
        try:
            if source.startswith("loaded"):
                _check_engine_metadata(trt, onnx_path, engine_path, fp16, context.device.name())
            if engine_path is not None:
                with open(engine_path, "rb") as handle:
                    serialized = handle.read()
            else:
                with open(onnx_path, "rb") as handle:
                    serialized = _build_serialized(trt, api, handle.read(), fp16, workspace_mb)
            return cls(weights, trt, cuda, api, serialized, context, source)
        except BaseException:
            context.close()
            raise

    def _check_state(self, state):
        if not isinstance(state, _GpuState) or state.owner is not self:
            raise UsageError("tensorrt backend: state must come from this backend's initial_state() or step()")
        if state.serial != self._serial:
            raise UsageError("tensorrt backend: stale state (the GPU holds only the latest state); "
                             "pass the state returned by the previous step")

    def initial_state(self):
        cuda, stream = self._cuda, self._stream
        for buffers in self._device_states:
            cuda.memcpy_htod_async(buffers[0], self._host_zero_state, stream)
        stream.synchronize()
        self._current = 0
        self._serial += 1
        return _GpuState(self, self._serial)

    def step(self, features, state):
        self._check_state(state)
        features = self._features(features)
        cuda, stream, api = self._cuda, self._stream, self.api
        read, write = self._current, 1 - self._current
        self._host_features[0] = features
        cuda.memcpy_htod_async(self._device_features, self._host_features, stream)
        for name_in, name_out, buffers in zip(self._state_in, self._state_out, self._device_states):
            api.set_address(name_in, buffers[read])
            api.set_address(name_out, buffers[write])
        if not api.execute(stream):
            raise RuntimeError("TensorRT failed to enqueue the decoder step (see its log)")
        cuda.memcpy_dtoh_async(self._host_positions, self._device_positions, stream)
        stream.synchronize()
        self._current = write
        self._serial += 1
        return self._host_positions[0].copy(), _GpuState(self, self._serial)

    def state_arrays(self, state):
        self._check_state(state)
        arrays = []
        for buffers in self._device_states:
            self._cuda.memcpy_dtoh_async(self._host_state_readback, buffers[self._current], self._stream)
            self._stream.synchronize()
            arrays.append(self._host_state_readback.copy())
        return arrays

    def close(self):
        if self._cuda_context is None:
            return
        for allocation in self._allocations:
            allocation.free()
        self._allocations = []
        self._context = self._engine = self._runtime = None
        self._cuda_context.close()
        self._cuda_context = None
