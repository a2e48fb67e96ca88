"""Output that is never left half-written (build in a temporary sibling, then rename), and JSON
input whose every failure is one line naming the file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from slmkit.errors import InputError, OutputExistsError

_UMASK = os.umask(0o022)  # read once at import (setting it is process-wide), then restored
os.umask(_UMASK)


def _publish(path: Path) -> None:
    """Give a finished output the permissions of a normally created one: temporary files and
    directories are private (0600/0700), which would leave a model unreadable to other users."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror.lower()} ({out.parent}); "
                         "choose a writable --out") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for root, dirs, files in os.walk(tmp):
        for name in dirs + files:
            _publish(Path(root) / name)
    _publish(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary sibling so readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _publish(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The parsed content of a UTF-8 JSON file; unreadable, undecodable or invalid is an InputError."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror.lower()}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{path} is nested too deeply to parse") from None
