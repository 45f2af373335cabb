"""Per-task baselines fitted on a batch of episodes."""

from abc import ABC, abstractmethod

import torch as th

from sb3_metarl.common.rows import RowPacking
from sb3_metarl.common.threads import torch_threads


class Baseline(ABC):
    """A state-value baseline fitted per task on the episodes it is then applied to."""

    @abstractmethod
    def fit_predict(self, features: th.Tensor, returns: th.Tensor, masks: th.Tensor) -> th.Tensor:
        """
        :param features: observation features (B, E, H, F)
        :param returns: regression targets, the returns-to-go (B, E, H)
        :param masks: (B, E, H), 1 on valid steps
        :return: predictions (B, E, H), zero where masked
        """


class LinearFeatureBaseline(Baseline):
    """
    The linear feature baseline of rllab / MAML (Duan et al. 2016): ridge regression of the
    returns-to-go on ``[o, o^2, t, t^2, t^3, 1]`` (t = step / 100), fitted separately per task.

    :param reg_coeff: initial ridge coefficient; multiplied by 10 (up to 5 times) while the system is singular or
        its solution not finite
    """

    def __init__(self, reg_coeff: float = 1e-5):
        self.reg_coeff = reg_coeff

    @staticmethod
    def design_matrix(features: th.Tensor, steps: th.Tensor | None = None) -> th.Tensor:
        """
        :param features: observation features (B, E, H, F), or (..., F) at the given ``steps``
        :param steps: each row's step within its episode (``features.shape[:-1]``); None: 0 .. H - 1 along dim 2
        :return: (..., 2F + 4) regression features
        """
        if steps is None:
            horizon = features.shape[2]
            steps = th.arange(horizon, device=features.device).view(1, 1, horizon).expand(*features.shape[:3])
        time = (steps.to(features.dtype) / 100.0).unsqueeze(-1)
        return th.cat([features, features**2, time, time**2, time**3, th.ones_like(time)], dim=-1)

    def fit_predict(self, features: th.Tensor, returns: th.Tensor, masks: th.Tensor) -> th.Tensor:
        n_tasks, horizon = features.shape[0], features.shape[2]
        # where episodes end early, the regression runs over the valid steps only (packed): the padding rows are zero
        # and add nothing to the normal equations
        packing = RowPacking.of(masks.reshape(n_tasks, -1))
        if packing is None:
            row_masks = masks.double().reshape(n_tasks, -1, 1)
            x = self.design_matrix(features.double()).reshape(n_tasks, -1, features.shape[-1] * 2 + 4) * row_masks
            y = returns.double().reshape(n_tasks, -1, 1) * row_masks
        else:
            row_masks = packing.masks.double().unsqueeze(-1)
            flat_features = packing.pack(features.double().reshape(n_tasks, -1, features.shape[-1]))
            x = self.design_matrix(flat_features, packing.index % horizon) * row_masks
            y = packing.pack(returns.double().reshape(n_tasks, -1, 1)) * row_masks
        n_features = x.shape[-1]
        gram = x.transpose(1, 2) @ x
        target = x.transpose(1, 2) @ y
        eye = th.eye(n_features, dtype=gram.dtype, device=gram.device)
        reg = self.reg_coeff
        # on one thread: MKL's threaded batched LU (torch 2.13's MKL 2024.2) fails on some CPUs for systems of 150 or
        # more features (measured on an AMD EPYC with AVX-512 on 2 threads: "DLASWP parameter 6 incorrect" and a false
        # "singular"), and one thread makes the fit's bits independent of the thread count
        with torch_threads(1):
            for _ in range(5):
                try:
                    weights = th.linalg.solve(gram + reg * eye, target)
                except th.linalg.LinAlgError:  # singular at this ridge: a larger one
                    weights = None
                if weights is not None and th.isfinite(weights).all():
                    break
                reg *= 10
        if weights is None:
            raise FloatingPointError(
                "baseline: the linear feature baseline's regression stayed singular up to a ridge of "
                f"{reg / 10:g}; check the observations (finite, not constant), or pass baseline=None."
            )
        if packing is None:
            x = x.reshape(*features.shape[:3], n_features)
            return (x @ weights.unsqueeze(1)).squeeze(-1).to(returns.dtype) * masks
        return packing.unpack((x @ weights).squeeze(-1).to(returns.dtype)).reshape(masks.shape)


BASELINES = {"linear": LinearFeatureBaseline}


def make_baseline(baseline: str | Baseline | None) -> Baseline | None:
    """
    :param baseline: None, a name in ``BASELINES`` or a ``Baseline`` instance
    :return: the baseline object (None for no baseline)
    """
    if baseline is None or isinstance(baseline, Baseline):
        return baseline
    if baseline not in BASELINES:
        raise ValueError(
            f"baseline: unknown baseline {baseline!r}; use None, one of {sorted(BASELINES)} or a Baseline instance."
        )
    return BASELINES[baseline]()
