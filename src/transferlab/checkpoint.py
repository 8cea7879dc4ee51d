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
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import safeload
from .config import UserError

WEIGHTS = "model.safetensors"
META = "meta.json"
UMASK = os.umask(0o022)  # read once (setting it is the only way), then put back
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path: Path, exclusive: bool = False):
    """Yield a temp path in the same folder; on success fsync it and os.replace onto `path`,
    with the mode the file had, else the one a new file gets (mkstemp's is 0600).
    `exclusive`: never over a file that appeared since the caller checked (another command
    writing the same path at once): a hard link, which fails where a file exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~UMASK
        os.chmod(tmp, mode)
        _link(tmp, path) if exclusive else os.replace(tmp, path)
    except Exception as err:
        code = write_errno(err, Path(tmp))
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err  # one line, naming `path`
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link(tmp: str | Path, path: Path) -> None:
    """`tmp` at `path` unless a file is there (os.replace where links are not supported)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} was written by another command meanwhile (an export to the "
                        "same file at once?): pass --overwrite to replace it") from None  # fmt: skip
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK) or path.exists():  # fmt: skip
            raise
        os.replace(tmp, path)


def write_errno(err: Exception, tmp: Path) -> int | None:
    """The OS error behind a failed write of the file `tmp` where the writer hid it: torch.save
    raises RuntimeError ("unexpected pos") on a full disk or at a file-size limit, safetensors
    names "(os error 27)", ONNX's OSError names no file. None: not a write the disk refused."""
    if isinstance(err, OSError):
        return err.errno if err.errno and not err.filename else None
    if not isinstance(err, RuntimeError | SafetensorError):  # (a UserError is the user's)
        return None
    if found := re.search(r"os error (\d+)", str(err)):
        return int(found[1])
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = tmp.stat().st_size if tmp.is_file() else 0
    if limit != resource.RLIM_INFINITY and size >= limit:
        return errno.EFBIG
    return errno.ENOSPC if shutil.disk_usage(tmp.parent).free < 2**24 else None


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
        info = json.dumps({"arch": arch, "classes": classes})  # one key: safetensors writes a
        save_file(state, str(tmp), metadata={"transferlab": info})  # dict in a random order


def load_run_weights(run: Path, meta: dict) -> dict:
    """A run's weights, verified against the sha256 recorded in its meta.json."""
    path = weights_path(run)
    expected = meta.get("weights_sha256")
    if path.is_file() and expected and sha256(path) != expected:
        raise UserError(f"{path} does not match the sha256 in {Path(run) / META} (corrupt)")
    return load_state_dict_file(path)


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
    state = safeload.torch_load(path, trust_pickle)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def file_record(path: str | Path) -> dict:
    """What a safetensors export of a run records of itself (`export.describe`: its classes,
    the run it came from); {} for any other file."""
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("transferlab", "{}"))
        return info if isinstance(info, dict) else {}
    except (SafetensorError, OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- meta


def unfinished(run: str | Path) -> str:
    """How to finish a run with no meta.json, in the words of the command that made it."""
    from .outputs import read_mark

    for folder in Path(run).resolve().parents:
        kind = (read_mark(folder) or {}).get("kind")
        if kind == "recipe":
            return "still training, or stopped: run the recipe that made it again to finish it"
        if kind == "auto" and not Path(run).resolve().is_relative_to(folder / "candidates"):
            break  # not the study's: a run put in its folder (pass 44)
        if kind == "auto":  # a candidate's fold run
            return (f"still training, or stopped: finish it with transferlab auto --out {folder} "
                    "--resume, with the study's --data and --budget")  # fmt: skip
    try:  # (none whole: --resume, advised, was refused; pass 49)
        newest_checkpoint(Path(run) / "state", check_only=True)
    except UserError:
        return f"stopped, and no checkpoint of it is whole: train it anew with transferlab train --out {run} --overwrite and its settings"  # fmt: skip
    return f"still training, or stopped: finish it with transferlab train --out {run} --resume"


def read_meta(run: str | Path) -> dict:
    run = Path(run)
    if not run.exists():
        raise UserError(f"run folder not found: {run}")
    if run.is_file():  # an exported model, say: transferlab reads the run it came from
        from .outputs import enclosing

        found = enclosing(run)
        came = f": name the {found[1]} folder it belongs to, {found[0]}" if found else ""
        raise UserError(f"{run} is a file, not a run folder{came}")
    path = run / META
    if not path.is_file() and (run / "state").is_dir():  # written when a run finishes
        raise UserError(f"{run} is a run that has not finished ({unfinished(run)})")
    if not path.is_file() and (run / "ensemble.json").is_file():
        raise UserError(f"{run} is an ensemble, not a run folder: name one of its members")
    from .outputs import read_mark

    if not path.is_file() and (read_mark(run) or {}).get("kind") in ("run", "ensemble"):
        raise UserError(  # (a soup killed while it averaged)
            f"{run} is a transferlab folder whose command stopped before it finished "
            "(it holds no results): run that command again"
        )
    if not path.is_file() and (read_mark(run) or {}).get("kind") == "auto":
        raise UserError(f"{run} is a transferlab auto study, not a run folder: its choice is "
                        f"{run / 'best'} (a run or an ensemble): name that")  # fmt: skip
    if not path.is_file():
        raise UserError(f"not a run folder (no {META}): {run}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"corrupt {path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"corrupt {path}: no JSON object in it (not a finished run's record)")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:  # a traceback in whoever read it next
        raise UserError(f"corrupt {path}: no {', '.join(missing)} (not a finished run's record)")
    classes, names, n = meta["classes"], meta["class_names"], meta["num_classes"]
    if not (
        all(isinstance(x, list) and all(isinstance(c, str) for c in x) for x in (classes, names))
        and type(n) is int
        and len(set(classes)) == len(classes) == len(names) == n >= 2
    ):  # edited by hand: predict's table indexed past them, export labelled a head with them
        raise UserError(
            f"corrupt {path}: its num_classes, classes and class_names must agree: as many "
            "different names as the model has outputs, two or more (edited by hand?)"
        )
    if not sound_preprocessing(meta["preprocessing"]):  # predict/export crashed on it
        raise UserError(
            f"corrupt {path}: its preprocessing must hold input_size (8 to 1024), channels (1 or "
            "3), mean and std (a number per channel, std above 0) and interpolation (bilinear, "
            "bicubic or nearest) (edited by hand?)"
        )
    return meta


def sound_preprocessing(prep) -> bool:
    """meta.json's preprocessing as transferlab writes it (the values a model can run with)."""
    if not isinstance(prep, dict):
        return False
    size, channels = prep.get("input_size"), prep.get("channels")
    if type(size) is not int or not 8 <= size <= 1024 or type(channels) is not int:
        return False
    if channels not in (1, 3):
        return False
    number = lambda v: type(v) in (int, float) and np.isfinite(v)  # noqa: E731
    mean, std = prep.get("mean"), prep.get("std")
    lists = all(
        isinstance(x, list) and len(x) == channels and all(map(number, x)) for x in (mean, std)
    )
    return (
        lists and min(std) > 0 and prep.get("interpolation") in ("bilinear", "bicubic", "nearest")
    )


META_KEYS = (
    "arch",
    "classes",
    "class_names",
    "num_classes",
    "data",
    "preprocessing",
    "source",
    "metrics",
)


def weights_problem(run: Path, meta: dict) -> str | None:
    """Why a run's weights cannot be used (missing, empty, not what meta.json recorded), or
    None; a hash of the file, not a load."""
    path = weights_path(run)
    if not path.is_file() or path.stat().st_size == 0:
        return f"weights file {'not found' if not path.is_file() else 'is empty'}: {path}"
    expected = meta.get("weights_sha256")
    if expected and sha256(path) != expected:
        return f"{path} does not match the sha256 in {Path(run) / META} (corrupt)"
    return None


def is_run(path: Path) -> bool:
    return (Path(path) / META).is_file() and weights_path(path).is_file()


# ----------------------------------------------------------------------------- resume state


def save_state(path: Path, state: dict, step: int = 0) -> None:
    """Save training state atomically with its sha256 manifest (the completeness marker). The
    manifest names the new file's hash before the file replaces the old one, and the old one's
    until it has: a kill between the two (the same step saved again) left a whole last.pt
    "corrupt", and with --keep-last 1 nothing to resume."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        line = f"{sha256(tmp)}  step={int(step)}\n"
        old = _manifest(path).read_text().splitlines(keepends=True)[:2] if path.is_file() and _manifest(path).is_file() else []  # fmt: skip
        write_text(_manifest(path), "".join([line, *old]))
    write_text(_manifest(path), line)


def _manifest(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _manifest_step(path: Path) -> int | None:
    try:
        return int(_manifest(path).read_text().splitlines()[0].split("step=")[1])
    except (OSError, IndexError, ValueError):
        return None


def save_checkpoint(folder: Path, state: dict, step: int, keep_last: int = 2) -> Path:
    """Write `last.pt`; the previous one is kept as `step-N.pt`; only `keep_last` are kept.

    A crash at any point leaves at least one complete, verified checkpoint behind.
    """
    folder = Path(folder)
    last = folder / "last.pt"
    previous = _manifest_step(last) if last.is_file() else None
    if previous is not None and previous != step:  # kept whole at every instant: its manifest
        older = folder / f"step-{previous:09d}.pt"  # first, then the file as a second name
        write_text(_manifest(older), _manifest(last).read_text())  # (moved in two steps, a
        older.unlink(missing_ok=True)  # kill between left neither whole: nothing to resume)
        try:
            os.link(last, older)  # last.pt is replaced by a new file below: this one stays
        except OSError:  # (a file system without hard links)
            shutil.copy2(last, older)
    save_state(last, state, step)
    steps = sorted(folder.glob("step-*.pt"), reverse=True)  # and manifests a kill left alone:
    orphans = {m.with_suffix("") for m in folder.glob("step-*.pt.sha256")} - set(steps)  # fmt: skip
    for old in [*steps[max(keep_last - 1, 0) :], *orphans]:
        old.unlink(missing_ok=True)
        _manifest(old).unlink(missing_ok=True)
    return last


def candidates(folder: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    folder = Path(folder)
    found = sorted(folder.glob("step-*.pt"), reverse=True)
    return ([folder / "last.pt"] if (folder / "last.pt").exists() else []) + found


def newest_checkpoint(folder: Path, trust_pickle: bool = False, check_only: bool = False) -> tuple[dict | None, Path] | None:  # fmt: skip
    """The newest checkpoint that is complete and verified; skipped ones are named in warnings.

    Returns None when there is no checkpoint at all; raises when there are some but none is valid
    (never a silent restart from scratch). `check_only`: verified, not loaded, nothing said.
    """
    paths, skipped = candidates(folder), []
    for path in paths:
        try:
            return load_state(path, trust_pickle, check_only), path
        except UserError as err:
            skipped.append(str(err))
            if not check_only:
                warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
    if skipped:
        raise UserError("no valid checkpoint to resume from: " + "; ".join(skipped))
    return None


def load_state(path: Path, trust_pickle: bool = False, check_only: bool = False) -> dict | None:
    """Load a training state only if its manifest matches; weights-only unpickling."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise UserError(f"{path} is empty or missing")
    if not _manifest(path).is_file():
        raise UserError(f"{path} has no sha256 manifest (unfinished save)")
    if sha256(path) not in [line.split()[0] for line in _manifest(path).read_text().splitlines() if line.strip()]:  # fmt: skip
        raise UserError(f"{path} does not match its sha256 manifest (corrupt)")
    return None if check_only else safeload.torch_load(path, trust_pickle)


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
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["logits"], z["targets"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        warnings.warn(f"{path} is damaged: predicting again instead", stacklevel=2)
        return None


def features_key(spec: str, val_fraction, limit, tta: str, fold: str = "none") -> str:
    """What a run's cached features were computed on: data, split carving and TTA."""
    return f"{spec}|{val_fraction}|{limit}|{tta}" + (f"|{fold}" if fold != "none" else "")


def save_features(run: Path, name: str, key: str, feats: np.ndarray) -> None:
    """Cache a run's pooled features (features/NAME.npz); `key` names the data they came from."""
    path = Path(run) / "features" / f"{name}.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=feats.astype(np.float32), key=np.array(key))


def load_features(run: Path, name: str, key: str) -> np.ndarray | None:
    path = Path(run) / "features" / f"{name}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["features"] if str(z["key"]) == key else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        warnings.warn(f"{path} is damaged: computing the features again", stacklevel=2)
        return None


def state_sha256(state: dict) -> str:
    """A fingerprint of a state dict's names and values (the weights a run started from)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
