"""The Python API, mirroring the CLI: train, load, predict, ensemble, soup, export.

import transferlab
run = transferlab.train("runs/lite0", data="digits", model="tf_efficientnet_lite0",
                        weights="imagenet", input_size=32, epochs=3)
print(run.metrics["test"]["top1"])
run.predict(["photo.jpg", "holiday/"], top_k=3)      # [{"path", "predictions": [...]}, ...]
run.predict(pil_image)  or  run.predict(uint8_array)  # in-memory images too
ft = transferlab.finetune(run, "runs/lite0-ft", data="folder:photos", epochs=5)
ens = transferlab.ensemble([run, "runs/dcnn"], method="weighted", out="runs/ens")
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import stops


@dataclass(frozen=True)
class Model:
    """A finished run or ensemble folder: its numbers, classes, and predict/evaluate/export."""

    path: Path

    def __post_init__(self):  # absolute: after os.chdir (a notebook's), "r" was another run
        path = _path(self.path, "Model() takes the path of a run or ensemble folder")
        object.__setattr__(self, "path", Path(os.path.abspath(path)))

    @property
    def is_ensemble(self) -> bool:
        from . import ensembles

        return ensembles.is_ensemble(self.path)

    @property
    def info(self) -> dict:
        """meta.json of a run, ensemble.json of an ensemble."""
        from . import checkpoint, ensembles

        return ensembles.read(self.path) if self.is_ensemble else checkpoint.read_meta(self.path)

    @property
    def metrics(self) -> dict:
        return self.info["metrics"]

    @property
    def classes(self) -> list[str]:
        return self.info["class_names"]

    def predict(self, images, top_k: int = 5, tta: str | None = None, quiet: bool = True) -> list:
        """Top-k predictions for image files, folders, PIL images or arrays (uint8, or float
        in [0, 1]; (H, W[, C]) or a batch (N, H, W[, C])): one of them or a list."""
        from . import predict
        from .config import UserError

        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool):  # (the CLI's is
            raise UserError(f"top_k must be a whole number, got {top_k!r}")  # parsed; np.int64 too)
        top_k = int(top_k)
        _flags(quiet=quiet)
        inputs = list(images) if isinstance(images, (list, tuple)) else [images]
        with _api_words():  # ("--top-k must be at least 1")
            return predict.predict(self.path, inputs, top_k, tta, quiet)[0]

    def evaluate(
        self, split: str = "test", data: str | None = None, tta: str | None = None
    ) -> dict:
        """As `transferlab evaluate`: its metrics, and under "notes" what a reader of them must
        know (test images a member trained on, a val score a combiner was fitted on), as the
        CLI says them (they were dropped: the score read as held out)."""
        from . import ensembles

        with _api_words():
            result = ensembles.evaluate_path(self.path, data, split, True, tta)
        return result["metrics"] | {"notes": result["notes"]}

    def export(
        self,
        format: str,
        out: str | Path | None = None,
        overwrite: bool = False,
        input_size: int | None = None,
    ) -> dict:
        """As `transferlab export`: a run in `format` (onnx, torchscript, safetensors, hf), an
        ensemble as one ONNX graph (`input_size`: its input, else its largest member's)."""
        from . import shipping
        from .config import UserError

        _flags(overwrite=overwrite)
        if not isinstance(format, str):
            raise UserError(f"format is one of onnx, torchscript, safetensors, hf, not {format!r}")
        if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral)):  # fmt: skip
            raise UserError(f"input_size is a whole number of pixels, not {input_size!r}")
        out = None if out is None else _path(out, "out is the path of the file to write")
        with _api_words():  # ("pass --overwrite to replace it")
            return shipping.export_any(self.path, format, out, overwrite, input_size)

    def __fspath__(self) -> str:
        return str(self.path)


def load(path: str | Path) -> Model:
    """A finished run or ensemble folder."""
    from . import checkpoint, ensembles
    from .config import UserError

    path = _path(path, "load() takes the path of a run or ensemble folder")
    if not ensembles.is_ensemble(path):
        checkpoint.read_meta(path)  # a clear error when it is neither
    if not path.is_dir():
        raise UserError(f"not a run or ensemble folder: {path}")
    return Model(path)


def train(
    out: str | Path, data: str | None = None, quiet: bool = True, resume: bool = False,
    overwrite: bool = False, log_json: str | Path | None = None, **config,
) -> Model:  # fmt: skip
    """Train one model on `data` (a spec: folder:PATH, csv:FILE, ...) into the run folder `out`
    (`resume` a stopped one, `overwrite` one there; `log_json`: the CLI's --log-json); keyword
    arguments are TrainConfig fields (the CLI's --options: model, weights, strategy, epochs, lr,
    ...). Resumed, as `train --out R --resume`, the run's own options stand where none is
    given."""
    from . import resume as resuming
    from . import trainer
    from .config import UserError, make_config

    _flags(quiet=quiet, resume=resume, overwrite=overwrite)
    out = _path(out, "train() needs out=, the run folder to write")
    started = resuming.started_with(out) if resume else None
    if not data and not resume:  # (resumed: its own, or "does not exist" said by fit)
        raise UserError("train() needs data=..., e.g. data='folder:photos' or data='digits'")
    log_json = None if log_json is None else _path(log_json, "log_json is a file to write")
    with _api_words():
        cfg = make_config({**config, **({"data": data} if data else {})}, started)
        trainer.fit(cfg, out, resume, overwrite, quiet, log_json)
    return Model(Path(out))


def finetune(
    run: str | Path | Model, out: str | Path, quiet: bool = True, resume: bool = False,
    overwrite: bool = False, log_json: str | Path | None = None, **config,
) -> Model:  # fmt: skip
    """Continue training from a finished run into `out` (the CLI's `finetune --from RUN`): its
    data, architecture and preprocessing unless overridden, at a tenth of its LR; new data with
    other classes gets a new head."""
    from . import resume as resuming
    from . import trainer

    _flags(quiet=quiet, resume=resume, overwrite=overwrite)
    run = _path(run, "finetune() starts from a finished run: its folder, or a Model")
    out = _path(out, "finetune() needs out=, the run folder to write")
    log_json = None if log_json is None else _path(log_json, "log_json is a file to write")
    with _api_words():  # (resumed: its own options where none is given, as the CLI's)
        cfg = resuming.finetune_config(os.fspath(run), config, out if resume else None)
        trainer.fit(cfg, out, resume, overwrite, quiet, log_json)
    return Model(Path(out))


def ensemble(
    runs: list, method: str = "soft", out: str | Path = "runs/ensemble", tta: str = "none",
    quiet: bool = True, overwrite: bool = False,
) -> Model:  # fmt: skip
    """Combine runs (any architectures, input sizes, channels) into the ensemble folder `out`
    (an existing ensemble there is replaced only with `overwrite`)."""
    from . import ensembles

    _flags(quiet=quiet, overwrite=overwrite)
    out = _path(out, "ensemble() needs out=, the ensemble folder to write")
    with _api_words():
        ensembles.build(_runs(runs, "ensemble"), method, out, None, quiet, tta, overwrite)
    return Model(Path(out))


def soup(runs: list, method: str = "greedy", out: str | Path = "runs/soup", overwrite: bool = False) -> Model:  # fmt: skip
    """Average the weights of runs fine-tuned from one start into the run folder `out` (a run
    there is replaced only with `overwrite`)."""
    from . import soups

    out = _path(out, "soup() needs out=, the run folder to write")
    _flags(overwrite=overwrite)
    with _api_words():  # ("choose another --out")
        soups.make(_runs(runs, "soup"), method, out, quiet=True, overwrite=overwrite)
    return Model(Path(out))


@contextlib.contextmanager
def _api_words():
    """The CLI's flags in an error, as this API's keywords: "pass --resume ... or --overwrite"
    named options train() lacked."""
    from .config import UserError

    try:
        yield
        stops.say_later()  # (the notes that waited for every refusal)
    except UserError as err:
        stops.LATER.clear()
        said = re.sub(r"--(resume|overwrite)\b", r"\1=True", str(err)).replace("--log-json", "log_json")  # fmt: skip
        said = re.sub(
            r"--(format|out|input-size|top-k|tta)\b", lambda m: m[1].replace("-", "_"), said
        )
        if type(err) is not UserError or said == str(err):
            raise
        raise UserError(said) from None


def _flags(**flags) -> None:
    """Each a bool: overwrite="no" is true, and replaced the run there (hostile passes 36, 38)."""
    from .config import UserError

    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UserError(f"{name} is True or False, not {value!r}")


def _path(value, what: str) -> Path:
    """A folder argument as a Path; anything else is the CLI's kind of one-line error (None
    was a bare TypeError from os.fspath)."""
    from .config import UserError

    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise UserError(f"{what}, not {value!r}")
    return Path(os.path.expanduser(value))  # as the CLI's (out="~/r" made a folder named ~)


def _runs(runs, what: str) -> list[str]:
    """The runs of an ensemble or soup: a list of folders (a single string was read letter by
    letter: "a run is listed twice")."""
    if isinstance(runs, str | os.PathLike) or not isinstance(runs, list | tuple):
        from .config import UserError

        raise UserError(f"{what}() takes a list of run folders, not {runs!r}")
    return [os.fspath(_path(r, f"each run of {what}() is a folder or a Model")) for r in runs]
