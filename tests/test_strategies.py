"""Transfer learning: strategies, head initialisation by class name, lr-find."""

from pathlib import Path

import pytest
import torch

from transferlab import models, strategies, trainer
from transferlab.config import UserError, make_config

from conftest import tiny_cfg


def _initial_state(cfg):
    """The model a fresh run of `cfg` starts from (scratch init is seeded)."""
    from transferlab.distributed import Dist

    model = trainer.setup(cfg, Path("initial"), lambda *a, **k: None, Dist(0, 1)).model
    return {k: v.clone() for k, v in model.state_dict().items()}, model


def test_gradual_epoch_one_trains_only_the_head_and_freezes_batchnorm(
    folder_data, tmp_path, capsys
):
    from safetensors.torch import load_file

    cfg = tiny_cfg(f"folder:{folder_data}", strategy="gradual", epochs=2)
    start, model = _initial_state(cfg)
    trainer.fit(cfg, tmp_path / "g1")
    assert "stage 1/" in capsys.readouterr().out
    first = next((tmp_path / "g1" / "state").glob("step-*.pt"))  # the end of epoch 1
    after = torch.load(first, weights_only=True)["model"]
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # running stats of every BatchNorm unchanged
    last = load_file(tmp_path / "g1" / "model.safetensors")  # epoch 2: the top two groups
    assert {k for k in start if not torch.equal(start[k], last[k])} > changed
    with pytest.raises(UserError, match="with epochs 1 the backbone never trains"):
        tiny_cfg(f"folder:{folder_data}", strategy="gradual", epochs=1)  # (head-first's alike)


def test_freeze_n_keeps_the_lowest_block_groups_fixed_and_trains_the_rest(folder_data, tmp_path):
    """--freeze 2: the stem and the first stage keep weights and BatchNorm statistics; all above train."""
    from safetensors.torch import load_file

    from transferlab.config import UserError

    cfg = tiny_cfg(f"folder:{folder_data}", freeze="2", epochs=1)
    start, model = _initial_state(cfg)
    groups = strategies.block_groups(model)
    meta = trainer.fit(cfg, tmp_path / "f2", quiet=True)
    after = load_file(tmp_path / "f2" / "model.safetensors")
    low = {k for g in groups[:2] for k in g}
    frozen_modules = {k.rsplit(".", 1)[0] for k in low}
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert not {k for k in changed if k.rsplit(".", 1)[0] in frozen_modules}  # + running stats
    assert {k for k in after if k in {n for g in groups[2:] for n in g}} <= changed
    assert meta["trainable_params"] == sum(
        p.numel() for n, p in model.named_parameters() if n not in low
    )
    with pytest.raises(UserError, match="would freeze everything"):
        strategies.trainable(model, str(len(groups)))
    # pass 59: freeze N leaving only the head (as freeze backbone, refused there) slipped past
    # head-first (its second stage trained the head again), lp-ft and layer-decay
    top = str(len(groups) - 1)
    assert strategies.trainable(model, top) == frozenset(groups[-1])  # full: the head trains
    for strategy in ("lp-ft", "head-first", "layer-decay"):
        with pytest.raises(UserError, match=rf"^freeze {top} would leave strategy {strategy} only the head to train in every stage: .*; use at most {len(groups) - 2}, or for the head alone: strategy full with freeze backbone, or linear-probe without freeze$"):  # fmt: skip
            trainer.fit(tiny_cfg(f"folder:{folder_data}", freeze=top, strategy=strategy, epochs=2), tmp_path / strategy, quiet=True)  # fmt: skip
        assert not (tmp_path / strategy).exists()
    for bad in ("0", "-1", "two", "stages"):
        with pytest.raises(UserError, match="freeze must be"):
            tiny_cfg(f"folder:{folder_data}", freeze=bad)
    for strategy in ("linear-probe", "gradual"):  # they decide themselves what is frozen
        with pytest.raises(UserError, match="does not combine"):
            tiny_cfg(f"folder:{folder_data}", freeze="2", strategy=strategy)


def test_each_strategy_is_a_plan_whose_optimizer_holds_exactly_what_trains(folder_data):
    cases = (("full", 1), ("linear-probe", 1), ("lp-ft", 2), ("head-first", 2), ("gradual", 2),
             ("layer-decay", 1))  # fmt: skip
    for strategy, epochs in cases:
        trained = {} if strategy == "linear-probe" else {"epochs": epochs}  # (refused: no effect)
        cfg = tiny_cfg(f"folder:{folder_data}", strategy=strategy, **trained)
        _, model = _initial_state(cfg)
        stages = strategies.plan(cfg, model)
        head = {"fc.weight", "fc.bias"}
        assert sum(s.epochs for s in stages) == (0 if strategy == "linear-probe" else epochs)
        assert [s.probe for s in stages] == {
            "linear-probe": [True], "lp-ft": [True, False], "gradual": [False, False],
            "head-first": [False, False]
        }.get(strategy, [False]), strategy  # fmt: skip
        widest = stages[-1]  # the optimizer holds what the last stage trains
        strategies.enter(model, widest)
        opt = strategies.make_optimizer(cfg, strategies.optimizer_groups(model, widest, 0.1), 0.1)
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}, strategy
        if strategy in ("linear-probe", "lp-ft", "head-first"):
            assert stages[0].trains == head
        if strategy == "head-first":  # one epoch of the head, then everything
            assert [s.epochs for s in stages] == [1, 1]
            assert stages[1].trains == {n for n, _ in model.named_parameters()}
        if strategy == "gradual":  # epoch 1: the head; epoch 2 (the last): the top two groups
            groups = strategies.block_groups(model)
            assert len(groups) > 2 and "fc.weight" in groups[-1]
            assert stages[0].trains == set(groups[-1])
            assert stages[1].trains == set(groups[-1] + groups[-2])
            assert held == {id(p) for n, p in model.named_parameters() if n in stages[1].trains}
        if strategy == "layer-decay":
            groups = strategies.block_groups(model)
            lrs = {round(g["lr"], 9) for g in opt.param_groups}
            assert max(lrs) == 0.1 and min(lrs) == round(0.1 * 0.75 ** (len(groups) - 1), 9)


def test_gradual_plan_with_fewer_epochs_than_groups_stops_unfreezing_early():

    model = models.create("dcnn", 10, 1)  # 5 block groups
    groups = strategies.block_groups(model)
    for epochs, want in ((3, [1, 1, 1]), (5, [1] * 5), (8, [1, 1, 1, 1, 4])):
        stages = strategies.plan(
            make_config({"model": "dcnn", "strategy": "gradual", "epochs": epochs}), model
        )
        assert [s.epochs for s in stages] == want
        assert stages[-1].trains == {n for g in groups[-len(stages) :] for n in g}


def test_dcnn_has_block_groups_for_gradual_unfreezing():

    groups = strategies.block_groups(models.create("dcnn", 10, 1))
    assert len(groups) == 5 and groups[-1] == ["fc.weight", "fc.bias"]
    assert groups[0][0] == "features.0.weight" and "features.8.weight" in groups[1]


def test_head_first_trains_the_head_alone_for_one_epoch_then_everything(folder_data, tmp_path):

    cfg = tiny_cfg(f"folder:{folder_data}", strategy="head-first", epochs=2)
    start, model = _initial_state(cfg)
    meta = trainer.fit(cfg, tmp_path / "h2", quiet=True)
    first = next((tmp_path / "h2" / "state").glob("step-*.pt"))  # the end of epoch 1
    after = torch.load(first, weights_only=True)["model"]
    assert {k for k in start if not torch.equal(start[k], after[k])} == {"fc.weight", "fc.bias"}
    with pytest.raises(UserError, match="strategy head-first trains the head alone in its first"):
        make_config({"epochs": 1}, cfg)
    last = torch.load(tmp_path / "h2" / "state" / "last.pt", weights_only=True)["model"]
    assert not torch.equal(start["conv1.0.weight"], last["conv1.0.weight"])  # epoch 2: all
    assert meta["trainable_params"] == meta["params"] and meta["epochs_run"] == 2


def test_lp_ft_fine_tunes_from_its_probe_and_never_ends_below_it_unsaid(tmp_path, capsys):
    """The probe head was fitted on eval-mode features but met train-mode BatchNorm in the
    fine-tune: its first step's loss was 19,498 (the DCNN on digits; Lite0: 70) and the run
    kept its fine-tuned epochs, far below the probe (81% -> 14% val). Now every BatchNorm keeps
    its statistics in the fine-tune, and the probe is epoch 0: kept, and said, unless a
    fine-tuned epoch beats it on val."""
    import json

    cfg = tiny_cfg("digits", model="dcnn", input_size=16, strategy="lp-ft", epochs=2,
                   flip=False, crop="none", lr=1e-3)  # fmt: skip
    meta = trainer.fit(cfg, tmp_path / "r", quiet=True, log_json=str(tmp_path / "log.jsonl"))
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first = next(e["loss"] for e in steps if e.get("event") == "step")
    history = (tmp_path / "r" / "history.csv").read_text().splitlines()
    probe_loss = float(history[1].split(",")[2])  # epoch 0: the probe's train loss
    assert history[1].startswith("0,") and probe_loss < 0.1 and first < 10, first  # (dropout)
    assert meta["epochs_run"] == 2 and meta["metrics"]["val"]["top1"] >= meta["probe"]["val_acc"]
    if meta["best_epoch"] == 0:  # the fine-tune did not beat it here: kept, and said
        assert "no fine-tuned epoch beat the probe on val" in capsys.readouterr().err


def test_patience_stops_early_only_with_epochs_left_and_names_its_rule(
    tmp_path, capsys, monkeypatch
):
    """It said "early stop: val top-1 has not improved" after the last epoch (not early), and
    a lower val loss at the same top-1 counts as an improvement, which it did not say."""
    from transferlab import evaluate

    improves = evaluate.improves
    monkeypatch.setattr(evaluate, "improves", lambda val, best: best["epoch"] == 0 and improves(val, best))  # fmt: skip
    meta = trainer.fit(tiny_cfg("digits", epochs=3, patience=1, limit=60), tmp_path / "a")
    assert meta["epochs_run"] == 2  # epoch 1 the best; epoch 2 not better: stop, 1 left
    assert "early stop: val (top-1, then loss) has not improved for 1 epoch(s), 1 left unrun" in capsys.readouterr().out  # fmt: skip
    meta = trainer.fit(tiny_cfg("digits", epochs=3, patience=2, limit=60), tmp_path / "b")
    assert meta["epochs_run"] == 3 and "early stop" not in capsys.readouterr().out
