"""DistributedDataParallel under torchrun: 2 gloo processes on loopback vs one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from transferlab import checkpoint
from transferlab.cli import main
from transferlab.distributed import Dist

from conftest import make_folder


def torchrun(*args, env=None, extra=()) -> subprocess.CompletedProcess:
    environ = {**os.environ, **(env or {})}
    if not env or "TRANSFERLAB_FAULT" not in env:
        environ.pop("TRANSFERLAB_FAULT", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *extra,
        "-m",
        "transferlab",
        "--quiet",
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=300)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """3 classes x 15 train images: 5 val (odd: padding is exercised), 40 train = 16+16+8."""
    root = tmp_path_factory.mktemp("ddp")
    make_folder(root / "data", ["a", "b", "c"], 15)
    a = next(p for p in (root / "data").rglob("a") if p.is_dir())
    (a / "readme.txt").write_text("not an image: a note to say once")
    return root / "data"


def train_args(data_dir, out):
    # a model without BatchNorm, so that 2 x 8 images equal one batch of 16; SGD, since Adam
    # turns float rounding in near-zero gradients into lr-sized weight differences
    return [
        "train",
        "--data",
        f"folder:{data_dir}",
        "--model",
        "test_convnext",
        "--input-size",
        32,
        "--epochs",
        2,
        "--batch-size",
        16,
        "--optimizer",
        "sgd",
        "--lr",
        0.05,
        "--precision",
        "fp32",
        "--checkpoint-every",
        2,
        "--log-json",
        f"{out}.jsonl",
        "--out",
        out,
    ]


@pytest.fixture(scope="module")
def clean_runs(ddp_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    assert main(["--quiet", *map(str, train_args(ddp_data, root / "one"))]) == 0
    two = torchrun(*train_args(ddp_data, root / "two"))
    assert two.returncode == 0, two.stderr
    (root / "two.stderr").write_text(two.stderr)
    return root


def max_diff(a, b) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(clean_runs):
    one, two = (checkpoint.read_meta(clean_runs / d) for d in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["metrics"]["val"]["top1"] == one["metrics"]["val"]["top1"]
    assert two["metrics"]["val"]["loss"] == pytest.approx(one["metrics"]["val"]["loss"], abs=1e-5)
    assert two["metrics"]["val"]["n"] == 5 and two["metrics"]["test"]["n"] == 45
    assert max_diff(clean_runs / "one", clean_runs / "two") < 1e-5
    steps = [  # the images each step trained on: the global batch (rank 0's half: pass 38, F13)
        [r["indices"] for r in map(json.loads, (clean_runs / f"{d}.jsonl").open()) if r["event"] == "step"]
        for d in ("one", "two")
    ]  # fmt: skip
    assert steps[0] == steps[1] and len(steps[0]) == 6 and len(steps[0][0]) == 16
    # only rank 0 wrote: one set of files, no stray temp files
    assert sorted(p.name for p in (clean_runs / "two").iterdir()) == sorted(
        p.name for p in (clean_runs / "one").iterdir()
    )
    assert not list((clean_runs / "two").rglob("*.tmp"))
    said = (clean_runs / "two.stderr").read_text()  # each note once, not once a process
    assert said.count("skipped 1 file(s)") == 1 and said.count("readme.txt") == 1, said


@pytest.mark.slow
def test_S24_sigterm_on_one_rank_stops_every_rank_at_the_same_step(ddp_data, clean_runs, tmp_path):
    args = train_args(ddp_data, tmp_path / "run")
    stopped = torchrun(*args, env={"TRANSFERLAB_FAULT": "term:3@1"})
    assert stopped.returncode != 0 and "143" in stopped.stderr
    state = torch.load(tmp_path / "run" / "state" / "last.pt", weights_only=True)
    assert state["progress"]["global_step"] == 3  # rank 0 saved at rank 1's step
    resumed = torchrun(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert max_diff(clean_runs / "two", tmp_path / "run") == 0.0


@pytest.mark.slow
def test_S25_a_rank_failure_restarts_resumes_and_finishes_equal(ddp_data, clean_runs, tmp_path):
    args = [*train_args(ddp_data, tmp_path / "run"), "--resume"]
    run = torchrun(*args, env={"TRANSFERLAB_FAULT": "kill:4@1"}, extra=("--max-restarts", "1"))
    assert run.returncode == 0, run.stderr
    assert max_diff(clean_runs / "two", tmp_path / "run") == 0.0


@pytest.mark.slow
def test_two_gloo_processes_on_webdataset_shards_equal_one_process(ddp_data, tmp_path):
    shards = tmp_path / "wds"
    assert (
        main(
            [
                "--quiet",
                "data",
                "shard",
                f"folder:{ddp_data}",
                "--out",
                str(shards),
                "--shard-size",
                "6",
            ]
        )
        == 0
    )
    args = train_args(shards, tmp_path / "one")
    args[args.index("--data") + 1] = f"wds:{shards}"
    assert main(["--quiet", *map(str, args)]) == 0
    two = torchrun(*[tmp_path / "two" if a == tmp_path / "one" else a for a in args])
    assert two.returncode == 0, two.stderr
    one, two = (checkpoint.read_meta(tmp_path / d) for d in ("one", "two"))
    assert two["processes"] == 2 and two["metrics"]["val"]["n"] == one["metrics"]["val"]["n"] == 5
    assert two["metrics"]["val"]["loss"] == pytest.approx(one["metrics"]["val"]["loss"], abs=1e-5)
    assert max_diff(tmp_path / "one", tmp_path / "two") < 1e-5


def test_sharded_evaluation_counts_every_sample_once():
    for n in (5, 6, 7):
        shards = [Dist(r, 2).shard(n) for r in (0, 1)]
        assert len(shards[0]) == len(shards[1])
        interleaved = np.stack(shards, axis=1).reshape(-1)[:n]  # what gather() undoes
        assert interleaved.tolist() == list(range(n))


DECODE_WORKER = """
import json, sys
from pathlib import Path
from transferlab import data, decoding, distributed

d = distributed.setup()
opened, real = [], decoding.open_image
decoding.open_image = lambda *a: opened.append(a[0]) or real(*a)
split = data.load(sys.argv[1], val_fraction=0.2).splits["train"]
cache = Path(sys.argv[2].format(rank=d.rank))  # {rank}: a cache folder of each rank's own
images, kept, bad = decoding.decode_checked(split, 20, 3, skip_bad=True, cache=cache)
report = {"opened": len(opened), "sum": int(images.sum()), "n": len(kept), "bad": bad}
Path(sys.argv[3], f"rank{d.rank}.json").write_text(json.dumps(report))
"""


def test_ranks_decode_the_cache_together_each_its_half_byte_identical_to_one_process(tmp_path):
    from transferlab import data, decoding

    make_folder(tmp_path / "d", ["a", "b", "c"], 12)
    (tmp_path / "d" / "train" / "b" / "3.png").write_bytes(b"not an image at all")
    spec, worker = f"folder:{tmp_path / 'd'}", tmp_path / "worker.py"
    worker.write_text(DECODE_WORKER)
    split = data.load(spec, val_fraction=0.2).splits["train"]
    one = decoding.decode_checked(split, 20, 3, skip_bad=True, cache=tmp_path / "one")

    def launch(cache: str, out: str) -> list[dict]:
        (tmp_path / out).mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        args = ["2", str(worker), spec, str(tmp_path / cache), str(tmp_path / out)]
        run = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return [json.loads((tmp_path / out / f"rank{r}.json").read_text()) for r in (0, 1)]

    ranks = launch("two", "first")
    assert sorted(r["opened"] for r in ranks) == [len(split) // 2, len(split) - len(split) // 2]
    for r in ranks:  # every rank reads the whole entry, the bad image listed once
        assert (r["n"], r["sum"], r["bad"]) == (len(one[1]), int(one[0].sum()), one[2])
    files = {d: {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} for d in ("one", "two")}
    assert files["one"] == files["two"] and len(files["one"]) == 2  # the array and its info
    assert [r["opened"] for r in launch("two", "again")] == [0, 0]  # found: nothing decoded
    own = launch("own-{rank}", "own")  # caches the ranks do not share (one per node)
    assert [(r["opened"], r["sum"]) for r in own] == [(len(split), int(one[0].sum()))] * 2


@pytest.mark.slow
def test_a_rank_killed_without_restarts_is_one_line_and_resumes_in_one_process(ddp_data, tmp_path):
    """Hostile pass 38: the surviving rank printed gloo's traceback and not how to continue
    (F7); a resume in another number of processes was taken without a word (F9)."""
    args = [*train_args(ddp_data, tmp_path / "run"), "--model", "test_resnet"]  # (BatchNorm)
    run = torchrun(*args, env={"TRANSFERLAB_FAULT": "kill:4@1"})
    assert run.returncode != 0 and "[rank0]" not in run.stderr, run.stderr
    said = [line for line in run.stderr.splitlines() if line.startswith("transferlab train: ")]
    assert len(said) == 1 and said[0].endswith(f"{tmp_path / 'run' / 'state'}: rerun with --resume to continue"), said  # fmt: skip
    assert "Connection" in said[0] or "stopped by SIGTERM" in said[0], said  # (torchrun's too)
    assert run.stderr.count("normalises the BatchNorm layers over its share") == 1
    assert main(["--quiet", *map(str, args), "--resume"]) == 0
    notes = checkpoint.read_meta(tmp_path / "run")["notes"]
    assert any(n.startswith("trained in 2 process(es) to step 4, then in 1") for n in notes)


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line_whichever_process_reaches_it(ddp_data, tmp_path):
    """Stop 53's low items: an unknown model was refused once per process; a refusal of rank
    0 alone (an --out that holds a user's file) was followed by the other rank's "another
    process of this torchrun job stopped"."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for change, words in (
        (["--model", "nosuchmodel"], "error: unknown model 'nosuchmodel'"),
        (["--optimizer", "foo"], "error: optimizer must be one of adam, adamw, sgd"),  # pass 41
        (["--lr", "1e30", "--out", tmp_path / "nan"], "error: non-finite loss"),  # 42: training
        (["--out", tmp_path / "mine"], "is not a transferlab run folder (it holds notes.txt)"),
    ):
        run = torchrun(*train_args(ddp_data, tmp_path / "run"), *change)
        said = [line for line in run.stderr.splitlines() if line.startswith("transferlab train")]
        assert run.returncode != 0 and len(said) == 1 and words in said[0], run.stderr
    run = torchrun("finetune", "--from", tmp_path / "nope", "--out", tmp_path / "ft")  # pass 41
    said = [line for line in run.stderr.splitlines() if line.startswith("transferlab finetune")]
    assert said == [f"transferlab finetune: error: run folder not found: {tmp_path / 'nope'}"], run.stderr  # fmt: skip
    assert not (tmp_path / "run").exists()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_refusal_one_process_reaches_is_said_by_rank_0_naming_that_process():
    from dataclasses import dataclass

    from transferlab.config import EveryRank, UserError

    @dataclass(frozen=True)
    class Gathered(Dist):  # rank 0 of 3, whose rank 2 refused
        def all_objects(self, obj):
            return [obj, None, "no such file: x.png"]

    with pytest.raises(EveryRank, match="^process 2 of this torchrun job: no such file: x.png$"):
        Gathered(0, 3).agreed(lambda: 7)
    assert Dist().agreed(lambda: 7) == 7
    with pytest.raises(UserError, match="^mine$") as raised:

        def refuse():
            raise UserError("mine")

        Gathered(0, 3).agreed(refuse)
    assert isinstance(raised.value, EveryRank)


def test_what_a_job_of_several_processes_refuses_and_says(tmp_path, capsys, monkeypatch):
    """Hostile pass 38: --batch-size 2 over 3 processes gave one rank an empty share, whose NaN
    loss read "try a lower --lr" three times (F2); `auto` and `run` under torchrun said "in use
    by another transferlab process", the other rank (F1)."""
    from types import SimpleNamespace

    from transferlab import cli, distributed, guards, models
    from transferlab.config import EveryRank, Terminated

    for rank in (0, 2):
        with pytest.raises(EveryRank, match="--batch-size 2 is the global batch, shared by the 3 processes"):  # fmt: skip
            distributed.check(Dist(rank, 3), 2, 99)
    with pytest.raises(EveryRank, match="at least two images of it, .* \\(--batch-size 4 or more\\)"):  # fmt: skip
        distributed.check(Dist(0, 2), 3, 99)
    with pytest.raises(EveryRank, match="the 3 training images cannot give each of the 2 processes of this torchrun job two of a batch, .* in 1 process"):  # fmt: skip
        distributed.check(Dist(0, 2), 64, 3)
    distributed.check(Dist(0, 2), 4, 4)
    loop = SimpleNamespace(cfg=SimpleNamespace(flip=False, batch_size=5, head_init="fresh"), dist=Dist(0, 2), stages=[SimpleNamespace(probe=False)], ds=None, labels={"train": range(99)})  # fmt: skip
    loop.model = models.create("test_convnext", 3, 3)
    assert guards.advice(loop) == []  # no BatchNorm: nothing to say
    loop.model = models.create("test_resnet", 3, 3)
    said = guards.advice(loop)
    assert said and "over its share of the batch (2-3 images), not over all 5" in said[0]
    loop.cfg.batch_size = 64  # hostile pass 40 (F7): 16 training images, one batch of 16
    loop.labels["train"] = range(16)
    assert "over its share of the batch (8-8 images), not over all 16:" in guards.advice(loop)[0]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):  # rank 0 says it, once
        monkeypatch.setenv("RANK", rank)
        out = tmp_path / f"auto{rank}"
        assert main(["auto", "--data", "digits", "--budget", "1m", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == lines and not out.exists(), err
    assert "auto runs in one process: run it without torchrun" in err
    # hostile pass 39: what every process says alike, the others said again: argparse's usage
    # and --help, and, under rank 0's refusal, "stopped by SIGTERM: rerun with --resume" (the
    # SIGTERM torchrun sends the others when one fails)
    monkeypatch.setenv("RANK", "1")
    for argv in (["train", "--epochz", "1"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert capsys.readouterr() == ("", "")

    def terminated(args):
        raise Terminated

    monkeypatch.setitem(cli.COMMANDS, "train", terminated)
    assert main(["train", "--out", str(tmp_path / "t")]) == 143
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--out", str(tmp_path / "t")]) == 143
    assert capsys.readouterr().err.startswith("transferlab train: stopped by SIGTERM")


def test_train_lr_auto_under_torchrun_runs_the_range_test_on_rank_0_only(
    folder_data, tmp_path, monkeypatch
):
    """Hostile pass 38 (F8): every rank ran its own range test, wrote lr_find.json and trained
    at the LR it found (on GPUs, maybe another one than rank 0's)."""
    from dataclasses import dataclass

    from transferlab import lrfind, trainer

    from conftest import tiny_cfg

    @dataclass(frozen=True)
    class Rank1(Dist):
        def broadcast(self, obj):
            assert obj is None  # what rank 1 sends
            return 0.0123  # rank 0's

    monkeypatch.setattr(lrfind, "find_lr", lambda *a: pytest.fail("rank 1 ran the range test"))
    monkeypatch.setattr(trainer.distributed, "wrap", lambda model, *a, **k: model)  # (no group)
    cfg = tiny_cfg(f"folder:{folder_data}", lr="auto", epochs=1)
    loop = trainer.setup(cfg, tmp_path / "r", lambda *a, **k: None, Rank1(1, 2))
    loop.images, loop.labels = {"train": np.zeros((8, 24, 24, 3), np.uint8)}, {"train": np.zeros(8)}
    trainer.start_training(loop, tmp_path / "r", False, lambda *a, **k: None, True)
    assert loop.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.0123)
