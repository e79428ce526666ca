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

CUDA context.  pycuda's context stack is per thread, and ``neurohand run``
creates the backend on the main thread but steps it on its decoder thread.
So the backend's one context is current nowhere between calls: every call
that touches CUDA (set-up, ``initial_state``, ``step``, ``state_arrays``,
``close``) pushes it on the calling thread and pops it after, under a lock,
whichever thread calls.  ``close`` releases everything made in the context
while it is current, then destroys it.  A build followed by a run
(:meth:`TensorRTBackend.from_onnx` without a saved engine) uses the same
context.

Supported TensorRT majors are 8 (JetPack 4.6), 9 and 10; others are refused
(7 is too old, 11 removed ``BuilderFlag.FP16`` and weakly typed networks).
FP32 engines are built with TF32 cleared (see :func:`_clear_tf32`).

Only fakes of both APIs (tests/device/fake_tensorrt.py) exercise this module
here; real-GPU verification is the on-device self-test with golden vectors.
"""
import hashlib
import os
import threading

import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.base import Backend, BackendUnavailableError
from neurohand.firmware_bridge.shared.checks import check_option, load_json_file
from neurohand.firmware_bridge.shared.atomic import write_atomic, write_json_atomic
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

ENGINE_METADATA_SUFFIX = ".json"
DEFAULT_WORKSPACE_MB = 256
SUPPORTED_MAJORS = (8, 9, 10)          # also named in select_api's message


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

    def release(self):
        self._engine = self._context = None


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

    def release(self):
        self._engine = self._context = None


def tensorrt_major(trt):
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise BackendUnavailableError("cannot read the TensorRT version from {!r}".format(trt.__version__))


def select_api(trt):
    """The adapter class for the installed TensorRT: by major version, then by features.

    8.x uses bindings (8.5/8.6 also have named tensors, but 8.2 -- JetPack 4.6 --
    does not, and the bindings API is the one 8.x is known to run well with);
    10.x uses named tensors, which is all it has.  Other majors are refused
    before any CUDA is touched: 7 lacks what the engines here need, and 11
    removed ``BuilderFlag.FP16`` and weakly typed networks, so the build
    could not even be asked for what the self-test was run with.
    """
    major = tensorrt_major(trt)
    if major not in SUPPORTED_MAJORS:
        raise BackendUnavailableError(
            "TensorRT {} is not supported; neurohand supports TensorRT 8.x (JetPack 4.6), 9.x and 10.x".format(
                trt.__version__))
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


def _clear_tf32(trt, config):
    # TF32 is on by default (TensorRT 7.1 and later) and used on Ampere and newer GPUs (Orin, not
    # the Nano): it rounds FP32 inner products to 10-bit mantissas, errors of the order of 1e-4, so
    # an "FP32" engine would meet the self-test's 1e-4 tolerance only by luck, or miss it.
    flag = getattr(trt.BuilderFlag, "TF32", None)
    if flag is not None:
        config.clear_flag(flag)


def _build_serialized(trt, api, onnx_bytes, fp16, workspace_mb):
    """Parse and build with the CUDA context current; return the serialized engine (bytes).

    Every TensorRT object made here is released before this returns or
    raises, newest first: a raised exception's traceback holds this frame,
    and would keep the builder (which holds CUDA resources) alive until after
    the caller has popped the context.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = network = parser = config = serialized = None
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(api.network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_bytes):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ConfigError("TensorRT's ONNX parser rejected the model: {}".format(
                "; ".join(errors) or "no detail"))
        config = builder.create_builder_config()
        api.set_workspace(trt, config, int(workspace_mb) << 20)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            _clear_tf32(trt, config)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ConfigError("TensorRT could not build an engine (see its log above); "
                              "try a larger workspace_mb than {}".format(workspace_mb))
        return bytes(serialized)
    finally:
        serialized = config = parser = network = None
        builder = None


class _CudaContext(object):
    """The one CUDA context of a build or a backend; ``with context:`` makes it current.

    pycuda's ``make_context`` leaves the new context current on the creating
    thread only, and its context stack is per thread: so it is popped at once,
    and each use pushes it on the thread that uses it and pops it after, also
    when the use raises.  The lock makes the uses one at a time: they share the
    stream and the buffers, and ``destroy`` must not free them under a step.
    """

    def __init__(self, cuda):
        cuda.init()
        self.device = cuda.Device(0)
        self.gpu_name = self.device.name()
        self._lock = threading.Lock()
        self._context = self.device.make_context()
        self._context.pop()

    def __enter__(self):
        self._lock.acquire()
        try:
            if self._context is None:
                raise UsageError("tensorrt backend: used after close()")
            self._context.push()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc_info):
        try:
            self._context.pop()
        finally:
            self._lock.release()

    def destroy(self, release=None):
        """Call ``release()`` with the context current, then destroy the context; idempotent.

        The context is detached while current: that destroys it and takes it off
        this thread's stack, on any thread.  (Popped first, pycuda could only
        destroy it on the thread that made it; elsewhere it leaks it silently.)
        """
        with self._lock:
            context, self._context = self._context, None
            if context is None:
                return
            context.push()
            try:
                if release is not None:
                    release()
            finally:
                context.detach()


def _build_and_save(trt, api, context, onnx_path, engine_path, fp16, workspace_mb, graph_path=None):
    """Build in ``context`` and save the engine and its metadata; return (metadata, serialized).

    ``graph_path``: the loop-free export of the same model to build from instead
    (the engine still belongs to ``onnx_path``, which the metadata names).
    """
    with open(onnx_path, "rb") as handle:
        onnx_bytes = handle.read()
    graph_bytes = onnx_bytes
    if graph_path is not None:
        with open(graph_path, "rb") as handle:
            graph_bytes = handle.read()
    with context:
        serialized = _build_serialized(trt, api, graph_bytes, fp16, workspace_mb)
    metadata = {
        "tensorrt_version": str(trt.__version__), "api": api.name, "gpu_name": context.gpu_name,
        "fp16": bool(fp16), "workspace_mb": int(workspace_mb),
        "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "graph": "rnn" if graph_path is None else "plain",
        "graph_sha256": hashlib.sha256(graph_bytes).hexdigest(),
        "engine_sha256": hashlib.sha256(serialized).hexdigest(),
    }
    write_atomic(engine_path, serialized)
    write_json_atomic(engine_path + ENGINE_METADATA_SUFFIX, metadata, indent=2)
    return metadata, serialized


GRAPHS = ("auto", "rnn", "plain")


def build_engine(onnx_path, engine_path, fp16=False, workspace_mb=DEFAULT_WORKSPACE_MB, plain_path=None,
                 graph="auto"):
    """Build a TensorRT engine for the model ``onnx_path`` and save it to ``engine_path``.

    ``graph``: "rnn" builds from ``onnx_path`` (GRU/LSTM nodes); "plain" from
    ``plain_path``, the loop-free export of the same model (TensorRT 8.x makes
    a GRU/LSTM node a loop, and some 8.x builds fail inside it); "auto" tries
    "rnn" and, where that build fails and ``plain_path`` is given, "plain"
    (``metadata["fallback"]`` says why).

    Also writes ``engine_path + ".json"`` with the metadata returned here, so a
    later load can tell whether the engine still belongs to that model and
    TensorRT version.  FP32 engines are built without TF32.

    Returns
    -------
    dict: tensorrt_version, api ("bindings"|"tensors"), gpu_name, fp16,
    workspace_mb, onnx_sha256, graph ("rnn"|"plain"), graph_sha256, engine_sha256
    """
    check_option("graph", graph, GRAPHS)
    trt, cuda = import_tensorrt()
    api = select_api(trt)
    weights = onnx_weights.load_rnn_weights(onnx_path)          # refuse a graph that is not ours, early
    if plain_path is not None:
        check_plain_graph(plain_path, weights)
    elif graph == "plain":
        raise UsageError("--graph plain needs the loop-free export (model_plain.onnx), which this bundle lacks")
    context = _CudaContext(cuda)
    try:
        if graph == "plain":
            metadata, _ = _build_and_save(trt, api, context, onnx_path, engine_path, fp16, workspace_mb, plain_path)
        else:
            try:
                metadata, _ = _build_and_save(trt, api, context, onnx_path, engine_path, fp16, workspace_mb)
            except ConfigError as exc:
                if graph == "rnn" or plain_path is None:
                    raise
                metadata, _ = _build_and_save(trt, api, context, onnx_path, engine_path, fp16, workspace_mb,
                                              plain_path)
                metadata["fallback"] = "the GRU/LSTM graph did not build ({}); built the loop-free one".format(exc)
    finally:
        context.destroy()
    return metadata


def check_plain_graph(plain_path, weights):
    """ConfigError unless ``plain_path`` is the loop-free export of the model ``weights`` came from."""
    plain = onnx_weights.read_onnx(plain_path)
    if plain.metadata.get(onnx_weights.GRAPH_FORMAT_KEY) != onnx_weights.PLAIN_GRAPH_FORMAT:
        raise ConfigError("{!r} is not a loop-free export (graph format {!r}, expected {!r})".format(
            plain_path, plain.metadata.get(onnx_weights.GRAPH_FORMAT_KEY), onnx_weights.PLAIN_GRAPH_FORMAT))
    if plain.metadata.get(onnx_weights.CONFIG_METADATA_KEY) != weights.metadata.get(onnx_weights.CONFIG_METADATA_KEY):
        raise ConfigError("{!r} was exported from another model than the bundle's model.onnx".format(plain_path))
    found = sorted({node.op_type for node in plain.nodes} & {"GRU", "LSTM", "RNN", "Loop", "Scan"})
    if found:
        raise ConfigError("{!r} holds {} nodes; the loop-free export has none".format(plain_path, found))


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
        """Set up on the GPU; call with ``cuda_context`` current (``with cuda_context:``).

        On failure everything made so far is released before the exception
        leaves, while the context is still current.  (GPU objects live only in
        attributes, never in locals, which a traceback would keep alive.)
        """
        super().__init__(weights)
        self._cuda = cuda
        self._cuda_context = cuda_context
        self.engine_source = engine_source
        self.tensorrt_version = str(trt.__version__)
        self.api = None
        self._runtime = self._engine = self._context = self._stream = None
        self._allocations = []
        self._device_features = self._device_positions = None
        self._device_states = []
        self._host_features = self._host_positions = None
        self._host_zero_state = self._host_state_readback = None
        try:
            self._set_up(weights, trt, cuda, api_class, serialized)
        except BaseException:
            self._release()
            raise
        self._current = 0
        self._serial = 0

    def _set_up(self, weights, trt, cuda, api_class, serialized):
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(serialized)
        if self._engine is None:
            raise ConfigError("TensorRT could not load the engine ({}); rebuild it with build_engine "
                              "on this device".format(self.engine_source))
        self._context = self._engine.create_execution_context()
        self.api = api_class(trt, self._engine, self._context)
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

    def _release(self):
        """Release every GPU object, users before what they use; the context must be current.

        Each release happens even if an earlier one raised: one skipped would
        be destroyed later, without its context (allocator errors or a crash at
        exit on TensorRT 8.x).
        """
        try:
            if self._stream is not None:
                self._stream.synchronize()    # nothing queued may touch what is freed below
        finally:
            if self.api is not None:
                self.api.release()
            self._context = None              # the execution context, before its engine
            self._engine = None               # the engine, before its runtime
            self._runtime = None
            self._stream = None
            allocations, self._allocations = self._allocations, []
            self._device_features = self._device_positions = None
            self._device_states = []
            failure = None
            while allocations:
                try:
                    allocations.pop().free()
                except Exception as exc:      # pycuda: freed twice, or a dead context
                    failure = failure or exc
            self._host_features = self._host_positions = None
            self._host_zero_state = self._host_state_readback = None
            if failure is not None:
                raise failure

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
        there; with None, it is built in memory for this run only.  Building
        and running share one CUDA context.
        """
        trt, cuda = import_tensorrt()
        api = select_api(trt)
        weights = onnx_weights.load_rnn_weights(onnx_path)
        context = _CudaContext(cuda)
        try:
            if engine_path is None:
                with open(onnx_path, "rb") as handle:
                    onnx_bytes = handle.read()
                with context:
                    serialized = _build_serialized(trt, api, onnx_bytes, fp16, workspace_mb)
                source = "built in memory"
            elif not os.path.exists(engine_path):
                _, serialized = _build_and_save(trt, api, context, onnx_path, engine_path, fp16, workspace_mb)
                source = "built and saved to {}".format(engine_path)
            else:
                _check_engine_metadata(trt, onnx_path, engine_path, fp16, context.gpu_name)
                with open(engine_path, "rb") as handle:
                    serialized = handle.read()
                source = "loaded from {}".format(engine_path)
            with context:
                backend = cls(weights, trt, cuda, api, serialized, context, source)
        except BaseException:
            context.destroy()
            raise
        return backend

    def _check_state(self, state):
        if not isinstance(state, _GpuState) or state.owner is not self:
            raise UsageError("tensorrt backend: state must come from this backend's initial_state() or step()")
        if state.serial != self._serial:
            raise UsageError("tensorrt backend: stale state (the GPU holds only the latest state); "
                             "pass the state returned by the previous step")

    def _in_context(self):
        """``with self._in_context():`` -- this backend's context, current on the calling thread."""
        context = self._cuda_context
        if context is None:
            raise UsageError("tensorrt backend: used after close()")
        return context

    def initial_state(self):
        with self._in_context():
            for buffers in self._device_states:
                self._cuda.memcpy_htod_async(buffers[0], self._host_zero_state, self._stream)
            self._stream.synchronize()
            self._current = 0
            self._serial += 1
            return _GpuState(self, self._serial)

    def step(self, features, state):
        self._check_state(state)
        features = self._features(features)
        with self._in_context():
            cuda, api = self._cuda, self.api
            read, write = self._current, 1 - self._current
            self._host_features[0] = features
            cuda.memcpy_htod_async(self._device_features, self._host_features, self._stream)
            for name_in, name_out, buffers in zip(self._state_in, self._state_out, self._device_states):
                api.set_address(name_in, buffers[read])
                api.set_address(name_out, buffers[write])
            if not api.execute(self._stream):
                raise RuntimeError("TensorRT failed to enqueue the decoder step (see its log)")
            cuda.memcpy_dtoh_async(self._host_positions, self._device_positions, self._stream)
            self._stream.synchronize()
            self._current = write
            self._serial += 1
            return self._host_positions[0].copy(), _GpuState(self, self._serial)

    def state_arrays(self, state):
        self._check_state(state)
        arrays = []
        with self._in_context():
            for buffers in self._device_states:
                self._cuda.memcpy_dtoh_async(self._host_state_readback, buffers[self._current], self._stream)
                self._stream.synchronize()
                arrays.append(self._host_state_readback.copy())
        return arrays

    def close(self):
        """Release the engine, its context, the stream and the buffers in the CUDA context, then
        destroy it; idempotent, from any thread."""
        context, self._cuda_context = self._cuda_context, None
        if context is not None:
            context.destroy(self._release)
