"""Fakes of the TensorRT Python API (8.2 and 10.x) and of pycuda, for machines without a GPU.

    fake = FakeGpuStack("8.2.1.8")        # or "10.3.0"
    fake.install(monkeypatch)             # sys.modules: tensorrt, pycuda, pycuda.driver

Faithful to the documented APIs in what the backend uses, and stricter where a
real GPU would silently do the wrong thing:

* ``fake.trt`` for 8.x has ONLY the bindings API (``num_bindings``,
  ``get_binding_index``/``name``/``shape``/``dtype``, ``binding_is_input``,
  ``execute_async_v2(bindings, stream_handle)``, ``config.max_workspace_size``);
  for 10.x ONLY the named-tensor API (``num_io_tensors``, ``get_tensor_name``/
  ``mode``/``shape``/``dtype``, ``set_tensor_address``, ``execute_async_v3``,
  ``set_memory_pool_limit``).  Builder configs use __slots__, so setting the
  other version's attribute raises AttributeError as pybind objects do.
* The 8.2 parser rejects networks without EXPLICIT_BATCH and opsets above 13;
  the 8.2 builder fails without a workspace (TensorRT finds no tactics).
* The "engine" really computes the decoder, with numpy from the ONNX weights
  it was parsed from (FP16 engines round weights and state to float16).
* ``fake.driver`` (pycuda.driver): ``init``, ``Device(i).name()/make_context()``,
  ``mem_alloc``, ``pagelocked_empty``, ``memcpy_htod_async``,
  ``memcpy_dtoh_async``, ``Stream().synchronize()``.  Device memory is real
  bytes; async copies and engine runs are queued on the stream and happen at
  ``synchronize()`` (so a missing synchronize shows).  Copies must be between
  page-locked host arrays and live allocations of exactly the same size;
  allocating without a current context raises like pycuda.
* Counters (``fake.gpu.copies``) let tests prove the state stays on the GPU.
"""
import json
import sys
import types

import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.numpy_backend import NumpyRnn

ENGINE_MAGIC = b"FAKETRT1"


class FakeCudaError(RuntimeError):
    """What pycuda.driver raises (pycuda's LogicError/Error stand-in)."""


# --- the GPU and pycuda.driver -------------------------------------------------

class FakeGpu(object):
    """Device memory (pointer -> bytearray), streams and the context stack."""

    def __init__(self):
        self.memory = {}
        self.next_pointer = 0x7F0000000000
        self.streams = {}
        self.context_stack = []
        self.pagelocked = {}
        self.copies = {"htod": 0, "dtoh": 0}
        self.executions = 0

    def buffer(self, pointer, nbytes=None, what="buffer"):
        pointer = int(pointer)
        if pointer not in self.memory:
            raise FakeCudaError("{}: 0x{:x} is not a live device allocation".format(what, pointer))
        data = self.memory[pointer]
        if nbytes is not None and len(data) != nbytes:
            raise FakeCudaError("{}: device allocation 0x{:x} has {} bytes, {} expected".format(
                what, pointer, len(data), nbytes))
        return data

    def require_context(self):
        if not self.context_stack:
            raise FakeCudaError("explicit_context_dependent failed: invalid device context - "
                                "no currently active context?")


class _DeviceAllocation(object):
    def __init__(self, gpu, pointer):
        self._gpu = gpu
        self._pointer = pointer

    def __int__(self):
        return self._pointer

    __index__ = __int__

    def free(self):
        if self._pointer in self._gpu.memory:
            del self._gpu.memory[self._pointer]


class _Stream(object):
    def __init__(self, gpu):
        gpu.require_context()
        self._gpu = gpu
        self.handle = 0x5000 + len(gpu.streams) + 1
        self.pending = []
        gpu.streams[self.handle] = self

    def synchronize(self):
        pending, self.pending = self.pending, []
        for operation in pending:
            operation()


class _Context(object):
    def __init__(self, gpu):
        self._gpu = gpu

    def pop(self):
        if not self._gpu.context_stack or self._gpu.context_stack[-1] is not self:
            raise FakeCudaError("cannot pop non-current context")
        self._gpu.context_stack.pop()


class _Device(object):
    def __init__(self, gpu, index):
        if index != 0:
            raise FakeCudaError("invalid device ordinal {}".format(index))
        self._gpu = gpu

    def name(self):
        return "Fake NVIDIA Tegra X1"

    def make_context(self):
        context = _Context(self._gpu)
        self._gpu.context_stack.append(context)
        return context


def _make_driver(gpu):
    driver = types.ModuleType("pycuda.driver")
    state = {"initialised": False}

    def init(flags=0):
        state["initialised"] = True

    def device(index):
        if not state["initialised"]:
            raise FakeCudaError("cuInit has not been called (pycuda.driver.init())")
        return _Device(gpu, index)

    def mem_alloc(nbytes):
        gpu.require_context()
        pointer = gpu.next_pointer
        gpu.next_pointer += (int(nbytes) + 255) // 256 * 256 + 256
        gpu.memory[pointer] = bytearray(int(nbytes))
        return _DeviceAllocation(gpu, pointer)

    def pagelocked_empty(shape, dtype, order="C", mem_flags=0):
        gpu.require_context()
        array = np.empty(shape, dtype=dtype, order=order)
        gpu.pagelocked[id(array)] = array       # kept alive, so the id stays unique
        return array

    def check_host(array, what):
        if not isinstance(array, np.ndarray) or gpu.pagelocked.get(id(array)) is not array:
            raise FakeCudaError("{}: host array must come from pagelocked_empty".format(what))

    def enqueue(stream, operation):
        if stream is None:
            operation()
        else:
            stream.pending.append(operation)

    def memcpy_htod_async(dest, src, stream=None):
        check_host(src, "memcpy_htod_async")
        target = gpu.buffer(dest, src.nbytes, "memcpy_htod_async")
        gpu.copies["htod"] += 1
        # The DMA reads the host buffer when the stream gets to it, not now.
        enqueue(stream, lambda: target.__setitem__(slice(None), src.tobytes()))

    def memcpy_dtoh_async(dest, src, stream=None):
        check_host(dest, "memcpy_dtoh_async")
        source = gpu.buffer(src, dest.nbytes, "memcpy_dtoh_async")
        gpu.copies["dtoh"] += 1

        def copy():
            dest.reshape(-1)[...] = np.frombuffer(bytes(source), dtype=dest.dtype)
        enqueue(stream, copy)

    driver.init = init
    driver.Device = device
    driver.mem_alloc = mem_alloc
    driver.pagelocked_empty = pagelocked_empty
    driver.memcpy_htod_async = memcpy_htod_async
    driver.memcpy_dtoh_async = memcpy_dtoh_async
    driver.Stream = lambda flags=0: _Stream(gpu)
    driver.Error = FakeCudaError
    driver.LogicError = FakeCudaError
    return driver


# --- TensorRT ---------------------------------------------------------------------

def _make_tensorrt(version, gpu):
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger(object):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=1):
            self.min_severity = min_severity

    class DataType(object):
        FLOAT, HALF, INT8, INT32 = "FLOAT", "HALF", "INT8", "INT32"

    def nptype(data_type):
        return {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32}[data_type]

    class NetworkDefinitionCreationFlag(object):
        EXPLICIT_BATCH = 0            # deprecated (ignored) in 10.x, still defined

    class BuilderFlag(object):
        FP16, INT8 = 0, 1

    class _Network(object):
        def __init__(self, flags):
            self.flags = flags
            self.onnx_bytes = None
            self.inputs, self.outputs = [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        @property
        def num_outputs(self):
            return len(self.outputs)

    class _ParserError(object):
        def __init__(self, text):
            self._text = text

        def desc(self):
            return self._text

        def __str__(self):
            return self._text

    class OnnxParser(object):
        def __init__(self, network, logger):
            self._network = network
            self._errors = []

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

        def parse(self, model, path=None):
            explicit = self._network.flags & (1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            if major < 10 and not explicit:
                self._errors.append(_ParserError("Network must have the Explicit Batch flag set"))
                return False
            if not isinstance(model, (bytes, bytearray)):
                raise TypeError("parse(): model must be bytes")
            try:
                parsed = onnx_weights.parse_onnx(bytes(model))
            except Exception as exc:   # the real parser reports, never raises
                self._errors.append(_ParserError("failed to parse ONNX model: {}".format(exc)))
                return False
            opset = parsed.opsets.get("", 0)
            if major == 8 and opset > 13:
                self._errors.append(_ParserError("unsupported opset {} (8.2 supports 7-13)".format(opset)))
                return False
            self._network.onnx_bytes = bytes(model)
            self._network.inputs = list(parsed.inputs)
            self._network.outputs = list(parsed.outputs)
            return True

    if major < 10:
        class IBuilderConfig(object):
            __slots__ = ("max_workspace_size", "_flags")

            def __init__(self):
                self.max_workspace_size = 0     # 8.2's default: no workspace
                self._flags = set()

            def set_flag(self, flag):
                self._flags.add(flag)

            def get_flag(self, flag):
                return flag in self._flags
    else:
        class MemoryPoolType(object):
            WORKSPACE, DLA_MANAGED_SRAM = "WORKSPACE", "DLA_MANAGED_SRAM"

        class IBuilderConfig(object):
            __slots__ = ("_pools", "_flags")

            def __init__(self):
                self._pools = {}
                self._flags = set()

            def set_memory_pool_limit(self, pool, pool_size):
                if pool not in (MemoryPoolType.WORKSPACE, MemoryPoolType.DLA_MANAGED_SRAM):
                    raise TypeError("set_memory_pool_limit(): incompatible pool {!r}".format(pool))
                self._pools[pool] = int(pool_size)

            def get_memory_pool_limit(self, pool):
                return self._pools.get(pool, 1 << 40)

            def set_flag(self, flag):
                self._flags.add(flag)

            def get_flag(self, flag):
                return flag in self._flags

        trt.MemoryPoolType = MemoryPoolType

        class TensorIOMode(object):
            NONE, INPUT, OUTPUT = "NONE", "INPUT", "OUTPUT"

        trt.TensorIOMode = TensorIOMode

    class Builder(object):
        def __init__(self, logger):
            self.logger = logger
            self.platform_has_fast_fp16 = True
            self.last_config = None

        def create_network(self, flags=0):
            return _Network(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def build_serialized_network(self, network, config):
            gpu.require_context()
            self.last_config = config
            if network.onnx_bytes is None:
                return None
            if major < 10 and config.max_workspace_size <= 0:
                return None          # "no implementation obeys reformatting-free rules" etc.
            header = {"version": version, "fp16": config.get_flag(BuilderFlag.FP16),
                      "workspace": (config.max_workspace_size if major < 10
                                    else config.get_memory_pool_limit(MemoryPoolType.WORKSPACE))}
            encoded = json.dumps(header).encode("ascii")
            return ENGINE_MAGIC + len(encoded).to_bytes(4, "little") + encoded + network.onnx_bytes

    class _Engine(object):
        """The I/O tensors in network order: inputs, then outputs (as TensorRT orders bindings)."""

        def __init__(self, header, onnx_bytes):
            self.header = header
            parsed = onnx_weights.parse_onnx(onnx_bytes)
            weights = onnx_weights.load_rnn_weights(parsed)
            self.fp16 = header["fp16"]
            if self.fp16:
                weights = _round_weights(weights)
            self.rnn = NumpyRnn(weights)
            self.weights = weights
            self.io = ([(name, True, shape) for name, shape in parsed.inputs]
                       + [(name, False, shape) for name, shape in parsed.outputs])

        def _names(self):
            return [item[0] for item in self.io]

        def create_execution_context(self):
            return IExecutionContext(self)

        def run(self, addresses):
            """Compute one step reading and writing fake device memory."""
            nbytes = {name: 4 * int(np.prod(shape)) for name, _, shape in self.io}
            pointers = {name: int(addresses[name]) for name in nbytes}
            buffers = {name: gpu.buffer(pointers[name], nbytes[name], "tensor {!r}".format(name))
                       for name in nbytes}
            state_in, state_out = self.weights.state_names
            for name_in, name_out in zip(state_in, state_out):
                if pointers[name_in] == pointers[name_out]:
                    raise FakeCudaError("{} and {} alias the same device memory".format(name_in, name_out))

            def read(name):
                return np.frombuffer(bytes(buffers[name]), dtype=np.float32).reshape(
                    dict((n, s) for n, _, s in self.io)[name]).copy()

            def compute():
                gpu.executions += 1
                features = read(onnx_weights.INPUT_FEATURES)[0]
                states_in = [read(name) for name in state_in]
                positions = np.empty(self.weights.n_outputs, dtype=np.float32)
                states_out = [np.empty(self.weights.state_shape, dtype=np.float32) for _ in state_out]
                self.rnn.run(features, states_in, positions, states_out)
                if self.fp16:
                    states_out = [s.astype(np.float16).astype(np.float32) for s in states_out]
                buffers[onnx_weights.OUTPUT_POSITIONS][:] = positions.tobytes()
                for name, value in zip(state_out, states_out):
                    buffers[name][:] = value.tobytes()
            return compute

    if major < 10:
        class ICudaEngine(_Engine):
            @property
            def num_bindings(self):
                return len(self.io)

            def get_binding_index(self, name):
                names = self._names()
                return names.index(name) if name in names else -1

            def get_binding_name(self, index):
                return self.io[index][0]

            def binding_is_input(self, index):
                if isinstance(index, str):
                    index = self.get_binding_index(index)
                return self.io[index][1]

            def get_binding_shape(self, index):
                return tuple(self.io[index][2])

            def get_binding_dtype(self, index):
                return DataType.FLOAT

        class IExecutionContext(object):
            def __init__(self, engine):
                self.engine = engine

            def execute_async_v2(self, bindings, stream_handle, input_consumed=None):
                if len(bindings) != self.engine.num_bindings:
                    raise TypeError("execute_async_v2: {} bindings given, the engine has {}".format(
                        len(bindings), self.engine.num_bindings))
                if any(not isinstance(b, int) or b == 0 for b in bindings):
                    raise TypeError("execute_async_v2: bindings must be non-null device pointers (int)")
                if stream_handle not in gpu.streams:
                    raise FakeCudaError("execute_async_v2: unknown stream handle {!r}".format(stream_handle))
                compute = self.engine.run(dict(zip(self.engine._names(), bindings)))
                gpu.streams[stream_handle].pending.append(compute)
                return True
    else:
        class ICudaEngine(_Engine):
            @property
            def num_io_tensors(self):
                return len(self.io)

            def get_tensor_name(self, index):
                return self.io[index][0]

            def get_tensor_mode(self, name):
                for item_name, is_input, _ in self.io:
                    if item_name == name:
                        return TensorIOMode.INPUT if is_input else TensorIOMode.OUTPUT
                return TensorIOMode.NONE

            def get_tensor_shape(self, name):
                return tuple(dict((n, s) for n, _, s in self.io)[name])

            def get_tensor_dtype(self, name):
                return DataType.FLOAT

        class IExecutionContext(object):
            def __init__(self, engine):
                self.engine = engine
                self.addresses = {}

            def set_tensor_address(self, name, memory):
                if name not in self.engine._names():
                    return False            # TensorRT logs an error and returns false
                if not isinstance(memory, int):
                    raise TypeError("set_tensor_address(): memory must be an int pointer")
                self.addresses[name] = memory
                return True

            def execute_async_v3(self, stream_handle):
                if set(self.addresses) != set(self.engine._names()):
                    return False            # an address is missing: error logged, false returned
                if stream_handle not in gpu.streams:
                    raise FakeCudaError("execute_async_v3: unknown stream handle {!r}".format(stream_handle))
                gpu.streams[stream_handle].pending.append(self.engine.run(dict(self.addresses)))
                return True

    class Runtime(object):
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            data = bytes(serialized_engine)
            if not data.startswith(ENGINE_MAGIC):
                return None                 # the real one logs "magic tag does not match"
            size = int.from_bytes(data[8:12], "little")
            header = json.loads(data[12:12 + size].decode("ascii"))
            if header["version"] != version:
                return None                 # engines only load with the TensorRT that built them
            return ICudaEngine(header, data[12 + size:])

    for name, value in (("Logger", Logger), ("DataType", DataType), ("nptype", nptype),
                        ("NetworkDefinitionCreationFlag", NetworkDefinitionCreationFlag),
                        ("BuilderFlag", BuilderFlag), ("OnnxParser", OnnxParser),
                        ("IBuilderConfig", IBuilderConfig), ("Builder", Builder),
                        ("ICudaEngine", ICudaEngine), ("IExecutionContext", IExecutionContext),
                        ("Runtime", Runtime)):
        setattr(trt, name, value)
    return trt


def _round_weights(weights):
    """Weights rounded to float16 and back: the precision an FP16 engine computes with."""
    def half(array):
        return None if array is None else array.astype(np.float16).astype(np.float32)
    projection = None if weights.projection is None else tuple(half(a) for a in weights.projection)
    layers = [tuple(half(a) for a in layer) for layer in weights.layers]
    head = tuple(half(a) for a in weights.head)
    return onnx_weights.RnnWeights(weights.cell, weights.n_features, weights.n_outputs,
                                   weights.hidden_size, projection, layers, head, weights.metadata)


class FakeGpuStack(object):
    """One fake GPU with matching fake ``tensorrt`` and ``pycuda`` modules."""

    def __init__(self, version):
        self.gpu = FakeGpu()
        self.driver = _make_driver(self.gpu)
        self.pycuda = types.ModuleType("pycuda")
        self.pycuda.driver = self.driver
        self.trt = _make_tensorrt(version, self.gpu)

    def install(self, monkeypatch):
        """Make ``import tensorrt`` and ``import pycuda.driver`` find the fakes (undone after the test)."""
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setitem(sys.modules, "pycuda", self.pycuda)
        monkeypatch.setitem(sys.modules, "pycuda.driver", self.driver)
