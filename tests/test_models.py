"""Architectures and their records: the DCNN on timm's head contract, pooled stages, the one
forward (`models.logits`: the head in fp32, no patched methods, no hooks), and the typed
Preprocessing / Architecture records, old run folders included."""

import pytest
import torch

from transferlab import evaluate, models, trainer, weights
from transferlab.config import UserError
from transferlab.distributed import Dist

from conftest import tiny_cfg


def test_dcnn_follows_timm_head_contract():
    m = models.DCNN(num_classes=5, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    feats = m.forward_features(x)
    assert feats.shape == (2, 256, 2, 2)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    assert m(x).shape == (2, 5)
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.get_classifier().out_features == 7
    assert models.head_keys(m) == {"fc.weight", "fc.bias"}


def test_dcnn_uses_glorot_uniform_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    m = models.DCNN(10, 3)
    w = m.features[0].weight
    fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    m(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="did you mean.*resnet50"):
        models.check_arch("resnet05")
    with pytest.raises(UserError, match="unknown model 'DCNN' \\(did you mean dcnn"):
        models.check_arch("DCNN")  # case: a name typed in capitals finds its own
    with pytest.raises(
        UserError, match="resnet18 has no pretrained tag '' \\(timm knows: .*a1_in1k"
    ):
        models.check_arch("resnet18.")  # a stray dot: not a hub download of an empty tag


def test_pooled_stages_widen_only_the_head_and_a_matched_head_starts_as_the_source(
    tmp_path, folder_data
):
    torch.manual_seed(0)
    src = models.create("test_resnet", 3, 3).eval()
    wide = models.create("test_resnet", 3, 3, pool_stages=2).eval()
    stages = wide.feature_info[-3:-1]  # the last stage is the final feature map: skipped
    assert [wide.feature_info[i]["module"] for i in wide.pooled_stages] == [
        s["module"] for s in stages
    ]
    assert wide.fc.in_features == src.num_features + sum(s["num_chs"] for s in stages)
    weights.load_into(wide, src.state_dict(), ["c", "x", "a"], ["a", "b", "c"], "match")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = models.logits(wide, x, pre_logits=True)
        assert feats.shape == (2, wide.fc.in_features)
        torch.testing.assert_close(models.logits(wide, x)[:, [0, 2]], src(x)[:, [2, 0]])
    # a run trained with pooled stages is rebuilt from its preprocessing when evaluated
    meta = trainer.fit(tiny_cfg(f"folder:{folder_data}", epochs=1, pool_stages=1), tmp_path / "r")
    assert meta["architecture"]["pool_stages"] == 1 and "pool_stages" not in meta["preprocessing"]
    assert evaluate.load_run_model(tmp_path / "r", meta).fc.in_features > src.num_features
    # bf16 on a CPU: the check for a bf16 gradient trap ran the plain timm forward into the
    # widened head (a shape-mismatch traceback, every strategy that trains the network)
    cfg = tiny_cfg(f"folder:{folder_data}", epochs=1, pool_stages=1, precision="bf16")
    assert trainer.fit(cfg, tmp_path / "bf16")["architecture"]["pool_stages"] == 1


def test_logits_keep_the_head_in_fp32_under_bf16_with_no_patched_method_and_no_hook():
    torch.manual_seed(0)
    for pool in (0, 2):
        m = models.create("test_resnet", 3, 3, pool_stages=pool).eval()
        assert m.forward_head.__func__ is type(m).forward_head  # the class's own, unpatched
        assert not any(mod._forward_hooks for mod in m.modules())  # nothing stores tensors
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            for pre_logits in (False, True):
                y = models.logits(m, x, "bf16", pre_logits)
                assert y.dtype == torch.float32, (pool, pre_logits)
            # in fp32 the explicit forward is the model's own forward (pool 0) exactly
            if not pool:
                assert torch.equal(models.logits(m, x), m(x))
            assert torch.equal(models.Forward(m)(x), models.logits(m, x))


def test_preprocessing_and_architecture_records_read_old_and_new_run_folders():
    old = {  # a meta.json from before the split: stem and pool_stages in the preprocessing
        "arch": "resnet18",
        "num_classes": 4,
        "preprocessing": {"input_size": 64, "channels": 3, "mean": [0.5] * 3,
                          "std": [0.5] * 3, "interpolation": "bicubic", "stem": "small",
                          "pool_stages": 2},
    }  # fmt: skip
    arch = models.Architecture.of_run(old)
    assert arch == models.Architecture("resnet18", "small", 2)
    prep = models.Preprocessing.from_dict(old["preprocessing"])
    assert prep == models.Preprocessing(64, 3, (0.5,) * 3, (0.5,) * 3, "bicubic")
    new = {"arch": "resnet18", "architecture": arch.to_dict(), "preprocessing": prep.to_dict()}
    assert models.Architecture.of_run(new) == arch and "stem" not in new["preprocessing"]
    assert models.Preprocessing.from_dict(new["preprocessing"]) == prep
    model = models.for_run({**old, "num_classes": 4})
    assert model.conv1.stride == (1, 1) and len(model.pooled_stages) == 2
    assert models.Preprocessing.make(32, 1, [0.5], [0.5], "random").interpolation == "bilinear"


def _noisy_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Running statistics and affine parameters far from the identity (a fresh BN is one)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_resnet", "dcnn"])
def test_folded_batchnorms_leave_the_features_unchanged_and_the_model_untouched(arch):
    torch.manual_seed(0)
    m = _noisy_norms(models.create(arch, 3, 3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    folded = models.fold_batchnorm(m, 32)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in folded.modules())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = models.logits(m, x, pre_logits=True)
        torch.testing.assert_close(models.logits(folded, x, pre_logits=True), want)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # a copy folded
    if arch == "test_efficientnet":  # timm's BatchNormAct2d keeps its activation
        assert any(isinstance(x, (torch.nn.ReLU, torch.nn.SiLU)) for x in folded.modules())
    next(p for p in m.parameters() if p.dim() == 4).data.fill_(float("nan"))  # a diverged run's
    assert models.fold_batchnorm(m, 32) is m  # weights: left unfolded (allclose raised on NaN)


def test_a_convolution_whose_output_is_used_elsewhere_too_is_not_folded():
    class Shared(torch.nn.Module):  # bn(conv(x)) + conv(x): folding would change the sum
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

        def forward_features(self, x):
            y = self.conv(x)
            return self.bn(y) + y

        def forward_head(self, x, pre_logits=False):
            return x.mean((2, 3))

    m = _noisy_norms(Shared())
    assert models.fold_batchnorm(m, 8) is m


def test_auto_precision_trains_in_fp32_where_a_cpu_bf16_conv_gradient_can_turn_nan(
    tmp_path, monkeypatch, capsys
):
    """oneDNN's bf16 weight gradient of a strided 3x3 convolution on maps 1 pixel high is NaN
    in the taps that see only padding (resnet50 on 8-px digits, a Xeon with AMX): --precision
    auto trains such a model in fp32 and says why; --precision bf16 is kept, and said."""
    import timm

    r50 = timm.create_model("resnet50", num_classes=10)
    assert models.bf16_grad_trap(r50, 16) == "layer4.0.conv2" and r50.training
    assert models.bf16_grad_trap(r50, 20) == models.bf16_grad_trap(r50, 224) == ""
    lite = timm.create_model("tf_efficientnet_lite0", num_classes=10)  # depthwise: exact
    assert models.bf16_grad_trap(lite, 8) == ""

    monkeypatch.setattr(evaluate, "bf16_supported", lambda: True)
    meta = trainer.fit(tiny_cfg("digits", precision="auto", input_size=8, epochs=1, limit=64),
                       tmp_path / "auto", quiet=True)  # fmt: skip
    err = capsys.readouterr().err
    assert meta["precision"] == "fp32" and "precision fp32, not bf16" in err
    assert "(layer3.0.conv2)" in err
    meta = trainer.fit(tiny_cfg("digits", precision="auto", input_size=32, epochs=1, limit=64),
                       tmp_path / "large", quiet=True)  # fmt: skip
    assert meta["precision"] == "bf16" and "NaN" not in capsys.readouterr().err
    said = []  # asked for: kept, and said (not trained here: its NaN comes at random steps)
    loop = trainer.setup(tiny_cfg("digits", precision="bf16", input_size=8, epochs=1, limit=64),
                         tmp_path / "asked", lambda *a, **k: said.append(a[0]), Dist(0, 1))  # fmt: skip
    assert loop.precision == "bf16" and "--precision fp32 or a larger" in " ".join(said)
