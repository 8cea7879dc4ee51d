"""`hf:` data: a Hugging Face `datasets` dataset as a transferlab source (the optional extra
`hf`). Its images are written once, as their own bytes, under the decode cache, so from there
on they are decoded, cached and fingerprinted as a folder's files. Also `cached_models`: the
timm models the Hugging Face hub cache holds whole (`models --offline`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from . import weights
from .config import UserError
from .data import SPLIT_NAMES, Split, label_order

COLUMN_OPTIONS = ("image", "label")
# the folders its rows' images are written to, and the dataset they are written from: an error
# names the dataset's row, not the copy, which mending would not mend
WRITTEN_FROM: dict[str, str] = {}
ROW = " row "


def named(path: str) -> str:
    """An image as a user knows it: its path, or a written-out row as `NAME SPLIT row N` (a
    shard's member: as it names itself)."""
    if not isinstance(path, str):
        return str(path)
    p = Path(path)
    source = WRITTEN_FROM.get(str(p.parent.parent))
    if source is None or not p.name[:7].isdigit():
        return path
    return f"{source} {p.parent.name}{ROW}{int(p.name[:7])}"


def fix_for(bad: list[str]) -> str:
    """What mends unreadable images: the files, or a dataset's rows (its written-out copies
    are written again from it)."""
    rows = any(line.startswith(tuple(WRITTEN_FROM.values())) and ROW in line for line in bad)
    return "fix those rows in the dataset" if rows else "fix or remove them"


def parse(arg: str) -> tuple[str, str, dict[str, str]]:
    """`NAME[:CONFIG][,image=COLUMN][,label=COLUMN]` -> (name, config, {option: column})."""
    head, *given = arg.split(",")
    name, _, config = (part.strip() for part in head.partition(":"))
    options = {}
    for option in given:
        key, eq, column = (part.strip() for part in option.partition("="))
        if key not in COLUMN_OPTIONS or not eq or not column:
            raise UserError(f"hf: option '{option}' is not image=COLUMN or label=COLUMN")
        if key in options:
            raise UserError(f"hf: option {key}= is given twice ({options[key]}, {column})")
        options[key] = column
    return name, config, options


def spec_of(name: str, config: str, options: dict[str, str]) -> str:
    return (
        f"hf:{name}"
        + (f":{config}" if config else "")
        + "".join(f",{k}={options[k]}" for k in COLUMN_OPTIONS if k in options)
    )


def source(arg: str, notes: list[str]):
    """A Hugging Face `datasets` dataset (the optional extra `hf`): `hf:PATH` of a
    `save_to_disk` folder or parquet file(s), or `hf:NAME[:CONFIG]` from the Hub (from its cache
    when offline). The image column is the one of type Image, the label column the ClassLabel
    (its names become class names) or the one called label/labels, unless `,image=COLUMN` or
    `,label=COLUMN` name them. Images are written once as files under the decode cache, so they
    are decoded, cached and fingerprinted as a folder's."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "hf: data needs the datasets package: pip install 'transferlab[hf]'"
        ) from None
    name, config, options = parse(arg)
    if not name:
        raise UserError("hf data is hf:NAME[:CONFIG] or hf:PATH (a save_to_disk folder or parquet)")
    loaded = _load(datasets, name, config or None)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    kinds = {k: _split_of(k, whole=True) for k in loaded}  # Test, dev: as datasets
    if unknown := sorted(k for k, kind in kinds.items() if kind is None):
        notes.append(f"ignored split(s) of {name}: {', '.join(unknown)}")
    for kind in ("train", "val", "test"):  # val and validation: one was dropped without a word
        if len(twice := [k for k in loaded if kinds[k] == kind]) > 1:
            raise UserError(f"{name} has {len(twice)} {kind} splits ({', '.join(twice)}): keep one, or name them apart")  # fmt: skip
    parts = {kinds[k]: v for k, v in loaded.items() if kinds[k]}
    if "train" not in parts:
        raise UserError(f"{name} has no train split (it has {', '.join(loaded) or 'none'})")
    image_col, label_col = _columns(datasets, parts["train"], name, options)
    feature = parts["train"].features[label_col]
    if by_index := isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
    else:  # numbers in numeric order, as csv: orders them ("10" came before "2")
        classes = label_order({_named(v) for v in parts["train"][label_col]} - {None}, name)
    if not by_index and len(classes) == len(parts["train"]) >= 10 and "label" not in options:  # (pass 64: paths, 1 a class; 66: named, trusted)  # fmt: skip
        raise UserError(f"{name}: column '{label_col}' holds another value in each of its {len(classes)} train rows, so not labels (ids, file paths, captions?): name the label column with ,label=COLUMN")  # fmt: skip
    if not by_index and label_col not in ("label", "labels", options.get("label")):  # (pass 63:
        notes.append(f"labels: column '{label_col}' of {name}, the one beside its images ({len(classes)} classes); name another with ,label=COLUMN")  # a caption column trained on unsaid)  # fmt: skip
    folder = root(name, config)
    WRITTEN_FROM[str(folder)] = name  # its unreadable images named by row
    splits = {}
    for split, ds in parts.items():
        if image_col not in ds.features:  # (a KeyError traceback; a test split without labels
            raise UserError(f"{name}'s {split} split has no column '{image_col}', train's images: name its image column alike")  # fmt: skip
        labels = _labels(datasets, ds, label_col, classes, by_index) if label_col in ds.features else [None] * len(ds)  # fmt: skip
        if split in ("test", "val") and all(v is None for v in labels):  # the Hub's "no label"
            notes.append(
                f"{name}'s {split} split has {'no labels' if labels else 'no rows'}: a {split} split is "
                + ("held out of" if split == "test" else "carved from")
                + " train"
            )  # fmt: skip
            continue
        if (row := next((i for i, v in enumerate(labels) if v is None), None)) is not None:
            raise UserError(f"{name} {split} row {row} has no label: label it, or remove the row")
        if (row := next((i for i, v in enumerate(labels) if v < 0), None)) is not None:
            value, f = ds[row][label_col], ds.features[label_col]
            shown = f.int2str(value) if isinstance(f, datasets.ClassLabel) and 0 <= value < f.num_classes else value  # fmt: skip
            raise UserError(f"{name} {split} row {row}: label {shown!r} is not a class of its train split ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")  # fmt: skip
        paths = _files(datasets, ds, image_col, folder / split, Path(name).expanduser(), f"{name} {split}")  # fmt: skip
        splits[split] = Split(np.array(labels, dtype=np.int64), paths=paths)
    return classes, classes, splits, None, 3


def _labels(datasets, ds, col: str, classes: list[str], by_index: bool) -> list[int | None]:
    """Each row's index in `classes`: None where it has no label (the Hub marks a test split's
    -1), -1 where it names no class. A split's own ClassLabel is read through its own names (a
    split encoded apart from train was read with train's: right answers scored 50%); plain
    numbers are indices when train's labels are a ClassLabel (`by_index`), else names."""
    feature = ds.features[col]
    own = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    for v in ds[col]:
        if _named(v) is None or ((own is not None or by_index) and isinstance(v, int) and v < 0):
            labels.append(None)  # (a number below 0: the Hub's "no label")
        elif own is not None:
            labels.append(index.get(own[v], -1) if v < len(own) else -1)
        elif by_index and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            labels.append(int(v) if v < len(classes) else -1)
        else:
            labels.append(index.get(_named(v), -1))
    return labels


def _named(value) -> str | None:
    """A plain label as a class name: None for none (NaN too: it was a class "nan"), a whole
    float as its integer (0.0 is the 0 of a split pandas made float by a missing label)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _split_of(key: str, whole: bool = False) -> str | None:
    """The split a name says, by the words `datasets` reads in file names, in any case (Test,
    dev, validation): a split's whole name, or a word of a parquet file's (train-00000), or None."""
    said = [key.lower()] if whole else re.split(r"[-._ 0-9]+", key.lower())
    return next((SPLIT_NAMES[t] for t in said if t in SPLIT_NAMES), None)


def _load(datasets, name: str, config: str | None):
    """`name` loaded; what `datasets` logs as an error on the way ("Failed to read schema ...")
    is said once, in our one line (it printed a line of its own first), and a dataset on this
    machine is read without its bars ("Generating train split"): in a moment, and they came
    before a refusal too (the hub's download keeps them)."""
    level, off = datasets.logging.get_verbosity(), datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if Path(name).expanduser().exists():
        datasets.utils.disable_progress_bars()
    try:
        return _read(datasets, name, config)
    finally:
        datasets.logging.set_verbosity(level)
        if not off:
            datasets.utils.enable_progress_bars()


def _read(datasets, name: str, config: str | None):
    path = Path(name).expanduser()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
            if empty := [s.parent.name for s in path.glob("*/state.json") if json.loads(s.read_text()).get("_data_files") == []]:  # fmt: skip
                raise UserError(f"{name}'s {' and '.join(empty)} split holds no rows, which datasets cannot load back (list index out of range): save the dataset without it")  # fmt: skip
            return datasets.load_from_disk(str(path))
        if path.is_dir() and not _parquets(path) and _parquets(path / "data"):
            path = path / "data"  # the Hub's layout, as a dataset repo downloads
        if path.suffix.lower() == ".parquet" or (path.is_dir() and _parquets(path)):
            files = [path] if path.is_file() else _parquets(path)
            if empty := [f.name for f in files if _rows(f) == 0]:  # (datasets: "An error occurred")
                raise UserError(f"{name}: parquet file(s) {', '.join(empty[:5])} hold no rows, which datasets cannot load: remove them")  # fmt: skip
            return datasets.load_dataset("parquet", data_files=_parquet_splits(files, name))  # fmt: skip
        if path.exists():
            raise UserError(f"{name} is neither a save_to_disk folder nor parquet")
        if name.startswith(("/", "./", "../", "~")):  # a path, not a Hub name (pass 66: it was
            raise UserError(f"dataset path does not exist: {name}")  # looked for on the Hub)
        why = weights.hub_unreachable()  # in 5 s; the hub client retries for half a minute
        with weights.cache_only(why is not None):
            try:
                return datasets.load_dataset(name, config)
            except Exception:
                if why is None:
                    raise
        raise UserError(
            f"could not load Hugging Face dataset {name}: no such folder here, and the Hugging "
            f"Face cache does not hold it ({why}): check the path, or download it once online"
        )
    except UserError:
        raise
    except Exception as err:  # the hub, the cache and the formats raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load Hugging Face dataset {name}: {first}") from None


def _parquet_splits(files: list[Path], name: str) -> dict[str, list[str]]:
    """Parquet files by the split their name says, by the words `datasets` reads there (in any
    case: dev.parquet is val, Test.parquet test; both were trained on); none named: all train."""
    said = {f: _split_of(f.stem) for f in files}
    if not any(said.values()):
        return {"train": [str(f) for f in files]}
    if unsaid := [f.name for f, split in said.items() if split is None]:
        raise UserError(f"{name}: parquet file(s) {', '.join(unsaid[:5])} name no split (train, val, test) where others do: rename them, or move them out")  # fmt: skip
    return {split: [str(f) for f, s in said.items() if s == split] for split in dict.fromkeys(said.values())}  # fmt: skip


def _rows(file: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(file).num_rows


def _parquets(folder: Path) -> list[Path]:
    """The parquet files in `folder`, any case of extension (Test.PARQUET was left out)."""
    return sorted(f for f in folder.glob("*") if f.suffix.lower() == ".parquet") if folder.is_dir() else []  # fmt: skip


def _columns(datasets, ds, name: str, options: dict[str, str]) -> tuple[str, str]:
    features = ds.features
    listed = ", ".join(f"{c} ({getattr(f, 'dtype', None) if isinstance(f, datasets.Value) else type(f).__name__})" for c, f in features.items())  # fmt: skip
    for option, column in options.items():
        if column not in features:
            raise UserError(f"{name} has no column '{column}' ({option}=); its columns: {listed}")
    if "image" in options and not _images(datasets, features[options["image"]], named=True):
        raise UserError(f"{name}: column '{options['image']}' holds no images or file paths; its columns: {listed}")  # fmt: skip
    if "label" in options and _images(datasets, features[options["label"]]):
        raise UserError(
            f"{name}: column '{options['label']}' holds images, not labels; its columns: {listed}"
        )
    images = [options["image"]] if "image" in options else [
        c for c, f in features.items() if _images(datasets, f)
    ]  # fmt: skip
    images = ["image"] if len(images) > 1 and "image" in images else images  # (a thumb beside it)
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
    other = [c for c in features if c not in images]  # one image column and one other: that
    labels = [options["label"]] if "label" in options else (  # one holds the labels
        labels or [c for c in ("label", "labels") if c in features]
        or [c for c in other if len(images) == 1 and len(other) == 1
            and isinstance(features[c], datasets.Value)]
    )  # fmt: skip
    if len(images) != 1 or len(labels) != 1:
        paths = " (a column of image file paths is read when named image=)" * (not images)
        raise UserError(
            f"{name}: cannot tell the image and label columns apart (columns: {listed}); name "
            f"them: hf:NAME,image=COLUMN,label=COLUMN{paths}"
        )
    if not isinstance(features[labels[0]], (datasets.ClassLabel, datasets.Value)):  # a list:
        raise UserError(f"{name}: column '{labels[0]}' holds {type(features[labels[0]]).__name__} values, several labels an image: transferlab trains one label an image; name another with label=COLUMN")  # fmt: skip
    return images[0], labels[0]


def _images(datasets, feature, named: bool = False) -> bool:
    """An Image column, or one of image files' bytes without that type: `{bytes, path}` as Image
    stores them, or bare bytes (a parquet pyarrow wrote: "holds no images" once named); `named`
    by image=, a column of file paths too (pass 63: "name them" was followed, then refused)."""
    if isinstance(feature, dict) and set(feature) <= {"bytes", "path"}:
        feature = feature.get("bytes")
    kinds = ("binary", "large_binary") + ("string", "large_string") * named
    return isinstance(feature, datasets.Image) or getattr(feature, "dtype", "") in kinds


def root(name: str, config: str) -> Path:
    from .decoding import resolve_cache

    cache = resolve_cache(None) or Path.home() / ".cache" / "transferlab"
    local = Path(name).expanduser()
    where = str(local.resolve()) if local.exists() else name
    return cache / "hf" / hashlib.sha256(f"{where}|{config}".encode()).hexdigest()[:16]


def _files(datasets, ds, column: str, folder: Path, local: Path, who: str) -> list[str]:
    """Each row's image as the file it was (its own bytes), written once into `folder`; a path
    relative to a `local` dataset's folder (as csv: reads its) or else to the current one. A
    column of paths names the rows whose file is not there, as csv: names its lines (pass 64:
    "no image in its row")."""
    base, strings = local if local.is_dir() else local.parent, not _images(datasets, ds.features[column])  # fmt: skip
    raw = ds.cast_column(column, datasets.Image(decode=False))
    paths, missing = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(raw[column]):
        data, given = (item or {}).get("bytes"), (item or {}).get("path")
        if data is None and given:
            where = (base / given, Path(given).expanduser())
            try:
                data = next(p for p in where if p.is_file()).read_bytes()
            except (StopIteration, OSError):  # a path from the machine that made it
                why = "a URL: download the images first" if re.match(r"[a-z]+://", given) else ("a folder" if any(p.is_dir() for p in where) else "not found")  # fmt: skip
                missing.append(f"row {i} {given!r} ({why})")
        # a row without an image: an empty file, named so, which decoding calls unreadable
        # (--skip-bad-images leaves it out), where it was a traceback
        name = f"{i:07d}-{hashlib.sha256(data).hexdigest()[:16]}" if data else f"{i:07d}-no-image"
        path = folder / name
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data or b"")
            os.replace(tmp, path)
        paths.append(str(path))
    if missing and strings:
        raise UserError(f"{who}: {len(missing)} row(s) name no image file here: {'; '.join(missing[:10])}{'; ...' * (len(missing) > 10)} (a relative path is read from the dataset's folder, then the current one)")  # fmt: skip
    return paths


def cached_models() -> set[str]:
    """The model repos of the Hugging Face hub cache that timm can build with their weights:
    refs/main's snapshot holds model.safetensors (or pytorch_model.bin) and a config.json that
    names a timm architecture (`models --offline` listed transformers models and downloads that
    stopped halfway as usable here)."""
    import timm
    from huggingface_hub import constants, scan_cache_dir

    try:
        repos = [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == "model"]
    except Exception:  # no cache yet (CacheNotFound), or one being written
        return set()
    usable = set()
    for repo in repos:
        files = {
            f.file_name: f.file_path for v in repo.revisions if "main" in v.refs for f in v.files
        }
        org, _, name = repo.repo_id.partition("/")
        try:  # timm's own tags build from timm's pretrained_cfg (a broken config.json hid them)
            arch = name if org == "timm" and name in timm.list_pretrained(name) else json.loads(files["config.json"].read_text()).get("architecture")  # fmt: skip
        except (KeyError, OSError, ValueError, AttributeError):
            continue
        if "model.safetensors" in files and not _complete(files["model.safetensors"]):
            continue  # a copy cut short was listed, then refused as "do not load"
        if files.keys() & {"model.safetensors", "pytorch_model.bin"} and timm.is_model(str(arch)):
            usable.add(repo.repo_id)
    return usable


def _complete(path) -> bool:
    """A safetensors file holds every byte its header promises (read from the header alone)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, 100_000_000)))
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        return Path(path).stat().st_size == 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
