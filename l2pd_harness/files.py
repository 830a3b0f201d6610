"""Every file the package reads or writes goes through here.

Readers name the file (and the line) of anything they cannot read, as a :class:`FileFormatError`, so every
command reports a bad file in one line. Writers stage into a file of their own beside the target and rename it
into place when complete: a finished row is never lost, a complete file is never half-written, and two processes
writing one target never write into each other's file (the last to finish wins, whole).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class FileFormatError(ValueError):
    """A file that is missing or cannot be read as what it should be; the message names it."""


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, or a FileFormatError saying it does not exist or is a directory."""
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"{what} {str(path)!r} is a directory, expected a file")
    if not path.is_file():
        raise FileFormatError(f"{what} {str(path)!r} does not exist")
    return path


def around_markers(path: str | os.PathLike, name: str, what: str) -> tuple[str, str]:
    """The text of ``path`` up to and including its ``<!-- NAME:start -->`` line's marker, and from its
    ``<!-- NAME:end -->`` marker on (a generated section of a document sits between them)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = require_file(path, what).read_text()
    if start not in text or end not in text:
        raise FileFormatError(f"{what} {str(path)!r} lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start, end + tail


def replace_marked(path: str | os.PathLike, name: str, what: str, section: str) -> None:
    """Replace what lies between ``path``'s ``NAME`` markers by ``section`` (atomically)."""
    head, tail = around_markers(path, name, what)
    write_atomic(Path(path), head + section + tail)


def read_json(path: str | os.PathLike, what: str, expect: type = dict):
    """The JSON value in ``path``, which must be an instance of ``expect``."""
    path = require_file(path, what)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{what} {str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(value, expect):
        raise FileFormatError(f"{what} {str(path)!r} holds a JSON {type(value).__name__}, expected a JSON "
                              f"{expect.__name__}")
    return value


def iter_jsonl(path: str | os.PathLike, what: str) -> Iterator[dict]:
    """The JSON objects of ``path``, one per non-empty line."""
    path = require_file(path, what)
    with path.open("rb") as handle:  # decoded line by line, so undecodable text is named by its line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise FileFormatError(f"{what} {str(path)!r} line {number} is not UTF-8 text ({err})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FileFormatError(f"{what} {str(path)!r} line {number} is not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise FileFormatError(f"{what} {str(path)!r} line {number} is a JSON {type(row).__name__}, "
                                      "expected an object")
            yield row


def read_jsonl(path: str | os.PathLike, what: str) -> list[dict]:
    return list(iter_jsonl(path, what))


def read_tensors(path: str | os.PathLike, what: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``."""
    with open_tensors(path, what, device) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@contextmanager
def open_tensors(path: str | os.PathLike, what: str, device: str | torch.device = "cpu"):
    """``safetensors.safe_open`` on ``path`` (tensors read one at a time), a truncated or empty file refused."""
    from safetensors import SafetensorError, safe_open

    path = require_file(path, what)
    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as err:
        raise FileFormatError(f"{what} {str(path)!r} is not a readable safetensors file ({err}); "
                              "it may be truncated: write or download it again") from None
    with handle:
        try:
            yield handle
        except SafetensorError as err:
            raise FileFormatError(f"{what} {str(path)!r} is damaged ({err}): write or download it again") from None


def check_output_path(path: str | os.PathLike, what: str, directory: bool = False) -> Path:
    """``path`` as a Path, or a FileFormatError if a writer could not create it there: an empty path, an existing
    directory where a file goes (an existing file where a ``directory`` goes), or a parent that is a file or not
    writable. Creates nothing, so a command can check its outputs before its long work."""
    if not str(path):
        raise FileFormatError(f"{what} is an empty path")
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise FileFormatError(f"{what} {str(path)!r} is {'a file' if directory else 'a directory'}, expected "
                              f"{'a directory' if directory else 'a file'}")
    start = path.absolute() if directory else path.absolute().parent
    existing = next(folder for folder in (start, *start.parents) if folder.exists())
    if not existing.is_dir():
        raise FileFormatError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileFormatError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is not writable")
    return path


def _write_error(path: Path, err: OSError) -> FileFormatError:
    return FileFormatError(f"cannot write {str(path)!r}: {err.strerror or err}")


def _staging(path: Path) -> Path:
    """A new empty file beside ``path`` that no other writer uses."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from None
    os.close(handle)
    return Path(name)


def _publish(staging: Path, path: Path) -> None:
    """Rename the complete ``staging`` file to ``path`` with a new file's permissions (mkstemp's 0600, or that of a
    library that rewrote the staging file, would make every result file private)."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, path)
    except OSError as err:
        raise _write_error(path, err) from None


@contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A staging file for a whole-file write: published to ``path`` when the block completes, removed when it
    fails (a write error becomes a FileFormatError naming ``path``)."""
    staging = _staging(path)
    try:
        yield staging
        _publish(staging, path)
    except BaseException as err:
        staging.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise


class JsonlWriter:
    """Appends result rows to a staging file as they come and renames it to ``path`` when complete (``None``:
    standard output). A run that fails before its first row leaves nothing; one that fails later keeps its rows in
    the staging file, named by :attr:`kept`."""

    def __init__(self, path: Path | None):
        self.path, self.rows = path, 0
        self.staging: Path | None = None
        self.handle = sys.stdout if path is None else None

    def __enter__(self) -> JsonlWriter:
        return self

    def write(self, row: dict) -> None:
        if self.handle is None:  # opened on the first row, so a run refused before any result writes nothing
            self.staging = _staging(self.path)
            self.handle = self.staging.open("w")
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        self.rows += 1

    @property
    def kept(self) -> str | None:
        """Where the rows of an unfinished run are, for the message that reports it."""
        return None if self.staging is None else f"{self.rows} finished rows kept in {str(self.staging)!r}"

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path is None:
            return
        if self.handle is None:
            if exc_type is None:  # a complete run without rows is an empty result file
                write_atomic(self.path, "")
            return
        self.handle.close()
        try:
            if exc_type is None:
                _publish(self.staging, self.path)
        except FileFormatError as err:
            err.kept_rows = self.kept  # the rows stay in the staging file, as for any failure after the first row
            raise
        if exc is not None:
            exc.kept_rows = self.kept  # read by the command line's one-line report


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a staging file, so ``path`` is either the old or the whole new text."""
    with _staged(path) as staging:
        staging.write_text(text)


def save_tensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written through a staging file, like :func:`write_atomic`."""
    from safetensors.torch import save_file

    with _staged(path) as staging:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(staging),
                  metadata=metadata)
