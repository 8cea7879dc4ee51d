"""`transferlab data get`: the standard datasets users start from, fetched from their official
archives (the URLs and MD5s of torchvision.datasets where it has the set), verified, resumable,
and laid out so one `--data` spec reads them.

A download goes to DIR/downloads/FILE.part and asks the server for the bytes it lacks (HTTP
Range), so an interrupted run continues where it stopped; only a complete file whose MD5 matches
is renamed to FILE and extracted. DIR/.transferlab-data.json records which set the folder holds,
so a second `get` of the same set is a no-op and a folder holding anything else is refused."""

from __future__ import annotations

import http.client
import json
import pickle
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import datasets as tvd
from torchvision.datasets.utils import calculate_md5, extract_archive

from .bars import bar as progress_bar
from .config import UserError

STATE = ".transferlab-data.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def archive(self) -> bool:
        return self.filename.endswith((".zip", ".tar.gz", ".tgz", ".tar"))


@dataclass(frozen=True)
class Standard:
    about: str  # one line for `data list`
    resources: tuple[Resource, ...]
    layout: Callable[[Path], str]  # files in DIR -> the --data spec that reads them


# ----------------------------------------------------------------------------- layouts


def _cifar(cls, label_key: str, folder: str) -> Callable[[Path], str]:
    """CIFAR's pickled batches (torchvision's list of them) written out as
    FOLDER/train/<class>/N.png and FOLDER/test/<class>/N.png."""

    def layout(root: Path) -> str:
        batches = root / cls.base_folder
        names = _unpickle(batches / cls.meta["filename"])[cls.meta["key"]]
        out = root / folder
        for split, files in (("train", cls.train_list), ("test", cls.test_list)):
            n = 0
            for file, _ in files:
                batch = _unpickle(batches / file)
                images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
                for image, label in zip(
                    images.transpose(0, 2, 3, 1), batch[label_key], strict=True
                ):
                    target = out / split / names[label] / f"{n:05d}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(target)
                    n += 1
        return f"folder:{out}"

    return layout


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _write_csv(root: Path, name: str, rows: list[tuple[str, str, str]]) -> str:
    """rows of (path relative to root, label, split) -> ROOT/NAME.csv and its spec."""
    import csv

    path = root / f"{name}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("file_name", "label", "split"))
        writer.writerows(rows)
    return f"csv:{path}"


def _pets(root: Path) -> str:
    """annotations/{trainval,test}.txt name the images; the breed is the name less its number."""
    rows = []
    for split, file in (("train", "trainval.txt"), ("test", "test.txt")):
        for line in (root / "annotations" / file).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                stem = line.split()[0]
                rows.append((f"images/{stem}.jpg", stem.rsplit("_", 1)[0], split))
    return _write_csv(root, "pets", rows)


def _flowers(root: Path) -> str:
    """imagelabels.mat (1-based labels) and setid.mat (train/val/test ids) from the archive."""
    from scipy.io import loadmat

    labels = loadmat(root / "downloads" / "imagelabels.mat")["labels"][0]
    setid = loadmat(root / "downloads" / "setid.mat")
    names = tvd.Flowers102.classes
    rows = [
        (f"jpg/image_{i:05d}.jpg", names[labels[i - 1] - 1], split)
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
        for i in setid[key][0]
    ]
    return _write_csv(root, "flowers102", rows)


def _food(root: Path) -> str:
    """meta/{train,test}.txt list CLASS/ID; the images are images/CLASS/ID.jpg."""
    rows = [
        (f"food-101/images/{line}.jpg", line.split("/")[0], split)
        for split in ("train", "test")
        for line in (root / "food-101" / "meta" / f"{split}.txt").read_text().split()
    ]
    return _write_csv(root, "food101", rows)


def _tiny_imagenet(root: Path) -> str:
    return f"tiny-imagenet:{root / 'tiny-imagenet-200'}"


SCENE_TRAIN_PER_CLASS = 100  # the protocol of Lazebnik et al. (2006): 100 per class, rest test


def _scene(root: Path) -> str:
    """Class folders of JPEGs wherever the zip put them; the first 100 per class (by name) are
    train, the rest test."""
    dirs = sorted(
        {p.parent for p in root.rglob("*.jpg") if "downloads" not in p.relative_to(root).parts}
    )
    rows = []
    for d in dirs:
        files = sorted(d.glob("*.jpg"))
        rows += [
            (
                f.relative_to(root).as_posix(),
                d.name,
                "train" if i < SCENE_TRAIN_PER_CLASS else "test",
            )
            for i, f in enumerate(files)
        ]
    return _write_csv(root, "15-scene", rows)


# ----------------------------------------------------------------------------- the catalog


def _tv(pairs) -> tuple[Resource, ...]:
    return tuple(Resource(url, md5) for url, md5 in pairs)


STANDARD = {
    "cifar10": Standard(
        "CIFAR-10: 60,000 32x32 images, 10 classes, 50k train / 10k test (163 MB)",
        _tv([(tvd.CIFAR10.url, tvd.CIFAR10.tgz_md5)]),
        _cifar(tvd.CIFAR10, "labels", "cifar10"),
    ),
    "cifar100": Standard(
        "CIFAR-100: 60,000 32x32 images, 100 classes, 50k train / 10k test (161 MB)",
        _tv([(tvd.CIFAR100.url, tvd.CIFAR100.tgz_md5)]),
        _cifar(tvd.CIFAR100, "fine_labels", "cifar100"),
    ),
    "pets": Standard(
        "Oxford-IIIT Pets: 7,349 photos, 37 breeds, trainval 3,680 / test 3,669 (792 MB)",
        _tv(tvd.OxfordIIITPet._RESOURCES),
        _pets,
    ),
    "flowers102": Standard(
        "Oxford Flowers-102: 8,189 photos, 102 species, train 1,020 / val 1,020 / test 6,149 "
        "(345 MB)",
        _tv(
            (tvd.Flowers102._download_url_prefix + file, md5)
            for file, md5 in tvd.Flowers102._file_dict.values()
        ),
        _flowers,
    ),
    "food101": Standard(
        "Food-101: 101,000 photos, 101 dishes, 75,750 train / 25,250 test (5 GB)",
        _tv([(tvd.Food101._URL, tvd.Food101._MD5)]),
        _food,
    ),
    "tiny-imagenet": Standard(
        "Tiny ImageNet-200: 64x64, 200 classes, 100k train / 10k val used as test (237 MB)",
        (
            Resource(
                "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                "90528d7ca1a48142e341f4ef8d21d0de",
            ),
        ),  # fmt: skip
        _tiny_imagenet,
    ),
    "15-scene": Standard(
        "15-Scene (Lazebnik et al. 2006): 4,485 images, 15 scenes, 100 per class train (92 MB)",
        (
            Resource(
                "http://www-cvr.ai.uiuc.edu/ponce_grp/data/scene_categories/scene_categories.zip",
                "58828019197b2ad0a7efb472e7a85c2a",
            ),
        ),  # fmt: skip
        _scene,
    ),
}


# ----------------------------------------------------------------------------- fetching


def get(name: str, to: str | Path, quiet: bool = False) -> str:
    """Download, verify, extract and lay out a standard dataset in `to`; return its spec."""
    if name not in STANDARD:
        raise UserError(f"unknown dataset '{name}' (known: {', '.join(STANDARD)})")
    root = Path(to).expanduser().resolve()
    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    state = _claim(root, name)
    if state.get("spec"):
        return state["spec"]
    standard = STANDARD[name]
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        for res in standard.resources:
            file = downloads / res.filename
            if fetched := not file.exists():
                fetch(res, file, quiet)  # (MD5-checked)
            if res.archive and res.filename not in state["extracted"]:
                if not fetched and (md5 := calculate_md5(file)) != res.md5:  # (by hand, damaged)
                    raise UserError(f"{file} is not the archive expected (MD5 {md5}, expected {res.md5}): move it away and run the same command again to download it")  # fmt: skip
                extract_archive(file, root)
                state["extracted"].append(res.filename)
                _save(root, state)
    except UserError:
        _unclaim(root, made)
        raise
    state["spec"] = str(standard.layout(root))
    _save(root, state)
    return state["spec"]


def _claim(root: Path, name: str) -> dict:
    """The folder's record of what it holds; refuse a folder with anything else in it."""
    record = root / STATE
    if record.is_file():
        state = _record(record)
        if state.get("name") != name:
            raise UserError(f"{root} holds the dataset '{state.get('name')}'; choose another --to")
        return state
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        what = "holds other files" if root.is_dir() else "is not a folder"  # a file, /dev/null
        raise UserError(f"{root} {what}; choose a new or empty folder for --to")
    root.mkdir(parents=True, exist_ok=True)
    state = {"name": name, "extracted": [], "spec": None}
    _save(root, state)
    return state


def _record(record: Path) -> dict:
    """A folder's download record, refused in one line if it is not one (damaged, edited)."""
    try:
        state = json.loads(record.read_text())
        if isinstance(state, dict) and isinstance(state.get("extracted"), list):
            return state
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    raise UserError(f"{record} is not a readable download record (damaged?); remove it to start "
                    f"again, or choose a new or empty folder for --to")  # fmt: skip


def _unclaim(root: Path, made: list[Path]) -> None:
    """A try that kept nothing (offline, a corrupt first archive) leaves the folder as it was:
    its record and empty downloads/ removed, and the folders it created; a partial download
    (a .part to continue) or an extracted archive keeps everything."""
    downloads = root / "downloads"
    if any(downloads.iterdir()) or sorted(p.name for p in root.iterdir()) != sorted(
        [STATE, "downloads"]
    ):
        return
    downloads.rmdir()
    (root / STATE).unlink()
    for folder in made:  # deepest first; each empty now
        folder.rmdir()


def _save(root: Path, state: dict) -> None:
    tmp = root / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(root / STATE)


def fetch(res: Resource, dest: Path, quiet: bool = False) -> None:
    """res.url -> dest, continuing a dest.part left by an interrupted run; MD5-checked."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "transferlab", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(res.url, headers=headers), timeout=60
        )
    except urllib.error.HTTPError as err:
        if err.code != 416:  # 416: nothing left to send, the .part is whole
            raise UserError(f"cannot download {res.url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise UserError(
            f"cannot reach {res.url} ({getattr(err, 'reason', None) or err}); with the network "
            "back, run the same command again"
        ) from None
    else:
        with response:
            _receive(response, part, have, quiet)
    md5 = calculate_md5(part)
    if md5 != res.md5:
        part.unlink()
        raise UserError(
            f"{res.filename} is corrupt (MD5 {md5}, expected {res.md5}); deleted it: run the same "
            "command again to download it anew"
        )
    part.replace(dest)


def _receive(response, part: Path, have: int, quiet: bool) -> None:
    """Append the response body to part (or rewrite it, when the server ignored the Range)."""
    if have and response.status != 206:  # the server sent the whole file: start over
        have = 0
    size = int(response.headers.get("Content-Length") or 0)
    bar = progress_bar(total=have + size or None, initial=have, unit="B", unit_scale=True,
                       desc=part.name.removesuffix(".part"), disable=quiet)  # fmt: skip
    try:
        with open(part, "ab" if have else "wb") as f, bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        if size and part.stat().st_size < have + size:
            raise ConnectionError("the connection closed early")
    except (ConnectionError, TimeoutError, http.client.HTTPException, urllib.error.URLError) as err:
        raise UserError(
            f"download of {response.url} stopped after {part.stat().st_size / 1e6:.1f} MB "
            f"({getattr(err, 'reason', None) or err}); run the same command again to continue it"
        ) from None
