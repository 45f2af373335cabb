"""
MuJoCo's ``mj_step`` for many sub-envs in one compiled call that holds no GIL.

The batched twin (``sb3_metarl.tasks.mujoco.batched``) advances each sub-env's own ``MjData`` with ``mj_step``. Called
from a Python loop, every call releases the GIL for the physics and takes it back before the next one, so a physics
thread waits for whatever Python another thread runs meanwhile (``benchmarks/gil_overlap.py`` measures it). This module
compiles the whole loop with numba (``nogil=True``) and calls MuJoCo's own library by its symbols: the loop over the
sub-envs, the copies of their controls and the ``mj_step`` calls run without the GIL from start to end, so physics
threads overlap the sampling thread's acting and bookkeeping. It calls the same C function on the same data as the
Python bindings do, so every trajectory is the same, bit for bit (tested per family, warm start included).

**Either it works or it is not used.** :func:`nogil_kernel` loads the loop once per process and checks it before
handing it out: numba must import (any error, not only a missing package), its JIT must be on (``NUMBA_DISABLE_JIT=1``
would run the loop as Python, where the external C functions do nothing), every MuJoCo symbol must resolve, and the
compiled loop must step a small model to the same bits as ``mujoco.mj_step``. Where any of this fails it returns
None and warns once, saying why; the twin then keeps its Python loop (the same samples, slower).

**MuJoCo errors.** An error inside ``mj_step`` (for example ``mj_stackAlloc: out of memory`` with a small
``<size memory>``) calls MuJoCo's error handler, whose default prints and exits the process; the Python bindings
replace it per call with one that jumps back to their C++ frame, which a compiled loop does not have. The loop
therefore installs its own handler (MuJoCo's thread-local one) for its duration: it records the message and the
thread, then parks that thread for good (MuJoCo's code after an error must not run on; no frame can be jumped back
to). A parked thread holds no GIL; the waiting side sees the record (:meth:`CompiledPhysics.error_of`) and raises
``mujoco.FatalError`` with MuJoCo's message, as the per-env path does, so a ``try: learn ... except: save`` works.
The loop must therefore run on threads that may be parked (:class:`sb3_metarl.common.threads.DaemonThreads`), never
on a thread that others wait for without a deadline.
"""

import glob
import os
import threading
import warnings
from collections.abc import Sequence
from functools import cache
from typing import Any

import mujoco
import numpy as np

#: the C symbols the loop calls, from MuJoCo's library and the C library
MUJOCO_SYMBOLS = ("mj_step", "mj_rnePostConstraint", "_mjPRIVATE__set_tls_error_fn", "_mjPRIVATE__get_tls_error_fn")
C_SYMBOLS = ("memcpy", "strlen", "sleep", "pthread_self")
#: MuJoCo formats an error into a 1024-byte buffer (``mju_error_v``)
MESSAGE_BYTES = 1024
#: how many threads can hold a MuJoCo error at once (a parked thread keeps its record: it never runs again)
ERROR_SLOTS = 64

#: the checked model of :func:`load_compiled_physics`: a hopping body with a hinge, a motor and floor contact
_CHECK_XML = """
<mujoco>
  <option timestep="0.01"/>
  <worldbody>
    <geom type="plane" size="5 5 0.1"/>
    <body pos="0 0 0.3">
      <joint name="slide" type="slide" axis="0 0 1"/>
      <joint name="hinge" type="hinge" axis="0 1 0"/>
      <geom type="capsule" fromto="-0.2 0 0 0.2 0 0" size="0.05"/>
    </body>
  </worldbody>
  <actuator><motor joint="hinge" gear="5"/></actuator>
</mujoco>
"""


class KernelUnavailable(RuntimeError):
    """The compiled physics loop cannot be used here; the message says why."""


def mujoco_library_path() -> str | None:
    """:return: the path of the MuJoCo shared library that the ``mujoco`` package loads, or None if none is found"""
    folder = os.path.dirname(mujoco.__file__)
    for pattern in ("libmujoco.so.*", "libmujoco*.dylib", "mujoco.dll"):
        found = sorted(glob.glob(os.path.join(folder, pattern)))
        if found:
            return found[0]
    return None


class Gather:
    """
    Byte segments of each row's state that the compiled loop copies into one float64 array (one row per sub-env, the
    segments side by side): one C loop instead of a Python list of views per step.

    :param sources: (rows, segments) uint64, each segment's address (a float64 array of the row's MjData, contiguous)
    :param sizes: (segments,) int64, each segment's bytes (the same for every row)
    :param out: (rows, sum(sizes) / 8) float64, C-contiguous: written by the loop
    """

    def __init__(self, sources: np.ndarray, sizes: np.ndarray, out: np.ndarray):
        if not (out.flags.c_contiguous and out.dtype == np.float64 and out.ndim == 2):
            raise ValueError("out: must be a C-contiguous float64 (rows, width) array.")
        if sources.shape != (len(out), len(sizes)) or 8 * out.shape[1] != int(np.sum(sizes)):
            raise ValueError(f"sources, sizes, out: shapes {sources.shape}, {sizes.shape}, {out.shape} do not agree.")
        self.arguments = (np.ascontiguousarray(sources, dtype=np.uint64), np.ascontiguousarray(sizes, dtype=np.int64), out)

    @classmethod
    def nothing(cls, rows: int) -> "Gather":
        """:return: a gather of no segment for ``rows`` rows"""
        return cls(np.zeros((rows, 0), dtype=np.uint64), np.zeros(0, dtype=np.int64), np.zeros((rows, 0)))


class CompiledPhysics:
    """
    The compiled loop and the record of the MuJoCo errors it met.

    Called as ``physics(models, datas, ctrl_addresses, controls, frame_skips, with_post_constraint, before, after)``:
    model, data and control addresses (uint64, one per sub-env), controls (rows, nu) float64 C-contiguous, frame skips
    (int64), whether to run the post-step force pass, and two :class:`Gather` (or None) naming what to copy out of
    each row's state before and after its physics; each row as Gymnasium's ``do_simulation``.
    """

    def __init__(self, advance: Any, error_threads: np.ndarray, error_messages: np.ndarray):
        self.advance = advance
        #: per slot, the ``threading.get_ident()`` of a thread parked at a MuJoCo error (0: free)
        self.error_threads = error_threads
        #: per slot, that error's message (NUL-terminated)
        self.error_messages = error_messages

    def __call__(
        self,
        models: np.ndarray,
        datas: np.ndarray,
        ctrl_addresses: np.ndarray,
        controls: np.ndarray,
        frame_skips: np.ndarray,
        with_post_constraint: bool,
        before: "Gather | None" = None,
        after: "Gather | None" = None,
    ) -> None:
        before, after = before or Gather.nothing(len(models)), after or Gather.nothing(len(models))
        self.advance(models, datas, ctrl_addresses, controls, frame_skips, with_post_constraint, *before.arguments,
                     *after.arguments)  # fmt: skip

    def error_of(self, thread_ident: int | None) -> str | None:
        """:return: MuJoCo's message if the thread ``thread_ident`` was parked at a MuJoCo error, else None"""
        if thread_ident is None:
            return None
        for slot in np.flatnonzero(self.error_threads == np.uint64(thread_ident)):
            return bytes(self.error_messages[slot]).split(b"\0", 1)[0].decode(errors="replace")
        return None


def _import_numba() -> Any:
    """:return: the numba module, its JIT on; :raise KernelUnavailable: where it cannot be used"""
    try:  # (imported here: a process without these families never pays for numba's import)
        import numba
    except Exception as error:  # a broken llvmlite raises OSError, NUMBA_NUM_THREADS=0 ValueError: any of them means no
        raise KernelUnavailable(f"numba cannot be imported ({type(error).__name__}: {error})") from error
    if numba.config.DISABLE_JIT:
        raise KernelUnavailable("NUMBA_DISABLE_JIT is set: the loop would run as Python, where MuJoCo's functions do nothing")
    if np.dtype(np.uintp).itemsize != 8:
        raise KernelUnavailable("a 64-bit platform is needed (addresses pass as 64-bit integers)")
    return numba


def _load_symbols(library_path: str, names: Sequence[str]) -> None:
    """:raise KernelUnavailable: unless the library loads and every one of ``names`` resolves in this process"""
    from llvmlite import binding

    try:
        binding.load_library_permanently(library_path)  # the library the bindings already loaded: the same code and state
    except Exception as error:
        raise KernelUnavailable(f"MuJoCo's library {library_path} cannot be loaded ({error})") from error
    # an unresolved symbol would be a call to address 0 inside a physics thread: check every one before compiling
    missing = [name for name in names if not binding.address_of_symbol(name)]
    if missing:
        raise KernelUnavailable(f"symbols not found in MuJoCo's or the C library: {', '.join(missing)}")


def _compile(numba: Any, mujoco_symbols: Sequence[str]) -> CompiledPhysics:
    """:return: the loop and its error handler, compiled (the symbols resolve: ``_load_symbols``)"""
    from numba import types
    from numba.extending import intrinsic

    step_name, post_name, set_handler_name, get_handler_name = mujoco_symbols
    # on 64-bit platforms an address passes as a 64-bit integer in the same register as a pointer
    address, void = types.uint64, types.void
    step = types.ExternalFunction(step_name, void(address, address))
    post_constraint = types.ExternalFunction(post_name, void(address, address))
    set_error_handler = types.ExternalFunction(set_handler_name, void(address))
    get_error_handler = types.ExternalFunction(get_handler_name, address())
    copy = types.ExternalFunction("memcpy", address(address, address, address))
    length = types.ExternalFunction("strlen", address(address))
    sleep = types.ExternalFunction("sleep", types.uint32(types.uint32))
    thread_self = types.ExternalFunction("pthread_self", address())

    @intrinsic
    def slots_at(typingctx: Any, location: Any) -> Any:  # pragma: no cover (compiled)
        """The uint64 array at an address (numba freezes global arrays as constants; this one is written)."""
        signature = types.CPointer(types.uint64)(location)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint64)))

        return signature, codegen

    error_threads = np.zeros(ERROR_SLOTS, dtype=np.uint64)
    error_messages = np.zeros((ERROR_SLOTS, MESSAGE_BYTES), dtype=np.uint8)
    threads_address, messages_address = error_threads.ctypes.data, error_messages.ctypes.data
    n_slots, message_bytes = ERROR_SLOTS, MESSAGE_BYTES

    @numba.cfunc(void(address))
    def on_error(message):  # pragma: no cover (compiled; runs inside mju_error, on the physics thread)
        threads = numba.carray(slots_at(threads_address), n_slots)
        for slot in range(n_slots):
            if threads[slot] == 0:
                size = min(length(message), message_bytes - 1)
                copy(messages_address + slot * message_bytes, message, size)
                threads[slot] = thread_self()  # (written last: the reader takes a slot once its thread is named)
                break
        while True:  # parked: MuJoCo's code after the error must not run on, and there is no frame to jump to
            sleep(3600)

    handler = on_error.address

    @numba.njit(nogil=True)
    def gather(sources, sizes, out, row):  # pragma: no cover (compiled)
        # the row's byte segments, one after the other, into its row of out (float64, C-contiguous)
        at = out.ctypes.data + row * out.shape[1] * 8
        for segment in range(sizes.shape[0]):
            copy(at, sources[row, segment], sizes[segment])
            at += sizes[segment]

    @numba.njit(nogil=True)
    def advance(models, datas, ctrl_addresses, controls, frame_skips, with_post_constraint,
                before_sources, before_sizes, before, after_sources, after_sizes, after):  # pragma: no cover  # fmt: skip
        # (compiled: coverage does not see it run) each row as Gymnasium's do_simulation: its controls, then
        # frame_skip calls of mj_step, then (where the family reads the forces) mj_rnePostConstraint; around it, the
        # copies of what the family reads of the row's state before and after (no Python loop over the rows for them)
        previous = get_error_handler()
        set_error_handler(handler)
        row_bytes = controls.shape[1] * 8
        first = controls.ctypes.data
        for row in range(datas.shape[0]):
            gather(before_sources, before_sizes, before, row)
            copy(ctrl_addresses[row], first + row * row_bytes, row_bytes)
            for _ in range(frame_skips[row]):
                step(models[row], datas[row])
            if with_post_constraint:
                post_constraint(models[row], datas[row])
            gather(after_sources, after_sizes, after, row)
        set_error_handler(previous)

    return CompiledPhysics(advance, error_threads, error_messages)


def _check(physics: CompiledPhysics) -> None:
    """:raise KernelUnavailable: unless the compiled loop steps a small model to the same bits as ``mujoco.mj_step``"""
    model = mujoco.MjModel.from_xml_string(_CHECK_XML)
    compiled, reference = mujoco.MjData(model), mujoco.MjData(model)
    controls = np.array([[0.7]])
    frame_skips = np.array([3], dtype=np.int64)
    segments = (compiled.qpos, compiled.qvel)
    sources = np.array([[segment.ctypes.data for segment in segments]], dtype=np.uint64)
    sizes = np.array([segment.nbytes for segment in segments], dtype=np.int64)
    width = model.nq + model.nv
    before, after = Gather(sources, sizes, np.zeros((1, width))), Gather(sources, sizes, np.zeros((1, width)))
    for _ in range(20):
        state_before = np.concatenate((reference.qpos, reference.qvel))
        reference.ctrl[:] = controls[0]
        mujoco.mj_step(model, reference, nstep=3)
        mujoco.mj_rnePostConstraint(model, reference)
        physics(addresses([model]), addresses([compiled]), np.array([compiled.ctrl.ctypes.data], dtype=np.uint64),
                controls, frame_skips, True, before, after)  # fmt: skip
    same = all(np.array_equal(getattr(compiled, name), getattr(reference, name)) for name in ("qpos", "qvel", "cacc", "ctrl"))
    same = same and np.array_equal(before.arguments[2][0], state_before)
    same = same and np.array_equal(after.arguments[2][0], np.concatenate((reference.qpos, reference.qvel)))
    if compiled.time != reference.time or compiled.time == 0.0 or not same:
        raise KernelUnavailable(
            f"the compiled loop's check failed: after 20 steps its time is {compiled.time} (mj_step's {reference.time}) and "
            f"its state is {'the same' if same else 'not the same'}"
        )


def load_compiled_physics(library_path: str | None = None, mujoco_symbols: Sequence[str] = MUJOCO_SYMBOLS) -> CompiledPhysics:
    """
    Compile and check the loop (about half a second, numba's start included).

    :param library_path: MuJoCo's shared library (default: the one the ``mujoco`` package loads)
    :param mujoco_symbols: the names of ``mj_step``, ``mj_rnePostConstraint`` and MuJoCo's thread-local error handler's
        setter and getter, in that order (an argument so that a test can name one that does not exist)
    :return: the loop, checked against ``mujoco.mj_step``
    :raise KernelUnavailable: with the reason, where it cannot be used
    """
    path = library_path or mujoco_library_path()
    if path is None:
        raise KernelUnavailable("MuJoCo's shared library is not found beside the mujoco package")
    numba = _import_numba()
    _load_symbols(path, (*mujoco_symbols, *C_SYMBOLS))
    try:
        physics = _compile(numba, mujoco_symbols)
        _check(physics)  # (compiles at its first call: a compile error is found here, not at the first learn)
    except KernelUnavailable:
        raise
    except Exception as error:
        raise KernelUnavailable(f"the loop did not compile ({type(error).__name__}: {error})") from error
    return physics


#: why the compiled loop is not used in this process (None while it is, or before it was loaded)
unavailable_reason: str | None = None
_load_lock = threading.Lock()


@cache
def _nogil_kernel() -> CompiledPhysics | None:
    global unavailable_reason
    try:
        return load_compiled_physics()
    except KernelUnavailable as error:
        unavailable_reason = str(error)
        warnings.warn(
            f"sb3_metarl: the batched MuJoCo twin steps with its Python loop (the same samples, slower): {error}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def nogil_kernel() -> CompiledPhysics | None:
    """
    :return: the compiled loop (loaded and checked at the first call in a process), or None where it cannot be used
        (then one ``RuntimeWarning`` per process says why, and :data:`unavailable_reason` holds it)
    """
    with _load_lock:
        return _nogil_kernel()


def addresses(objects: list[object]) -> np.ndarray:
    """:return: the C addresses of MuJoCo structs (``MjModel``, ``MjData``) as uint64"""
    return np.array([obj._address for obj in objects], dtype=np.uint64)  # type: ignore[attr-defined]
