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
      - auto: best-30m           # transferlab auto: the best a time budget buys, by CV
        budget: 30m
      - report: {}

Precedence: defaults < step keys < `--set` overrides (so `--set epochs=1` shortens every step).
A step whose run folder is already complete is skipped, and an interrupted one resumes:
rerunning a recipe after a crash loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import yaml

from . import (
    autochoose,
    checkpoint,
    data,
    ensembles,
    evaluate,
    outputs,
    predict,
    report,
    resume,
    strategies,
    trainer,
)
from .config import Preempted, TrainConfig, UserError, to_dict
from .recipebook import (  # noqa: F401  (the recipe's API: load, validate, ... live there)
    EXTRA_KEYS,
    NAME,
    STEP_KINDS,
    TOP_KEYS,
    _auto_data_seed,
    apply_overrides,
    load,
    parse_step,
    ref_path,
    train_config,
    train_settings,
    validate,
)
from .recipefile import MAX_BYTES, OWN, find  # noqa: F401  (MAX_BYTES, OWN: the recipe's API)
from .stops import AGAIN, RESUME, say_later


def run(
    path: str | Path,
    out: str | Path | None = None,
    overrides: dict | None = None,
    quiet: bool = False,
) -> Path:
    """Run every step of a recipe into `out`; returns the output folder.

    Everything is checked first (keys, values, names, members, the output folder, finished
    steps made with other options); only then does the disk change.
    """
    path = find(path)  # (a name: one transferlab comes with)
    recipe = apply_overrides(load(path), overrides or {})
    validate(recipe)  # (first: an empty --set out= is said as that)
    if out is not None and str((overrides or {}).get("out", out)) != str(out):
        raise UserError(f"--out {out} and --set out={overrides['out']} disagree: give one")
    out = Path(out or recipe.get("out") or Path("runs") / (recipe.get("name") or Path(path).stem))
    recipe["out"] = str(out)  # its recipe.yaml says where it ran (--out over the file's out:)
    out = out.expanduser()  # out: ~/runs/x made a folder named ~ here
    validate(recipe, out)
    recipe.pop("_set", None)  # (validation's alone: recipe.yaml records the steps as they run)
    resolved = out / "recipe.yaml"
    if resolved.exists() and resolved.resolve() == Path(path).resolve():
        raise UserError(
            f"--out {out} would overwrite the recipe being run ({path}); choose another --out"
        )
    outputs.check_out(out, "recipe", resume=True)
    _refuse_another_recipe(recipe, out)
    if any(parse_step(step, i)[0] == "report" for i, step in enumerate(recipe["steps"], 1)):
        report.check_writable(out)
    _check_finished(recipe, out)
    made = [f for f in (out, *out.parents) if not f.exists()]  # deepest first
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    try:
        t0 = _steps(recipe, out, resolved, quiet)
    except UserError:
        _unmake(out, made, before)
        raise
    print(f"== recipe finished in {time.time() - t0:.0f}s -> {out}", flush=True)
    return out


def _unmake(out: Path, made: list[Path], before: set[str]) -> None:
    """A recipe that failed before any step wrote a thing (a report of nothing, a step
    refused as it began) leaves `out` as it was: the mark, lock and recipe.yaml it added
    removed, and the folders it made."""
    new = {p.name for p in out.iterdir()} - before if out.is_dir() else set()
    if not new or not new <= {outputs.MARK, outputs.LOCK, "recipe.yaml"}:
        return
    for name in new:
        (out / name).unlink(missing_ok=True)
    for folder in made:
        with contextlib.suppress(OSError):  # (not empty: something else made it meanwhile)
            folder.rmdir()


def _steps(recipe: dict, out: Path, resolved: Path, quiet: bool) -> float:
    """Claim `out` and run every step; returns the time they began."""
    with outputs.lock(out):
        outputs.claim(out, "recipe", outputs.check_out(out, "recipe", resume=True))
        checkpoint.write_text(resolved, yaml.safe_dump(recipe, sort_keys=False))
        t0 = time.time()
        say_later()  # (every refusal is behind: which recipe file ran, say)
        for i, step in enumerate(recipe["steps"], 1):
            kind, name, keys = parse_step(step, i)
            print(f"== step {i}/{len(recipe['steps'])}: {kind} {name}", flush=True)
            try:
                STEPS[kind](recipe, name, keys, out, quiet)
            except Preempted as err:  # `run` resumes a step by itself (--resume: said anyway)
                raise Preempted(str(err).replace(RESUME, AGAIN)) from None
            except UserError as err:  # nor --budget: an auto step's budget is set in its own way
                if kind != "auto" or autochoose.LARGER not in str(err):
                    raise
                said = str(err).partition(autochoose.LARGER)[0]
                raise UserError(
                    f"{said}give step {i} a larger budget (--set steps.{i - 1}.budget=...) and "
                    "run the recipe again: the study continues, its timings kept"
                ) from None
    return t0


def _train(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    _fit(train_config(recipe, keys), out / name, quiet)


def _finetune(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    _fit(_finetune_config(recipe, keys, out), out / name, quiet, [ref_path(keys["from"], out)])


def _finetune_config(recipe: dict, keys: dict, out: Path) -> TrainConfig:
    keys = dict(keys)
    parent = ref_path(keys.pop("from"), out)
    return strategies.finetune_config(parent, train_settings(recipe, keys, data=False), keys)


def _refuse_another_recipe(recipe: dict, out: Path) -> None:
    """OUT made by a recipe of another name is refused (its recipe.yaml was replaced without a
    word, the report mixed both); runs no step makes now (renamed, removed) are said."""
    try:
        was = yaml.safe_load((out / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    if isinstance(was, dict) and was.get("name") != recipe.get("name"):
        raise UserError(f"{out} holds the steps of recipe {was.get('name')!r} (its recipe.yaml): run "
                        f"recipe {recipe.get('name')!r} into another --out")  # fmt: skip
    names = {parse_step(step, i)[1] for i, step in enumerate(recipe["steps"], 1)}
    if left := sorted(
        d.name for d in out.iterdir() if outputs.read_mark(d) and d.name not in names
    ):
        read = [f"{kind} {name} reads {', '.join(sorted(refs))}" for i, step in enumerate(recipe["steps"], 1) for kind, name, keys in [parse_step(step, i)]
                if (refs := {str(r) for r in [keys.get("from"), *(keys.get("members") or [])]} & set(left))]  # fmt: skip
        print(f"note: {out} also holds {', '.join(left)}, which no step of this recipe makes "
              f"(renamed or removed?): its report lists them too{''.join(f'; {r} from there' for r in read)}", file=sys.stderr)  # fmt: skip


def _check_finished(recipe: dict, out: Path) -> None:
    """Before step 1: each finished train, finetune or soup step is reused only if it was made
    as the recipe asks now, from the runs it names as they are now, none of which will be made
    anew (a changed parent deleted: its fine-tune was kept, made from the old one)."""
    anew: set[str] = set()  # steps that will train (unfinished now)
    for i, step in enumerate(recipe["steps"], 1):
        kind, name, keys = parse_step(step, i)
        if kind == "auto":
            _study_as_asked(recipe, keys, out / name, f"step {i} (auto {name})")
        if kind not in ("train", "finetune", "soup"):
            continue
        if not checkpoint.is_run(out / name):
            anew.add(name)
            continue
        inputs = [keys["from"]] if kind == "finetune" else keys.get("members", [])
        if redone := [str(r) for r in inputs if str(r) in anew]:
            raise UserError(f"{out / name} is finished, but {', '.join(redone)}, which it is made "
                            f"from, will be made anew: delete {out / name} too, or choose another --out")  # fmt: skip
        if kind == "train":
            refuse_changed(out / name, train_config(recipe, keys))
        elif kind == "finetune":
            refuse_changed(
                out / name, _finetune_config(recipe, keys, out), [ref_path(keys["from"], out)]
            )
        else:
            _soup_made_as_asked(out / name, _members(keys, out), keys.get("method", "greedy"))


def _study_as_asked(recipe: dict, keys: dict, study: Path, step: str) -> None:
    """A study begun in `study` continues only on the data and seed it began with (else it was
    refused when its turn came, after the steps before it had run)."""
    from . import auto

    try:
        was = json.loads((study / auto.STATE).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # none begun (or damaged: the study itself says so, in its turn)
    spec, seed = _auto_data_seed(recipe, keys)
    now = {"data": data.canonical(spec), "seed": seed}
    if changed := [f"{k} {was.get(k)} (now {now[k]})" for k in now if was.get(k) != now[k]]:
        raise UserError(f"{step}: {study} was begun with {', '.join(changed)}: give the step "
                        f"what it began with, or delete {study} or choose another --out")  # fmt: skip


def refuse_changed(run_dir: Path, cfg: TrainConfig, parents: tuple | list = ()) -> None:
    """A finished step is reused only if it was made with the options the recipe asks for, and
    a fine-tune from its `parents` holding the weights they hold now."""
    meta = checkpoint.read_meta(run_dir)
    made, was = meta.get("config") or {}, (meta.get("source") or {}).get("parent_sha256")
    if was and cfg.weights and resume.holds_weights(cfg.weights, was):
        made = {**made, "weights": cfg.weights}  # its parent, moved: the same weights elsewhere
    _refuse_stale(run_dir, [was] if was else None, parents)  # (first: a retrained parent's
    if changed := resume.config_changes(made, to_dict(cfg)):  # options were said as the step's)
        raise UserError(
            f"{run_dir} is finished but was made with other options ({changed}); delete it "
            "or choose another --out"
        )


def _refuse_stale(run_dir: Path, was: list | None, runs: list) -> None:
    """`run_dir` was made from `runs` whose weights were `was` (None: not recorded)."""
    now = [checkpoint.read_meta(r).get("weights_sha256") for r in runs if checkpoint.is_run(r)]
    if was is not None and sorted(was) != sorted(now):
        mine = checkpoint.read_meta(run_dir).get("arch")  # a parent replaced by another model: said
        other = sorted({checkpoint.read_meta(r).get("arch") for r in runs if checkpoint.is_run(r)} - {mine})  # fmt: skip
        what = f"other weights now, of {', '.join(map(str, other))} where it is {mine}" if other else "other weights now"  # fmt: skip
        raise UserError(f"{run_dir} is finished but was made from {', '.join(str(r) for r in runs)} as "
                        f"it was before ({what}); delete {run_dir} to make it anew, or choose another --out")  # fmt: skip


def _fit(cfg: TrainConfig, run_dir: Path, quiet: bool, parents: tuple | list = ()) -> None:
    if checkpoint.is_run(run_dir):
        refuse_changed(run_dir, cfg, parents)
        print(f"   {run_dir} is complete: skipped (delete it to redo)")
        return
    with _advice_for_run(run_dir):
        trainer.fit(cfg, run_dir, resume=run_dir.exists(), quiet=quiet)


@contextlib.contextmanager
def _advice_for_run(folder: Path):
    """train's and ensemble's advice names --resume and --overwrite, which `run` does not act on
    (it resumes a step by itself): say what a recipe's user can do."""
    try:
        yield
    except UserError as err:
        if "--overwrite" not in str(err):
            raise
        what = str(err).replace("--overwrite would delete", "rebuilding it would delete")
        raise UserError(
            what.split("; ")[0]
            + f"; delete {folder} to make that step anew, or choose another --out"
        ) from None


def _members(keys: dict, out: Path) -> list[str]:
    return [str(ref_path(m, out)) for m in keys["members"]]


def _soup(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    from . import soups

    members, method = _members(keys, out), keys.get("method", "greedy")
    if (out / name / checkpoint.META).exists():
        _soup_made_as_asked(out / name, members, method)
        print(f"   {name}: already made, skipped")
        return
    meta = soups.make(members, method, out / name, keys.get("data"), quiet)
    m = meta["metrics"]
    print(f"   {name}: soup of {len(meta['source']['ingredients'])} runs, val {m['val']['top1']:.2%}"
          f", test {m['test']['top1']:.2%}")  # fmt: skip


def _soup_made_as_asked(folder: Path, members: list[str], method: str) -> None:
    made = checkpoint.read_meta(folder).get("source") or {}
    asked = {"method": method, "candidates": sorted(str(Path(m).resolve()) for m in members)}
    had = {"method": made.get("method"),
           "candidates": sorted(str(Path(m).resolve()) for m in made.get("candidates", []))}  # fmt: skip
    if asked != had:
        raise UserError(f"{folder} is a soup of other runs or by another method; delete it "
                        "or choose another --out")  # fmt: skip
    _refuse_stale(folder, made.get("candidates_sha256"), members)


def _ensemble(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    runs = _members(keys, out)
    changed = _made_otherwise(out / name, runs, keys)
    if changed == "":  # a rerun skips it, as it skips finished runs
        print(f"   {name}: already made from these members, skipped")
        print_ensemble(ensembles.read(out / name))
        return
    if changed:  # made from its members again, as the step asks now (it was, without a word)
        print(f"   {name}: was made otherwise ({changed}): made again as the step asks now")
    with _advice_for_run(out / name):
        info = ensembles.build(
            runs,
            keys.get("method", "soft"),
            out / name,
            keys.get("data"),
            quiet,
            keys.get("tta", "none"),
            overwrite=True,  # the recipe's own ensemble folder, rebuilt from its members
        )
    print_ensemble(info)


def _made_otherwise(folder: Path, runs: list, keys: dict) -> str | None:
    """How this step's ensemble folder was made otherwise than the step asks now ("" if as
    asked, of members unchanged since; None if there is none to compare)."""
    if not ensembles.is_ensemble(folder):
        return None
    try:
        info = ensembles.read(folder)
        ensembles.check_members(info, folder)  # each member's weights as they were
    except UserError as err:
        return f"{err}"
    spec = data.canonical(keys.get("data") or checkpoint.read_meta(runs[0])["data"])
    had = [str(Path(m["run"]).resolve()) for m in info["members"]]
    made = {"members": had, "method": info["method"], "tta": info.get("tta", "none"),
            "data": info["data"]}  # fmt: skip
    asked = {"members": [str(Path(r).resolve()) for r in runs], "method": keys.get("method", "soft"),
             "tta": keys.get("tta", "none"), "data": spec}  # fmt: skip
    return resume.config_changes(made, asked)


def tta_label(tta: str) -> str:
    return "" if tta == "none" else f" (tta {tta})"


def print_ensemble(info: dict) -> None:
    """Each member's and the ensemble's test numbers, and how much combining helped."""
    print(f"   {'test':<30} {'top-1':>7} {'NLL':>7} {'ECE':>6} {'weight':>7}")
    for m in info["members"]:
        t = m["test"]
        print(
            f"   {(n := Path(m['run']).name) + ' ' * (30 - predict.width(n))} {t['top1']:>7.2%} {t['loss']:>7.4f} "
            f"{t.get('ece', float('nan')):>6.3f} {m['weight']:>7.3f}"
        )
    t = info["metrics"]["test"]
    print(
        f"   {info['method']}{tta_label(info.get('tta', 'none'))} ensemble: test top-1 {t['top1']:.2%}, {evaluate.top5_text(t, 'top-5 {:.2%}, ')}"
        f"NLL {t['loss']:.4f}, ECE {t['ece']:.3f} "
        f"({evaluate.points(info['gain_over_best_member'])} points over the best member, "
        f"{evaluate.points(info['gain_over_mean_member'])} over the mean member; oracle "
        f"{info['oracle_top1']:.2%}, disagreement {info['disagreement']:.1%}; "
        f"{info['splits']['combiner']})"
    )


def _report(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    path, table = report.write(out, held=True)  # the recipe holds OUT's lock
    print(table)
    print(f"   report -> {path}")


def _auto(recipe: dict, name: str, keys: dict, out: Path, quiet: bool) -> None:
    """A study in OUT/NAME (continued if one was begun there); its best is OUT/NAME/best."""
    from . import auto

    data, seed = _auto_data_seed(recipe, keys)
    study = out / name
    if spent := _finished_over(study, keys["budget"]):
        print(f"   {study} is complete: skipped (it spent {auto.clock(spent)}, more than the {keys['budget']} the step gives it now; a larger budget continues it)")  # fmt: skip
        return
    auto.run(data, keys["budget"], study, resume=(study / auto.STATE).is_file(), seed=seed,
             quiet=quiet, cache_dir=keys.get("cache_dir"), log=lambda *a: print(*a, flush=True))  # fmt: skip


def _finished_over(study: Path, budget) -> float | None:
    """A finished study (its best/ made) that spent more than `budget`: a recipe
    run again after `--set steps.N.budget=` raised it skips it, as a finished run (it was
    refused: "has spent ... more than --budget"). Returns the seconds it spent, else None."""
    from . import auto, ensembles

    try:
        spent = float(json.loads((study / auto.STATE).read_text())["spent"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    seconds = auto.parse_budget(budget) if isinstance(budget, str) else float(budget)
    best = study / "best"  # (written after every candidate, before the report)
    done = checkpoint.is_run(best) or ensembles.is_ensemble(best)
    return spent if spent > seconds and done else None


STEPS = {
    "auto": _auto,
    "train": _train,
    "finetune": _finetune,
    "ensemble": _ensemble,
    "soup": _soup,
    "report": _report,
}
