"""
Write what 0.1.0 computes one meta-iteration after each zip here, on this machine's CPU (CPUs round differently:
MKL's and PyTorch's kernels differ between an AMD EPYC and an AVX-512 Xeon). Run it with the code before the
restructuring (ec1365a) on the import path, from the repository root:

    git worktree add /tmp/v0_1_0 ec1365a
    PYTHONPATH=/tmp/v0_1_0 python tests/data/v0_1_0/continue_zips.py intel_xeon_avx512

It writes ``<name>_next_<cpu>.npy``; ``tests/test_resume.py`` requires the current code to reach one of them bit for bit.
"""

import os
import sys
import warnings

import numpy as np
import torch as th

from sb3_metarl import MetaPolicyGradient

if __name__ == "__main__":
    folder = os.path.dirname(os.path.abspath(__file__))
    for name in ["trpo_lvc", "adam_lsf_reuse", "ppo_maml_auto"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = MetaPolicyGradient.load(os.path.join(folder, f"{name}.zip"), env="sb3_metarl/Navigation2D-v0")
        episodes = model.inner_steps * model.inner_episodes + model.outer_episodes
        model.learn(model.meta_batch_size * episodes * model.episode_sampler.horizon, reset_num_timesteps=False)
        parameters = th.nn.utils.parameters_to_vector(model.policy.parameters()).detach().numpy()
        np.save(os.path.join(folder, f"{name}_next_{sys.argv[1]}.npy"), parameters)
