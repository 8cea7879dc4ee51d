"""Output folders: what a command may create, replace or lock, decided before the disk changes.

The rules (docs/RELIABILITY.md, scenarios 26-38):
- a folder transferlab makes holds a marker file, `.transferlab` (JSON: kind and, for a run,
  its resolved config), so later commands know it is theirs;
- an existing folder that is not transferlab's and not empty is never written into;
  `--overwrite` replaces only a transferlab run or ensemble folder, and only when everything in
  it is a file transferlab writes (a user's notes.txt inside makes it refuse, naming the file);
- no command writes into its own input (a member, the source run, the data folder);
- one process at a time per folder: an OS file lock (`.transferlab.lock`), which the kernel
  releases when the process dies, so a crash never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path

from filelock import FileLock, Timeout

from .config import UserError, one_line
from .stops import has_checkpoint

MARK = ".transferlab"
LOCK = ".transferlab.lock"
# Every file transferlab writes inside a run, ensemble or shard folder, as glob patterns of its path
# relative to the folder (a snapshot is a run folder of its own, checked the same way).
# As narrow as the names written (a user's train-photos.tar or logits/mine.npz is not ours).
_SPLITS, _D = ("train", "val", "test"), "[0-9]"
OWNED = (
    MARK, LOCK, "model.safetensors", "meta.json", "history.csv", "curves.png", "lr_find.png",
    "lr_find.json", "ensemble.json", "combiner.npz", "confusion.png", "confusion-train.png",
    "confusion-val.png", *(f"confusion{s}-other-data.png" for s in ("", "-train", "-val")),
    "state/last.pt", "state/last.pt.sha256", f"state/step-{_D * 9}.pt",
    f"state/step-{_D * 9}.pt.sha256", *(f"logits/{s}.npz" for s in _SPLITS),
    *(f"features/{s}-{t}.npz" for s in _SPLITS for t in ("none", "flip", "crops")),
    "tensorboard/events.out.tfevents.*", "export/model.onnx", "export/model.onnx.data",
    "export/model.pt", "export/model.safetensors", "export/ensemble.onnx",
    "export/ensemble.onnx.data", "export/hf/config.json", "export/hf/model.safetensors",
    *(f"export/hf/.hf-*/{f}" for f in ("config.json", "model.safetensors")),  # a killed export's
    f"explain/{_D * 3}*-gradcam.png", "shards.json", *(f"{s}-{_D * 6}.tar" for s in _SPLITS),
    ".transferlab-report.json",
)  # fmt: skip
TEMP = ".*.tmp"  # a temp file of an interrupted atomic write (checkpoint.atomic_path)
# Report files, recognised by how their text starts (a user's own file of that name is not ours).
REPORTS = {
    "report.md": "# transferlab report",
    "results.csv": ("model,arch,weights", "model,data,arch,weights"),  # runs on 1 or more data
    "report.html": "<!doctype html>",
}
REPORT_SHA = ".transferlab-report.json"  # each report file's sha256 as written: edited, not ours


def read_mark(folder: Path) -> dict | None:
    """The marker of a folder transferlab made, or None (legacy folders: by their files)."""
    folder = Path(folder)
    try:
        return json.loads((folder / MARK).read_text())
    except (OSError, ValueError):
        pass
    if (folder / "meta.json").is_file() and (folder / "model.safetensors").is_file():
        return {"kind": "run"}  # made before markers existed
    if (folder / "ensemble.json").is_file():
        return {"kind": "ensemble"}
    if (folder / "state").is_dir() and not _foreign(folder):
        return {"kind": "run"}  # an interrupted run from before markers existed
    if (folder / "recipe.yaml").is_file() and any(read_mark(d) for d in _subfolders(folder)):
        return {"kind": "recipe"}  # a recipe's folder from before markers existed
    return None


def _subfolders(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]


def _foreign(folder: Path) -> list[str]:
    """Files under a run/ensemble folder that transferlab does not write (links not followed)."""
    found = []
    for parent, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(parent) / d).is_symlink()]:
            rel = (Path(parent) / name).relative_to(folder).as_posix()
            if not owned(rel, folder / rel):
                found.append(rel)
    return sorted(found)


def owned(rel: str, path: Path) -> bool:
    """Is `rel` (a path inside a run or ensemble folder) one that transferlab writes?"""
    parts = rel.split("/")
    if len(parts) > 2 and parts[0] == "snapshots" and fnmatch(parts[1], "snapshot-*"):
        rel = "/".join(parts[2:])  # inside a snapshot run
    if fnmatch(Path(rel).name, TEMP) or any(fnmatch(rel, pattern) for pattern in OWNED):
        return not path.is_symlink() and _looks_ours(rel, path)
    return rel in REPORTS and is_report(path)


def _looks_ours(rel: str, path: Path) -> bool:
    """Where its content can tell: an export carries transferlab's metadata and a picture the
    matplotlib that drew it (a user's photo or notes under one of those names are not ours)."""
    if rel.startswith("export/") and rel.endswith((".onnx", ".pt", ".safetensors")):
        from .export import is_export  # (it imports this module)

        return rel.startswith("export/hf/") or is_export(path)
    if rel.endswith(".png"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                return "matplotlib" in str(im.info.get("Software", "")).lower()
        except (OSError, ValueError):  # (not an image Pillow reads: not ours)
            return False
    return True


def is_report(path: Path) -> bool:
    """A report.md / results.csv / report.html that transferlab wrote, unchanged since."""
    return report_state(path) == "ours"


def report_state(path: Path) -> str:
    """ "ours" (transferlab wrote it, unchanged since: its sha256 is in REPORT_SHA beside it),
    "edited" (a user's notes added since), "unrecorded" (it starts as one, but no sha256 was
    kept: moved or copied without REPORT_SHA, or older than it; notes may be in it), or
    "foreign"; a report is written over only when "ours"."""
    path = Path(path)
    start = REPORTS.get(path.name)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(400)
        if not (start and head.startswith(start)) or (
            start == "<!doctype html>" and "transferlab report" not in head
        ):
            return "foreign"
        written = _report_shas(path.parent).get(path.name)
        return "unrecorded" if written is None else "ours" if _sha(path.read_bytes()) in written else "edited"  # fmt: skip
    except OSError:
        return "foreign"


def check_reports_writable(root: Path, names: tuple[str, ...], who: str, elsewhere: str) -> None:
    """Refuse to write over report files (`names`) that `who` (transferlab report, auto) did
    not write, or wrote and a user changed since (notes added), or whose writing left no
    record here (moved without REPORT_SHA): one line, before any work."""
    for path in (Path(root) / name for name in names):
        if path.exists() and (state := report_state(path)) != "ours":
            how = {
                "edited": f"was changed since {who} wrote it (notes of yours?)",
                "unrecorded": f"has no record of how {who} wrote it ({REPORT_SHA} is not beside "
                "it: moved or copied?), so it may hold notes of yours",
                "foreign": f"was not written by {who}",
            }[state]
            raise UserError(f"{path} {how}; it is left as it is: move it or {elsewhere}")


def write_report_file(path: Path, text: str) -> None:
    """Write a report file, its sha256 recorded first, beside that of the file there now (a
    kill between the two writes leaves the file as either, each recognised as transferlab's;
    the one before it was kept instead, and two failed writes in a row made the file there
    "changed since transferlab report wrote it" for good)."""
    from .checkpoint import atomic_path, write_json

    shas, data = _report_shas(path.parent), text.encode("utf-8")
    there = [_sha(path.read_bytes())] if path.is_file() else []  # (checked as ours before)
    shas[path.name] = [*there, _sha(data)]
    write_json(path.parent / REPORT_SHA, shas)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _report_shas(folder: Path) -> dict:
    try:
        shas = json.loads((folder / REPORT_SHA).read_text())
        return shas if isinstance(shas, dict) else {}
    except (OSError, ValueError):
        return {}


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def not_utf8(name: str) -> bool:
    """A file name whose bytes are not UTF-8 (Python holds them as lone surrogates)."""
    return any(0xDC80 <= ord(c) <= 0xDCFF for c in name)


def check_creatable(path: Path, what: str) -> None:
    """`path` can be created (or written) here: no file in the way, a writable ancestor."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    probe = path
    while not probe.exists():
        if not probe.name.isprintable():  # a newline split report.md's table row in two
            odd = "that is not UTF-8" if not_utf8(probe.name) else "with a control character (a newline, a tab)"  # fmt: skip
            raise UserError(f"{what} {one_line(str(path))} would make a name {odd}: choose another")  # fmt: skip
        if probe.is_symlink():  # (mkdir below it: "File exists")
            raise UserError(
                f"cannot create {what} {path}: {probe} is a broken link (to {os.readlink(probe)})"
            )
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {what} {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {probe} is not writable")


def check_log_file(path: str | Path, out: Path) -> None:
    """--log-json appends to a JSON-lines event log: never to another file (a run's meta.json,
    a CSV) nor into another transferlab folder."""
    if not str(path).strip():  # ('' is the current folder to Path)
        raise UserError("--log-json is empty: name a file for the event log")
    path = Path(path).expanduser()
    if inside(out, path):  # (the folder --out makes: "Is a directory")
        raise UserError(f"--log-json {str(path)!r} names --out or a folder above it; name a file")
    check_file_writable(path, "--log-json")
    for folder in path.resolve().parents:
        mark = read_mark(folder)
        if mark and not inside(folder, out):
            raise UserError(
                f"--log-json {path} is inside the transferlab {mark['kind']} folder {folder}; "
                "write the log elsewhere"
            )
    if path.exists() and path.stat().st_size:
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline())
            assert isinstance(first, dict) and "event" in first
        except (ValueError, AssertionError, UnicodeDecodeError):
            raise UserError(
                f"--log-json {path} exists and is not a transferlab event log; it is left as it "
                "is: choose another file"
            ) from None


def check_file_writable(path: str | Path, what: str) -> None:
    """A file we will create or append to (a --log-json path): its folder exists and is writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write {what} {path}: permission denied")
    if not path.exists():
        check_creatable(path, what)  # (a name with a newline)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {path.parent} is not writable")


def check_out(out: Path, kind: str, resume: bool = False, overwrite: bool = False) -> str:
    """Decide, without touching the disk, what to do with `out`: "new", "resume" or "replace".

    Raises UserError for a folder that is not ours, one that is ours but not asked to be
    continued or replaced, and a replace that would delete files transferlab did not write.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: pass one of them")
    check_creatable(out, f"{kind} folder")
    if not out.exists() or not [p for p in out.iterdir() if p.name != LOCK]:
        return "new"
    mark = read_mark(out)
    if mark is None:
        listing = _few(sorted(p.name for p in out.iterdir()))
        raise UserError(
            f"{out} already exists and is not a transferlab {kind} folder (it holds {listing}); "
            "nothing was changed: choose another --out"
            + (" (--overwrite replaces only folders transferlab wrote)" if overwrite else "")
        )
    if mark.get("kind") != kind:
        raise UserError(
            f"{out} is a transferlab {mark.get('kind')} folder, not a transferlab {kind} folder: "
            "choose another --out"
        )
    if resume:
        return "resume"
    if not overwrite:
        finished = (out / "meta.json").is_file() and not has_checkpoint(out)
        raise UserError(
            f"{kind} folder {out} already exists: pass --resume to continue it "
            "or --overwrite to replace it"
            if kind == "run" and not finished  # (a soup: "pass --resume", then refused)
            else f"{kind} folder {out} already exists: pass --resume to continue it or choose "
            "another --out"
            if kind == "auto"
            else f"{kind} folder {out} already exists: pass --overwrite to replace it"
        )
    foreign = _foreign(out)
    if foreign:
        raise UserError(
            f"--overwrite would delete files transferlab did not write in {out} "
            f"({_few(foreign)}); move them or choose another --out"
        )
    return "replace"


def check_rebuildable(folder: Path, why: str) -> None:
    """Refuse, before any work, a folder that a command will delete and write again (a resumed
    study's best/) unless it is a run or ensemble folder holding only what transferlab wrote."""
    if not Path(folder).exists():
        return
    mark = read_mark(folder)
    foreign = _foreign(folder) if mark else []
    exports = Path(folder) / "export"
    if exports.is_dir() and any(exports.iterdir()):  # the user's: what they made to ship
        raise UserError(f"{exports} holds what you exported: move it; {why}")
    if not mark or mark.get("kind") not in ("run", "ensemble") or foreign:
        held = _few(foreign) if foreign else "no transferlab run or ensemble marker"
        raise UserError(f"{folder} holds what transferlab did not write ({held}): move it; {why}")


def claim(out: Path, kind: str, action: str, info: dict | None = None) -> None:
    """Carry out check_out's decision: create or empty the folder, then write its marker.

    Call it with the folder's lock held (see `lock`), after every argument was validated.
    """
    out = Path(out)
    if action == "replace":
        for entry in out.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    mark(out, kind, info)


def mark(out: Path, kind: str, info: dict | None = None) -> None:
    """Write the folder's marker (it says transferlab made the folder); `info` (a run's
    config) replaces an existing one, else an existing marker is kept."""
    if info is not None or not (Path(out) / MARK).is_file():
        from .checkpoint import write_json

        write_json(Path(out) / MARK, {"kind": kind, **(info or {})})


@contextlib.contextmanager
def lock(out: Path):
    """Hold `out`'s lock for the block; a second process gets a one-line error at once.

    The lock is an flock on OUT/.transferlab.lock: the kernel drops it when the holder exits,
    even on kill -9, so a crashed run never leaves the folder locked.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}") from None
    held = FileLock(str(out / LOCK), timeout=0)
    try:
        held.acquire()
    except Timeout:
        raise UserError(
            f"{out} is in use by another transferlab process; wait for it to finish "
            "or choose another --out"
        ) from None
    try:
        yield
    finally:
        held.release()


def enclosing(path: str | Path) -> tuple[Path, str] | None:
    """The nearest run or ensemble folder strictly above `path`, with its kind (or None)."""
    for folder in Path(path).expanduser().resolve().parents:
        mark = read_mark(folder)
        if mark and mark.get("kind") in ("run", "ensemble"):
            return folder, mark["kind"]
    return None


def inside(path: str | Path, other: str | Path) -> bool:
    """`path` is `other` or lies somewhere under it (after resolving links and ..)."""
    a, b = Path(path).expanduser().resolve(), Path(other).expanduser().resolve()
    return a == b or b in a.parents


def refuse_overlap(
    out: str | Path, inputs: list[str | Path], what: str, flag: str = "--out"
) -> None:
    """`out` (or the folder given as `flag`) must not be, hold or sit inside one of the
    command's inputs."""
    for item in inputs:
        if inside(out, item) or inside(item, out):
            raise UserError(
                f"{flag} {out} overlaps {what} {item}: a command never writes into its own "
                f"input; choose another {flag}"
            )


def refuse_writing_into_data(ds, out: str | Path, cache_dir: str | None = None) -> None:
    """`refuse_writing_into` the data a command reads, loaded (`ds`, a data.Dataset): a
    folder, a CSV, shards; a named set (digits, hf:) has no folder of the user's."""
    from .data import PATH_KINDS

    kind, _, folder = ds.spec.partition(":")
    if kind in PATH_KINDS:
        refuse_writing_into(folder, out, cache_dir, ds.splits)


def refuse_writing_into(
    folder: str | Path, out: str | Path, cache_dir: str | None, splits: dict | None = None
) -> None:
    """Neither --out nor the decode cache (--cache-dir, else $TRANSFERLAB_CACHE; the default
    is the user's own) is, holds or sits inside the data folder a command reads, nor, given
    its `splits`, a folder their images lie in (a linked class folder, a CSV's images)."""
    from .decoding import named_cache

    named, dirs = named_cache(cache_dir), image_folders(splits or {})
    for place, flag in [(out, "--out"), *([named] if named else [])]:
        refuse_overlap(place, [folder], "the data folder", flag)
        refuse_image_folders(place, dirs, folder, flag)


def image_folders(splits: dict) -> list[Path]:
    """The folders the `splits`' images lie in, links resolved: a linked folder's target and a
    linked file's own folder (a tree of links over a photo library; a dangling link's target
    holds no image: `ln -s /gone.png` made every --out "overlap /"); shards: none."""
    paths = [p for s in splits.values() for p in s.paths or ()]
    parents = {os.path.dirname(p) for p in paths}
    parents |= {os.path.dirname(os.path.realpath(p)) for p in paths if os.path.islink(p) and os.path.exists(p)}  # fmt: skip
    return sorted({Path(os.path.realpath(d)) for d in parents})


def refuse_image_folders(place: str | Path, dirs: list[Path], folder, flag: str = "--out") -> None:
    """`place` is not, holds or sits inside one of `dirs` (`image_folders`), which can be
    outside the data `folder`: a linked class folder, a CSV's images."""
    resolved = Path(place).expanduser().resolve()
    above = {resolved, *resolved.parents}
    for d in dirs:
        if d in above or resolved in d.parents:
            raise UserError(
                f"{flag} {place} overlaps {d}, a folder the images of {folder} lie in: a "
                f"command never writes into its own input; choose another {flag}"
            )
