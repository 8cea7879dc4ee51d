"""A recipe: `--set` overrides, and every check made before a step runs (keys, values, names,
members, models, data specs); `recipefile` reads it, `recipe` runs it."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import re
from pathlib import Path

from . import checkpoint, data, decoding, ensembles, evaluate, outputs, strategies, weights
from .config import PROBE_IGNORES, TrainConfig, UserError, field_names, make_config, names_weights
from .recipefile import TOP_KEYS, load  # noqa: F401  (load: the recipe's API)

STEP_KINDS = ("train", "finetune", "ensemble", "soup", "auto", "report")
EXTRA_KEYS = {
    "auto": ("budget", "seed", "cache_dir"),
    "finetune": ("from",),
    "ensemble": ("members", "method", "tta"),
    "soup": ("members", "method"),
    "report": (),
}


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a step's run folder, inside --out


NUMBERS = {f.name for f in dataclasses.fields(TrainConfig) if re.search(r"\b(int|float)\b", str(f.type))}  # fmt: skip


def apply_overrides(recipe: dict, overrides: dict) -> dict:
    """`--set` pairs: top-level keys (data, out), `steps.N.key`, `defaults.key` (a step's own
    value stays), or TrainConfig fields (every step)."""
    recipe = copy.deepcopy(recipe)
    recipe.setdefault("overrides", {})
    for key, value in overrides.items():
        number = isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value)  # fmt: skip
        if number and key.rpartition(".")[2] in NUMBERS:  # as YAML: not '3'; 007 a path
            value = int(value) if value.lstrip("+-").isdigit() else float(value)
        if key in ("data", "out", "name") and isinstance(value, str) and not value.strip():
            raise UserError(f"--set {key} is empty: give a value, or leave it out")  # (as lr's)
        if key in ("data", "out", "name"):
            recipe[key] = value
            recipe.setdefault("_set", []).append(key)
        elif key.startswith("steps.") or key == "steps":
            parts = key.split(".", 2)
            steps = recipe.get("steps")
            if len(parts) != 3 or not parts[1].isdigit():
                raise UserError(f"--set {key}: write steps.N.KEY=VALUE (N counts from 0)")
            index = int(parts[1])
            if not isinstance(steps, list) or index >= len(steps):
                raise UserError(f"--set {key}: no step {index} in this recipe (--set counts its steps from 0: steps.0 to steps.{len(steps) - 1})"  # fmt: skip
                                if isinstance(steps, list) and steps else f"--set {key}: this recipe has no steps")  # fmt: skip
            if not isinstance(steps[index], dict) or "report" in steps[index]:  # (- report: {})
                raise UserError(f"--set {key}: steps.{index} is a report step, which takes no keys")
            if parts[2] == "members" and isinstance(value, str):  # m1,m2 or [m1, m2]
                value = [m.strip() for m in value.strip().strip("[]").split(",") if m.strip()]
            step, kind = steps[index], next((k for k in STEP_KINDS if k in steps[index]), None)
            if parts[2] in STEP_KINDS and parts[2] != kind:  # (pass 64: "step 1", not the --set)
                raise UserError(f"--set {key}: steps.{index} is a{'n' * (kind[0] in 'aeiou')} {kind} step; --set changes its keys, not its kind")  # fmt: skip
            parts[2] = "name" if parts[2] == kind else parts[2]  # steps.0.train=zz: its name (its
            if isinstance(step.get(kind), dict):  # - train: {...}  (mapping went, unsaid: pass 64)
                step = step[kind]  # (pass 62: beside it, "give its keys either inside or beside")
            elif parts[2] == "name" and isinstance(step.get(kind), str):  # - train: NAME
                parts[2] = kind  # (its name: "unknown key 'name'")
            step[parts[2]] = value
            recipe.setdefault("_set", []).append(key)  # (its errors name the --set, not the file)
        elif key == "defaults.data":  # (every step trained on it; recipe.yaml said the other)
            raise UserError("--set defaults.data: the recipe's data is its top-level data: --set data=SPEC")  # fmt: skip
        elif key.startswith("defaults.") and isinstance(recipe.get("defaults") or {}, dict):
            recipe["defaults"] = {**(recipe.get("defaults") or {}), key.removeprefix("defaults."): value}  # fmt: skip
            recipe.setdefault("_set", []).append(key)
        else:
            plain = key.removeprefix("defaults.")
            if plain in recipe["overrides"] and recipe["overrides"][plain] != value:
                raise UserError(f"--set {plain} is given twice, {recipe['overrides'][plain]!s} "
                                f"and {value!s} ({key}): give it once")  # fmt: skip
            recipe["overrides"][plain] = value
            recipe.setdefault("_set", []).append(plain)
    for key in (k for k in overrides if k.startswith("steps.") and k.count(".") == 2):  # pass 45:
        if (plain := key.split(".")[2]) in recipe["overrides"]:  # the step's was silently beaten
            raise UserError(f"--set {plain}={recipe['overrides'][plain]} sets every step, over --set {key}={overrides[key]}: give the steps theirs one by one (--set steps.N.{plain}=...), or one value for all")  # fmt: skip
    return recipe


def validate(recipe: dict, out: Path | None = None) -> None:
    """Every key, type, step form, name and member reference, before any step runs; with
    `out`, members and parents are checked to exist (an earlier step or a run folder)."""
    unknown = [k for k in recipe if k not in (*TOP_KEYS, "overrides", "_set")]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), TOP_KEYS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown recipe key '{unknown[0]}'{hint} (known: {', '.join(TOP_KEYS)})")
    for key in ("name", "description", "data", "out"):
        if recipe.get(key) is not None and not isinstance(recipe[key], str):
            raise UserError(f"recipe key '{key}' must be text, got {type(recipe[key]).__name__}")
    _refuse_blank(recipe)
    name = recipe.get("name")
    if name is not None and not (NAME.fullmatch(name) and name not in (".", "..")):
        raise UserError(
            f"recipe name {name!r} must be a plain name (letters, digits, . _ -, a letter or digit first): it names the "
            "default output folder runs/NAME"
        )
    for key in ("defaults", "overrides"):
        if not isinstance(recipe.get(key) or {}, dict):
            raise UserError(f"recipe key '{key}' must be a mapping of training options")
    steps = recipe.get("steps")
    if not isinstance(steps, list) or not steps:
        raise UserError("a recipe needs a non-empty 'steps' list (- train: NAME, ...)")
    for key in ("defaults", "overrides"):
        try:
            make_config(recipe.get(key) or {})
        except UserError as err:  # --set budget=30m: a key of auto steps, not of every step
            first = next((k for k in recipe.get(key) or {} if str(k).replace("-", "_") not in field_names(TrainConfig)), None)  # fmt: skip
            owners = [kind for kind, keys in EXTRA_KEYS.items() if first in keys]
            where = f"; {' and '.join(owners)} steps take it: --set steps.N.{first}=... (N from 0)" if owners and key == "overrides" else ""  # fmt: skip
            bad = next((k for k in recipe.get(key) or {} if re.match(rf"(unknown config key ')?{re.escape(str(k))}\b", str(err))), None)  # fmt: skip
            address = bad if key == "overrides" else f"defaults.{bad}"  # (pass 61: defaults.lr)
            said = f"--set {address}" if address in recipe.get("_set", []) else f"the recipe's {key}"  # fmt: skip
            raise UserError(f"{said}: {err}{where}") from None
    names: list[str] = []
    kinds: dict[str, str] = {}
    for i, step in enumerate(steps, 1):  # numbered as `run` prints them: step 1 is the first
        kind, name, keys = parse_step(step, i)
        with _in_step(i, kind, name, recipe, keys):  # a bad value: which step (and --set) holds it
            _check_step(recipe, kind, name, keys, i, names, kinds, out)
    if out is not None:
        _refuse_out_in_data(recipe, out)


def _refuse_blank(recipe: dict) -> None:
    """An empty value (`out: ""`, `--set data=`) read as one not given: the steps ran into
    runs/NAME, on the recipe's data. Refused, naming where it is."""
    places = [(f"recipe key '{k}'", k, v) for k, v in recipe.items() if k != "description"]
    for key, where in (("defaults", "defaults: {}"), ("overrides", "--set {}")):
        values = recipe.get(key) if isinstance(recipe.get(key), dict) else {}
        places += [(where.format(k), k, v) for k, v in values.items()]
    for i, step in enumerate(recipe.get("steps") if isinstance(recipe.get("steps"), list) else []):
        values = step if isinstance(step, dict) else {}
        places += [(f"step {i + 1}: '{k}'", k, v) for k, v in values.items()]
    said_elsewhere = (*STEP_KINDS, "cache_dir")  # in more words: a plain name, a folder or off
    where = next((w for w, k, v in places
                  if isinstance(v, str) and not v.strip() and k not in said_elsewhere), None)  # fmt: skip
    if where:
        raise UserError(f"{where} is empty: give a value, or leave it out")


def _check_step(recipe: dict, kind: str, name: str, keys: dict, i: int, names: list[str],
                kinds: dict[str, str], out: Path | None) -> None:  # fmt: skip
    """One step of `validate`: its keys, values, name and references."""
    _check_keys(kind, name, keys, i, recipe.get("_set", []))
    _check_values(kind, name, keys, i, out is not None)
    if kind != "report":
        if name in names:
            j = next(j for j, step in enumerate(recipe["steps"], 1) if parse_step(step, j)[1] == name)  # fmt: skip
            renamed = [a for a in recipe.get("_set", []) if re.fullmatch(rf"steps\.({j - 1}|{i - 1})\.(name|{'|'.join(STEP_KINDS)})", a)]  # fmt: skip
            raise UserError(f"step {i}: the name '{name}' is used by an earlier step, step {j}{''.join(f'; --set {a}' for a in renamed)}")  # fmt: skip
        if kind == "train":
            cfg = train_config(recipe, keys)  # bad values fail before any
            weights.check_model(cfg)  # step runs, a typo in a later step's model too
            data.check_spec(cfg.data, exists=out is not None)
            _check_weights(recipe, cfg.weights, out is not None)
        elif kind == "auto":
            from .auto import parse_budget

            if "limit" in (recipe.get("overrides") or {}):  # a smoke test ran a whole study
                raise UserError(
                    "--limit does not apply to an auto step (a study splits all its data): "
                    f"smoke-test it with a small budget, --set steps.{i - 1}.budget=1m"
                )
            parse_budget(keys.get("budget", ""), "budget:")
            _auto_data_seed(recipe, keys)
        elif kind == "soup":
            _check_soup_starts(recipe, name, keys, i)
        elif kind == "finetune":
            settings = train_settings(recipe, keys, data=False)  # the parent decides the rest
            for key in ("model", "weights"):
                if key in keys:  # its own (in defaults or --set: the train steps')
                    raise UserError(
                        f"{key} does not apply to a fine-tune (step {i}, finetune {name}): "
                        "it starts from its 'from' run; set it on train steps only"
                    )
            ignored = [k for k in keys if str(k).replace("-", "_") in PROBE_IGNORES] if settings.get("strategy") == "linear-probe" else []  # fmt: skip
            make_config({k: v for k, v in settings.items() if k != "from"}, check_applies=ignored)  # (its own, told a probe: pass 61)  # fmt: skip
        if out is not None and kind in ("train", "finetune", "auto"):  # not after step 1
            own = keys if kind == "auto" else train_settings(recipe, keys, data=False)
            decoding.check_cache(own.get("cache_dir"), f"the cache_dir of step {i} ({kind} {name})")
        if out is not None and kind in ("finetune", "ensemble", "soup"):
            _check_refs(kind, name, keys, names, out, i)
        if kind in ("train", "finetune") and (arch := _arch(recipe, kind, keys, i)):
            own = train_settings(recipe, keys, data=False)
            strategies.check_freeze(arch, str(own.get("freeze", "none")), str(own.get("strategy", "full")))  # fmt: skip
        refs = keys.get("members") if kind in ("ensemble", "soup") else [keys.get("from")]
        hit = next((kinds[str(r)] for r in refs or [] if kinds.get(str(r)) in NOT_RUNS), None)
        if hit:  # (it failed after every step before it had run)
            raise UserError(f"step {i} ({kind} {name}): {NOT_RUNS[hit]}")
        names.append(name)
        kinds[name] = kind


def _arch(recipe: dict, kind: str, keys: dict, i: int) -> str | None:
    """The architecture step i trains (a finetune's: its `from` step's, before it, or run
    folder's); None where the recipe cannot tell (a hub name, a weights file)."""
    if kind == "finetune":
        ref = str(keys.get("from"))
        steps = [(*parse_step(step, j), j) for j, step in enumerate(recipe["steps"][: i - 1], 1)]
        parent = next(((k, v, j) for k, n, v, j in steps if n == ref and k in ("train", "finetune")), None)  # fmt: skip
        meta = Path(ref).expanduser() / checkpoint.META
        return _arch(recipe, *parent) if parent else meta.is_file() and checkpoint.read_meta(meta.parent)["arch"] or None  # fmt: skip
    cfg = train_config(recipe, keys)
    return None if ":" in cfg.model or cfg.weights not in (None, "imagenet", "none") else cfg.model  # fmt: skip


def _check_weights(recipe: dict, given: str | None, exists: bool) -> None:
    """A train step's weights: a step's name is refused with the fine-tune that does it (it
    failed after the step named had trained, as a file not found); a path must exist."""
    if given in (None, "imagenet", "none"):
        return
    steps = [parse_step(step, j)[1] for j, step in enumerate(recipe["steps"], 1)]
    if given in steps and not Path(given).expanduser().exists():  # (a folder here: as before)
        raise UserError(
            f"weights: {given} names a step of this recipe; to start from its run, make this "
            f"step '- finetune: NAME' with 'from: {given}' (weights: is a run folder or a "
            "weights file, read from the current folder)"
        )
    if exists and not Path(given).expanduser().exists():
        raise UserError(f"weights: {given} does not exist (a run folder or a weights file, read from the current folder, not --out; imagenet, or none)")  # fmt: skip


@contextlib.contextmanager
def _in_step(i: int, kind: str, name: str, recipe: dict, keys: dict):
    """A value error inside step i names the step (key errors already do), and each --set
    whose key or value it names (pass 60: a file without freeze 7 was read for it; step 1 is
    steps.0 there)."""
    try:
        yield
    except UserError as err:
        text, here = str(err), f"step {i} ({kind} {name})"
        if type(err) is not UserError or (re.search(r"\bstep \d", text) and not text.startswith(here)):  # fmt: skip
            raise
        said = "; ".join(f"--set {a}" for a in _set_in(recipe, i, keys, text))
        where = f"step {i} ({kind} {name}{'; ' * bool(said)}{said})"
        raise UserError(text.replace(here, where, 1) if text.startswith(here) else f"{where}: {text}") from None  # fmt: skip


def _set_in(recipe: dict, i: int, keys: dict, text: str) -> list[str]:
    """The --set addresses (steps.N.KEY of step i, KEY of every step, defaults.KEY where the
    step has none of its own) that `text` names: first or as `KEY VALUE`; a reference (from,
    members, data) by its key or a value (pass 61: a file's `schedule: sgd` was blamed on
    --set optimizer=sgd, by its value alone)."""
    found = []
    for address in recipe.get("_set", []):
        mine, default = address.startswith(f"steps.{i - 1}."), address.startswith("defaults.")
        if ("." in address and not (mine or default)) or (default and address[9:] in keys):
            continue
        key = address.split(".", 2)[2] if mine else address.removeprefix("defaults.")
        value = keys.get(key) if mine else (recipe.get("defaults" if default else "overrides") or {}).get(key, recipe.get(key))  # fmt: skip
        named = text.startswith((f"{key} ", f"{key}:")) or f"{key} {value}" in text or (key == "model" and f"model '{value}'" in text)  # (budget:)  # fmt: skip
        values = [str(v) for v in (value if isinstance(value, list) else [value])]
        ref = key in ("from", "members", "data") and (re.search(rf"\b{key}\b", text) or any(f"'{v}'" in text or f": {v.partition(':')[2] or v}" in text for v in values))  # fmt: skip
        if named or ref:
            found.append(address)
    return found


def _refuse_out_in_data(recipe: dict, out: Path) -> None:
    """The recipe's folder is not, holds or sits in a folder it reads images from (its marker
    and recipe.yaml were left there, read as a class that had no images)."""
    every = [recipe, recipe.get("defaults") or {}, recipe.get("overrides") or {}]
    every += [parse_step(step, i)[2] for i, step in enumerate(recipe["steps"], 1)]
    caches = sorted({str(d["cache_dir"]) for d in every if d.get("cache_dir") not in (None, "off")})
    for spec in sorted({str(d["data"]) for d in every if d.get("data")}):
        kind, _, arg = spec.partition(":")
        if kind in data.PATH_KINDS and arg:  # (and where its images lie: a CSV's, linked)
            splits = data.load(spec).splits if kind in ("csv", "folder") else None
            outputs.refuse_writing_into(arg, out, None, splits)  # --out, $TRANSFERLAB_CACHE
            for cache in caches:  # (refused at its step, after the steps before it)
                outputs.refuse_overlap(cache, [arg], "the data folder", "cache_dir")


NOT_RUNS = {  # steps a finetune's `from` or an ensemble's or soup's `members` cannot name
    "ensemble": "an ensemble step is not a run; name the runs it combines",
    "auto": "an auto step is a study, not a run; what it chose is OUT/NAME/best once the "
    "recipe has run (a later recipe or command can use it)",
}


ALIASES = {"learning_rate": "lr", "lrate": "lr", "epoch": "epochs", "bs": "batch_size", "wd": "weight_decay", "image_size": "input_size", "img_size": "input_size", "size": "input_size", "arch": "model", "backbone": "model"}  # fmt: skip


def _check_keys(kind: str, name: str, keys: dict, index: int, set_keys: list = ()) -> None:
    """`set_keys`: the --set steps.N.KEY given (a key of the recipe's file is mended there)."""
    allowed = set(EXTRA_KEYS.get(kind, ())) | (
        {*field_names(TrainConfig)} - {"data"} if kind in ("train", "finetune") else set()
    )
    allowed |= {"data"} if kind in ("train", "finetune", "ensemble", "soup", "auto") else set()
    for key in keys:
        if str(key).replace("-", "_") not in allowed:
            alias = ["members"] if key in ("runs", "run") else [ALIASES.get(str(key).lower(), "")]
            close = [a for a in alias if a in allowed] or difflib.get_close_matches(str(key), sorted(allowed), n=2)  # fmt: skip
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f"; --set steps.{index - 1}.{key}" * (f"steps.{index - 1}.{key}" in set_keys)
            raise UserError(f"unknown key '{key}' in step {index} ({kind} {name}{where}){hint}")  # fmt: skip


RESERVED = ("recipe.yaml", *outputs.REPORTS)  # files of the recipe's folder, not step names


def _check_values(kind: str, name: str, keys: dict, i: int, exists: bool) -> None:
    """What an ensemble, soup or auto step would refuse after the steps before it had run
    (`exists`: data paths are checked to exist too)."""
    from . import soups

    if name in RESERVED and kind != "report":
        raise UserError(f"step {i} ({kind}): '{name}' is a file of the recipe's folder; rename it")
    if "data" in keys and kind != "train":
        data.check_spec(str(keys["data"]), exists)
    if kind == "ensemble":
        if keys.get("method", "soft") not in ensembles.COMBINERS:
            raise UserError(
                f"step {i} (ensemble {name}): unknown ensemble method '{keys['method']}' "
                f"(known: {', '.join(ensembles.COMBINERS)})"
            )
        evaluate.check_tta(str(keys.get("tta", "none")))
    if kind == "soup" and keys.get("method", "greedy") not in soups.METHODS:
        raise UserError(
            f"step {i} (soup {name}): unknown soup method '{keys['method']}' "
            f"(known: {', '.join(soups.METHODS)})"
        )


def _check_refs(kind: str, name: str, keys: dict, earlier: list[str], out: Path, i: int) -> None:
    """A finetune's `from` and an ensemble's or soup's `members` name earlier steps or runs."""
    refs = [keys.get("from")] if kind == "finetune" else keys.get("members")
    if kind == "finetune" and not refs[0]:
        raise UserError(f"step {i} (finetune {name}) needs 'from: RUN' (a step name or run folder)")
    if kind in ("ensemble", "soup") and isinstance(refs, list):
        twice = next((str(r) for r in refs if str(r) == name or refs.count(r) > 1), None)
        if twice is not None:  # (it said "needs two or more")
            why = "is this step itself" if twice == name else "is listed twice"
            raise UserError(f"step {i} ({kind} {name}): member '{twice}' {why}; list other runs")
    if kind in ("ensemble", "soup") and (not isinstance(refs, list) or len(refs) < 2):
        raise UserError(f"step {i} ({kind} {name}) needs 'members: [A, B, ...]' (two or more)")
    for ref in refs:
        if str(ref) not in earlier and not checkpoint.is_run(ref_path(ref, out)):
            raise UserError(
                f"step {i} ({kind} {name}): '{ref}' is neither an earlier step "
                f"({', '.join(earlier) or 'none'}) nor a finished run folder (looked for in --out "
                "by name, else as a path from the current folder)"
            )


def ref_path(ref, out: Path) -> Path:
    """A member or parent: a step name under `out`, else a run folder path."""
    ref = str(ref)
    return out / ref if NAME.fullmatch(ref) and (out / ref).exists() else Path(ref).expanduser()


def parse_step(step, index: int) -> tuple[str, str, dict]:
    """(kind, name, keys) of `- train: NAME` + keys, `- train: {name: NAME, ...}` or `- report`."""
    if step == "report":
        return "report", "report", {}
    if not isinstance(step, dict):
        bare = difflib.get_close_matches(str(step), ["report"], n=1) if isinstance(step, str) else []  # fmt: skip
        raise UserError(f"step {index} must be a mapping like '- train: NAME', or '- report', got {step!r}"[:200] + (" (did you mean report?)" if bare else ""))  # fmt: skip
    kinds = [k for k in step if k in STEP_KINDS]
    if len(kinds) != 1:
        close = [m for k in step for m in difflib.get_close_matches(str(k), STEP_KINDS, n=1)]
        hint = f" (did you mean {close[0]}?)" if not kinds and close else ""  # (pass 55: trian)
        raise UserError(
            f"step {index} needs exactly one of {', '.join(STEP_KINDS)}; "
            f"got keys {', '.join(map(str, step))}"[:300]
            + hint
        )
    kind, value = kinds[0], step[kinds[0]]
    keys = {k: v for k, v in step.items() if k != kind}
    if kind == "report":
        if value not in (None, {}, "report") or keys:
            raise UserError(f"step {index}: report takes no name or keys ('- report')")
        return kind, "report", {}
    if isinstance(value, dict):  # the mapping form: - train: {name: a, model: dcnn}
        if keys:
            raise UserError(
                f"step {index}: give its keys either inside {kind}: {{...}} or beside it"
            )
        keys = dict(value)
        value = keys.pop("name", None)
    if not isinstance(value, str) or not NAME.fullmatch(value) or value in (".", ".."):
        raise UserError(
            f"step {index} ({kind}) needs a plain name for its run folder inside --out "
            f"(letters, digits, . _ -, starting with a letter or digit), got {value!r}"[:200]
        )
    return kind, value, keys


def train_config(recipe: dict, keys: dict) -> TrainConfig:
    """A train step's config; an option that has no effect on it is refused where the step
    names it, not where the defaults or --set every step shares name it (a probe among runs
    that train for epochs)."""
    return make_config(train_settings(recipe, keys), check_applies=keys)


def train_settings(recipe: dict, keys: dict, data: bool = True) -> dict:
    """A train/finetune step's options: defaults < step keys < --set overrides (a finetune
    takes its parent's data unless it names its own)."""
    base = {"data": recipe.get("data", "digits")} if data else {}
    every = [recipe.get("defaults") or {}, recipe.get("overrides") or {}]
    if not data:  # a fine-tune's model and weights are its parent's: these are the train steps'
        every = [{k: v for k, v in d.items() if k not in ("model", "weights")} for d in every]
    return {**base, **every[0], **keys, **every[1]}


def _check_soup_starts(recipe: dict, name: str, keys: dict, i: int) -> None:
    """A soup's members that are this recipe's train steps from scratch with different seeds
    start from different weights: refused before any step runs (it failed after them)."""
    steps = [parse_step(step, j) for j, step in enumerate(recipe["steps"], 1)]
    members = {str(m) for m in keys.get("members") or [] if isinstance(m, str | int)}
    seeds = {}
    for kind, member, own in steps:
        cfg = train_config(recipe, own) if kind == "train" else None
        if cfg and member in members and cfg.weights in (None, "none"):
            if not names_weights(cfg.model):  # from scratch: its seed draws every weight
                seeds[member] = cfg.seed
    if len(set(seeds.values())) > 1:
        said = ", ".join(f"{m} seed {s}" for m, s in seeds.items())
        raise UserError(
            f"step {i} (soup {name}): its members start from different weights ({said}, "
            "from scratch): a soup averages runs of one start; give them one seed, or "
            "fine-tune them from one run"
        )
    parents = {
        m: str(own.get("from")) for kind, m, own in steps if kind == "finetune" and m in members
    }
    child = next((m for m, p in parents.items() if p in members), None)
    if child or len(set(parents.values())) > 1:  # (it failed after every step before it)
        said = f"{child} is a fine-tune of {parents[child]}" if child else ", ".join(
            f"{m} from {p}" for m, p in parents.items())  # fmt: skip
        raise UserError(
            f"step {i} (soup {name}): its members start from different weights ({said}): a "
            "soup averages runs fine-tuned from one start; ensemble them instead"
        )


def _auto_data_seed(recipe: dict, keys: dict) -> tuple[str, int]:
    """An auto step's data and seed as a train step's: defaults < the step's keys < `--set`;
    a bad seed fails here (make_config), before any step runs."""
    given = train_settings(recipe, {k: v for k, v in keys.items() if k in ("data", "seed")})
    return given["data"], make_config({"seed": given.get("seed", 0)}).seed
