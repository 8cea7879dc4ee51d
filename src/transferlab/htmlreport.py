"""report.html: one self-contained page (figures embedded as PNG, no network, opens from disk).

The comparison table (click a header to sort), then for every ensemble the gain chart (members
vs ensemble), for every run and ensemble its curves, normalised confusion matrix, reliability
diagram with ECE, per-class accuracy and metadata, and a grid of the best model's most
confidently wrong test images.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from . import checkpoint, data, decoding, ensembles, evaluate, outputs, plots
from .config import UserError, one_line
from .folds import load_as_run

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => {
  th.addEventListener('click', () => {
    const body = th.closest('table').tBodies[0];
    const up = th.dataset.dir !== 'asc';
    th.dataset.dir = up ? 'asc' : 'desc';
    const key = r => {
      const t = r.cells[col].innerText.replace('%', '');
      const n = parseFloat(t);
      return isNaN(n) ? t : n;
    };
    [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b);
      return (x > y ? 1 : x < y ? -1 : 0) * (up ? 1 : -1);
    }).forEach(r => body.appendChild(r));
  });
});
"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f3f7; cursor: pointer; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 4px; vertical-align: top; }
section { border-top: 2px solid #dde; margin-top: 18px; }
.meta td { text-align: left; } .note { color: #555; font-size: 13px; }
"""


def _img(png_bytes: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png_bytes).decode()}">'


def _file_img(path: Path, alt: str) -> str:
    return _img(path.read_bytes(), alt) if path and path.is_file() else ""


def _test_logits(path: Path):
    found = checkpoint.load_logits(path, "test")
    return (None, None) if found is None else found


def _figures(path: Path, names: list[str]) -> tuple[str, dict]:
    """Confusion, reliability and per-class figures from the saved test logits."""
    logits, targets = _test_logits(path)
    if logits is None:
        return '<p class="note">no saved test logits</p>', {}
    prob = np.exp(evaluate.log_softmax(logits))
    pred, conf = prob.argmax(1), prob.max(1)
    correct = pred == targets
    ece = evaluate.ece(conf, correct)
    k = len(names)
    matrix = evaluate.confusion(pred, targets, k)
    per_class = np.diag(matrix) / np.maximum(matrix.sum(1), 1)
    parts = [
        _img(plots.png(plots.confusion_figure(matrix, names, "confusion (test, row-normalised)")),
             "confusion matrix"),
        _img(plots.png(plots.reliability_figure(conf, correct, ece)), "reliability diagram"),
        _img(plots.png(plots.per_class_figure(per_class, names)), "per-class accuracy"),
    ]  # fmt: skip
    return "".join(parts), {"ece": ece, "prob": prob, "targets": targets}


def _class_table(scores: dict) -> str:
    """Macro-F1, balanced accuracy, the most-confused pairs, and a folded per-class table."""
    if not scores:
        return ""
    pairs = ", ".join(
        f"{p['true']} → {p['predicted']} {p['count']} ({p['share_of_true']:.0%})"
        for p in scores["most_confused"]
    )
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{c['precision']:.3f}</td>"
        f"<td>{c['recall']:.3f}</td><td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
        for c in scores["classes"]
    )
    return (
        f'<p class="note">test macro-F1 {scores["macro_f1"]:.2%}, balanced accuracy '
        f"{scores['balanced_accuracy']:.2%}; most confused (true → predicted): "
        f"{html.escape(pairs or 'none')}</p><details><summary>per-class precision, recall, F1"
        '</summary><table class="meta"><tr><th>class</th><th>precision</th><th>recall</th>'
        f"<th>F1</th><th>support</th></tr>{rows}</table></details>"
    )


def _meta_table(items: list[tuple[str, str]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items
    )
    return f'<table class="meta">{rows}</table>'


def _run_meta(meta: dict) -> list[tuple[str, str]]:
    src, cfg = meta["source"], meta.get("config", {})
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items() if v)
    items = [
        ("data", meta["data"]),
        ("architecture", meta["arch"]),
        ("weights", src.get("weights")),
        ("weights file", src.get("path", "")),
        ("strategy", meta.get("strategy", "")),
        ("seed", meta.get("seed")),
        ("input", f"{meta['preprocessing']['input_size']}px x{meta['preprocessing']['channels']}"),
        ("probe L2 strength", (meta.get("probe") or {}).get("l2"))
        if meta.get("strategy") == "linear-probe"  # its history rows are strengths, not epochs
        else ("epochs run / best", f"{meta.get('epochs_run')} / {meta.get('best_epoch')}"),
        ("lr, batch", f"{cfg.get('lr')}, {cfg.get('batch_size')}"),
        ("wall time", f"{meta['seconds']:.0f} s"),
        ("versions", versions),
    ]
    if meta.get("strategy") != "soup":
        return items
    names = ", ".join(Path(r).name for r in src["ingredients"])
    soup = {  # its ingredients' seeds and LRs (it had the first one's), no epochs of its own
        "strategy": ("strategy", f"{src['method']} soup of {names}"),
        "seed": ("seeds of its ingredients", ", ".join(map(str, src.get("seeds") or "-"))),
        "epochs run / best": None,
        "lr, batch": ("lrs of its ingredients", ", ".join(map(str, src.get("lrs") or "-"))),
    }
    return [soup.get(k, (k, v)) for k, v in items if soup.get(k, True)]


def _ensemble_meta(info: dict) -> list[tuple[str, str]]:
    return [
        ("data", info["data"]),
        ("method", info["method"] + ("" if info.get("tta", "none") == "none" else f", tta {info['tta']}")),
        ("members", ", ".join(Path(m["run"]).name for m in info["members"])),
        ("weights", ", ".join(f"{m['weight']:.3f}" for m in info["members"])),
        ("splits", "; ".join(f"{k}: {v}" for k, v in info.get("splits", {}).items())),
        ("gain over best / mean member", _points(info, "gain_over_best_member") + " / "
         + _points(info, "gain_over_mean_member")),
        ("oracle top-1, disagreement", _points(info, "oracle_top1", "%") + ", "
         + _points(info, "disagreement", "%")),
        ("wall time", f"{info['seconds']:.0f} s"),
    ]  # fmt: skip


def _points(info: dict, key: str, unit: str = " points") -> str:
    """A share as points (+x.xx) or a percentage; '-' for folders written before it existed."""
    if key not in info:
        return "-"
    return f"{100 * info[key]:.2f}%" if unit == "%" else evaluate.points(info[key]) + unit


def _gain_chart(info: dict, name: str) -> str:
    labels = [Path(m["run"]).name for m in info["members"]] + [name]
    values = [m["test"]["top1"] for m in info["members"]] + [info["metrics"]["test"]["top1"]]
    flags = [False] * len(info["members"]) + [True]
    fig = plots.gain_figure(labels, values, flags, f"{name}: members vs ensemble (test)")
    return _img(plots.png(fig), f"{name} gain chart")


def _wrong_grid(spec: str, meta: dict, prob: np.ndarray, targets: np.ndarray, names, who: str,
                run: Path | None = None) -> str:  # fmt: skip
    """The most confidently wrong test images of the best model (`who`), if the data can still
    be read as it was scored (it said "no wrong test images" of a model it did not name, and
    of a test split that had changed)."""
    try:
        ds = load_as_run(meta, spec)
    except (UserError, OSError) as err:  # the data may be gone: the page still renders
        return f'<p class="note">most confidently wrong images: data not readable ({html.escape(str(err))})</p>'
    pred, conf = prob.argmax(1), prob.max(1)
    wrong = np.flatnonzero(pred != targets)
    if len(ds.splits["test"]) != len(targets) or ds.fingerprint != meta.get("data_fingerprint", ds.fingerprint):  # fmt: skip
        return f'<p class="note">{html.escape(who)}: not shown, the files of its data changed since it was scored (its test split now holds {len(ds.splits["test"])} images; it was scored on {len(targets)})</p>'
    if len(wrong) == 0:
        return f'<p class="note">{html.escape(who)}, the best model on test, got every test image right</p>'
    pick = wrong[np.argsort(-conf[wrong])][:12]
    images = decoding.decode(ds.splits["test"].subset(pick), 96, 3, quiet=True)
    captions = [
        f"true {names[targets[i]][:16]}\npred {names[pred[i]][:16]} ({conf[i]:.2f})" for i in pick
    ]
    title = f"{who}: most confident mistakes"
    grid = _img(plots.png(plots.wrong_grid_figure(images, captions, title)), "confidently wrong")
    return grid + (_gradcam_grid(run, ds.splits["test"].subset(pick), captions) if run else "")


def _gradcam_grid(run: Path, split: data.Split, captions: list[str]) -> str:
    """Grad-CAM of the predicted (wrong) class on those images: where the run looked."""
    from . import explain, models

    try:
        meta = checkpoint.read_meta(run)
        prep = models.Preprocessing.from_dict(meta["preprocessing"])
        images = decoding.decode(split, prep.input_size, prep.channels, prep.interpolation,
                                 quiet=True)  # fmt: skip
        model = evaluate.load_run_model(run, meta)
        maps, _ = explain.cams(model, prep, images)
    except UserError as err:  # grad-cam not installed, no convolution: the page still renders
        return f'<p class="note">Grad-CAM: {html.escape(str(err))}</p>'
    figure = plots.wrong_grid_figure(explain.overlay(images, maps), captions,
                                     f"Grad-CAM of {run.name}: where it looked for its wrong answer")  # fmt: skip
    blank = f'<p class="note">Grad-CAM: {html.escape(why)}</p>' if (why := explain.blank(model, prep)) else ""  # fmt: skip
    return blank + _img(plots.png(figure), "Grad-CAM of the confidently wrong images")


def write_html(root: Path, rows: list[dict], columns: list[str], left_out: list[str] = ()) -> Path:  # fmt: skip
    """report.html: the table, then each run's section; `left_out`: the runs report.md says it
    left out (unfinished, unreadable), said under the table too (pass 56: not a word of them)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*columns, "test NLL", "test ECE"])
    body, sections, best = [], [], None
    for r in rows:
        path = r["_path"]
        is_ens = r["_curves"] is None
        info = _ensemble_info(path) if is_ens else json.loads((path / "meta.json").read_text())
        names = info["class_names"]
        figures, extra = _figures(path, names)
        test = info["metrics"]["test"]
        cells = [r[c] for c in columns] + [
            f"{test['loss']:.4f}",
            f"{extra.get('ece', float('nan')):.3f}",
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        parts = [f"<section><h2>{html.escape(r['model'])}</h2>"]
        if is_ens:
            parts += [_gain_chart(info, r["_csv"]["model"]), _meta_table(_ensemble_meta(info))]  # fmt: skip
        else:
            parts += [_file_img(r["_curves"], "training curves"), _meta_table(_run_meta(info))]
        parts += [figures, _class_table(r.get("_classes") or {}), "</section>"]
        sections.append("".join(parts))
        if extra and not r.get("_stale") and (best is None or r["_test"] > best[0]):
            run = Path(info["members"][0]["run"]) if is_ens else path
            best = (
                r["_test"],
                one_line(str(path.relative_to(root)) or path.name),
                info,
                extra,
                run,
            )  # (not its notes)
    wrong = ""
    if best:
        _, name, info, extra, run = best
        ref = info if "data" in info and "preprocessing" in info else _first_member_meta(info)
        wrong = "<section><h2>Most confidently wrong test images</h2>" + _wrong_grid(
            info["data"], ref, extra["prob"], extra["targets"], info["class_names"], name, run,
        ) + "</section>"  # fmt: skip
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>transferlab report: {html.escape(root.resolve().name)}</title>
<style>{CSS}</style></head><body>
<h1>transferlab report: {html.escape(root.resolve().name)}</h1>
<p class="note">Top-1 on the held-out test split; val is the data's own or carved from train; train top-1 is measured
on augmented batches during training. Click a column header to sort.</p>
<table class="sortable" id="comparison"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
{"".join(f'<p class="note">Left out: {html.escape(one_line(why))}</p>' for why in left_out)}
{wrong}
{"".join(sections)}
<script>{SORT_JS}</script>
</body></html>
"""
    out = root / "report.html"
    outputs.write_report_file(out, page)
    return out


def _ensemble_info(path: Path) -> dict:
    """ensemble.json with its members found; as recorded when one is gone (its row: stale)."""
    try:
        return ensembles.read(path)
    except UserError:
        return ensembles.read(path, resolve=False)


def _first_member_meta(info: dict) -> dict:
    return checkpoint.read_meta(info["members"][0]["run"])
