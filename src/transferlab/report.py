"""The comparison table of every run and ensemble under a folder: report.md, results.csv and
a self-contained report.html (see htmlreport)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import sys
from pathlib import Path
from urllib.parse import quote

from . import checkpoint, ensembles, evaluate, htmlreport, leaks, members, outputs
from .config import UserError, one_line

COLUMNS = [
    "model",
    "arch",
    "weights",
    "input",
    "params",
    "train top-1",
    "val top-1",
    "test top-1",
    "test top-5",
    "test macro-F1",
    "test bal. acc",
    "epochs",
    "seconds",
]


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS, with the data each row was trained and scored on when the rows differ in it
    (their numbers are then not one comparison)."""
    mixed = len({r["data"] for r in rows}) > 1
    return [COLUMNS[0], "data", *COLUMNS[1:]] if mixed else COLUMNS


def collect(root: Path, skipped: list[str] | None = None) -> list[dict]:
    """One row per run folder and ensemble folder found under `root` (sorted by path); a run
    whose meta.json cannot be read is left out, said in `skipped`."""
    rows, skipped, now = [], [] if skipped is None else skipped, {}
    for meta_path in _files(root, checkpoint.META):
        if _study_inside(meta_path.parent, root):
            continue
        try:
            meta = checkpoint.read_meta(meta_path.parent)
        except UserError as err:
            skipped.append(str(err))
            continue
        rows.append(_run_row(meta_path.parent, root, meta, now))
    for ens_path in _files(root, ensembles.ENSEMBLE):
        if _study_inside(ens_path.parent, root):
            continue
        try:
            info = ensembles.read(ens_path.parent, resolve=False)
        except UserError as err:  # not an ensemble's record: left out, as a run's
            skipped.append(str(err))
            continue
        try:
            info = ensembles.read(ens_path.parent)
        except UserError:  # a member is gone: its row says stale, and why
            info["gone"] = True
        rows.append(_ensemble_row(ens_path.parent, root, info, now))
    for row in rows:
        row["_classes"] = class_scores(row["_path"], row["_names"])
        row["test macro-F1"] = _pct(row["_classes"].get("macro_f1"))
        row["test bal. acc"] = _pct(row["_classes"].get("balanced_accuracy"))
    return rows


def _files(root: Path, name: str) -> list[Path]:
    """The files called `name` under `root`, sorted, through linked folders too (runs gathered
    with ln -s for a comparison were left out without a word), each real folder once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link loop, or a folder linked twice: once
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort(key=lambda d: (os.path.islink(os.path.join(folder, d)), d))  # a folder before
        found += [Path(folder) / name] if name in files else []  # a link to it: its own name
    return sorted(found)


def _study_inside(path: Path, root: Path) -> bool:
    """A candidate of a `transferlab auto` study (under its candidates/): not a result (its
    test was never scored); the study's best/ is, and so is anything else put in its folder."""
    parts = path.relative_to(root).parts
    return any(part == "candidates" and (root.joinpath(*parts[:i]) / "auto.json").is_file() for i, part in enumerate(parts))  # fmt: skip


def class_scores(path: Path, names: list[str]) -> dict:
    """Macro-F1, balanced accuracy, per-class P/R/F1 and confused pairs from the saved test
    logits (so runs made before these metrics existed get them too); {} without logits."""
    found = checkpoint.load_logits(path, "test")
    if found is None:
        return {}
    logits, targets = found
    return evaluate.metrics(logits, targets) | evaluate.per_class(logits, targets, names)


def per_class_markdown(row: dict) -> list[str]:
    """The per-class table and the most-confused pairs of one row, as markdown lines."""
    scores = row["_classes"]
    lines = [f"## Per class: {md(row['model'])} (test)", "",
             "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| {md(c['name'])} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
        f"{c['support']} |"
        for c in scores["classes"]
    ]
    pairs = ", ".join(
        f"{md(p['true'])} → {md(p['predicted'])} {p['count']} ({p['share_of_true']:.0%} of {md(p['true'])})"
        for p in scores["most_confused"]
    )
    return [*lines, "", f"Most confused (true → predicted): {pairs or 'none'}", ""]


def _top5(scores: dict, record: dict) -> str:
    """A top-5 score, "-" with 5 classes or fewer (runs scored before that rule stored 100%)."""
    few = len(record.get("classes") or ()) in range(1, 6)
    return _pct(None if few else scores.get("top5"))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _changed(meta: dict, now: dict, spec: str | None = None, then: str | None = None) -> list[str]:
    """The mark of a run whose data's files changed since it was scored, as evaluate and
    report.html say (report.md and results.csv did not); none when the data cannot be read.
    `now`: the fingerprints found so far, by data and carving (runs on the same data: once).
    `spec`, `then`: an ensemble's data, split as its first member (`meta`) splits them, and
    the fingerprint it recorded."""
    from . import folds

    then = meta.get("data_fingerprint") if spec is None else then
    key = (spec or meta["data"], spec is not None, folds.carving_on(meta, spec))
    if then and key not in now:
        try:
            now[key] = folds.load_as_run(meta, spec).fingerprint
        except (UserError, OSError):  # gone, or unreadable: nothing to compare with
            now[key] = None
    changed = now.get(key) not in (None, then)
    return ["scored before its data's files changed (the old numbers: evaluate scores it on the files as they are)"] * changed  # fmt: skip


def _ensemble_changed(info: dict, now: dict) -> list[str]:
    """An ensemble's mark when the files it was scored on changed since (only its members'
    rows said so); one built before it kept their fingerprint: when its first member's data,
    the same, changed."""
    from . import data

    with contextlib.suppress(UserError):  # (a member gone: the row says stale already)
        meta = checkpoint.read_meta(Path(info["members"][0]["run"]))
        if "data_fingerprint" in info:
            return _changed(meta, now, data.canonical(info["data"]), info["data_fingerprint"])
        if data.canonical(info["data"]) == data.canonical(meta["data"]):
            return _changed(meta, now)
    return []


def _run_row(path: Path, root: Path, meta: dict, now: dict | None = None) -> dict:
    m, src, prep = meta["metrics"], meta["source"], meta["preprocessing"]
    problem = checkpoint.weights_problem(path, meta)  # its numbers are of weights now gone
    weights = src["weights"]
    if weights == "run":
        weights = f"from {Path(src['parent']).name}"
    elif weights == "soup":
        weights = f"{src['method']} soup of " + ", ".join(Path(r).name for r in src["ingredients"])
    mark = "unusable: its weights are missing or corrupt; train it again" if problem else ""
    if leaked(meta.get("notes", [])) and not mark:  # (meta.json: counted when it trained)
        mark = "not a test score: its test images include ones its weights were trained on"
    marks = [mark] if mark else leaks.score_notes(meta.get("notes", []))
    marks += _changed(meta, {} if now is None else now) if not mark else []
    return {
        "model": _name(path, root) + "".join(f" ({s})" for s in marks),
        "_csv": _csv_fields(_name(path, root), marks, m["val"]["top1"], meta),
        "_stale": bool(mark),
        "data": meta["data"],
        "arch": meta["arch"],
        "weights": weights,
        "input": f"{prep['input_size']}px x{prep['channels']}",
        "params": f"{meta['params'] / 1e6:.2f}M",
        "train top-1": _pct(m.get("train", {}).get("top1")),
        "val top-1": _pct(m["val"]["top1"]) + _val_mark(meta),
        "test top-1": _pct(m["test"]["top1"]),
        "test top-5": _top5(m["test"], meta),
        "epochs": str(meta["epochs_run"]),
        "seconds": f"{meta['seconds']:.0f}",
        "_curves": path / "curves.png",
        "_test": m["test"]["top1"],
        "_path": path,
        "_names": meta["class_names"],
    }


def _ensemble_row(path: Path, root: Path, info: dict, now: dict | None = None) -> dict:
    m = info["metrics"]
    names = ", ".join(_member(Path(x["run"])) for x in info["members"])
    try:
        ensembles.check_members(info, path)
        stale = ""
    except UserError:  # a member was retrained or removed: its numbers no longer hold
        stale = f"stale: a member {'is gone; put it back or' if info.get('gone') else 'changed;'} rebuild it"  # fmt: skip
    if leaked(info.get("notes", [])) and not stale:  # (ensemble.json: counted when it was built)
        stale = "not a test score: its test images include ones a member trained on"
    marks = [stale] if stale else leaks.score_notes(info.get("notes", []))
    marks += _ensemble_changed(info, {} if now is None else now) if not stale else []
    return {
        "model": _name(path, root) + "".join(f" ({s})" for s in marks),
        "_csv": _csv_fields(_name(path, root), marks, m["val"]["top1"], info),
        "_stale": bool(stale),
        "data": info["data"],
        "arch": f"ensemble ({info['method']})",
        "weights": names,
        "input": "per member",
        "params": "-",
        "train top-1": "-",
        "val top-1": _pct(m["val"]["top1"]) + _val_mark(info),
        "test top-1": _pct(m["test"]["top1"]),
        "test top-5": _top5(m["test"], info),
        "epochs": "-",
        "seconds": f"{info['seconds']:.0f}",
        "_curves": None,
        "_test": m["test"]["top1"],
        "_path": path,
        "_names": info["class_names"],
    }


def _member(run: Path) -> str:
    """A member's name in the report: a fold run's with its candidate's (auto's best/ listed
    fold-1, ..., fold-5 of which candidate, it did not say)."""
    return f"{run.parent.name}/{run.name}" if re.fullmatch(r"fold-\d+", run.name) else run.name


def _csv_fields(name: str, marks: list[str], val: float | None, record: dict) -> dict:
    """results.csv's model and val columns without the marks report.md writes beside them, and
    those marks in a notes column (a program keyed rows by "r (test score on 19 of the 20 test
    images)" and read "85.00% (...)" as a number)."""
    val_mark = members.val_used(record)[0]
    notes = marks + [f"val: {val_mark}"] * bool(val_mark)
    return {"model": name, "val top-1": _pct(val), "notes": "; ".join(notes)}


def _val_mark(record: dict) -> str:
    """The mark of a val score that is no held-out score (`members.val_used`), or ""."""
    mark = members.val_used(record)[0]
    return f" ({mark})" if mark else ""


def leaked(notes: list[str]) -> bool:
    """Whether a run's or ensemble's recorded notes say its test images were trained on."""
    return any("not a test score" in n or "not a held-out test score" in n for n in notes)


def _name(path: Path, root: Path) -> str:
    """A run's name in the report: its path under the root, as one line."""
    rel = path.relative_to(root)  # (the root itself, a run: its own name, not ".")
    return one_line(str(rel) if rel.parts else path.resolve().name)


def markdown_table(rows: list[dict]) -> str:
    cols = columns(rows)  # (once: it reads every row)
    return md_table(cols, [[r[c] for c in cols] for r in rows])


# Markdown's inline punctuation escaped, HTML's (and math's $) as entities: a run or class named
# <img onerror=...> or [x](javascript:...) was live in report.md (escaped in report.html), a
# backtick opened code, and a | (or \| once | was escaped) split a table row; _ only at a
# word's edge (_u_ was emphasis; inside a word, as in paths, it is none)
_MD = str.maketrans({c: "\\" + c for c in "\\`*[]|"} | {"&": "&amp;", "<": "&lt;", ">": "&gt;", "$": "&#36;", "~": "&#126;"})  # fmt: skip


def md(text) -> str:
    """Text for report.md, shown as written on one line (the name, not Markdown or HTML)."""
    return re.sub(r"(?<![^\W_])_|_(?![^\W_])", r"\_", one_line(str(text)).translate(_MD))


def md_table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(md, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(md, r)) + " |" for r in rows])


def spreadsheet_safe(value):
    """A CSV cell a spreadsheet will not run as a formula: text starting = + - @ (a tab, a
    return) gets a ' first, as OWASP advises; numbers (-1, +2.5) and the lone - of a cell with
    no value are kept as they are (results.csv held '- for it)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") and value != "-":
        with contextlib.suppress(ValueError):
            return value if float(value) == float(value) else "'" + value  # (nan: text)
        return "'" + value
    return value


def check_writable(root: Path) -> None:
    """Refuse to write over a report.md, results.csv or report.html that transferlab did not."""
    outputs.check_reports_writable(
        root, tuple(outputs.REPORTS), "transferlab report", "report another folder"
    )


def _is_study(folder: Path) -> bool:
    return (outputs.read_mark(folder) or {}).get("kind") == "auto"


def write(root: str | Path, held: bool = False) -> tuple[Path, str]:
    """Write report.md, results.csv and report.html under `root`; returns (path, table).

    A folder another transferlab command holds (a recipe running into it) is refused, as every
    command refuses it; `held`: this process holds it (the recipe's own report step)."""
    root = Path(root)
    mine = held or not (root / outputs.LOCK).exists()
    with contextlib.nullcontext() if mine else outputs.lock(root):
        return _write(root)


def _unfinished(root: Path) -> list[Path]:
    """The run folders under `root` without meta.json yet: marked as runs, or with training
    state (they were left out of the table without a word; one in its first epoch has no
    state yet, only its mark). Not an auto study's candidates: the study decides which it
    finishes (one skipped for its budget stays so), and its best/ is what is reported."""
    found = {p.parent for p in root.rglob("*") if p.name in (outputs.MARK, "state")}  # one walk
    return sorted(
        p
        for p in found
        if not (p / "meta.json").exists() and (outputs.read_mark(p) or {}).get("kind") == "run"
        and not _study_inside(p, root)
    )  # fmt: skip


def _refuse_study(root: Path) -> None:
    """A study's report.md/.html are its leaderboard: never rewritten by this (`root` is a
    study or inside one). The runs a user put in it (not its candidates, nor a best/) are
    reported with the folder that holds the outermost study (hostile passes 45, 48)."""
    studies = [f for f in (root.resolve(), *root.resolve().parents) if _is_study(f)]
    if not studies:
        return
    study, above = studies[0], studies[-1].parent
    bests = [f / "best" for f in [study, *(m.parent for m in study.rglob(outputs.MARK))] if _is_study(f)]  # fmt: skip
    runs = sorted(str(p.parent.relative_to(study)) for name in (checkpoint.META, ensembles.ENSEMBLE) for p in _files(study, name) if not _study_inside(p.parent, study) and not any(b in (p.parent, *p.parent.parents) for b in bests))  # fmt: skip
    choice = f"evaluate its choice with transferlab evaluate {study / 'best'}" if (study / "best").is_dir() else "it has chosen nothing yet (no best/)"  # fmt: skip
    theirs = f"; the runs you put in it ({', '.join(runs)}) are reported with the folder that holds the study: transferlab report {above}" if runs else ""  # fmt: skip
    raise UserError(f"{study} is a transferlab auto study with its own report (report.md, report.html); {choice}{theirs}")  # fmt: skip


def _write(root: Path) -> tuple[Path, str]:
    if not root.is_dir():
        raise UserError(
            f"{root} is a file; report a folder of runs" if root.exists()
            else f"report folder not found: {root}"
        )  # fmt: skip
    found = outputs.enclosing(root)  # not into the insides of a run (its state/, logits/)
    if found:
        raise UserError(f"{root} is inside the {found[1]} folder {found[0]}: report that")
    _refuse_study(root)
    check_writable(root)
    skipped: list[str] = []
    rows = collect(root, skipped)
    skipped[:0] = [f"{s}: a run that has not finished ({checkpoint.unfinished(s)})"
                   for s in _unfinished(root)]  # fmt: skip
    if not rows:
        raise UserError(f"no finished run or ensemble under {root}"
                        + (f"; left out {skipped[0]}" if skipped else ""))  # fmt: skip
    for why in skipped:  # the rest are reported
        print(f"note: left out {why}", file=sys.stderr)
    table = markdown_table(rows)
    best_ens = max(
        (r for r in rows if r["_curves"] is None and not r["_stale"]),
        key=lambda r: r["_test"],
        default=None,
    )
    best_single = best_ens and max(  # on the ensemble's data: others' scores do not compare
        (
            r
            for r in rows
            if r["_curves"] is not None and not r["_stale"] and r["data"] == best_ens["data"]
        ),  # fmt: skip
        key=lambda r: r["_test"],
        default=None,
    )
    parts = [
        f"# transferlab report: {md(root.resolve().name)}",  # (`report .`: its name, not "")
        "",
        "Top-1 on the held-out test split; "
        "val is the data's own or carved from train. Train top-1 is measured on augmented batches during "
        "training.",
        "",
        table,
        "",
        *(f"Left out: {md(why)}\n" for why in skipped),
    ]
    if best_single and best_ens:
        gain = evaluate.points(best_ens["_test"] - best_single["_test"])
        parts += [
            f"Best single model: **{md(best_single['model'])}** {best_single['test top-1']}; "
            f"best ensemble: **{md(best_ens['model'])}** {best_ens['test top-1']} "
            f"({gain} points).",
            "",
        ]
    best = max((r for r in rows if r["_classes"] and not r.get("_stale")), key=lambda r: r["_test"],
               default=None)  # fmt: skip
    if best:
        parts += per_class_markdown(best)
    parts += ["## Curves", ""]
    for r in rows:
        if r["_curves"] is not None and r["_curves"].is_file():
            rel = r["_curves"].relative_to(root)
            name, link = md(r["model"]), quote(rel.as_posix())
            parts += [f"### {name}", "", f"![{name} curves]({link})", ""]
    path = root / "report.md"
    outputs.write_report_file(path, "\n".join(parts))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*columns(rows), "notes"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in (r | r["_csv"]).items()} for r in rows)
    outputs.write_report_file(root / "results.csv", buf.getvalue())
    htmlreport.write_html(root, rows, columns(rows), skipped)
    return path, table
