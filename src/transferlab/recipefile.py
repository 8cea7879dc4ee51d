"""Reading a recipe file: UTF-8 YAML, strict (a key given twice is an error) and bounded (its
size, and the values its aliases expand to)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from .config import UserError
from .stops import later

TOP_KEYS = ("name", "description", "data", "out", "defaults", "steps")
MAX_BYTES = 1_000_000  # a recipe is a page of YAML, not a data file
OWN = Path(__file__).parent / "recipes"  # the recipes transferlab comes with (package data)
MAX_VALUES = 100_000  # values after expanding YAML aliases: a "billion laughs" stops here


def find(path: str | Path) -> Path:
    """A recipe file: `path`, or `path`.yaml (yours first), or where it names one transferlab
    comes with (`tiny-imagenet`, `digits-five.yaml`, `recipes/15-scene.yaml` as the docs and a
    checkout have it), that one."""
    text, path = str(path), Path(path)
    stem = next((path.name[: -len(e)] for e in (".yaml", ".yml") if path.name.endswith(e)), path.name)  # fmt: skip
    if stem == path.name:  # (`run digits-five`: yours, digits-five.yaml or .yml, first)
        yours = [p for p in (path, Path(f"{text}.yaml"), Path(f"{text}.yml")) if p.is_file()]
        if len(yours) > 1:  # (one was run, unsaid)
            raise UserError(f"recipe {text} could be {' or '.join(map(str, yours))}: name the file")
        path = yours[0] if yours else path
    own = {p.stem: p for p in OWN.glob("*.yaml")}
    if path.is_file():  # (yours, named as one transferlab comes with: which ran, said)
        if stem in own and text == Path(text).name and path.resolve() != own[stem].resolve():
            later(f"running {path}, yours: transferlab comes with a recipe named {stem} too (to run that one: transferlab run {own[stem]})")  # fmt: skip
        return path
    if path.is_symlink() and not path.exists():
        raise UserError(f"recipe {path} is a link to {os.readlink(path)}, which does not exist")
    if (text == path.name or text == f"recipes/{path.name}") and stem in own:  # (not ./NAME; a
        return own[stem]  # folder of that name, `--out digits-five` say, is not a recipe)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder: name its .yaml file")
    close = [] if "/" in text else difflib.get_close_matches(stem.casefold().replace("_", "-"), own, 1, 0.8)  # fmt: skip
    raise UserError(f"recipe not found: {text} (the ones transferlab comes with, run by name: {', '.join(sorted(own))}){f'; did you mean {close[0]}?' if close else ''}")  # fmt: skip


def load(path: str | Path) -> dict:
    """Read a recipe file: UTF-8 YAML, at most MAX_BYTES, no alias bomb or cycle."""
    path = find(path)
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{path} is {path.stat().st_size:,} bytes; a recipe is at most {MAX_BYTES:,}")  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#x} at offset {err.start}): "
            "save it as UTF-8"
        ) from None
    try:
        recipe = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {problem or err}") from None
    except RecursionError:
        raise UserError(f"{path} nests too deeply to be a recipe") from None
    count_values(recipe, path)
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    return recipe


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error (PyYAML keeps the last
    one silently: `model: dcnn` then `model: resnet50` would train a ResNet-50)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys give way
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key == "<<":
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def count_values(node, path, ancestors: tuple = (), budget: list | None = None) -> None:
    """Walk the loaded YAML as its aliases expand it; refuse cycles and more than MAX_VALUES."""
    budget = budget if budget is not None else [MAX_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise UserError(f"{path} expands to more than {MAX_VALUES:,} values (a YAML alias bomb?)")
    if isinstance(node, (dict, list)):
        if any(node is a for a in ancestors):
            raise UserError(f"{path} refers to itself (a YAML alias inside its own anchor)")
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        for child in children:
            count_values(child, path, (*ancestors, node), budget)
