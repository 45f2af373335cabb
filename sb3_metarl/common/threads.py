"""
Threads: torch's intra-op threads, set deliberately (acting on small batches is fastest on one thread), and the
physics threads of the batched MuJoCo twin (daemon threads, waited for through every interruption).
"""

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_all
from typing import Any

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


class DaemonThreads:
    """
    A small pool of daemon threads, each taking calls from one shared queue, with ``submit`` as
    ``concurrent.futures.ThreadPoolExecutor``'s. Daemon threads, because a thread may be parked for good (the compiled
    physics loop parks a thread at a MuJoCo error: ``sb3_metarl.tasks.mujoco.kernel``), and a pool whose threads the
    interpreter joins at exit would then never let the process end. Each call's future carries the running thread's
    ``threading.get_ident()`` as ``future.thread_ident`` once it started.

    :param n_threads: the number of threads (>= 1)
    :param name: the threads' name prefix
    """

    def __init__(self, n_threads: int, name: str = "sb3_metarl-physics"):
        if n_threads < 1:
            raise ValueError(f"n_threads: must be >= 1, got {n_threads}.")
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._shutdown = False
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{k}", daemon=True) for k in range(n_threads)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            future, function, arguments = call
            future.thread_ident = threading.get_ident()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*arguments)
            except BaseException as error:  # handed to the waiting side, as ThreadPoolExecutor does
                future.set_exception(error)
            else:
                future.set_result(result)

    @property
    def idents(self) -> list[int | None]:
        """The threads' ``threading.get_ident()``."""
        return [thread.ident for thread in self._threads]

    def submit(self, function: Callable[..., Any], *arguments: Any) -> Future:
        """:return: the future of ``function(*arguments)`` on one of the threads"""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future = Future()
        self._calls.put((future, function, arguments))
        return future

    def shutdown(self, wait: bool = False) -> None:
        """Let the threads end after the calls already submitted (``wait``: join them; a parked one is not waited for)."""
        if self._shutdown:
            return
        self._shutdown = True
        for _ in self._threads:
            self._calls.put(None)
        if wait:
            for thread in self._threads:
                thread.join(timeout=5.0)


def settle(
    futures: Sequence[Future], parked: Callable[[Future], BaseException | None] | None = None, poll_seconds: float = 0.02
) -> None:
    """
    Wait until every one of ``futures`` has finished, then raise the first one's error if one failed. The wait is not
    cut short by an exception raised in this thread meanwhile (Ctrl-C's ``KeyboardInterrupt``): the calls still run on
    data the caller owns, so they are waited for first, then that exception is raised.

    :param futures: calls on other threads
    :param parked: future -> the error of a call whose thread is parked for good (it will never finish), else None;
        asked every ``poll_seconds`` while calls run, and the first such error is raised once every other call finished
    :param poll_seconds: how often ``parked`` is asked
    """
    interrupted: BaseException | None = None
    running = set(futures)
    stuck: list[BaseException] = []
    while running:
        try:
            _, running = wait_for_all(running, timeout=poll_seconds if parked is not None else None)
        except BaseException as error:  # (KeyboardInterrupt: the physics still runs on the caller's sub-envs)
            interrupted = interrupted or error
            continue
        if parked is not None:
            for future in list(running):
                error = parked(future)
                if error is not None:
                    stuck.append(error)
                    running.discard(future)
    if stuck:
        raise stuck[0] from interrupted
    if interrupted is not None:
        raise interrupted
    for future in futures:
        future.result()
