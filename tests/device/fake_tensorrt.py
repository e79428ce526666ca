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
  "11.x" models what TensorRT 11 removed: no ``BuilderFlag.FP16``/``INT8`` and
  no ``EXPLICIT_BATCH``; "7.x" is the bindings API (both must be refused).
* ``BuilderFlag.TF32`` exists (TensorRT 7.1 and later) and a new builder config
  has it ON, as the real one; an FP32 engine built with it computes with
  weights rounded to TF32's 10-bit mantissa, as an Ampere-or-newer GPU (Orin)
  would (``gpu.tf32_cores``; a Maxwell Nano ignores the flag).
* The 8.2 parser rejects networks without EXPLICIT_BATCH and opsets above 13;
  the 8.2 builder fails without a workspace (TensorRT finds no tactics).
* The "engine" really computes the decoder, with numpy from the ONNX weights
  it was parsed from (FP16 engines round weights and state to float16).
* ``fake.driver`` (pycuda.driver): ``init``, ``Device(i).name()/make_context()``,
  ``Context.push()/pop()/detach()``, ``mem_alloc``, ``pagelocked_empty``,
  ``memcpy_htod_async``, ``memcpy_dtoh_async``, ``Stream().synchronize()``.
  Device memory is real bytes; async copies and engine runs are queued on the
  stream and happen at ``synchronize()`` (so a missing synchronize shows).
  Copies must be between page-locked host arrays and live allocations of
  exactly the same size.
* CUDA contexts as pycuda has them: the context stack is PER THREAD
  (``make_context`` makes the new context current on the calling thread only);
  allocating, copying, synchronizing, building, deserializing and executing
  need a current context on the calling thread, and the one the stream, the
  memory or the engine was made in (else FakeCudaError, pycuda's LogicError:
  "invalid device context").  ``detach()`` destroys the context when it is
  current or on the thread that made it, and leaks it elsewhere, as pycuda does.
* Releasing what was made in a context (``free()``, or the destructor of a
  stream, page-locked array, builder, runtime, engine or execution context)
  needs that context current on the releasing thread.  pycuda would activate
  it by itself on the thread that made it, TensorRT would not; the fake
  demands it everywhere.  ``free()`` raises; a destructor cannot, so it appends
  to ``gpu.errors``, as does destroying a context while something made in it
  is alive or while another thread has it current.  Tests assert
  ``gpu.errors == []``.
* Counters (``fake.gpu.copies``, ``contexts_created``) let tests prove the
  state stays on the GPU and that one context serves a build and a run.
"""
import json
import sys
import threading
import types
import weakref

import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.numpy_backend import NumpyRnn

ENGINE_MAGIC = b"FAKETRT1"


class FakeCudaError(RuntimeError):
    """What pycuda.driver raises (pycuda's LogicError/Error stand-in)."""


# --- the GPU and pycuda.driver -------------------------------------------------

class FakeGpu(object):
    """Device memory (pointer -> bytearray), streams, contexts and per-thread context stacks."""

    def __init__(self):
        self.memory = {}
        self.memory_context = {}
        self.next_pointer = 0x7F0000000000
        self.streams = weakref.WeakValueDictionary()
        self.next_stream = 0x5001
        self.copies = {"htod": 0, "dtoh": 0}
        self.executions = 0
        self.contexts_created = 0
        self.live_contexts = []
        self.errors = []
        self.tf32_cores = True
        # TensorRT 8.x up to 8.4 builds a GRU/LSTM node as an ILoop, and Myelin failures inside
        # such loops are reported on some of those versions: a test sets this to see that build fail.
        self.rnn_loop_fails = False
        self._threads = threading.local()

    @property
    def context_stack(self):
        """The CALLING THREAD's context stack, as pycuda keeps one per thread."""
        stack = getattr(self._threads, "stack", None)
        if stack is None:
            stack = self._threads.stack = []
        return stack

    def current_context(self):
        stack = self.context_stack
        return stack[-1] if stack else None

    def require_context(self, what, owner=None):
        """The calling thread's current context; raise as CUDA does without one, or with another than ``owner``."""
        current = self.current_context()
        if current is None or not current.alive:
            raise FakeCudaError("{} failed: invalid device context - no currently active context? (thread {})"
                                .format(what, threading.current_thread().name))
        if owner is not None and current is not owner:
            raise FakeCudaError("{} failed: invalid resource handle - made in another CUDA context".format(what))
        return current

    def release_problem(self, owner):
        """Why releasing something made in ``owner`` now would be wrong, or None."""
        if not owner.alive:
            return "after its CUDA context was destroyed"
        if self.current_context() is not owner:
            return "without its CUDA context current on thread {}".format(threading.current_thread().name)
        return None

    def buffer(self, pointer, nbytes=None, what="buffer"):
        pointer = int(pointer)
        if pointer not in self.memory:
            raise FakeCudaError("{}: 0x{:x} is not a live device allocation".format(what, pointer))
        if self.memory_context[pointer] is not self.current_context():
            raise FakeCudaError("{}: 0x{:x} was allocated in another CUDA context (invalid device context)"
                                .format(what, pointer))
        data = self.memory[pointer]
        if nbytes is not None and len(data) != nbytes:
            raise FakeCudaError("{}: device allocation 0x{:x} has {} bytes, {} expected".format(
                what, pointer, len(data), nbytes))
        return data


class _Resource(object):
    """Something made in a CUDA context that must be released with that context current."""

    _gpu = None
    _released = False

    def _bind(self, gpu, what, owner=None):
        self._what = what
        self._owner = gpu.require_context(what, owner)
        self._owner.resources.add(self)
        self._gpu = gpu

    def _release(self, explicit):
        problem = self._gpu.release_problem(self._owner)
        if problem is not None:
            message = "{} released {}".format(self._what, problem)
            if explicit:
                raise FakeCudaError(message)
            self._gpu.errors.append(message)
        self._released = True
        self._owner.resources.discard(self)
        self._on_release()

    def _on_release(self):
        pass

    def __del__(self):
        if self._gpu is not None and not self._released:
            self._release(explicit=False)


class _DeviceAllocation(_Resource):
    def __init__(self, gpu, pointer):
        self._pointer = pointer
        self._bind(gpu, "device allocation 0x{:x}".format(pointer))

    def __int__(self):
        return self._pointer

    __index__ = __int__

    def free(self):
        if self._released:
            raise FakeCudaError("device_allocation::free failed: invalid resource handle (freed twice)")
        self._release(explicit=True)

    def _on_release(self):
        self._gpu.memory.pop(self._pointer, None)
        self._gpu.memory_context.pop(self._pointer, None)


class _PinnedBytes(bytearray, _Resource):
    """The page-locked block behind a ``pagelocked_empty`` array (its base, as in pycuda)."""

    __hash__ = object.__hash__        # by identity: contexts keep their resources in WeakSets
    __eq__ = object.__eq__
    __ne__ = object.__ne__

    def __init__(self, gpu, nbytes):
        bytearray.__init__(self, nbytes)
        self._bind(gpu, "page-locked host buffer of {} bytes".format(nbytes))


def _pinned_block(array):
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, _PinnedBytes) else None


class _Stream(_Resource):
    def __init__(self, gpu):
        self._bind(gpu, "stream")
        self.handle = gpu.next_stream
        gpu.next_stream += 1
        self.pending = []
        gpu.streams[self.handle] = self

    def synchronize(self):
        self._gpu.require_context("cuStreamSynchronize", self._owner)
        pending, self.pending = self.pending, []
        for operation in pending:
            operation()

    def _on_release(self):
        self.pending = []


class _Context(object):
    """A pycuda Context: ``push``, ``pop`` (of the calling thread's stack), ``detach``."""

    def __init__(self, gpu):
        self._gpu = gpu
        self.alive = True
        self.thread = threading.get_ident()
        self.resources = weakref.WeakSet()
        self.current_on = {}          # thread ident -> times on that thread's stack
        gpu.contexts_created += 1
        gpu.live_contexts.append(self)
        self._enter()

    def _enter(self):
        self._gpu.context_stack.append(self)
        ident = threading.get_ident()
        self.current_on[ident] = self.current_on.get(ident, 0) + 1

    def _leave(self):
        self._gpu.context_stack.pop()
        self.current_on[threading.get_ident()] -= 1

    def push(self):
        if not self.alive:
            raise FakeCudaError("cuCtxPushCurrent failed: invalid device context (destroyed)")
        self._enter()

    def pop(self):
        # pycuda's Context.pop is static: it pops whatever is current on the calling thread.  The
        # fake also refuses to pop another context than this one, which would be a bug here.
        stack = self._gpu.context_stack
        if not stack:
            raise FakeCudaError("context::pop failed: invalid device context - cannot pop non-current context")
        if stack[-1] is not self:
            raise FakeCudaError("context::pop: another context is current on this thread")
        self._leave()

    def detach(self):
        if not self.alive:
            raise FakeCudaError("context::detach failed: invalid device context - cannot detach from invalid "
                                "context")
        stack = self._gpu.context_stack
        if stack and stack[-1] is self:
            self._leave()             # destroying the current context pops it
            self._destroy()
        elif self.thread == threading.get_ident():
            self._destroy()           # pycuda pushes it, and the destruction pops it
        else:
            self.alive = False        # pycuda marks it dead and leaks it, silently
            self._gpu.errors.append("context detached on a thread that neither made it nor had it current: "
                                    "leaked")

    def _destroy(self):
        gpu = self._gpu
        self.alive = False
        if any(self.current_on.values()):
            gpu.errors.append("context destroyed while still on a thread's context stack")
        alive = sorted(resource._what for resource in list(self.resources))
        if alive:
            gpu.errors.append("context destroyed while objects made in it were alive: {}".format(", ".join(alive)))
        for pointer in [p for p, owner in gpu.memory_context.items() if owner is self]:
            del gpu.memory[pointer], gpu.memory_context[pointer]      # the driver frees it all
        gpu.live_contexts.remove(self)


class _Device(object):
    def __init__(self, gpu, index):
        if index != 0:
            raise FakeCudaError("invalid device ordinal {}".format(index))
        self._gpu = gpu

    def name(self):
        return "Fake NVIDIA Tegra X1"

    def make_context(self, flags=0):
        return _Context(self._gpu)


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
        gpu.require_context("explicit_context_dependent")
        pointer = gpu.next_pointer
        gpu.next_pointer += (int(nbytes) + 255) // 256 * 256 + 256
        gpu.memory[pointer] = bytearray(int(nbytes))
        gpu.memory_context[pointer] = gpu.current_context()
        return _DeviceAllocation(gpu, pointer)

    def pagelocked_empty(shape, dtype, order="C", mem_flags=0):
        gpu.require_context("explicit_context_dependent")
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        block = _PinnedBytes(gpu, count * dtype.itemsize)
        return np.frombuffer(block, dtype=dtype, count=count).reshape(shape, order=order)

    def check_host(array, what):
        block = _pinned_block(array) if isinstance(array, np.ndarray) else None
        if block is None or block._gpu is not gpu or block._released:
            raise FakeCudaError("{}: host array must come from pagelocked_empty".format(what))

    def enqueue(stream, operation):
        if stream is None:
            operation()
        else:
            stream.pending.append(operation)

    def memcpy_htod_async(dest, src, stream=None):
        gpu.require_context("cuMemcpyHtoDAsync", None if stream is None else stream._owner)
        check_host(src, "memcpy_htod_async")
        target = gpu.buffer(dest, src.nbytes, "memcpy_htod_async")
        gpu.copies["htod"] += 1
        # The DMA reads the host buffer when the stream gets to it, not now.
        enqueue(stream, lambda: target.__setitem__(slice(None), src.tobytes()))

    def memcpy_dtoh_async(dest, src, stream=None):
        gpu.require_context("cuMemcpyDtoHAsync", None if stream is None else stream._owner)
        check_host(dest, "memcpy_dtoh_async")
        source = gpu.buffer(src, dest.nbytes, "memcpy_dtoh_async")
        gpu.copies["dtoh"] += 1

        def copy():
            dest.reshape(-1)[...] = np.frombuffer(bytes(source), dtype=dest.dtype)
        enqueue(stream, copy)

    driver.init = init
    driver.Device = device
    driver.Context = _Context
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
        pass

    class BuilderFlag(object):
        TF32 = 6                      # since 7.1; on by default
    if major < 11:
        NetworkDefinitionCreationFlag.EXPLICIT_BATCH = 0      # deprecated (ignored) in 10.x, still defined
        BuilderFlag.FP16, BuilderFlag.INT8 = 0, 1             # 11 types networks strongly: no precision flags
    if major >= 10:
        NetworkDefinitionCreationFlag.STRONGLY_TYPED = 1
    fp16_flag = getattr(BuilderFlag, "FP16", None)

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
            explicit = major >= 10 or self._network.flags & (1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
            if not explicit:
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
                self._flags = {BuilderFlag.TF32}

            def set_flag(self, flag):
                self._flags.add(flag)

            def clear_flag(self, flag):
                self._flags.discard(flag)

            def get_flag(self, flag):
                return flag in self._flags
    else:
        class MemoryPoolType(object):
            WORKSPACE, DLA_MANAGED_SRAM = "WORKSPACE", "DLA_MANAGED_SRAM"

        class IBuilderConfig(object):
            __slots__ = ("_pools", "_flags")

            def __init__(self):
                self._pools = {}
                self._flags = {BuilderFlag.TF32}

            def set_memory_pool_limit(self, pool, pool_size):
                if pool not in (MemoryPoolType.WORKSPACE, MemoryPoolType.DLA_MANAGED_SRAM):
                    raise TypeError("set_memory_pool_limit(): incompatible pool {!r}".format(pool))
                self._pools[pool] = int(pool_size)

            def get_memory_pool_limit(self, pool):
                return self._pools.get(pool, 1 << 40)

            def set_flag(self, flag):
                self._flags.add(flag)

            def clear_flag(self, flag):
                self._flags.discard(flag)

            def get_flag(self, flag):
                return flag in self._flags

        trt.MemoryPoolType = MemoryPoolType

        class TensorIOMode(object):
            NONE, INPUT, OUTPUT = "NONE", "INPUT", "OUTPUT"

        trt.TensorIOMode = TensorIOMode

    class Builder(_Resource):
        def __init__(self, logger):
            # The real builder sets up its CUDA resources in whatever context is current (with none, the
            # runtime API would quietly make a second one: the primary context).
            self._bind(gpu, "Builder")
            self.logger = logger
            self.platform_has_fast_fp16 = True
            self.last_config = None

        def create_network(self, flags=0):
            return _Network(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def build_serialized_network(self, network, config):
            gpu.require_context("build_serialized_network", self._owner)
            self.last_config = config
            if network.onnx_bytes is None:
                return None
            if major < 10 and config.max_workspace_size <= 0:
                return None          # "no implementation obeys reformatting-free rules" etc.
            if major == 8 and gpu.rnn_loop_fails and any(
                    node.op_type in ("GRU", "LSTM") for node in onnx_weights.parse_onnx(network.onnx_bytes).nodes):
                return None      # real 8.x logs "operation not supported within a loop body"
            header = {"version": version,
                      "fp16": fp16_flag is not None and config.get_flag(fp16_flag),
                      "tf32": config.get_flag(BuilderFlag.TF32),
                      "workspace": (config.max_workspace_size if major < 10
                                    else config.get_memory_pool_limit(MemoryPoolType.WORKSPACE))}
            encoded = json.dumps(header).encode("ascii")
            return ENGINE_MAGIC + len(encoded).to_bytes(4, "little") + encoded + network.onnx_bytes

    class _Engine(_Resource):
        """The I/O tensors in network order: inputs, then outputs (as TensorRT orders bindings)."""

        def __init__(self, header, onnx_bytes):
            self._bind(gpu, "ICudaEngine")
            self.header = header
            parsed = onnx_weights.parse_onnx(onnx_bytes)
            self.fp16 = header["fp16"]
            rounding = _to_float16 if self.fp16 else (_to_tf32 if header.get("tf32") and gpu.tf32_cores else None)
            if any(node.op_type in ("GRU", "LSTM") for node in parsed.nodes):
                weights = onnx_weights.load_rnn_weights(parsed)
                if rounding is not None:
                    weights = _round_weights(weights, rounding)
                self.rnn = NumpyRnn(weights)
            else:
                # The loop-free export: evaluated node by node, as TensorRT runs its layers.
                weights = self.rnn = _PlainGraph(parsed, rounding)
            self.weights = weights
            self.io = ([(name, True, shape) for name, shape in parsed.inputs]
                       + [(name, False, shape) for name, shape in parsed.outputs])

        def _names(self):
            return [item[0] for item in self.io]

        def create_execution_context(self):
            gpu.require_context("create_execution_context", self._owner)
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

    class _ExecutionContext(_Resource):
        def __init__(self, engine):
            self._bind(gpu, "IExecutionContext", engine._owner)
            self.engine = engine

        def _stream(self, method, stream_handle):
            gpu.require_context(method, self._owner)
            stream = gpu.streams.get(stream_handle)
            if stream is None:
                raise FakeCudaError("{}: unknown stream handle {!r}".format(method, stream_handle))
            if stream._owner is not self._owner:
                raise FakeCudaError("{}: the stream belongs to another CUDA context".format(method))
            return stream

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

        class IExecutionContext(_ExecutionContext):
            def execute_async_v2(self, bindings, stream_handle, input_consumed=None):
                if len(bindings) != self.engine.num_bindings:
                    raise TypeError("execute_async_v2: {} bindings given, the engine has {}".format(
                        len(bindings), self.engine.num_bindings))
                if any(not isinstance(b, int) or b == 0 for b in bindings):
                    raise TypeError("execute_async_v2: bindings must be non-null device pointers (int)")
                stream = self._stream("execute_async_v2", stream_handle)
                stream.pending.append(self.engine.run(dict(zip(self.engine._names(), bindings))))
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

        class IExecutionContext(_ExecutionContext):
            def __init__(self, engine):
                _ExecutionContext.__init__(self, engine)
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
                stream = self._stream("execute_async_v3", stream_handle)
                stream.pending.append(self.engine.run(dict(self.addresses)))
                return True

    class Runtime(_Resource):
        def __init__(self, logger):
            self.logger = logger
            if gpu.current_context() is not None:
                self._bind(gpu, "Runtime")

        def deserialize_cuda_engine(self, serialized_engine):
            gpu.require_context("deserialize_cuda_engine", self._owner if self._gpu is not None else None)
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


def _to_float16(array):
    return array.astype(np.float16).astype(np.float32)


def _to_tf32(array):
    """float32 rounded to TF32's 10-bit mantissa, as tensor cores read FP32 operands."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _round_weights(weights, rounding):
    """Weights rounded to the precision an engine computes with (float16, TF32) and back."""
    def rounded(array):
        return None if array is None else rounding(array)
    projection = None if weights.projection is None else tuple(rounded(a) for a in weights.projection)
    layers = [tuple(rounded(a) for a in layer) for layer in weights.layers]
    head = tuple(rounded(a) for a in weights.head)
    return onnx_weights.RnnWeights(weights.cell, weights.n_features, weights.n_outputs,
                                   weights.hidden_size, projection, layers, head, weights.metadata)


class _PlainGraph(object):
    """The loop-free export (train/export.py: export_plain_onnx) evaluated node by node in numpy.

    Knows exactly the operators that export writes; anything else is an error,
    as it would be a graph the project does not make.  Offers what the fake
    engine asks of a NumpyRnn and its weights (state names and shape, outputs,
    ``run``).
    """

    def __init__(self, parsed, rounding=None):
        self.parsed = parsed
        self.initializers = {name: (rounding(value) if rounding is not None and value.dtype == np.float32
                                    else value) for name, value in parsed.initializers.items()}
        inputs = [name for name, _ in parsed.inputs]
        lstm = onnx_weights.INPUT_C in inputs
        self.state_names = (([onnx_weights.INPUT_H, onnx_weights.INPUT_C] if lstm else [onnx_weights.INPUT_H]),
                            ([onnx_weights.OUTPUT_H, onnx_weights.OUTPUT_C] if lstm else [onnx_weights.OUTPUT_H]))
        shapes = dict(parsed.outputs)
        self.state_shape = tuple(shapes[onnx_weights.OUTPUT_H])
        self.n_outputs = shapes[onnx_weights.OUTPUT_POSITIONS][1]

    def run(self, features, states_in, positions, states_out):
        values = dict(self.initializers)
        values[onnx_weights.INPUT_FEATURES] = features.reshape(1, -1).astype(np.float32)
        for name, value in zip(self.state_names[0], states_in):
            values[name] = value
        for node in self.parsed.nodes:
            args = [values[name] if name else None for name in node.inputs]
            values[node.outputs[0]] = _plain_op(node, args)
        positions[:] = values[onnx_weights.OUTPUT_POSITIONS][0]
        for out, name in zip(states_out, self.state_names[1]):
            out[:] = values[name]


def _plain_op(node, args):
    op, attributes = node.op_type, node.attributes
    if op == "Constant":
        return attributes["value"]
    if op == "Gemm":
        a, b = args[0], args[1]
        if attributes.get("transA"):
            a = a.T
        if attributes.get("transB"):
            b = b.T
        result = attributes.get("alpha", 1.0) * a.dot(b)
        if len(args) > 2 and args[2] is not None:
            result = result + attributes.get("beta", 1.0) * args[2]
        return result.astype(np.float32)
    if op == "MatMul":
        return np.matmul(args[0], args[1]).astype(np.float32)
    if op in ("Add", "Sub", "Mul"):
        function = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
        return function(args[0], args[1]).astype(args[0].dtype)
    if op == "Sigmoid":
        return (1.0 / (1.0 + np.exp(-args[0]))).astype(np.float32)
    if op == "Tanh":
        return np.tanh(args[0]).astype(np.float32)
    if op == "Relu":
        return np.maximum(args[0], 0).astype(np.float32)
    if op == "Slice":
        data, starts, ends = args[0], args[1], args[2]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[int(axis)] = slice(int(start), int(min(end, 2 ** 62)), int(step))
        return data[tuple(index)]
    if op == "Gather":
        return np.take(args[0], args[1].astype(np.int64), axis=attributes.get("axis", 0))
    if op == "Unsqueeze":
        result = args[0]
        for axis in sorted(int(a) for a in args[1]):
            result = np.expand_dims(result, axis)
        return result
    if op == "Concat":
        return np.concatenate(args, axis=attributes["axis"])
    raise FakeCudaError("the fake TensorRT does not know operator {!r}".format(op))


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
