"""Result files written row by row, crash-safe: a finished row is never lost, a complete file never half-written."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class JsonlWriter:
    """Appends result rows to ``PATH.partial`` as they come and renames it to ``PATH`` when complete,
    so a crash keeps every finished row and a complete file never looks half-written."""

    def __init__(self, path: Path | None):
        self.path = path
        self.partial = None if path is None else path.with_name(path.name + ".partial")
        self.handle = sys.stdout if path is None else None

    def __enter__(self) -> JsonlWriter:
        if self.partial is not None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.partial.open("w")
        return self

    def write(self, row: dict) -> None:
        self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.partial is not None:
            self.handle.close()
            if exc_type is None:
                os.replace(self.partial, self.path)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a staging file, so ``path`` is either the old or the whole new text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(text)
    os.replace(staging, path)


def save_tensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written through a staging file, like :func:`write_atomic`."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(staging),
              metadata=metadata)
    os.replace(staging, path)
