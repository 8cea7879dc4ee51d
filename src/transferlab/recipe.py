"""Run a YAML experiment: an ordered list of train / finetune / ensemble / soup / report steps.

    data: digits                 # dataset spec for every train step
    defaults: {seed: 0}          # TrainConfig fields for every train/finetune step
    steps:
      - train: resnet50          # run folder name under --out
        model: resnet50
      - finetune: resnet50-ft
        from: resnet50           # a step name or a run folder
      - ensemble: soft
        members: [resnet50, resnet50-ft]
        method: soft
      - report: {}

Precedence: defaults < step keys < `--set` overrides (so `--set epochs=1` shortens every step).
A step whose run folder is already complete is skipped, and an interrupted one resumes:
rerunning a recipe after a crash loses nothing.
"""

from __future__ import annotations

import copy
import difflib
import time
from pathlib import Path

import yaml

from . import checkpoint, ensembles, report, trainer
from .config import TrainConfig, UserError, field_names, make_config

TOP_KEYS = ("name", "description", "data", "out", "defaults", "steps")
STEP_KINDS = ("train", "finetune", "ensemble", "soup", "report")
EXTRA_KEYS = {
    "finetune": ("from",),
    "ensemble": ("members", "method", "tta"),
    "soup": ("members", "method"),
    "report": (),
}


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    return recipe


def apply_overrides(recipe: dict, overrides: dict) -> dict:
    """`--set` pairs: top-level keys (data, out), `steps.N.key`, or TrainConfig fields."""
    recipe = copy.deepcopy(recipe)
    recipe.setdefault("overrides", {})
    for key, value in overrides.items():
        if key in ("data", "out", "name"):
            recipe[key] = value
        elif key.startswith("steps."):
            _, index, field = key.split(".", 2)
            try:
                recipe["steps"][int(index)][field] = value
            except (ValueError, IndexError, KeyError, TypeError):
                raise UserError(f"--set {key}: no step {index} in this recipe") from None
        else:
            recipe["overrides"][key.removeprefix("defaults.")] = value
    return recipe


def validate(recipe: dict) -> None:
    unknown = [k for k in recipe if k not in (*TOP_KEYS, "overrides")]
    if unknown:
        raise UserError(f"unknown recipe key '{unknown[0]}' (known: {', '.join(TOP_KEYS)})")
    if not recipe.get("steps"):
        raise UserError("a recipe needs a non-empty 'steps' list")
    make_config(recipe.get("defaults") or {})
    make_config(recipe.get("overrides") or {})
    for i, step in enumerate(recipe["steps"]):
        kind, name, keys = parse_step(step, i)
        allowed = set(EXTRA_KEYS.get(kind, ())) | (
            {*field_names(TrainConfig)} - {"data"} if kind in ("train", "finetune") else set()
        )
        allowed |= {"data"} if kind in ("train", "finetune", "ensemble", "soup") else set()
        for key in keys:
            if key.replace("-", "_") not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=2)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise UserError(f"unknown key '{key}' in step {i} ({kind} {name}){hint}")


def parse_step(step, index: int) -> tuple[str, str, dict]:
    if isinstance(step, str) and step == "report":
        return "report", "report", {}
    if not isinstance(step, dict):
        raise UserError(f"step {index} must be a mapping like '- train: NAME'")
    kinds = [k for k in step if k in STEP_KINDS]
    if len(kinds) != 1:
        raise UserError(
            f"step {index} needs exactly one of {', '.join(STEP_KINDS)}; "
            f"got keys {', '.join(map(str, step))}"
        )
    kind = kinds[0]
    name = step[kind] if isinstance(step[kind], str) else kind
    return kind, str(name), {k: v for k, v in step.items() if k != kind}


def run(
    path: str | Path,
    out: str | Path | None = None,
    overrides: dict | None = None,
    quiet: bool = False,
) -> Path:
    """Run every step of a recipe into `out`; returns the output folder."""
    recipe = apply_overrides(load(path), overrides or {})
    validate(recipe)
    out = Path(out or recipe.get("out") or Path("runs") / (recipe.get("name") or Path(path).stem))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text(out / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    t0 = time.time()
    for i, step in enumerate(recipe["steps"]):
        kind, name, keys = parse_step(step, i)
        print(f"== step {i + 1}/{len(recipe['steps'])}: {kind} {name}", flush=True)
        STEPS[kind](recipe, name, keys, out, quiet)
    print(f"== recipe finished in {time.time() - t0:.0f}s -> {out}", flush=True)
    return out


def _train(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    settings = {
        "data": recipe.get("data", "digits"),
        **(recipe.get("defaults") or {}),
        **keys,
        **recipe["overrides"],
    }
    _fit(make_config(settings), out / name, quiet)


def _finetune(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    keys = dict(keys)
    parent = keys.pop("from", None)
    if not parent:
        raise UserError(f"finetune step {name} needs 'from: RUN'")
    parent_path = out / parent if (out / parent).exists() else Path(parent)
    settings = {**(recipe.get("defaults") or {}), **keys, **recipe["overrides"]}
    _fit(trainer.finetune_config(parent_path, settings), out / name, quiet)


def _fit(cfg: TrainConfig, run_dir: Path, quiet: bool) -> None:
    if checkpoint.is_run(run_dir):
        print(f"   {run_dir} is complete: skipped (delete it to redo)")
        return
    trainer.fit(cfg, run_dir, resume=run_dir.exists(), quiet=quiet)


def _members(keys: dict, out: Path) -> list[str]:
    return [str(out / m) if (out / m).exists() else str(m) for m in keys.get("members") or []]


def _soup(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    from . import soups

    if (out / name / checkpoint.META).exists():
        print(f"   {name}: already made, skipped")
        return
    meta = soups.make(_members(keys, out), keys.get("method", "greedy"), out / name,
                     keys.get("data"), quiet)  # fmt: skip
    m = meta["metrics"]
    print(f"   {name}: soup of {len(meta['source']['ingredients'])} runs, val {m['val']['top1']:.2%}"
          f", test {m['test']['top1']:.2%}")  # fmt: skip


def _ensemble(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    runs = _members(keys, out)
    info = ensembles.build(
        runs,
        keys.get("method", "soft"),
        out / name,
        keys.get("data"),
        quiet,
        keys.get("tta", "none"),
    )
    print_ensemble(info)


def tta_label(tta: str) -> str:
    return "" if tta == "none" else f" (tta {tta})"


def print_ensemble(info: dict) -> None:
    """Each member's and the ensemble's test numbers, and how much combining helped."""
    print(f"   {'test':<30} {'top-1':>7} {'NLL':>7} {'ECE':>6} {'weight':>7}")
    for m in info["members"]:
        t = m["test"]
        print(
            f"   {Path(m['run']).name:<30} {t['top1']:>7.2%} {t['loss']:>7.4f} "
            f"{t.get('ece', float('nan')):>6.3f} {m['weight']:>7.3f}"
        )
    t = info["metrics"]["test"]
    print(
        f"   {info['method']}{tta_label(info.get('tta', 'none'))} ensemble: test top-1 {t['top1']:.2%}, top-5 {t['top5']:.2%}, "
        f"NLL {t['loss']:.4f}, ECE {t['ece']:.3f} "
        f"({100 * info['gain_over_best_member']:+.2f} points over the best member, "
        f"{100 * info['gain_over_mean_member']:+.2f} over the mean member; oracle "
        f"{info['oracle_top1']:.2%}, disagreement {info['disagreement']:.1%}; "
        f"{info['splits']['combiner']})"
    )


def _report(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    path, table = report.write(out)
    print(table)
    print(f"   report -> {path}")


STEPS = {
    "train": _train,
    "finetune": _finetune,
    "ensemble": _ensemble,
    "soup": _soup,
    "report": _report,
}
