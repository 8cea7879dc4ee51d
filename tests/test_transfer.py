"""Transfer learning: head initialisation by class name."""

import numpy as np
import pytest
import torch

from transferlab import data, evaluate, models
from transferlab.config import make_config


def test_class_rows_match_by_id_then_by_name():
    rows = models.class_rows(
        ["n2", "x", "n9"], ["dog", "Cat", "fish"], ["n1", "n2", "n3"], ["cat", "dog", "bird"]
    )
    assert rows == {0: 1, 1: 0}  # n2 by id; "Cat" by name; fish is new


def test_matched_head_copies_shared_rows_and_keeps_the_rest_fresh():
    torch.manual_seed(0)
    src = models.create("test_resnet", 3, 3)
    state = src.state_dict()
    target = models.create("test_resnet", 3, 3)
    fresh = target.state_dict()["fc.weight"].clone()
    summary = models.load_into(target, state, ["c", "x", "a"], ["a", "b", "c"], "match")
    w = target.state_dict()["fc.weight"]
    assert summary == {"loaded": len(state) - 2, "head_replaced": True, "head_matched": 2}
    assert torch.equal(w[0], state["fc.weight"][2]) and torch.equal(w[2], state["fc.weight"][0])
    assert torch.equal(w[1], fresh[1])
    assert torch.equal(target.state_dict()["fc.bias"][0], state["fc.bias"][2])


@pytest.mark.shared_data
def test_matched_imagenet_head_scores_far_above_chance_with_zero_training(shared_data, capsys):
    """ImageNet -> Tiny ImageNet shares all 200 WordNet ids: the mapping comes from the data."""
    ds = data.load(f"tiny-imagenet:{shared_data / 'tiny-imagenet-200'}", limit=600)
    cfg = make_config(
        {
            "model": "tf_efficientnet_lite0",
            "weights": "imagenet",
            "head_init": "match",
            "input_size": 128,
        }
    )
    model, prep, source = models.build(cfg, ds.classes, 64, 3, ds.names)
    assert source["head"] == "matched 200/200"
    split = ds.splits["test"]
    images = data.decode(split, prep["input_size"], 3, prep["interpolation"], cache=None)
    top1 = evaluate.metrics(evaluate.predict(model, images, prep), split.labels)["top1"]
    with capsys.disabled():
        print(
            f"\nLite0, matched ImageNet head, 0 steps, 128 px: Tiny ImageNet val top-1 "
            f"{top1:.1%} on {len(split)} images (chance 0.5%)"
        )
    assert top1 > 0.3 and np.isfinite(top1)


def test_linear_probe_moves_only_the_head_and_never_batchnorm(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from transferlab import train

    cfg = train.finetune_config(trained_run, {"strategy": "linear-probe", "epochs": 5, "lr": 0.05})
    meta = train.fit(cfg, tmp_path / "lp")
    out = capsys.readouterr().out
    assert "stage probe: 0.000M of" in out or "stage probe:" in out
    src, new = (load_file(p / "model.safetensors") for p in (trained_run, tmp_path / "lp"))
    changed = {k for k in src if not torch.equal(src[k], new[k])}
    assert changed <= {"fc.weight", "fc.bias"} and changed  # BN running stats untouched
    assert meta["trainable_params"] == sum(src[k].numel() for k in ("fc.weight", "fc.bias"))
    assert meta["epochs_run"] == 5 and meta["probe"]["epochs"] == 5
    assert meta["metrics"]["test"]["top1"] > 0.5


def test_lp_ft_resumes_in_the_fine_tune_stage_without_probing_again(
    trained_run, tmp_path, monkeypatch
):
    from transferlab import finetune, train

    overrides = {"strategy": "lp-ft", "probe_epochs": 3, "epochs": 2, "schedule": "constant"}
    cfg = train.finetune_config(trained_run, overrides)
    full = train.fit(cfg, tmp_path / "full", quiet=True)
    assert full["probe"]["epochs"] == 3 and full["epochs_run"] == 2
    # a run that died after its probe and one fine-tune epoch
    train.fit(
        train.finetune_config(trained_run, {**overrides, "epochs": 1}), tmp_path / "r", quiet=True
    )
    for name in ("meta.json", "model.safetensors"):
        (tmp_path / "r" / name).unlink()

    def no_second_probe(*args, **kwargs):
        raise AssertionError("the probe ran again after resume")

    monkeypatch.setattr(finetune, "linear_probe", no_second_probe)
    resumed = train.fit(cfg, tmp_path / "r", resume=True, quiet=True)
    assert resumed["epochs_run"] == 2
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "r"))
    assert all(torch.equal(a[k], b[k]) for k in a)
