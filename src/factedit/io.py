"""Atomic writes of JSON and safetensors files: a crash never leaves a half-written file behind."""
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from factedit.errors import FacteditError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_replace(path: Path, write) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    _atomic_replace(Path(path), write)


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    metadata = {key: str(value) for key, value in metadata.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and metadata; a truncated or foreign file is a clear error, never unpickled."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FacteditError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise FacteditError(f"{path} is not a readable safetensors file ({error}); delete it and write it again") from None
