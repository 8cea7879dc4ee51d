"""`--data tiny-imagenet:PATH`: the Tiny ImageNet-200 folder as its archive unpacks."""

from __future__ import annotations

import numpy as np

from .classfolders import existing_dir, image_files
from .config import UserError
from .data import Split


def source(root: str, notes: list[str]):
    """wnids.txt, words.txt, train/WNID/images/ and val/ with val_annotations.txt (its val is our
    test: the official split, never trained on)."""
    root_path = existing_dir(root)
    wnids_file = root_path / "wnids.txt"
    if not wnids_file.is_file():
        raise UserError(f"not a Tiny ImageNet folder (no wnids.txt): {root}")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    words = {}
    if (root_path / "words.txt").is_file():
        for line in (root_path / "words.txt").read_text().splitlines():
            wnid, _, name = line.partition("\t")
            words[wnid] = name.strip()
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for wnid in wnids:
        files = image_files(root_path / "train" / wnid / "images")
        if not files:
            raise UserError(f"class {wnid} has no training images in {root_path / 'train' / wnid}")
        paths += files
        labels += [index[wnid]] * len(files)
    ann = root_path / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UserError(f"missing {ann}")
    test_paths, test_labels = [], []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise UserError(f"{ann}: class {parts[1]} is not in wnids.txt")
        test_paths.append(str(root_path / "val" / "images" / parts[0]))
        test_labels.append(index[parts[1]])
    names = [words.get(w, w) for w in wnids]
    train = Split(np.array(labels, dtype=np.int64), paths=paths)
    test = Split(np.array(test_labels, dtype=np.int64), paths=test_paths)
    return wnids, names, {"train": train, "test": test}, 64, 3  # its val/ is our test
