"""
MuJoCo's ``mj_step`` for many sub-envs in one compiled call that holds no GIL.

The batched twin (``sb3_metarl.tasks.mujoco_batched``) advances each sub-env's own ``MjData`` with ``mj_step``. Called
from a Python loop, every call releases the GIL for the physics and takes it back before the next one, so a physics
thread waits for whatever Python another thread runs meanwhile (measured by ``benchmarks/gil_overlap.py``: a physics
thread beside a thread running Python takes the sum of the two). This module compiles the whole loop with numba
(``nogil=True``) and calls MuJoCo's own library by its symbols: the loop over the sub-envs, the copies of their
controls and the ``mj_step`` calls run without the GIL from start to end, so physics threads overlap the sampling
thread's acting and bookkeeping. It calls the same C function on the same data as the Python bindings do, so every
trajectory is the same, bit for bit (tested per family, warm start included).

It is used where numba and MuJoCo's shared library can be loaded (:func:`nogil_kernel` returns None otherwise, and
the twin keeps its Python loop). A MuJoCo *error* (not a warning: an unstable simulation only warns and resets, as
it does under Gymnasium) cannot become a Python exception inside the compiled loop; the only ones these families can
reach are out-of-memory errors of MuJoCo's arena.
"""

import glob
import os
from collections.abc import Callable
from functools import cache

import mujoco
import numpy as np

#: (model addresses, data addresses, control addresses, controls (rows, nu) float64 C-contiguous, frame skips,
#: whether to run the post-step force pass) -> None
Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool], None]


def mujoco_library_path() -> str | None:
    """:return: the path of the MuJoCo shared library that the ``mujoco`` package loads, or None if none is found"""
    folder = os.path.dirname(mujoco.__file__)
    for pattern in ("libmujoco.so.*", "libmujoco*.dylib", "mujoco.dll"):
        found = sorted(glob.glob(os.path.join(folder, pattern)))
        if found:
            return found[0]
    return None


@cache
def nogil_kernel() -> Kernel | None:
    """
    :return: the compiled loop (compiled at its first call in a process: about half a second, numba's start
        included), or None where numba or MuJoCo's library cannot be loaded
    """
    path = mujoco_library_path()
    if path is None or np.dtype(np.uintp).itemsize != 8:
        return None
    try:  # (imported here: numba's import is a quarter of a second that a process without these families never needs)
        import numba
        from llvmlite import binding
        from numba import types

        binding.load_library_permanently(path)  # the library the bindings already loaded: the same code and state
    except (ImportError, RuntimeError):
        return None
    # MuJoCo's functions as named external symbols of that library; on 64-bit platforms an address passes as a 64-bit
    # integer in the same register as a pointer
    step = types.ExternalFunction("mj_step", types.void(types.uint64, types.uint64))
    post_constraint = types.ExternalFunction("mj_rnePostConstraint", types.void(types.uint64, types.uint64))
    copy = types.ExternalFunction("memcpy", types.uint64(types.uint64, types.uint64, types.uint64))

    @numba.njit(nogil=True)
    def advance(models, datas, ctrl_addresses, controls, frame_skips, with_post_constraint):  # pragma: no cover
        # (compiled: coverage does not see it run) each row as Gymnasium's do_simulation: its controls, then
        # frame_skip calls of mj_step, then (where the family reads the forces) mj_rnePostConstraint
        row_bytes = controls.shape[1] * 8
        first = controls.ctypes.data
        for row in range(datas.shape[0]):
            copy(ctrl_addresses[row], first + row * row_bytes, row_bytes)
            for _ in range(frame_skips[row]):
                step(models[row], datas[row])
            if with_post_constraint:
                post_constraint(models[row], datas[row])

    return advance


def addresses(objects: list[object]) -> np.ndarray:
    """:return: the C addresses of MuJoCo structs (``MjModel``, ``MjData``) as uint64"""
    return np.array([obj._address for obj in objects], dtype=np.uint64)  # type: ignore[attr-defined]
