"""The infos of a batched step, built lazily per row."""

from collections.abc import Callable, Sequence
from typing import Any, overload


class RowInfos(Sequence[dict[str, Any]]):
    """
    The infos of one batched step, one dict per stepped sub-env, each built when it is first read (and then kept):
    the sampler reads none of them and a callback few, so building them all at every step would be work for nothing.

    :param n: the number of stepped sub-envs
    :param build: row -> that sub-env's info, as its own ``step`` returns it
    """

    def __init__(self, n: int, build: Callable[[int], dict[str, Any]]):
        self._build = build
        self._rows: list[dict[str, Any] | None] = [None] * n

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, k: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, k: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, k: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = range(len(self))[k]  # a negative row counts from the end; IndexError outside
        row = self._rows[k]
        if row is None:
            row = self._rows[k] = self._build(k)
        return row

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(self) -> tuple[type, tuple[list[dict[str, Any]]]]:
        # pickled (sent to another process, saved by a callback) as the plain list of its dicts
        return list, (list(self),)
