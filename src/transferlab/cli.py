"""Command line: argparse subcommands that only parse and call the library."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import sys
import warnings
from pathlib import Path

from . import __version__, bars, cli_ship
from .config import (
    EveryRank,
    Preempted,
    Terminated,
    TrainConfig,
    UserError,
    field_help,
    field_names,
    make_config,
    one_line,
    parse_set,
    sigterm_stops,
)
from .stops import LATER, alike, going_on, other_rank, peer_stopped, said_by_rank_0, say_later

EXAMPLES = {
    "demo": "transferlab demo                       # ~10 min on 2 CPU cores, no download",
    "run": "transferlab run tiny-imagenet --set data=tiny-imagenet:~/tiny-imagenet-200   # one it comes with\n"
    "  transferlab run tiny-imagenet --limit 400 --set epochs=1 --set data=tiny-imagenet:~/tiny-imagenet-200   # smoke test\n"
    "  transferlab run my-recipe.yaml --out runs/mine",
    "train": "transferlab train --data digits --model resnet50 --input-size 32 --epochs 10 "
    "--out runs/r50\n  transferlab train --data folder:~/photos --model tf_efficientnet_lite0 "
    "--weights imagenet --out runs/lite0",
    "finetune": "transferlab finetune --from runs/r50 --epochs 5 --out runs/r50-ft\n"
    "  transferlab finetune --from runs/r50 --data folder:~/new --freeze backbone "
    "--out runs/r50-new",
    "lr-find": "transferlab lr-find --data digits --model resnet18 --input-size 32 --out runs/lrf\n"
    "  transferlab train ... --lr auto   # the same test first, then trains at its suggestion\n"
    "  (where the loss had no minimum, a guess: there it trains at train's default, 1e-3, and says so)",
    "evaluate": "transferlab evaluate runs/r50 --split test --json",
    "ensemble": "transferlab ensemble runs/r50 runs/dcnn runs/lite0 --method weighted --out runs/ens",
    "predict": "transferlab predict runs/lite0 photo.jpg holiday/ --top-k 3\n"
    "  transferlab predict runs/ens holiday/ --json > predictions.json",
    "soup": "transferlab soup runs/ft-lr1e-3 runs/ft-lr3e-4 runs/ft-lr1e-4 --method greedy "
    "--out runs/soup",
    "report": "transferlab report runs/demo",
}


QUIET = "no progress bars or progress lines (a train or finetune that succeeds says nothing: its scores are in OUT/meta.json; notes, on images left out and on what a run does that you may not want, still print, to stderr)"  # fmt: skip


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "--budget -5m" gives its value to be checked (argparse took it for an option and said
        # "expected one argument"); no option here begins with "-" and a digit
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """A subcommand says its own name for arguments it does not know (`transferlab soup:
        error: unrecognized arguments: --overwrite`, not `transferlab:`)."""
        namespace, extra = super().parse_known_args(args, namespace)
        if extra and " " in self.prog:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra


def _sub(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"example:\n  {(EXAMPLES | cli_ship.EXAMPLES)[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # also after the subcommand (`transferlab train ... --quiet`); SUPPRESS keeps a --quiet
    # given before it
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET)
    return p


def _config_options(
    p: argparse.ArgumentParser, skip: tuple[str, ...] = (), parent: bool = False
) -> None:
    """One option per TrainConfig field, its help taken from the field's comment (`parent`: a
    fine-tune's, whose defaults are the --from run's settings, its lr a tenth of that run's)."""
    helps = field_help()
    defaults = TrainConfig()
    title = "the --from run's, unless given" if parent else "defaults in brackets"
    group = p.add_argument_group(f"training options ({title})")
    for name in field_names(TrainConfig):
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = (
            ("the --from run's / 10" if name == "lr" else "the --from run's") if parent else default
        )
        text = f"{helps.get(name, '')} [{shown}]".replace("%", "%%")  # argparse formats it
        if isinstance(default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        else:
            group.add_argument(flag, default=argparse.SUPPRESS, metavar=name.upper(), help=text)


# Training options the LR range test does not use (it sweeps the LR over a fixed number of
# steps): not offered, so argparse refuses them instead of ignoring them.
LR_FIND_SKIPS = ("lr", "epochs", "patience", "schedule", "warmup_epochs", "snapshots",
                 "keep_last", "checkpoint_every", "probe_l2", "eval_batch_size",
                 "feature_engine")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="transferlab", epilog="Start with `transferlab demo`; every command has --help with an example.",  # fmt: skip
                    description="Train, fine-tune, evaluate and ensemble image classifiers; write the report.")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help=QUIET)
    parser.add_argument("--version", action="version", version=f"transferlab {__version__}")  # (66)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _training_commands(sub)
    _result_commands(sub)
    cli_ship.commands(sub, _sub, Parser)
    return parser


def _run_folder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--log-json", metavar="PATH", help="append one JSON object per step/epoch")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (with the options it was started with)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def _training_commands(sub) -> None:
    """demo, run, train, finetune, lr-find: the commands that train."""
    p = _sub(sub, "demo", "the seed experiment on the bundled digits data (no download)")
    p.add_argument("--out", default="runs/demo", help="output folder [runs/demo]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as run's --set (epochs=1: quicker)")  # fmt: skip

    p = _sub(
        sub, "run", "run a YAML recipe (train, finetune, ensemble, soup, auto and report steps)"
    )
    p.add_argument("recipe", help="path to a recipe .yaml, or the name of one transferlab comes with: " + ", ".join(sorted(r.stem for r in (Path(__file__).parent / "recipes").glob("*.yaml"))))  # fmt: skip
    p.add_argument("--out", help="output folder [runs/<recipe name>]")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value: a training option (every step), defaults.KEY= (steps "
        "that set KEY keep theirs), data=, or steps.N.key= (N counts from 0; members=a,b)",
    )
    p.add_argument("--limit", help="at most N images per split (smoke test)")
    p.add_argument("--resume", action="store_true", help="what running it again does anyway: finished steps are kept, a stopped one continues")  # fmt: skip

    p = _sub(sub, "train", "train one model into a run folder")
    _run_folder_options(p)
    _config_options(p)

    p = _sub(sub, "finetune", "continue training from a run's weights (new data: new head)")
    p.add_argument("--from", dest="source", metavar="RUN", help="the run to start from (required, but with --out R --resume: the one R started from)")  # fmt: skip
    _run_folder_options(p)
    _config_options(p, skip=("model", "weights"), parent=True)

    p = _sub(sub, "lr-find", "LR range test: plot loss against LR, print a suggested --lr")
    p.add_argument("--out", required=True, help="folder for lr_find.png and lr_find.json")
    _config_options(p, skip=LR_FIND_SKIPS)


def _result_commands(sub) -> None:
    """evaluate, ensemble, export, predict, soup, report: the commands that use trained runs."""
    p = _sub(sub, "evaluate", "score a run or ensemble from its saved files")
    p.add_argument("path", help="a run folder or an ensemble folder")
    p.add_argument("--data", help="dataset spec [the one it was trained on]")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="the split scored (val is carved from train, as when it was trained) [test]")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="print the metrics as one JSON object, alone on stdout (the summary on stderr)")  # fmt: skip
    p.add_argument("--tta", help=TTA_HELP + " [none; an ensemble: its own]")

    p = _sub(sub, "ensemble", "combine runs (any architecture, input size, channels)")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument(
        "--method",
        default="soft",
        help="soft (mean probability) | hard (majority vote) | logit (mean log-prob) | "
        "weighted (NLL-optimal weights on val) | select (greedy selection on val) | "
        "stacking (logistic regression on member log-probs, CV on val) | fusion (one linear "
        "head on the members' concatenated features, fitted on train, chosen on val) [soft]",
    )
    p.add_argument("--out", required=True, help="ensemble folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ensemble in --out")
    p.add_argument("--data", help="dataset spec [the members' own]")
    p.add_argument("--tta", default="none", help=TTA_HELP + " [none]")

    p = _sub(sub, "predict", "top-k class names for image files and folders")
    p.add_argument("path", help="a run folder or an ensemble folder")
    p.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image [5]")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    fmt.add_argument("--csv", action="store_true", help="CSV rows: path,rank,class,name,prob")
    p.add_argument("--tta", help=TTA_HELP + " [none; an ensemble: its own]")

    p = _sub(sub, "soup", "average the weights of runs fine-tuned from the same start")
    p.add_argument("runs", nargs="+", help="run folders (one architecture, one initial state)")
    p.add_argument("--method", default="greedy", choices=("uniform", "greedy"),
                   help="uniform: average all; greedy: add runs best-val-first while val top-1 does not drop [greedy]")  # fmt: skip
    p.add_argument("--out", required=True, help="run folder to write (scored like any run)")
    p.add_argument("--data", help="dataset spec [the runs' own]")
    p.add_argument("--overwrite", action="store_true", help="replace a soup or run in --out")

    p = _sub(sub, "report", "write report.md and results.csv for every run under a folder")
    p.add_argument("path", help="a folder holding run and ensemble folders")


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in field_names(TrainConfig)}


def cmd_demo(args) -> None:
    from . import recipe

    recipe.run(recipe.OWN / "seed-demo.yaml", args.out, parse_set(args.set), quiet=args.quiet)


def cmd_run(args) -> None:
    from . import recipe

    overrides = parse_set(args.set)
    if args.limit is not None:
        if str(overrides.get("limit", args.limit)) != str(args.limit):
            raise UserError(f"--limit {args.limit} and --set limit={overrides['limit']} disagree: "
                            "give one")  # fmt: skip
        overrides["limit"] = args.limit
    recipe.run(args.recipe, args.out, overrides, quiet=args.quiet)


def cmd_train(args) -> None:
    from . import resume, trainer

    cfg = alike(lambda: make_config(_overrides(args), resume.started_with(args.out) if args.resume else None))  # fmt: skip
    trainer.fit(cfg, args.out, args.resume, args.overwrite, args.quiet, args.log_json)


def cmd_finetune(args) -> None:
    from . import resume, trainer

    cfg = alike(lambda: resume.finetune_config(args.source, _overrides(args), args.out if args.resume else None))  # fmt: skip
    trainer.fit(cfg, args.out, args.resume, args.overwrite, args.quiet, args.log_json)


def cmd_lr_find(args) -> None:
    from . import lrfind

    lrfind.command(make_config(_overrides(args)), args.out, args.quiet)  # (it prints the LR)


TTA_HELP = "test-time augmentation per member: none | flip (mirror) | crops (ten-crop: corners and centre at 87.5%%, each mirrored; inputs >= 96 px)"  # fmt: skip


def cmd_evaluate(args) -> None:
    from . import ensembles, evaluate

    result = ensembles.evaluate_path(args.path, args.data, args.split, args.quiet, args.tta)
    m = result["metrics"]
    for note in result["notes"]:  # on stderr: `--json` leaves stdout to the numbers
        print(f"note: {note}", file=sys.stderr)
    say = functools.partial(print, file=sys.stderr if args.json else sys.stdout)  # --json:
    say = (lambda *a: None) if args.json and args.quiet else say  # stdout is the JSON alone
    say(
        f"{args.path} on {result['data']} [{args.split}]: top-1 {m['top1']:.2%}  "
        f"{evaluate.top5_text(m, 'top-5 {:.2%}  ')}macro-F1 {m['macro_f1']:.2%}  balanced accuracy "
        f"{m['balanced_accuracy']:.2%}  loss {m['loss']:.4f}  n={m['n']}"
    )
    if m["most_confused"]:
        say("most confused (true -> predicted: count): " + ", ".join(
            f"{one_line(c['true'])} -> {one_line(c['predicted'])}: {c['count']}" for c in m["most_confused"]
        ))  # fmt: skip
    if result["confusion"]:  # (not where the folder is read-only: a note says so)
        say(f"confusion matrix -> {result['confusion']}  (per-class precision/recall/F1: --json)")
    if args.json:  # with what the notes said (a score that is not a test score)
        print(json.dumps(m | {"notes": result["notes"]}))


def cmd_ensemble(args) -> None:
    from . import ensembles, recipe

    info = ensembles.build(
        args.runs, args.method, args.out, args.data, args.quiet, args.tta, args.overwrite
    )
    recipe.print_ensemble(info)
    print(f"ensemble -> {args.out}")


def cmd_predict(args) -> None:
    from . import predict

    rows, bad = predict.predict(args.path, args.inputs, args.top_k, args.tta, args.quiet)
    for line in bad:
        print(f"skipped: {one_line(line)}", file=sys.stderr)  # (a name's \\xff, not \\udcff)
    for line in predict.escaped(rows):  # (a name of its own may read alike)
        print(line, file=sys.stderr)
    if args.json:
        print(predict.json_text(rows))
    elif args.csv:
        print(predict.csv_text(rows), end="")
    else:
        print(predict.table(rows))


def cmd_soup(args) -> None:
    from . import evaluate, soups

    meta = soups.make(args.runs, args.method, args.out, args.data, args.quiet, args.overwrite)
    m, src = meta["metrics"], meta["source"]
    print(
        f"{args.method} soup of {len(src['ingredients'])}/{len(src['candidates'])} runs: "
        f"val {m['val']['top1']:.2%}  test {m['test']['top1']:.2%}{evaluate.top5_text(m['test'], ' (top-5 {:.2%})')}"
        f"  -> {args.out}"
    )


def cmd_report(args) -> None:
    from . import report

    path, table = report.write(args.path)
    print(table)
    print(f"report -> {path}")


COMMANDS = {
    "demo": cmd_demo,
    "run": cmd_run,
    "train": cmd_train,
    "finetune": cmd_finetune,
    "lr-find": cmd_lr_find,
    "evaluate": cmd_evaluate,
    "ensemble": cmd_ensemble,
    "predict": cmd_predict,
    "soup": cmd_soup,
    "report": cmd_report,
}


FULL = dict.fromkeys(  # what the user can do about it
    (errno.ENOSPC, errno.EDQUOT, errno.EFBIG),
    ": free space there (or raise the file-size limit, ulimit -f) and run it again",
)


def _refuse_blank(argv: list[str], args) -> None:
    """A blank value (`--out "$DIR"`, DIR unset: the current folder, where a run went; `--offline ''`: an argument's)."""
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if (eq or not flag) and not value.strip():
            switch = i and isinstance(getattr(args, argv[i - 1].lstrip("-").replace("-", "_"), None), bool)  # fmt: skip
            where = flag or (argv[i - 1] if i and argv[i - 1].startswith("-") and not switch else "an argument")  # fmt: skip
            raise UserError(f"{where} is empty ({value!r}): give it a value (see --help)")


def console() -> int:
    """The `transferlab` program (and `python -m transferlab`): its clock started with the
    process, before torch was imported (auto's budget counts that start-up too)."""
    import transferlab

    return main(started=transferlab.STARTED)


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """One command; `started`: when its wall clock began (None: now)."""
    with said_by_rank_0():  # (the other processes of a torchrun job: the same usage, --help)
        args = build_parser().parse_args(argv)
    for key, value in vars(args).items():  # `--out=~/x`, quoted '~/x': the shell left the ~
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, key, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, key, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])
    args.started, LATER[:] = started, []  # (a note of a call that was refused: not this one's)
    if getattr(args, "quiet", False):  # the Hugging Face libraries' own bars (hf: data, hub)
        os.environ |= {
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
    who = " ".join(filter(None, (args.command, getattr(args, "action", None))))  # data shard
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"  # what to know,
    # as a user reads it, not Python's source line
    try:
        _refuse_blank(sys.argv[1:] if argv is None else argv, args)
        if lost := bars.closed(args.command, getattr(args, "quiet", False)):  # (pass 62, 66)
            raise UserError(lost)
        if os.environ.get("WORLD_SIZE", "1") != "1" and args.command not in ("train", "finetune"):
            raise EveryRank(f"{args.command} runs in one process: run it without torchrun (train and finetune run under it{'; train --lr auto runs the range test itself' if args.command == 'lr-find' else ''})")  # fmt: skip
        with sigterm_stops(args.command != "serve"):  # (uvicorn stops serve by itself)
            (COMMANDS | cli_ship.COMMANDS)[args.command](args)
            say_later()  # (notes that wait for every refusal: `stops.later`)
    except UserError as err:
        if not isinstance(err, EveryRank) or not other_rank():
            print(f"transferlab {who}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        if not other_rank():  # (each process stopped alike: rank 0 says where its state is)
            print(f"transferlab {who}: {err}", file=sys.stderr)
        return 143
    except BrokenPipeError:  # `| head` stopped reading: no error of the user's, nothing to say
        say_later()  # (but the notes that waited: stderr is still read)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit)
        return 141  # as a shell reports a process SIGPIPE ended
    except OSError as err:  # the disk or the OS refused (full, read-only, gone): say which file
        name = re.sub(r"(^|/)\.([^/]+)\.\w{8}\.tmp$", r"\1\2", str(err.filename or ""))
        where = f" ({name})" if name else ""  # (`atomic_path`'s temp file named as its file)
        full = FULL.get(err.errno, "") + (" with --resume" if err.errno in FULL and args.command in ("train", "finetune", "auto") else "")  # fmt: skip
        print(
            f"transferlab {who}: error: {err.strerror or err}{where}{full}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C; Terminated: SIGTERM outside a training step
        said = "stopped by SIGTERM" if isinstance(err, Terminated) else "interrupted"
        if not other_rank():  # (torchrun's SIGTERM, when another process failed)
            print(f"transferlab {who}: {said}{going_on(args.command, getattr(args, 'out', None))}", file=sys.stderr)  # fmt: skip
        return 143 if isinstance(err, Terminated) else 130
    except RuntimeError as err:  # pathlib's expanduser of ~name for a user this machine lacks
        if said := peer_stopped(err):
            print(f"transferlab {who}: error: {said}{going_on(args.command, getattr(args, 'out', None))}", file=sys.stderr)  # fmt: skip
            return 1
        if "home directory" not in str(err):
            raise
        print(f"transferlab {who}: error: a path begins with ~NAME for a user this "
              f"machine does not have ({err})", file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(console())
