import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from transferlab import models
from transferlab.config import UserError, make_config


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


def test_weights_file_loads_and_strips_ddp_prefixes(tmp_path):
    cfg = make_config({"model": "test_resnet", "input_size": 32})
    src = models.create("test_resnet", 4, 3)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        cfg2 = make_config({"weights": str(tmp_path / name)}, cfg)
        model, prep, source = models.build(cfg2, ["a", "b", "c", "d"], 32, 3)
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        assert source["weights"] == "file"


def test_wrong_architecture_names_keys(tmp_path):
    save_file(
        {k: v.contiguous() for k, v in models.create("dcnn", 4, 3).state_dict().items()},
        tmp_path / "dcnn.safetensors",
    )
    cfg = make_config({"model": "test_resnet", "weights": str(tmp_path / "dcnn.safetensors")})
    with pytest.raises(UserError, match="weights do not fit the model: missing .*unexpected"):
        models.build(cfg, ["a", "b"], 32, 3)


def test_nan_weights_are_refused(tmp_path):
    state = models.create("dcnn", 4, 3).state_dict()
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "nan.safetensors")
    cfg = make_config(
        {"model": "dcnn", "channels": 3, "weights": str(tmp_path / "nan.safetensors")}
    )
    with pytest.raises(UserError, match="NaN/Inf in tensor features.0.weight"):
        models.build(cfg, ["a", "b", "c", "d"], 32, 3)


def test_hub_weights_fail_fast_and_clearly_when_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    t0 = time.time()
    with pytest.raises(
        UserError, match="cannot download ImageNet weights for resnet18.*unreachable"
    ):
        models.build(make_config({"model": "resnet18", "weights": "imagenet"}), ["a"], 64, 3)
    assert time.time() - t0 < 10


def _china(size: int) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    im = Image.fromarray(load_sample_image("china.jpg"))
    from transferlab.decoding import resize

    return np.asarray(resize(im, size, "bicubic"))[None]


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_offline_efficientnet_lite_weights_are_really_imagenet(arch):
    """On scikit-learn's photo of a Chinese temple, the top-5 ImageNet classes are plausible."""
    from transferlab.evaluate import predict

    classes = models.imagenet_wnids()
    cfg = make_config({"model": arch, "weights": "imagenet"})
    model, prep, source = models.build(cfg, classes, 224, 3)
    assert prep["mean"] == [0.5] * 3 and source["weights"] == "imagenet"
    logits = predict(model, _china(prep["input_size"]), prep)
    names = models.imagenet_names()
    top5 = [names[i] for i in np.argsort(-logits[0])[:5]]
    plausible = (
        "palace",
        "monastery",
        "pagoda",
        "church",
        "dome",
        "bell cote",
        "stupa",
        "boathouse",
        "castle",
        "mosque",
        "cinema",
        "triumphal arch",
    )
    assert any(any(p in n.lower() for p in plausible) for n in top5[:2]), top5


def test_grayscale_input_adapts_pretrained_first_conv():
    cfg = make_config(
        {"model": "tf_efficientnet_lite0", "weights": "imagenet", "channels": 1, "input_size": 64}
    )
    model, prep, _ = models.build(cfg, ["a", "b"], 64, 1)
    rgb, _, _ = models.build(make_config({"channels": 3}, cfg), ["a", "b"], 64, 3)
    assert model.conv_stem.weight.shape[1] == 1 and prep["channels"] == 1
    assert torch.allclose(model.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))
