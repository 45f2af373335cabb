"""Torch's intra-op threads, set deliberately: acting on small batches is fastest on one thread."""

import contextlib
from collections.abc import Iterator

import torch as th

#: intra-op threads while sampling: a task group's policy call is a few small matmuls, which more threads only slow
#: down (OpenMP's spinning threads compete with the envs and, on a loaded machine, with other processes; measured in
#: the getting-started page's "Threads" section)
ACTING_THREADS = 1


@contextlib.contextmanager
def torch_threads(n_threads: int) -> Iterator[None]:
    """Torch's intra-op threads are ``n_threads`` in the block (at most the current number), as before afterwards."""
    previous = th.get_num_threads()
    if n_threads >= previous:
        yield
        return
    th.set_num_threads(n_threads)
    try:
        yield
    finally:
        th.set_num_threads(previous)
