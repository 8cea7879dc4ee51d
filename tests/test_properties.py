"""Property-based misuse tests (Hypothesis): generated invalid options, configs and recipes.

Whatever is generated, a mistake is exit 2 with one line on stderr and no traceback, and no
file changes anywhere but in the command's output folder (which, for a refused command, is
not even created). Valid inputs are filtered out: these tests never start training.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from transferlab import recipe
from transferlab.cli import main
from transferlab.config import (
    CHOICES,
    RANGES,
    TrainConfig,
    UserError,
    _within,
    field_names,
    make_config,
)

# Derandomized, so CI explores the same examples each run (a failure is a bug, never a flake);
# TRANSFERLAB_HYPOTHESIS=N explores N fresh random examples per test instead.
_N = int(os.environ.get("TRANSFERLAB_HYPOTHESIS", "0"))
SETTINGS = settings(
    max_examples=_N or 80,
    derandomize=not _N,
    database=None,  # writes nothing into the repository
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FIELDS = field_names(TrainConfig)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def run_refused(argv: list[str]) -> None:
    """Run the CLI in a fresh folder holding a user's file; assert the refusal contract."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "notes.txt").write_text("the user's")
        before = snapshot(root)
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(root)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main([*argv, "--out", "out"])
                except SystemExit as exc:  # argparse's own usage errors
                    code = exc.code
        finally:
            os.chdir(cwd)
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert code == 2, (argv, out.getvalue(), err.getvalue())
        assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
        assert snapshot(root) == before, argv  # nothing changed, nothing created (not even out)


# ----------------------------------------------------------------------------- values


def out_of_range(field: str) -> st.SearchStrategy:
    """Numbers a field must refuse: below, above, or exactly on an exclusive bound; nan, inf."""
    low, high, _ = RANGES[field]
    lo, hi = (
        (low[0] if isinstance(low, tuple) else low),
        (high[0] if isinstance(high, tuple) else high),
    )
    bad = [st.sampled_from(["nan", "inf", "-inf", "1e309"])]
    bad.append(st.floats(max_value=lo, exclude_max=not isinstance(low, tuple), allow_nan=False))
    bad.append(st.floats(min_value=hi, exclude_min=not isinstance(high, tuple), allow_nan=False))
    return st.one_of(*bad).map(lambda v: v if isinstance(v, str) else repr(v))


def not_a_number() -> st.SearchStrategy:
    def numeric(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return text.strip().lower() in ("auto", "none", "null", "")

    return st.text(min_size=1, max_size=20).filter(
        lambda t: not numeric(t) and not t.startswith("-")
    )


NUMERIC = sorted(RANGES)
bad_option = st.one_of(
    st.sampled_from(NUMERIC).flatmap(lambda f: st.tuples(st.just(f), out_of_range(f))),
    st.sampled_from(NUMERIC).flatmap(lambda f: st.tuples(st.just(f), not_a_number())),
    st.sampled_from(sorted(CHOICES)).flatmap(
        lambda f: st.tuples(
            st.just(f),
            st.text(min_size=1, max_size=12).filter(
                lambda t: t not in CHOICES[f] and not t.startswith("-")
            ),
        )
    ),
)


@SETTINGS
@given(bad_option, st.sampled_from(["train", "lr-find"]))
@example(("schedule", "\x1e"), "lr-find")  # found by Hypothesis: \x1e ends a line for splitlines
def test_cli_refuses_every_generated_bad_option_in_one_line(option, command):
    field, value = option
    if field == "limit" and value.strip().lower() in ("none", "null"):
        assume(False)
    run_refused(
        [command, "--data", "digits", "--model", "dcnn", f"--{field.replace('_', '-')}", value]
    )


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@SETTINGS
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), json_values, max_size=5
    )
)
def test_config_validation_raises_only_user_errors(overrides):
    """Any mapping of keys to values makes a valid config or raises UserError, nothing else;
    a config that is made has every numeric field finite and in range."""
    try:
        cfg = make_config(overrides)
    except UserError as err:
        assert "\n" not in str(err) and str(err)
        return
    for field, (low, high, _) in RANGES.items():
        value = getattr(cfg, field)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value) and _within(value, low, high), (field, value)


# ----------------------------------------------------------------------------- recipes

step_kinds = st.sampled_from(["train", "finetune", "ensemble", "soup", "report", "trian", "eval"])
step_names = st.one_of(
    st.sampled_from(["a", "b", "../x", "/tmp/x", "a/b", "..", "", " ", "a b"]), json_values
)
steps = st.lists(
    st.one_of(
        json_values,
        st.builds(lambda k, n: {k: n}, step_kinds, step_names),
        st.builds(
            lambda k, n, extra: {k: n, **extra},
            step_kinds,
            step_names,
            st.dictionaries(
                st.sampled_from([*FIELDS, "members", "from", "method", "nope"]),
                json_values,
                max_size=3,
            ),
        ),
    ),
    max_size=4,
)
recipes = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"steps": st.one_of(steps, json_values)},
        optional={
            "data": st.one_of(st.sampled_from(["digits", "folder:/nope", "cifar:x"]), json_values),
            "defaults": json_values,
            "name": json_values,
            "stepz": json_values,
        },
    ),
)


def refused(text: bytes) -> bool:
    """Does the loader + validator refuse this recipe file (UserError), as it must if invalid?"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(text)
        try:
            recipe.validate(recipe.load(path), Path(tmp) / "out")
        except UserError as err:
            assert "\n" not in str(err)
            return True
    return False


@SETTINGS
@given(recipes)
def test_generated_invalid_recipes_are_one_line_exit_2_and_touch_nothing(structure):
    text = yaml.safe_dump(structure, allow_unicode=True).encode()
    assume(refused(text))  # only invalid recipes: a valid one would start training
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_bytes(text)
        run_refused(["run", str(path)])


@SETTINGS
@given(st.binary(max_size=200))
def test_recipe_loader_takes_any_bytes_without_a_traceback(blob):
    refused(blob)  # UserError or a valid recipe: any other exception fails the test
