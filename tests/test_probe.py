"""The probe stage: frozen features computed once (and cached), the head an L2 logistic
regression on them, BatchNorm untouched."""

import numpy as np
import pytest
import torch

from transferlab import evaluate, models, probe, strategies, trainer


def test_linear_probe_moves_only_the_head_and_never_batchnorm(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from transferlab.linear import PROBE_L2, path_to

    cfg = strategies.finetune_config(trained_run, {"strategy": "linear-probe"})
    meta = trainer.fit(cfg, tmp_path / "lp")
    out = capsys.readouterr().out
    assert "stage probe: 0.000M of" in out or "stage probe:" in out
    assert f"[lp] l2 {meta['probe']['l2']:g}: val" in out  # its kept strength, not an "epoch"
    assert "best epoch" not in out
    src, new = (load_file(p / "model.safetensors") for p in (trained_run, tmp_path / "lp"))
    changed = {k for k in src if not torch.equal(src[k], new[k])}
    assert changed <= {"fc.weight", "fc.bias"} and changed  # BN running stats untouched
    assert meta["trainable_params"] == sum(src[k].numel() for k in ("fc.weight", "fc.bias"))
    assert meta["probe"]["l2"] in PROBE_L2  # fitted along the path to the CV's choice:
    rows = (tmp_path / "lp" / "history.csv").read_text().splitlines()[1:]  # one per strength
    assert len(rows) == len(path_to(PROBE_L2, meta["probe"]["l2"]))
    assert meta["epochs_run"] == 0  # no epoch of SGD (it counted the strengths: 4 of --epochs 3)
    assert meta["metrics"]["test"]["top1"] > 0.5
    from transferlab import htmlreport  # its report page says the strength, not "epochs"

    assert ("probe L2 strength", meta["probe"]["l2"]) in htmlreport._run_meta(meta)


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
    prep = models.Preprocessing.make(24, c, [0.5] * c, [0.25] * c)
    model = _Pooled(c, k)
    torch.nn.init.zeros_(model.fc.weight), torch.nn.init.zeros_(model.fc.bias)
    rows, best = probe.linear_probe(model, images, labels, prep, "fp32", 0.05, lambda *a: None)
    assert len(rows) == 1 and best["l2"] == 0.05

    def feats(split):
        return probe.features(model, {split: images[split]}, prep, "fp32")[split].cpu().numpy()

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


def test_a_probe_of_the_same_frozen_backbone_reuses_its_features(
    trained_run, tmp_path, monkeypatch
):
    """Features depend on the backbone and the pixels only: a second seed or another L2 skips
    every forward pass, gets the same numbers, and fusion finds them in the run folders."""
    from transferlab import ensembles

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    first = trainer.fit(
        strategies.finetune_config(trained_run, {"strategy": "linear-probe", "probe_l2": 0.01}),
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
        strategies.finetune_config(
            trained_run, {"strategy": "linear-probe", "probe_l2": 0.01, "seed": 7}
        ),
        tmp_path / "b",
        quiet=True,
    )
    assert second["metrics"]["test"] == first["metrics"]["test"]  # same features, same fit
    ens = ensembles.build([tmp_path / "a", tmp_path / "b"], "fusion", tmp_path / "f", quiet=True)
    assert ens["members"][0]["test"]["top1"] == pytest.approx(first["metrics"]["test"]["top1"])


def test_a_mirror_probe_sees_both_views_wherever_it_predicts(trained_run, tmp_path, monkeypatch):
    """`mirror_features`: the head is fitted on the mean features of each image and its mirror,
    the run records it, and every later forward (a reloaded model, evaluate, ONNX export)
    averages the same two views; its features are cached apart from single-view ones."""
    from transferlab import ensembles, export
    from transferlab.config import UserError, make_config

    monkeypatch.setenv("TRANSFERLAB_CACHE", str(tmp_path / "cache"))
    meta = trainer.fit(
        strategies.finetune_config(
            trained_run, {"strategy": "linear-probe", "mirror_features": True}
        ),
        tmp_path / "mirror",
        quiet=True,
    )
    assert meta["architecture"]["mirror"] is True
    model = evaluate.load_run_model(tmp_path / "mirror", meta)
    plain = models.for_run(checkpoint_meta_without_mirror(meta))
    plain.load_state_dict(model.state_dict())
    x = torch.rand(3, 3, 24, 24)
    with torch.no_grad():
        both = (models.logits(plain.eval(), x, pre_logits=True) + models.logits(plain, x.flip(3), pre_logits=True)) / 2  # fmt: skip
        torch.testing.assert_close(models.logits(model.eval(), x, pre_logits=True), both)
    scored = ensembles.evaluate_path(tmp_path / "mirror", split="test")["metrics"]
    assert scored["top1"] == pytest.approx(meta["metrics"]["test"]["top1"])
    assert (
        export.export(tmp_path / "mirror", "onnx", tmp_path / "m.onnx")["check"][
            "max_abs_logit_diff"
        ]
        <= 1e-4
    )
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    prep = models.Preprocessing.from_dict(meta["preprocessing"])
    x5 = torch.rand(5, 3, 24, 24)  # any batch size (the feature engine runs 32 at a time)
    with torch.no_grad():
        want = export.Packaged(model, prep)(x5).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x5.numpy()})[0], want, atol=1e-4)
    single = trainer.fit(
        strategies.finetune_config(trained_run, {"strategy": "linear-probe"}),
        tmp_path / "single",
        quiet=True,
    )
    assert len(list((tmp_path / "cache" / "features").glob("*.npy"))) == 6  # not shared
    assert single["architecture"]["mirror"] is False
    with pytest.raises(UserError, match="linear-probe"):
        make_config({"data": "digits", "mirror_features": True})
    tune = strategies.finetune_config(tmp_path / "mirror", {"strategy": "full"})
    assert tune.mirror_features is False  # trains without mirroring, as asked
    assert strategies.finetune_config(tmp_path / "mirror", {}).mirror_features is True


def checkpoint_meta_without_mirror(meta: dict) -> dict:
    return {**meta, "architecture": {**meta["architecture"], "mirror": False}}


def test_an_option_a_probe_never_uses_is_refused_where_it_is_given_not_in_shared_defaults():
    """A probe ran bit-identical with any --lr, --epochs, --optimizer, --crop and the rest: the
    options were accepted and recorded without a word. A recipe's defaults and --set, which
    every step shares, still set them for the steps that train for epochs."""
    from transferlab.config import PROBE_IGNORES, TrainConfig, UserError, make_config
    from transferlab.recipebook import train_config

    values = {"epochs": 3, "batch_size": 8, "optimizer": "sgd", "lr": 0.5, "weight_decay": 0.3,
              "schedule": "constant", "warmup_epochs": 0.5, "label_smoothing": 0.2, "crop": "rrc", "crop_pad": 2, "checkpoint_every": 5}  # fmt: skip
    assert set(values) == set(PROBE_IGNORES)
    for key, value in values.items():
        with pytest.raises(UserError, match=f"^{key} has no effect with strategy linear-probe"):
            make_config({"strategy": "linear-probe", key: value})
        make_config({"strategy": "linear-probe", key: getattr(TrainConfig(), key)})  # a no-op
        make_config({"strategy": "lp-ft", key: value})  # its fine-tune uses it
    recipe = {
        "data": "digits",
        "defaults": {"epochs": 5, "lr": 0.001},
        "overrides": {"crop": "rrc"},
    }
    assert train_config(recipe, {"strategy": "linear-probe"}).epochs == 5  # (unused: shared)
    with pytest.raises(UserError, match="^epochs has no effect with strategy linear-probe"):
        train_config(recipe, {"strategy": "linear-probe", "epochs": 3})


def test_a_probe_logs_and_draws_its_l2_strengths_not_epochs(trained_run, tmp_path, monkeypatch):
    """--log-json of a linear probe stayed empty, and curves.png drew its L2 strengths as
    "epoch" 1..4 (meta.json: epochs_run 0)."""
    import json

    from transferlab import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append((fig, path.name)))
    cfg = strategies.finetune_config(trained_run, {"strategy": "linear-probe"})
    trainer.fit(cfg, tmp_path / "p", quiet=True, log_json=tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    history = (tmp_path / "p" / "history.csv").read_text().splitlines()[1:]  # a row a strength
    assert [r["event"] for r in rows] == ["probe"] * len(history) and len(history) > 1
    assert all(r["lr"] is None for r in rows)  # a regression has no learning rate (it read 0.0)
    curves = next(fig for fig, name in figures if name == "curves.png")
    assert {(ax.get_xlabel(), ax.get_xscale()) for ax in curves.axes} == {
        ("probe L2 strength (standardised features)", "log")
    }


def test_a_fine_tune_of_a_probe_given_epochs_asks_for_a_strategy(trained_run, tmp_path):
    """Hostile pass 25: `finetune --from PROBE --epochs 3` was told to "choose another strategy"
    that the user never chose: a fine-tune keeps its parent's, here linear-probe."""
    from transferlab.config import UserError

    probe = tmp_path / "probe"
    trainer.fit(strategies.finetune_config(trained_run, {"strategy": "linear-probe"}), probe, quiet=True)  # fmt: skip
    with pytest.raises(UserError, match="is a linear probe, and a fine-tune keeps its strategy unless told: pass --strategy full"):  # fmt: skip
        strategies.finetune_config(probe, {"epochs": 3})
    assert strategies.finetune_config(probe, {"epochs": 3, "strategy": "full"}).epochs == 3
    # pass 59: told linear-probe with --epochs, a fine-tune of a run trained in full was told
    # its parent "is a linear probe" and to pass --strategy full: what train says instead
    for parent in (trained_run, probe):
        with pytest.raises(UserError, match="^epochs has no effect with strategy linear-probe: it fits its head by L-BFGS"):  # fmt: skip
            strategies.finetune_config(parent, {"epochs": 3, "strategy": "linear-probe"})
    # pass 61: a recipe's probe fine-tune step refused the epochs its defaults (or --set) give
    # every step, after the steps before it had trained; its own epochs are refused up front
    for extra, said in ({"momentum": 0.5}, r"momentum has no effect here: it needs an optimizer: strategy full \(or lp-ft, ...\) with optimizer sgd"), ({"snapshots": 2}, "snapshots need the cosine"):  # fmt: skip
        with pytest.raises(
            UserError, match=said
        ):  # pass 61: "needs optimizer sgd", "divide epochs"
            strategies.finetune_config(trained_run, {"strategy": "linear-probe", **extra})
    told = {"epochs": 3, "strategy": "linear-probe"}
    assert strategies.finetune_config(trained_run, told, {"strategy": "linear-probe"}).strategy == "linear-probe"  # fmt: skip
    from transferlab import recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"steps: [{{finetune: c, from: {trained_run}, strategy: linear-probe, epochs: 2}}]\n")  # fmt: skip
    with pytest.raises(UserError, match=r"^step 1 \(finetune c\): epochs has no effect with strategy linear-probe"):  # fmt: skip
        recipe.validate(recipe.load(path))
