"""Writing files and folders so that nobody ever sees half of one: the project's one atomic write.
`write_atomically(path, write)` lets `write` make a temporary beside `path` (same folder: a rename is atomic),
then renames it onto `path`; if `write` fails or is interrupted, `path` stays as it was, the temporary goes."""

import os
import shutil
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomically(path, write) -> Path:
    """write(temporary) creates a file or a folder; it replaces `path` in one rename (an existing folder: two).
    The temporary keeps `path`'s suffix, so writers that go by the name (matplotlib) know the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    _remove(temporary)
    try:
        write(temporary)
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        if temporary.is_dir() and path.is_dir():  # a non-empty folder cannot be replaced: move it aside
            os.replace(path, old)  # between the two renames `path` is briefly absent, never half-written
        os.replace(temporary, path)
        _remove(old)
    except BaseException:
        _remove(temporary)
        raise
    return path
