"""Writing files and folders so that nobody ever sees half of one: the project's one atomic write.

`write_atomically(path, write)` calls `write(temporary)`, where `temporary` is a fresh name beside
`path` (same folder, so a rename is atomic), then renames it onto `path`. If `write` fails, or the
process is interrupted, `path` keeps its old content (or stays absent) and the temporary is removed.
It serves files (safetensors, CSV, PNG, JSON) and folders (a checkpoint, a GLUE download) alike.
"""

import os
import shutil
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_atomically(path, write) -> Path:
    """write(temporary) creates a file or a folder at `temporary`; then it replaces `path` in one rename.

    The temporary keeps `path`'s suffix, so writers that go by the name (matplotlib) know the format.
    A folder that already exists is swapped in two renames: the old one moves aside, the new one in.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    _remove(temporary)
    try:
        write(temporary)
        if temporary.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)  # between the two renames `path` is briefly absent, never half-written
            os.replace(temporary, path)
            _remove(old)
        else:
            os.replace(temporary, path)
    except BaseException:
        _remove(temporary)
        raise
    return path
