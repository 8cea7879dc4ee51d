"""Loading a .pt/.pth file without ever unpickling code: `torch_load` (weights_only=True,
always), what a refused file names (`unsafe_globals`), and a TorchScript program told apart
from weights."""

from __future__ import annotations

import importlib
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from .config import UserError


def torch_load(path: Path, trust_pickle: bool = False):
    """torch.load with weights_only=True, always: pickled code is refused, naming its globals.

    Only `trust_pickle` (the CLI's --trust-pickle) admits the globals a file names, with a
    warning; even then the loader stays the weights-only one, told to allow just those names.
    A TorchScript archive (`export --format torchscript`) is a program, not weights: refused.
    """
    if _torchscript(path):
        raise UserError(
            f"{path} is a TorchScript program (export --format torchscript), not weights to start "
            "from: give the run folder it was exported from, or a .safetensors export of it"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = unsafe_globals(path)
        if names == ["unreadable"]:  # a photo, a text file: no pickle to trust at all
            raise UserError(
                f"{path} is not a PyTorch checkpoint or a safetensors file: give a run folder, "
                "a .safetensors file or a .pt/.pth checkpoint"
            ) from None
        if not trust_pickle:
            raise UserError(
                f"refusing to load {path}: it holds pickled objects ({', '.join(names)}) that "
                "could run code; pass --trust-pickle only if you trust its author"
            ) from None
        warnings.warn(
            f"--trust-pickle: loading {path} with {', '.join(names)} allowed; this can run code",
            stacklevel=2,
        )
        try:
            with torch.serialization.safe_globals([_resolve(n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a name that does not import, a class it cannot rebuild
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise UserError(f"cannot load {path} even with --trust-pickle: {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def _torchscript(path: Path) -> bool:
    """A zip archive holding TorchScript's code/ and constants.pkl (torch.jit.save's layout)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n.split("/", 1)[-1] for n in z.namelist()]
    except (OSError, zipfile.BadZipFile):
        return False
    return "constants.pkl" in names and any(n.startswith("code/") for n in names)


def unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or ["unknown"]
    except Exception:  # a file too broken to list is reported as such by the caller
        return ["unreadable"]


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)
