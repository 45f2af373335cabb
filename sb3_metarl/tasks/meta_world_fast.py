"""
Faster, bit-identical replacements for three helpers that every Meta-World v3 step runs, bound to one env instance
(Meta-World's classes and modules are left as they are).

Profiled on Metaworld 3.1.1 (cProfile of ``push-v3``; ``benchmarks/metaworld_sampling.py`` for the rates): in the envs
that hold an object most of a step is not the physics but Python around it, and two helpers are most of that:

- ``touching_object`` walks ``data.contact`` twice in Python, building a contact object per element (a quarter of
  ``push-v3``'s step). Here the contacts are filtered on MuJoCo's contact arrays and the forces of the matching ones
  are added in the same order, from the same ``0``, as Meta-World's ``sum``.
- ``_get_quat_objects`` converts the object's rotation matrix with ``scipy.spatial.transform.Rotation``, whose
  per-call checks (a determinant and a Gram matrix in numpy) cost more than the conversion. Here the checks run on
  nine Python floats with a margin, and a matrix that passes them is converted with scipy's own arithmetic (Markley's
  method as in scipy's Cython ``_from_matrix_orthogonal``: the same operations in the same order, in doubles); any
  other matrix goes to scipy itself, so the quaternion is scipy's bit for bit either way. Once per process the
  conversion is checked against the installed scipy (``scipy_agrees``); if another scipy version computes otherwise,
  every conversion goes to scipy.

The third is the observation's assembly (``_get_curr_obs_combined_no_goal``: ``np.split`` and ``np.hstack`` of 18
numbers), written into one array instead.

``tests/test_meta_world_fast.py`` checks every ML10 and ML45 env class against Meta-World's own step (observations,
rewards, infos, over 500 steps with resets, scripted and random actions).
"""

import functools
import math
import types
from typing import Any

import numpy as np

#: scipy's Gram-matrix test is ``isclose(M @ M.T, I, atol=1e-12)`` (rtol 1e-5); a matrix inside these tighter bounds
#: passes it whatever the rounding of the product, so it skips the SVD in scipy as here
_OFF_DIAGONAL_BOUND = 1e-13
_DIAGONAL_BOUND = 1e-6


class _Quaternion:
    """What ``Rotation.from_matrix(...)`` returns where Meta-World only calls ``as_quat()`` on it."""

    __slots__ = ("xyzw",)

    def __init__(self, xyzw: list[float]):
        self.xyzw = xyzw

    def as_quat(self) -> np.ndarray:
        return np.array(self.xyzw, dtype=np.float64)


@functools.cache
def scipy_agrees() -> bool:
    """
    :return: whether the installed scipy converts a set of rotation matrices (every branch of Markley's method) to the
        same quaternions as :class:`ExactRotation`'s own arithmetic; checked once per process, and where it does not
        (another scipy's algorithm) every conversion goes to scipy
    """
    from scipy.spatial.transform import Rotation

    matrices = [*Rotation.random(64, random_state=0).as_matrix(), np.eye(3)]
    matrices += [Rotation.from_rotvec(np.pi * axis).as_matrix() for axis in np.eye(3)]
    return all(
        np.array_equal(ExactRotation.quaternion(matrix), Rotation.from_matrix(matrix).as_quat()) for matrix in matrices
    )


class ExactRotation:
    """``Rotation`` for Meta-World's env modules: ``from_matrix(m).as_quat()`` equal to scipy's, bit for bit."""

    @staticmethod
    def from_matrix(matrix: Any) -> Any:
        """
        :param matrix: a 3 x 3 rotation matrix
        :return: an object whose ``as_quat()`` is scipy's ``Rotation.from_matrix(matrix).as_quat()``
        """
        xyzw = ExactRotation.quaternion(matrix) if scipy_agrees() else None
        if xyzw is not None:
            return _Quaternion(xyzw)
        from scipy.spatial.transform import Rotation  # (only here: the import statement costs on every step)

        return Rotation.from_matrix(matrix)

    @staticmethod
    def quaternion(matrix: Any) -> list[float] | None:
        """
        :param matrix: a 3 x 3 matrix
        :return: its quaternion (x, y, z, w) by scipy's arithmetic for an orthogonal matrix, or None where scipy would
            take another path (not float64 3 x 3, not orthogonal within the bounds, not right-handed)
        """
        array = np.asarray(matrix)
        if array.shape != (3, 3) or array.dtype != np.float64:
            return None
        (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = array.tolist()
        rows = ((m00, m01, m02), (m10, m11, m12), (m20, m21, m22))
        gram = [[a0 * b0 + a1 * b1 + a2 * b2 for (b0, b1, b2) in rows] for (a0, a1, a2) in rows]
        off_diagonal = (gram[0][1], gram[0][2], gram[1][2])
        diagonal = (gram[0][0], gram[1][1], gram[2][2])
        determinant = m00 * (m11 * m22 - m12 * m21) - m01 * (m10 * m22 - m12 * m20) + m02 * (m10 * m21 - m11 * m20)
        if (
            not determinant > 0.5
            or not all(abs(value) <= _OFF_DIAGONAL_BOUND for value in off_diagonal)
            or not all(abs(value - 1.0) <= _DIAGONAL_BOUND for value in diagonal)
        ):
            return None
        trace = m00 + m11 + m22
        decision = (m00, m11, m22, trace)
        choice = 0  # the first largest, as scipy's _argmax4
        for index in (1, 2, 3):
            if decision[index] > decision[choice]:
                choice = index
        quat = [0.0, 0.0, 0.0, 0.0]
        if choice != 3:
            i = choice
            j = (i + 1) % 3
            k = (j + 1) % 3
            quat[i] = 1 - trace + 2 * rows[i][i]
            quat[j] = rows[j][i] + rows[i][j]
            quat[k] = rows[k][i] + rows[i][k]
            quat[3] = rows[k][j] - rows[j][k]
        else:
            quat[0] = m21 - m12
            quat[1] = m02 - m20
            quat[2] = m10 - m01
            quat[3] = 1 + trace
        norm = math.sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3])
        return [quat[0] / norm, quat[1] / norm, quat[2] / norm, quat[3] / norm]


class _TouchingObject:
    """``env``'s ``touching_object`` computed on MuJoCo's contact arrays (the same forces, added in the same order)."""

    def __init__(self, env: Any):
        # a helper holds its env and reads its data at each call: it pickles with the env (Meta-World's envs pickle
        # their __dict__ and rebuild model and data)
        self.env = env
        self.left_pad = env.model.geom("leftpad_geom").id
        self.right_pad = env.model.geom("rightpad_geom").id

    def __call__(self, object_geom_id: int) -> Any:
        data = self.env.data
        contacts = data.contact
        geom1, geom2 = contacts.geom1, contacts.geom2
        with_object = (geom1 == object_geom_id) | (geom2 == object_geom_id)
        efc_address, efc_force = contacts.efc_address, data.efc_force
        left_force = 0
        for index in np.flatnonzero(with_object & ((geom1 == self.left_pad) | (geom2 == self.left_pad))):
            left_force = left_force + efc_force[efc_address[index]]
        right_force = 0
        for index in np.flatnonzero(with_object & ((geom1 == self.right_pad) | (geom2 == self.right_pad))):
            right_force = right_force + efc_force[efc_address[index]]
        return 0 < left_force and 0 < right_force


class _ObservationWithoutGoal:
    """
    ``env``'s ``_get_curr_obs_combined_no_goal`` writing the same numbers into one array (Meta-World splits and stacks
    them through numpy calls that cost more than the copy); Meta-World's own where objects and quaternions do not pair up.
    """

    def __init__(self, env: Any):
        self.env = env
        self.padded_length = 4 + env._obs_obj_max_len

    def __call__(self) -> np.ndarray:
        env = self.env
        data = env.data
        pos_hand = env.get_endeff_pos()
        gripper_distance_apart = np.linalg.norm(data.body("rightclaw").xpos - data.body("leftclaw").xpos)
        gripper_distance_apart = np.clip(gripper_distance_apart / 0.1, 0.0, 1.0)
        obj_pos, obj_quat = env._get_pos_objects(), env._get_quat_objects()
        n_objects = len(obj_pos) // 3
        if len(obj_pos) % 3 or len(obj_quat) != 4 * n_objects or 4 + 7 * n_objects > self.padded_length:
            from metaworld.sawyer_xyz_env import SawyerXYZEnv  # (only here: the import statement costs on every step)

            return SawyerXYZEnv._get_curr_obs_combined_no_goal(env)
        observation = np.zeros(self.padded_length)
        observation[:3] = pos_hand
        observation[3] = gripper_distance_apart
        for index in range(n_objects):
            start = 4 + 7 * index
            observation[start : start + 3] = obj_pos[3 * index : 3 * index + 3]
            observation[start + 3 : start + 7] = obj_quat[4 * index : 4 * index + 4]
        return observation


@functools.cache
def _with_exact_rotation(function: Any) -> Any:
    """:return: ``function`` reading ``Rotation`` as :class:`ExactRotation` (its module's other names unchanged)"""
    if "Rotation" not in function.__code__.co_names:
        return function
    namespace = dict(function.__globals__, Rotation=ExactRotation)
    return types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__)


class _QuatObjects:
    """``env``'s ``_get_quat_objects`` with scipy's ``Rotation`` read as :class:`ExactRotation`."""

    def __init__(self, env: Any):
        self.env = env

    def __call__(self) -> Any:
        return _with_exact_rotation(type(self.env)._get_quat_objects)(self.env)


def accelerate(env: Any) -> Any:
    """
    Bind the faster helpers to one Meta-World v3 env instance: its steps, resets and observations stay Meta-World's,
    bit for bit, and it still pickles (the helpers go with it).

    :param env: an instance of a Meta-World v3 env class (``SawyerXYZEnv``)
    :return: ``env``
    """
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    env_class = type(env)
    if env_class.touching_object is SawyerXYZEnv.touching_object:
        env.touching_object = _TouchingObject(env)
    if env_class._get_curr_obs_combined_no_goal is SawyerXYZEnv._get_curr_obs_combined_no_goal:
        env._get_curr_obs_combined_no_goal = _ObservationWithoutGoal(env)
    env._get_quat_objects = _QuatObjects(env)
    return env


#: the instance attributes ``accelerate`` binds (each helper holds its env: a reference cycle, see ``release``)
_HELPERS = ("touching_object", "_get_curr_obs_combined_no_goal", "_get_quat_objects")


def release(env: Any) -> None:
    """
    Unbind the helpers from ``env`` (it steps with Meta-World's own code again). Each helper holds its env, a reference
    cycle that only the cyclic collector frees, rarely and without seeing MuJoCo's memory: an owner that drops an
    accelerated env (an evicted class's env, a closed evaluation) releases it first, so reference counting frees it.

    :param env: an env ``accelerate`` was applied to (anything else is left as it is)
    """
    for name in _HELPERS:
        env.__dict__.pop(name, None)
