"""Resume: a run continues bitwise where it stopped, within a stage or between stages."""

import pytest
import torch
from safetensors.torch import load_file

from transferlab import probe, strategies, trainer
from transferlab.config import make_config
from transferlab.resume import Progress

from conftest import tiny_cfg


def test_lp_ft_resumes_in_the_fine_tune_stage_without_probing_again(
    trained_run, tmp_path, monkeypatch
):
    from transferlab import trainer

    overrides = {"strategy": "lp-ft", "probe_l2": 0.01, "epochs": 2, "schedule": "constant"}
    cfg = strategies.finetune_config(trained_run, overrides)
    full = trainer.fit(cfg, tmp_path / "full", quiet=True)
    assert full["probe"]["l2"] == 0.01 and full["epochs_run"] == 2
    assert not (tmp_path / "full" / "features").exists()  # fine-tuned: probe features are stale
    # a run that died after its probe and one fine-tune epoch
    trainer.fit(
        strategies.finetune_config(trained_run, {**overrides, "epochs": 1}),
        tmp_path / "r",
        quiet=True,
    )
    for name in ("meta.json", "model.safetensors"):
        (tmp_path / "r" / name).unlink()

    def no_second_probe(*args, **kwargs):
        raise AssertionError("the probe ran again after resume")

    monkeypatch.setattr(probe, "linear_probe", no_second_probe)
    resumed = trainer.fit(cfg, tmp_path / "r", resume=True, quiet=True)
    assert resumed["epochs_run"] == 2
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "r"))
    assert all(torch.equal(a[k], b[k]) for k in a)


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


def test_resume_after_an_epoch_equals_an_uninterrupted_run(folder_data, tmp_path):
    cfg = tiny_cfg(f"folder:{folder_data}", epochs=2, schedule="constant")
    trainer.fit(cfg, tmp_path / "full", quiet=True)
    # a run that died after epoch 1: its state is there, its final files are not
    trainer.fit(make_config({"epochs": 1}, cfg), tmp_path / "r", quiet=True)
    for name in ("meta.json", "model.safetensors"):
        (tmp_path / "r" / name).unlink()
    resumed = trainer.fit(cfg, tmp_path / "r", resume=True, quiet=True)
    assert resumed["epochs_run"] == 2
    full, again = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "r"))
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_progress_round_trips_and_reads_checkpoints_from_before_plans():
    p = Progress(stage=1, epoch=3, step=2, global_step=9, losses=[1.0, 0.5])
    assert Progress.from_state(p.to_state()) == p
    # an lp-ft checkpoint saved before plans recorded `probed` instead of the stage index
    assert Progress.from_state({"probed": True, "epoch": 2}).stage == 1
    assert Progress.from_state({"probed": False, "epoch": 1}).stage == 0


def test_stats_read_from_the_device_every_few_steps_change_nothing_and_resume_exactly(
    folder_data, tmp_path, monkeypatch
):
    """Issue 20.2: on a GPU each step's loss stays on the device and is read every N steps (here
    forced on the CPU: N=4, a checkpoint due every 5 steps): the same losses, step events,
    weights, checkpoints and exact resume as reading every step, with fewer host reads."""
    import json

    from transferlab import checkpoint
    from transferlab.config import Preempted

    saved, save = [], checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *a: saved.append(a[2]) or save(*a))
    cfg = tiny_cfg(f"folder:{folder_data}", epochs=2, checkpoint_every=5)
    trainer.fit(cfg, tmp_path / "each", log_json=tmp_path / "each.jsonl", quiet=True)
    saved_each, saved[:] = list(saved), []
    reads, real = [], trainer.read_steps
    monkeypatch.setattr(trainer, "host_sync_every", lambda dev: 4)
    monkeypatch.setattr(trainer, "read_steps", lambda *a: reads.append(len(a[1])) or real(*a))
    trainer.fit(cfg, tmp_path / "grouped", log_json=tmp_path / "grouped.jsonl", quiet=True)
    steps = 2 * -(-108 // 16)
    assert sum(reads) == steps and len([r for r in reads if r]) < steps  # grouped reads
    assert saved == saved_each and 5 in saved  # each checkpoint at its step
    a, b = ([json.loads(x) for x in open(tmp_path / f"{d}.jsonl")] for d in ("each", "grouped"))
    drop = {"seconds", "time", "elapsed"}
    assert [{k: v for k, v in e.items() if k not in drop} for e in a] == [
        {k: v for k, v in e.items() if k not in drop} for e in b
    ]
    w = [load_file(tmp_path / d / "model.safetensors") for d in ("each", "grouped")]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    monkeypatch.setenv("TRANSFERLAB_FAULT", "term:9")  # pre-empted in epoch 2, mid-group
    with pytest.raises(Preempted, match="step"):
        trainer.fit(cfg, tmp_path / "r", quiet=True)
    monkeypatch.delenv("TRANSFERLAB_FAULT")
    trainer.fit(cfg, tmp_path / "r", resume=True, quiet=True)
    r = load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(w[0][k], r[k]) for k in r)


def test_a_resume_on_data_whose_files_changed_is_refused(
    folder_data, tmp_path, monkeypatch, capsys
):
    """Images added after a kill: --resume carved the splits anew without a word, so images it
    had trained on were scored as val and test, and its place in the epoch indexed others."""
    import shutil

    from transferlab.cli import main
    from transferlab.config import Preempted, UserError

    (data := tmp_path / "data").mkdir()
    shutil.copytree(folder_data / "train", data / "train")
    shutil.copytree(folder_data / "test", data / "test")
    cfg = tiny_cfg(f"folder:{data}", epochs=2)
    monkeypatch.setenv("TRANSFERLAB_FAULT", "term:3")
    with pytest.raises(Preempted):
        trainer.fit(cfg, tmp_path / "r", quiet=True)
    monkeypatch.delenv("TRANSFERLAB_FAULT")
    added = data / "train" / "a" / "added.png"
    shutil.copy(next((data / "test" / "b").iterdir()), added)
    (data / "train" / "a" / "notes.txt").write_text("a file it skips, with a note")
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    with pytest.raises(UserError, match=r"cannot resume .*: the files of folder:.* changed since"):
        trainer.fit(cfg, tmp_path / "r", resume=True, quiet=True)
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "r"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()  # one line: before the note of the file it skips
    assert len(err.splitlines()) == 1 and "changed since it began" in err
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before  # as it was
    added.unlink()  # the data as they were: it resumes
    assert trainer.fit(cfg, tmp_path / "r", resume=True, quiet=True)["epochs_run"] == 2
