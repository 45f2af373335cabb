"""Writing files so that a failure part-way never destroys what was there before."""

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def replaced_atomically(path: str | pathlib.Path, suffix: str = ".zip") -> Iterator[pathlib.Path]:
    """
    Yield a temporary path in ``path``'s folder; when the block ends without error the temporary file
    replaces ``path`` in one rename, otherwise it is removed and ``path`` is left as it was (a full disk,
    a size limit or an interrupt part-way through a save never truncates the previous file).

    :param path: the file to write; without a suffix, ``suffix`` is added (as SB3's ``save`` does with ".zip")
    :param suffix: the suffix given to a path without one
    """
    target = pathlib.Path(path)
    if target.suffix == "":
        target = target.with_suffix(suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
    try:
        yield pathlib.Path(temporary)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
