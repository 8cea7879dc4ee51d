"""lrfind: the LR range test."""

import json

import numpy as np
import pytest
import torch

from transferlab import batching, models, strategies
from transferlab.config import UserError, make_config


def test_lr_find_suggests_a_rate_leaves_the_model_untouched_and_drives_lr_auto(
    folder_data, tmp_path
):
    from transferlab import lrfind, trainer

    from conftest import tiny_cfg

    assert lrfind.suggest([1e-4, 1e-3, 1e-2, 1e-1], [2.0, 1.5, 1.0, 9.0]) == pytest.approx(1e-3)
    cfg = tiny_cfg(f"folder:{folder_data}", lr="auto", epochs=1)
    lr = lrfind.command(cfg, tmp_path / "lrf", quiet=True)
    assert 1e-6 < lr < 1.0 and (tmp_path / "lrf" / "lr_find.png").stat().st_size > 0
    # hostile pass 28: another model's or data's range test in that folder was replaced silently
    with pytest.raises(UserError, match=f"lrf holds the range test of {cfg.model} on folder:{folder_data}: choose another --out"):  # fmt: skip
        lrfind.command(tiny_cfg("digits", lr="auto", epochs=1), tmp_path / "lrf", quiet=True)
    lrfind.command(cfg, tmp_path / "lrf", quiet=True)  # the same test again: replaced
    # the range test trains a throw-away copy: the model's weights, BN statistics and the RNG
    # come back exactly as they were
    model = models.create("test_resnet", 4, 3)
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    images = np.random.default_rng(0).integers(0, 255, (32, 24, 24, 3), dtype=np.uint8)
    prep = models.Preprocessing.make(24, 3, (0.5,) * 3, (0.25,) * 3)
    lrfind.range_test(
        model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), images,
        np.arange(32) % 4, 8, batching.Augment(), prep, "fp32", [], steps=5,
    )  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    meta = trainer.fit(cfg, tmp_path / "auto", quiet=True)  # the same test runs first
    assert (tmp_path / "auto" / "lr_find.png").exists()
    history = (tmp_path / "auto" / "history.csv").read_text()
    assert meta["epochs_run"] == 1 and history
    # hostile pass 38: a fine-tune of a --lr auto run started at 1e-3 / 10, not at a tenth of
    # the LR its parent trained at
    found = json.loads((tmp_path / "auto" / "lr_find.json").read_text())["suggested_lr"]
    assert found != 1e-3 and strategies.finetune_config(tmp_path / "auto", {}).lr == found / 10
    # hostile pass 39: with lr_find.json gone or damaged it fell back to 1e-3 / 10 unsaid
    for text in (None, "garbage{", '{"suggested_lr": -5}'):
        lr_file = tmp_path / "auto" / "lr_find.json"
        lr_file.unlink() if text is None else lr_file.write_text(text)
        with pytest.raises(UserError, match=f"auto trained with --lr auto, and {lr_file}, which .* is missing or damaged: give the fine-tune an --lr"):  # fmt: skip
            strategies.finetune_config(tmp_path / "auto", {})
        assert strategies.finetune_config(tmp_path / "auto", {"lr": 0.02}).lr == 0.02
    with pytest.raises(Exception, match="number or auto"):
        make_config({"lr": "fast"})


def test_lr_find_on_a_linear_probe_is_refused_and_a_range_without_a_minimum_says_so(
    folder_data, tmp_path, capsys, monkeypatch
):
    """A linear probe is fitted by regression: lr-find "suggested lr 0.1" for it, the range's
    end tenthed, as it did for any run whose loss still fell at the range's end (21 images)."""
    from transferlab import lrfind
    from transferlab.config import UserError

    from conftest import tiny_cfg

    with pytest.raises(UserError, match="lr has no effect here: .*L-BFGS"):  # train --lr auto
        tiny_cfg(f"folder:{folder_data}", strategy="linear-probe", lr="auto")
    cfg = tiny_cfg(f"folder:{folder_data}", strategy="linear-probe")  # as lr-find makes it
    with pytest.raises(UserError, match="no learning rate to find"):
        lrfind.command(cfg, tmp_path / "probe", quiet=True)
    assert not (tmp_path / "probe").exists()
    falling = lambda *a, **kw: ([1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.5, 1.0, 0.5])  # noqa: E731
    monkeypatch.setattr(lrfind, "range_test", falling)
    cfg = tiny_cfg(f"folder:{folder_data}", lr="auto", epochs=1)
    assert lrfind.command(cfg, tmp_path / "lrf", quiet=True) == pytest.approx(0.1)
    said = capsys.readouterr()
    assert "the loss still fell at the end of the range (lr 1)" in said.err and "--lr" in said.err
    # pass 59: it ended "suggested lr 0.1", said as a fit, and train --lr auto trains at 0.001
    assert said.out == f"suggested lr 0.1 (no minimum: a guess, see the note)  (plot: {tmp_path / 'lrf' / 'lr_find.png'})\n"  # fmt: skip
    assert "(--lr auto trains at 0.001, train's default LR, instead)" in said.err
    assert "not of a minimum" in (tmp_path / "lrf" / "lr_find.json").read_text()
    # pass 58: train --lr auto trained at that 0.1, which the note called unreliable, and
    # diverged (val loss 1309666): it trains at the default, and a fine-tune starts from that
    from transferlab import trainer

    used, make = [], strategies.make_optimizer
    monkeypatch.setattr(strategies, "make_optimizer", lambda c, g, lr: used.append(lr) or make(c, g, lr))  # fmt: skip
    trainer.fit(cfg, tmp_path / "fell", quiet=True)
    assert used == [1e-3] and "(--lr auto trains at 0.001, train's default LR, instead)" in capsys.readouterr().err  # fmt: skip
    assert strategies.finetune_config(tmp_path / "fell", {}).lr == pytest.approx(1e-4)
    # it decoded val and test (Tiny ImageNet's 10,000 test images) and noted --limit's classes
    # without a test image, though a range test reads train only
    from transferlab import decoding

    read, decode = [], decoding.decode_checked
    monkeypatch.setattr(decoding, "decode_checked", lambda *a, **kw: read.append(a[5]) or decode(*a, **kw))  # fmt: skip
    lrfind.command(tiny_cfg(f"folder:{folder_data}", limit=2), tmp_path / "lim", quiet=True)
    err = capsys.readouterr().err
    assert read == ["decode train"] and "have no train image" in err
    assert "test image" not in err and "val image" not in err


def test_its_log_axis_prints_no_font_lookups(tmp_path):
    """`lr-find --quiet` printed matplotlib's "findfont: Font family ['cmex10'] not found"
    lines (mathtext's fonts, absent from a slim install): a fresh process, as a user runs it."""
    import subprocess
    import sys

    code = ("from pathlib import Path; from transferlab import plots; "
            f"plots.lr_find([1e-5, 1e-3, 1e-1], [2.0, 1.0, 3.0], 1e-3, Path({str(tmp_path)!r}) / 'lr.png', 't')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (tmp_path / "lr.png").is_file(), done.stderr
    assert "findfont" not in done.stderr


def test_lr_find_under_torchrun_is_one_line_and_makes_no_folder(tmp_path, capsys, monkeypatch):
    """Under torchrun each process claimed the folder: one said "in use by another transferlab
    process", the other was stopped, and a folder holding only the lock was left."""
    from transferlab.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets in each process
    argv = ["lr-find", "--data", "digits", "--model", "dcnn", "--out", str(tmp_path / "lrf")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lr-find runs in one process: run it without torchrun" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "lrf").exists()


def test_lr_auto_resumed_with_no_checkpoint_runs_its_range_test(folder_data, tmp_path, capsys, monkeypatch):  # fmt: skip
    """Hostile pass 60 (F3): killed before its first checkpoint, a --lr auto run resumed said
    "nothing to resume" after its range test; with state/ there but empty it trained at 1e-3."""
    from transferlab import lrfind, trainer

    from conftest import tiny_cfg

    before = []  # what was said before each range test

    def ranged(*a, **kw):
        before.append(capsys.readouterr().err)
        return [1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.5, 1.0, 9.0]

    monkeypatch.setattr(lrfind, "range_test", ranged)
    used, make = [], strategies.make_optimizer
    monkeypatch.setattr(strategies, "make_optimizer", lambda c, g, lr: used.append(lr) or make(c, g, lr))  # fmt: skip
    cfg, out = tiny_cfg(f"folder:{folder_data}", lr="auto", epochs=1), tmp_path / "r"
    trainer.fit(cfg, out, quiet=True)
    for path in [out / "meta.json", *(out / "state").iterdir()]:  # killed before any checkpoint
        path.unlink()
    trainer.fit(cfg, out, resume=True)
    assert used == [pytest.approx(1e-2)] * 2 and (out / "meta.json").is_file()
    assert len(before) == 2 and "nothing to resume in" in before[1]
