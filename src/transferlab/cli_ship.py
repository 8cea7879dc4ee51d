"""The commands that bring data and weights in, search, and ship models out: `data`, `models`,
`auto`, `export`, `serve`, `explain` (their parsers and handlers; `cli.build_parser` adds them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import UserError, one_line

EXAMPLES = {
    "auto": "transferlab auto --data folder:photos --budget 30m --out runs/auto\n"
    "  transferlab predict runs/auto/best photo.jpg",
    "explain": "transferlab explain runs/lite0 photo.jpg holiday/   # -> runs/lite0/explain/*.png",
    "serve": "transferlab serve runs/ens --port 8000\n"
    "  curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'",
    "models": "transferlab models --offline   # the weights this machine has\n"
    "  transferlab models 'convnext*'   # timm's (their weights download when first used)",
    "data": "transferlab data get cifar10 --to ~/data   # prints the spec: folder:~/data/cifar10\n"
    "  transferlab data shard folder:photos --out photos-wds   # then --data wds:photos-wds\n"
    "  transferlab data list",
    "export": "transferlab export runs/lite0 --format onnx    # -> runs/lite0/export/model.onnx",
}


def commands(sub, _sub, Parser) -> None:
    """Add auto, data, models, export, serve and explain to the subcommands `sub`."""
    p = _sub(sub, "auto", "the best classifier a time budget buys: candidates timed, run while "
             "time is left, chosen by cross-validation, test scored once")  # fmt: skip
    p.add_argument("--data", help="dataset spec (as for train: folder:PATH, ...); required, but with --resume [the study's]")  # fmt: skip
    p.add_argument("--budget", help="wall time for everything: 30m, 90s, 1h30m; required, but with --resume [the study's]")  # fmt: skip
    p.add_argument("--out", required=True, help="a new folder (or, with --resume, the study's)")
    p.add_argument("--resume", action="store_true", help="continue a study that was stopped")
    p.add_argument("--seed", type=int, help="members' seed (folds never change) [0; with --resume, the study's]")  # fmt: skip
    p.add_argument("--cache-dir", help="decoded-image and feature cache [$TRANSFERLAB_CACHE]")

    p = _sub(sub, "explain", "Grad-CAM: where in each image a run looked for its prediction")
    p.add_argument("path", help="a run folder")
    p.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument(
        "--out", help="a new or empty folder for the overlays [RUN/explain, where they gather]"
    )
    p.add_argument("--class", dest="target",
                   help="explain this class: its name or index [the predicted one]")  # fmt: skip

    p = _sub(sub, "serve", "an HTTP API for a run or ensemble: POST /predict, GET /health, /info")
    p.add_argument("path", help="a run folder or an ensemble folder")
    p.add_argument("--host", default="127.0.0.1", help="interface [127.0.0.1: this machine only]")
    p.add_argument("--port", type=int, default=8000, help="[8000]")
    p.add_argument(
        "--top-k", type=int, default=5, help="classes per image unless ?top_k= (all, if fewer) [5]"
    )
    p.add_argument("--max-batch", type=int, default=32, help="images per model call [32]")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first image waits for others to batch with [5]")  # fmt: skip
    p.add_argument(
        "--max-mb",
        type=float,
        default=20.0,
        help="largest image accepted [20 MB]; a form of several is read up to 16 times that, a body no further than its limit",
    )
    p = _sub(sub, "models", "pretrained weights usable here (timm names, input size, source)")
    p.add_argument("pattern", nargs="?", default="*", help="a glob such as 'resnet50*' [*]")
    p.add_argument(
        "--offline", action="store_true", help="only what needs no network (packages, cache)"
    )

    _data_commands(
        _sub(sub, "data", "download a standard dataset (verified, resumable) or shard one"), Parser
    )

    p = _sub(sub, "export", "a run as ONNX, TorchScript, safetensors or a Hugging Face/timm "
             "folder; an ensemble as one ONNX graph")  # fmt: skip
    p.add_argument("path", help="a run folder or an ensemble folder")
    p.add_argument(
        "--format",
        required=True,
        choices=("onnx", "torchscript", "safetensors", "hf"),
        help="hf: config.json + model.safetensors that timm.create_model('local-dir:DIR', "
        "pretrained=True) loads; an ensemble: onnx only (uint8 NHWC RGB in, probabilities out)",
    )
    p.add_argument("--out", help="file (hf: folder) to write [RUN/export/model.onnx|.pt|"
                   ".safetensors, RUN/export/hf, ENS/export/ensemble.onnx]")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export (--out, or the default file)")  # fmt: skip
    p.add_argument(
        "--input-size", type=int, help="an ensemble graph's input size [its largest member's]"
    )


def _data_commands(p, Parser) -> None:
    """data list, get and shard."""
    what = p.add_subparsers(
        dest="action", required=True, parser_class=Parser, metavar="{list,get,shard}"
    )
    raw = argparse.RawDescriptionHelpFormatter
    what.add_parser("list", help="the datasets `get` knows", formatter_class=raw,
                    epilog="example:\n  transferlab data list")  # fmt: skip
    get = what.add_parser(
        "get",
        help="download, check and lay out one of them",
        formatter_class=raw,
        epilog="example:\n  transferlab data get cifar10 --to ~/data\n"
        "  transferlab train --data folder:~/data/cifar10 --out runs/c10   # the --data it printed",
        description="Download the official archive(s) into DIR/downloads (an interrupted download "
        "continues when run again), check the MD5, extract, and print the --data spec that reads "
        "the set: folder:DIR/cifar10, csv:DIR/pets.csv, tiny-imagenet:DIR/tiny-imagenet-200, ...",
    )
    get.add_argument("name", help="a name from `transferlab data list`")
    get.add_argument("--to", required=True, help="a new or empty folder (or one `get` began)")
    get.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                     help="no progress bars")  # fmt: skip
    shard = what.add_parser(
        "shard",
        help="write a dataset as WebDataset tar shards, for sets bigger than the decode cache",
        formatter_class=raw,
        epilog="example:\n  transferlab data shard folder:photos --out photos-wds\n"
        "  transferlab train --data wds:photos-wds --out runs/photos",
        description="Check every image, then write the splits as tar shards (webdataset's layout: "
        "KEY.EXT, each image file as it is, its extension kept: jpg, png, ..., + KEY.cls; shuffled so each shard holds every class) and shards.json. Train on "
        "them with --data wds:DIR: images are read and decoded per batch, never cached.",
    )
    shard.add_argument("spec", help="a --data spec: folder:PATH, csv:FILE, tiny-imagenet:PATH, ...")
    shard.add_argument("--out", required=True, help="a new folder (or, with --overwrite, shards')")
    shard.add_argument("--shard-size", type=int, default=1000, help="images per shard [1000]")
    shard.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of train carved as val when the source has none [0.1]")  # fmt: skip
    shard.add_argument("--overwrite", action="store_true", help="replace a shard folder")
    shard.add_argument("--skip-bad-images", action="store_true", help="leave unreadable ones out")
    shard.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars")  # fmt: skip


def cmd_auto(args) -> None:
    from . import auto

    if args.resume:  # the study's own --data, --budget and --seed where none is given (pass 55)
        auto.check_out(Path(args.out), resume=True)  # ("holds no transferlab auto study")
        was = _recorded(Path(args.out) / auto.STATE)
        args.data, args.budget = args.data or was.get("data"), args.budget or was.get("budget")
        args.seed = was.get("seed", 0) if args.seed is None else args.seed
    if missing := [f"--{k}" for k in ("data", "budget") if getattr(args, k) is None]:
        raise UserError(f"auto needs {' and '.join(missing)} (a study to resume has them: --resume --out STUDY)")  # fmt: skip
    if (args.seed or 0) < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    auto.run(args.data, args.budget, args.out, args.resume, args.seed or 0, args.quiet, args.cache_dir,
             log=lambda *a: print(*a, flush=True), started=args.started)  # fmt: skip


def _recorded(state: Path) -> dict:
    """A study's settings as its auto.json holds them ({} where it cannot say: auto says why)."""
    import json

    try:
        return dict(json.loads(state.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def cmd_models(args) -> None:
    from . import catalog

    rows = catalog.available(args.pattern, args.offline)
    word = args.pattern.strip("*")  # 'lite*' matched nothing: timm's names begin tf_...
    if not rows and word and not set("*?[") & set(word):  # the names holding the word
        rows = catalog.available(f"*{word}*", args.offline)
        if rows:
            starts = f" ('{word}*' lists the names that start with it)" * (args.pattern != f"{word}*")  # fmt: skip
            print(f"note: no name matches '{args.pattern}'; these contain '{word}'{starts}", file=sys.stderr)  # fmt: skip
    if not rows:
        own = (
            " (dcnn is transferlab's own CNN: it trains from scratch)"
            if "dcnn" in args.pattern
            else ""
        )
        raise UserError(
            f"no pretrained weights match '{args.pattern}'"
            + (" offline" if args.offline else "")
            + own
        )
    print(f"{'name':<48} {'input':>5} {'top-1':>6}  from")
    for r in rows:
        size, top1 = r["input_size"] or "-", f"{r['top1']:.2f}" if r["top1"] else "-"
        print(f"{r['name']:<48} {size:>5} {top1:>6}  {r['from']}")
    if any(r["from"] == "hub" for r in rows):
        print("note: hub weights download on first use (a network is needed; --offline lists "
              "what is here)", file=sys.stderr)  # fmt: skip
    print(
        f"{len(rows)} model(s); use one with --model NAME (its weights and preprocessing). "
        "top-1: ImageNet-1k val at that input size, as timm's results table records it"
    )


def cmd_data(args) -> None:
    from . import download

    if args.action == "list":
        for name, standard in download.STANDARD.items():
            print(f"{name:<14} {standard.about}")
        return
    if args.action == "shard":
        from . import shards

        if not 0 < args.val_fraction < 1:
            raise UserError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
        index = shards.write(args.spec, args.out, args.shard_size, args.val_fraction,
                             args.overwrite, args.skip_bad_images, args.quiet)  # fmt: skip
        for note in index["notes"]:  # (notes print with --quiet too, as train's; pass 49)
            print(f"note: {note}", file=sys.stderr)
        if index["skipped"]:
            print(f"note: left out {len(index['skipped'])} unreadable image(s): {'; '.join(index['skipped'])}", file=sys.stderr)  # fmt: skip
        counts = ", ".join(
            f"{k} {v['n']} in {len(v['shards'])}" for k, v in index["splits"].items()
        )
        print(f"shards of {index['source']} in {args.out} ({counts}); "
              f"train on them with: --data wds:{args.out}")  # fmt: skip
        return
    spec = download.get(args.name, args.to, args.quiet)
    print(f"{args.name} ready in {args.to}; train on it with: --data {spec}")


def cmd_export(args) -> None:
    from . import checkpoint, ensembles, shipping

    result = shipping.export_any(args.path, args.format, args.out, args.overwrite, args.input_size)
    check = result["check"]
    if ensembles.is_ensemble(args.path):
        print(
            f"checked on {check['images']}: max |probability difference| vs transferlab's "
            f"ensemble {check['max_abs_prob_diff']:.2e}"
            + ("" if check["resize_matches"] else " (members at other sizes or in grayscale "
               "convert inside the graph, not with PIL from the original image; vs the same "
               f"graph in PyTorch: {check['max_abs_graph_diff']:.2e})")
        )  # fmt: skip
        below = bool(args.input_size) and args.input_size < check["largest_member"]
        if below or check["top1_agrees"] < check["n"]:  # the graph is not the ensemble here
            said = f"the graph's top-1 agrees with the ensemble's on {check['top1_agrees']} of {check['n']} images"  # fmt: skip
            if below:
                said += (f"; its input, {args.input_size} px, is below the largest member's "
                         f"{check['largest_member']} px: leave --input-size out for the "
                         "ensemble's own predictions")  # fmt: skip
            print(f"note: {said}", file=sys.stderr)
        runs = [m["run"] for m in ensembles.read(args.path)["members"]]
        _fp32_note([checkpoint.read_meta(r) for r in runs], "the ensemble's")
        print(f"onnx -> {result['path']}")
        return
    if check:
        print(
            f"checked on {check['images']}: max |logit difference| vs PyTorch fp32 "
            f"{check['max_abs_logit_diff']:.2e}"
        )
    _fp32_note([checkpoint.read_meta(args.path)], "the run's", args.format in ("safetensors", "hf"))
    print(f"{args.format} -> {result['path']}")


def _fp32_note(metas: list[dict], whose: str, weights: bool = False) -> None:
    """Exported files compute in fp32 (`weights`: hold fp32 weights, which compute nothing;
    pass 47): say so where the runs score in another precision here."""
    from . import evaluate

    scored = {evaluate.inference_precision(m.get("precision", "fp32")) for m in metas} - {"fp32"}
    if scored:
        print(
            f"note: the file {'holds fp32 weights' if weights else 'computes in fp32'}; {whose} scores, evaluate, predict and serve here "
            f"run {'/'.join(sorted(scored))}, so a few images' top-1 may differ (--precision fp32 "
            "when training gives identical numbers)",
            file=sys.stderr,
        )


def cmd_serve(args) -> None:
    from . import serve

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port is 1..65535, got {args.port}")
    for flag, value in (("--top-k", args.top_k), ("--max-batch", args.max_batch),
                        ("--max-mb", args.max_mb)):  # fmt: skip
        if not value > 0:  # nan too
            raise UserError(f"{flag} must be positive, got {value:g}")
    if not args.max_mb <= 10_000:  # inf: a traceback; 1e300: no limit at all, unsaid
        raise UserError(f"--max-mb is at most 10000 (MB per image), got {args.max_mb:g}")
    if not 0 <= args.max_wait_ms <= 10_000:
        raise UserError(f"--max-wait-ms is 0..10000 (milliseconds), got {args.max_wait_ms:g}")
    serve.serve(args.path, args.host, args.port, max_batch=args.max_batch,
                max_wait_ms=args.max_wait_ms, max_mb=args.max_mb, top_k=args.top_k)  # fmt: skip


def cmd_explain(args) -> None:
    from . import ensembles, explain

    if ensembles.is_ensemble(args.path):
        raise UserError("explain one run (an ensemble's members each looked somewhere else)")
    rows = explain.explain(args.path, args.inputs, args.out, args.target, args.quiet)
    for r in rows:
        print(one_line(f"{r['file']}: {r['predicted']} ({r['prob']:.2f}); Grad-CAM of {r['explained']} -> {r['overlay']}"))  # fmt: skip


COMMANDS = {"auto": cmd_auto, "models": cmd_models, "data": cmd_data, "export": cmd_export, "serve": cmd_serve,
            "explain": cmd_explain}  # fmt: skip
