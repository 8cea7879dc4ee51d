"""The README's Python API and onnxruntime examples, executed as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example(marker: str) -> str:
    text = README.read_text()
    return re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)[1]


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(example("api-example"), "README api-example", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and "'predictions'" in out[2] and "max_abs_logit_diff" in out[3]
    assert (tmp_path / "runs" / "api-ens" / "ensemble.json").is_file()


def test_readme_onnx_example_runs(trained_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from transferlab import export

    from conftest import make_image

    export.export(trained_run, "onnx", tmp_path / "runs" / "lite0" / "export" / "model.onnx")
    monkeypatch.chdir(tmp_path)
    make_image(2, 0, 50).save("photo.jpg")
    exec(compile(example("onnx-example"), "README onnx-example", "exec"), {})
    assert capsys.readouterr().out.strip() in {"a", "b", "c", "d"}
