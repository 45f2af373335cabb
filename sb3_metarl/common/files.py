"""Writing files so that a failure part-way never destroys what was there before."""

import contextlib
import io
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Iterator

#: attributes every saved MetaPolicyGradient holds (a zip without them is another algorithm's)
META_POLICY_GRADIENT_KEYS = ("meta_batch_size", "inner_episodes", "outer_episodes", "inner_steps")


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


def check_saved_model(path: str | pathlib.Path | io.BufferedIOBase) -> None:
    """
    :param path: what ``MetaPolicyGradient.load`` was given (a path with or without ".zip", or a file object)
    :raises FileNotFoundError: if neither ``path`` nor ``path`` + ".zip" exists
    :raises ValueError: if the zip is not a saved MetaPolicyGradient (SB3 would load another algorithm's zip silently)
    """
    if not isinstance(path, (str, pathlib.Path)):
        return  # a file object: SB3 reads it as it is
    candidates = [pathlib.Path(path)] + ([pathlib.Path(f"{path}.zip")] if pathlib.Path(path).suffix == "" else [])
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        tried = " nor ".join(repr(str(candidate)) for candidate in candidates)
        raise FileNotFoundError(f"path: no saved model at {tried}.")
    try:
        with zipfile.ZipFile(found) as archive:
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"path: {str(found)!r} is not a model saved by SB3's save ({reason}).") from None
    missing = [key for key in META_POLICY_GRADIENT_KEYS if key not in data]
    if missing:
        raise ValueError(
            f"path: {str(found)!r} holds another algorithm's model (it has no {missing[0]}), not a MetaPolicyGradient; "
            "load it with the class that saved it."
        )
