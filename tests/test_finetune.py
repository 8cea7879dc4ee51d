"""Transfer learning: strategies, head initialisation by class name, lr-find."""

from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab import data, decoding, evaluate, models, trainer
from transferlab.config import make_config

from conftest import tiny_cfg


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
    images = decoding.decode(split, prep["input_size"], 3, prep["interpolation"], cache=None)
    top1 = evaluate.metrics(evaluate.predict(model, images, prep), split.labels)["top1"]
    with capsys.disabled():
        print(
            f"\nLite0, matched ImageNet head, 0 steps, 128 px: Tiny ImageNet val top-1 "
            f"{top1:.1%} on {len(split)} images (chance 0.5%)"
        )
    assert top1 > 0.3 and np.isfinite(top1)


def test_linear_probe_moves_only_the_head_and_never_batchnorm(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from transferlab import trainer
    from transferlab.linear import PROBE_L2

    cfg = trainer.finetune_config(trained_run, {"strategy": "linear-probe"})
    meta = trainer.fit(cfg, tmp_path / "lp")
    out = capsys.readouterr().out
    assert "stage probe: 0.000M of" in out or "stage probe:" in out
    src, new = (load_file(p / "model.safetensors") for p in (trained_run, tmp_path / "lp"))
    changed = {k for k in src if not torch.equal(src[k], new[k])}
    assert changed <= {"fc.weight", "fc.bias"} and changed  # BN running stats untouched
    assert meta["trainable_params"] == sum(src[k].numel() for k in ("fc.weight", "fc.bias"))
    assert meta["epochs_run"] == len(PROBE_L2) and meta["probe"]["l2"] in PROBE_L2
    assert meta["metrics"]["test"]["top1"] > 0.5


def test_lp_ft_resumes_in_the_fine_tune_stage_without_probing_again(
    trained_run, tmp_path, monkeypatch
):
    from transferlab import finetune, trainer

    overrides = {"strategy": "lp-ft", "probe_l2": 0.01, "epochs": 2, "schedule": "constant"}
    cfg = trainer.finetune_config(trained_run, overrides)
    full = trainer.fit(cfg, tmp_path / "full", quiet=True)
    assert full["probe"]["l2"] == 0.01 and full["epochs_run"] == 2
    assert not (tmp_path / "full" / "features").exists()  # fine-tuned: probe features are stale
    # a run that died after its probe and one fine-tune epoch
    trainer.fit(
        trainer.finetune_config(trained_run, {**overrides, "epochs": 1}), tmp_path / "r", quiet=True
    )
    for name in ("meta.json", "model.safetensors"):
        (tmp_path / "r" / name).unlink()

    def no_second_probe(*args, **kwargs):
        raise AssertionError("the probe ran again after resume")

    monkeypatch.setattr(finetune, "linear_probe", no_second_probe)
    resumed = trainer.fit(cfg, tmp_path / "r", resume=True, quiet=True)
    assert resumed["epochs_run"] == 2
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "r"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _initial_state(cfg):
    """The model a fresh run of `cfg` starts from (scratch init is seeded)."""
    from transferlab import trainer
    from transferlab.distributed import Dist

    _, model, *_ = trainer.setup(cfg, Path("initial"), lambda *a: None, Dist(0, 1))
    return {k: v.clone() for k, v in model.state_dict().items()}, model


def test_gradual_epoch_one_trains_only_the_head_and_freezes_batchnorm(
    folder_data, tmp_path, capsys
):
    from safetensors.torch import load_file

    from transferlab import trainer

    from conftest import tiny_cfg

    cfg = tiny_cfg(f"folder:{folder_data}", strategy="gradual", epochs=1)
    start, model = _initial_state(cfg)
    meta = trainer.fit(cfg, tmp_path / "g1")
    assert "stage 1/" in capsys.readouterr().out
    after = load_file(tmp_path / "g1" / "model.safetensors")
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # running stats of every BatchNorm unchanged
    assert meta["trainable_params"] == model.fc.weight.numel() + model.fc.bias.numel()


def test_freeze_n_keeps_the_lowest_block_groups_fixed_and_trains_the_rest(folder_data, tmp_path):
    """--freeze 2: the stem and the first stage keep weights and BatchNorm statistics; all above train."""
    from safetensors.torch import load_file

    from transferlab import finetune, trainer
    from transferlab.config import UserError

    from conftest import tiny_cfg

    cfg = tiny_cfg(f"folder:{folder_data}", freeze="2", epochs=1)
    start, model = _initial_state(cfg)
    groups = finetune.block_groups(model)
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
        trainer.freeze(model, str(len(groups)))
    for bad in ("0", "-1", "two", "stages"):
        with pytest.raises(UserError, match="freeze must be"):
            tiny_cfg(f"folder:{folder_data}", freeze=bad)
    for strategy in ("linear-probe", "gradual"):  # they decide themselves what is frozen
        with pytest.raises(UserError, match="does not combine"):
            tiny_cfg(f"folder:{folder_data}", freeze="2", strategy=strategy)


def test_each_strategy_optimizer_holds_exactly_what_trains(folder_data):
    from transferlab import finetune, trainer

    from conftest import tiny_cfg

    for strategy, epochs in (("full", 1), ("linear-probe", 1), ("gradual", 2), ("layer-decay", 1)):
        cfg = tiny_cfg(f"folder:{folder_data}", strategy=strategy, epochs=epochs)
        _, model = _initial_state(cfg)
        groups, frozen, _ = trainer.training_parts(model, cfg, {"input_size": 24})
        opt = trainer.make_optimizer(cfg, trainer.optimizer_params(model, cfg, groups, 0.1), 0.1)
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}, strategy
        if strategy == "gradual":  # by its last epoch (2): the top two block groups
            names = finetune.gradual_stage(groups, 2)
            assert held == {id(p) for n, p in model.named_parameters() if n in names}
            assert len(groups) > 2 and "fc.weight" in groups[-1]
        if strategy == "layer-decay":
            lrs = {round(g["lr"], 9) for g in opt.param_groups}
            assert max(lrs) == 0.1 and min(lrs) == round(0.1 * 0.75 ** (len(groups) - 1), 9)


def test_gradual_and_layer_decay_resume_mid_stage_exactly(folder_data, tmp_path, monkeypatch):
    """Pre-empted in the middle of epoch 2 (stage 2), resumed: bitwise the uninterrupted run."""
    from safetensors.torch import load_file

    from transferlab import trainer
    from transferlab.config import Preempted

    from conftest import tiny_cfg

    for strategy in ("gradual", "layer-decay"):
        cfg = tiny_cfg(f"folder:{folder_data}", strategy=strategy, epochs=3)
        trainer.fit(cfg, tmp_path / f"{strategy}-full", quiet=True)
        steps = -(-108 // 16)  # 120 train images less the 10% val carve-out, batch 16
        monkeypatch.setenv("TRANSFERLAB_FAULT", f"term:{steps + 2}")
        with pytest.raises(Preempted):
            trainer.fit(cfg, tmp_path / f"{strategy}-r", quiet=True)
        monkeypatch.delenv("TRANSFERLAB_FAULT")
        trainer.fit(cfg, tmp_path / f"{strategy}-r", resume=True, quiet=True)
        a, b = (
            load_file(tmp_path / f"{strategy}-{d}" / "model.safetensors") for d in ("full", "r")
        )
        assert all(torch.equal(a[k], b[k]) for k in a), strategy


def test_dcnn_has_block_groups_for_gradual_unfreezing():
    from transferlab import finetune

    groups = finetune.block_groups(models.create("dcnn", 10, 1))
    assert len(groups) == 5 and groups[-1] == ["fc.weight", "fc.bias"]
    assert groups[0][0] == "features.0.weight" and "features.8.weight" in groups[1]


def test_small_stem_keeps_every_pretrained_tensor_and_reloads_from_the_run(folder_data, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = models.create("resnet18", 4, 3)
    save_file(source.state_dict(), tmp_path / "src.safetensors")
    cfg = tiny_cfg(
        f"folder:{folder_data}",
        model="resnet18",
        weights=str(tmp_path / "src.safetensors"),
        stem="small",
        epochs=1,
    )
    model, prep, _ = models.build(cfg, ["a", "b", "c", "d"], 24, 3)
    assert prep["stem"] == "small" and isinstance(model.maxpool, torch.nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    got, want = model.state_dict(), source.state_dict()
    assert torch.equal(got["conv1.weight"], want["conv1.weight"][:, :, 2:5, 2:5])
    assert all(torch.equal(got[k], want[k]) for k in want if k != "conv1.weight")
    # a 64 px image keeps 4x more resolution into the last stage (8x8 instead of 2x2)
    x = torch.randn(1, 3, 64, 64)
    model.eval(), source.eval()
    assert model.forward_features(x).shape[-1] == 4 * source.forward_features(x).shape[-1]
    meta = trainer.fit(cfg, tmp_path / "small", quiet=True)  # evaluate rebuilds the same stem
    again = evaluate.load_run_model(tmp_path / "small", meta)
    assert isinstance(again.maxpool, torch.nn.Identity)


class _Pooled(torch.nn.Module):
    """A toy model with timm's head contract: features are the channel means."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(channels, classes)

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc


def test_linear_probe_is_the_l2_logistic_regression_folded_into_the_head():
    """Known answer: scikit-learn's LogisticRegression on standardised features (C = 1/(l2 N)),
    and the fitted head applied to raw features gives the logits the probe scored on val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from transferlab import finetune

    rng = np.random.default_rng(0)
    k, c, n = 3, 6, 120
    labels = {s: rng.integers(0, k, n) for s in ("train", "val")}
    centres = rng.uniform(60, 190, (k, c))
    images = {
        s: np.clip(centres[y][:, None, None, :] + rng.normal(0, 40, (n, 4, 4, c)), 0, 255).astype(
            np.uint8
        )
        for s, y in labels.items()
    }
    prep = {"mean": [0.5] * c, "std": [0.25] * c}
    model = _Pooled(c, k)
    torch.nn.init.zeros_(model.fc.weight), torch.nn.init.zeros_(model.fc.bias)
    rows, best = finetune.linear_probe(model, images, labels, prep, "fp32", 0.05, lambda *a: None)
    assert len(rows) == 1 and best["l2"] == 0.05

    def feats(split):
        return finetune.features(model, images[split], prep, "fp32").cpu().numpy()

    with torch.no_grad():
        val_logits = model.fc(torch.from_numpy(feats("val"))).numpy()
    np.testing.assert_allclose(val_logits, best["val_logits"], atol=1e-4)
    scaler = StandardScaler().fit(feats("train"))
    ref = LogisticRegression(C=1 / (0.05 * n), tol=1e-8, max_iter=5000)
    ref.fit(scaler.transform(feats("train")), labels["train"])
    ref_logits = ref.decision_function(scaler.transform(feats("val")))
    np.testing.assert_allclose(
        val_logits - val_logits.mean(1, keepdims=True),
        ref_logits - ref_logits.mean(1, keepdims=True),
        atol=2e-3,
    )


def test_pooled_stages_widen_only_the_head_and_a_matched_head_starts_as_the_source(
    tmp_path, folder_data
):
    torch.manual_seed(0)
    src = models.create("test_resnet", 3, 3).eval()
    wide = models.create("test_resnet", 3, 3, pool_stages=2).eval()
    stages = wide.feature_info[-3:-1]  # the last stage is the final feature map: skipped
    assert wide.pooled_stages == [s["module"] for s in stages]
    assert wide.fc.in_features == src.num_features + sum(s["num_chs"] for s in stages)
    models.load_into(wide, src.state_dict(), ["c", "x", "a"], ["a", "b", "c"], "match")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = wide.forward_head(wide.forward_features(x), pre_logits=True)
        assert feats.shape == (2, wide.fc.in_features)
        torch.testing.assert_close(wide(x)[:, [0, 2]], src(x)[:, [2, 0]])
    # a run trained with pooled stages is rebuilt from its preprocessing when evaluated
    meta = trainer.fit(tiny_cfg(f"folder:{folder_data}", epochs=1, pool_stages=1), tmp_path / "r")
    assert meta["preprocessing"]["pool_stages"] == 1
    assert evaluate.load_run_model(tmp_path / "r", meta).fc.in_features > src.num_features


def test_a_probe_of_the_same_frozen_backbone_reuses_its_features(
    trained_run, tmp_path, monkeypatch
):
    """Features depend on the backbone and the pixels only: a second seed or another L2 skips
    every forward pass, gets the same numbers, and fusion finds them in the run folders."""
    from transferlab import ensembles, trainer

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    first = trainer.fit(
        trainer.finetune_config(trained_run, {"strategy": "linear-probe", "probe_l2": 0.01}),
        tmp_path / "a",
        quiet=True,
    )
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 3  # train, val, test
    assert {p.name for p in (tmp_path / "a" / "features").iterdir()} == {
        f"{s}-none.npz" for s in ("train", "val", "test")
    }

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass over images: the cached features were not used")

    monkeypatch.setattr(evaluate, "predict", no_forward)
    second = trainer.fit(
        trainer.finetune_config(
            trained_run, {"strategy": "linear-probe", "probe_l2": 0.01, "seed": 7}
        ),
        tmp_path / "b",
        quiet=True,
    )
    assert second["metrics"]["test"] == first["metrics"]["test"]  # same features, same fit
    ens = ensembles.build([tmp_path / "a", tmp_path / "b"], "fusion", tmp_path / "f", quiet=True)
    assert ens["members"][0]["test"]["top1"] == pytest.approx(first["metrics"]["test"]["top1"])
