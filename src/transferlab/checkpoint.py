"""The run folder on disk: atomic writes, checksummed state, and loading that never unpickles code.

Run folder layout (see ARCHITECTURE.md):
    model.safetensors   weights only; arch and class names in its metadata
    meta.json           arch, classes, preprocessing, weights source, config, metrics, versions
    history.csv         one row per epoch
    state/last.pt       full training state (tensors and plain types only) + last.pt.sha256
    curves.png, confusion.png, logits/<split>.npz
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import UserError

WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "state/last.pt"


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path in the same folder; on success fsync it and os.replace onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def _plain(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- weights


def weights_path(run: Path) -> Path:
    return Path(run) / WEIGHTS


def save_weights(run: Path, model: torch.nn.Module, arch: str, classes: list[str]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights_path(run)) as tmp:
        save_file(state, str(tmp), metadata={"arch": arch, "classes": json.dumps(classes)})


def load_state_dict_file(path: str | Path, trust_pickle: bool = False) -> dict:
    """Load weights from .safetensors, or a state dict saved by torch.save (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"weights file is empty: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"cannot read {path}: {err}") from None
    state = torch_load(path, trust_pickle)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def torch_load(path: Path, trust_pickle: bool = False):
    """torch.load that refuses pickled code unless the user explicitly trusts the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if trust_pickle:
            import warnings

            warnings.warn(f"loading {path} with full pickle (--trust-pickle): it can run code",
                          stacklevel=2)
            return torch.load(path, map_location="cpu", weights_only=False)  # noqa: S614
        reason = str(err).split("\n")[0][:300]
        raise UserError(f"refusing to load {path}: it needs unsafe unpickling ({reason}); "
                        "pass --trust-pickle only if you trust its author") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- meta


def read_meta(run: str | Path) -> dict:
    run = Path(run)
    if not run.exists():
        raise UserError(f"run folder not found: {run}")
    path = run / META
    if not path.is_file():
        raise UserError(f"not a run folder (no {META}): {run}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt {path}: {err}") from None


def is_run(path: Path) -> bool:
    return (Path(path) / META).is_file() and weights_path(path).is_file()


# ----------------------------------------------------------------------------- resume state


def save_state(path: Path, state: dict) -> None:
    """Save training state atomically, then its sha256 manifest (the completeness marker)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_text(path.with_name(path.name + ".sha256"), sha256(path) + "\n")


def load_state(path: Path) -> dict:
    """Load a training state only if its manifest matches; weights-only unpickling."""
    path = Path(path)
    manifest = path.with_name(path.name + ".sha256")
    if not path.is_file() or not manifest.is_file():
        raise UserError(f"no complete checkpoint at {path}")
    if manifest.read_text().strip() != sha256(path):
        raise UserError(f"checkpoint {path} does not match its sha256 manifest (corrupt)")
    return torch_load(path)


# ----------------------------------------------------------------------------- logits


def save_logits(run: Path, split: str, logits: np.ndarray, targets: np.ndarray) -> None:
    path = Path(run) / "logits" / f"{split}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, logits=logits.astype(np.float32), targets=targets.astype(np.int64))


def load_logits(run: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    path = Path(run) / "logits" / f"{split}.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return z["logits"], z["targets"]
