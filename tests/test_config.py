"""config: field help from metadata, ranges, options that would have no effect."""

import dataclasses

import pytest

from transferlab.config import APPLIES, RANGES, TrainConfig, UserError, field_help, make_config


def test_every_option_has_its_help_from_the_field_metadata():
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(len(text) > 10 for text in helps.values()), helps
    assert "gray" in helps["channels"] and "cache" in helps["cache_dir"]


def test_every_range_names_a_numeric_field_and_its_default_is_inside():
    defaults = TrainConfig()
    for key in RANGES:
        value = getattr(defaults, key)
        assert value is None or value == "auto" or isinstance(value, (int, float)), key
    make_config({})  # the defaults pass their own validation


def test_unknown_keys_suggest_and_options_without_effect_are_refused():
    with pytest.raises(UserError, match="unknown config key 'learning_rate'"):
        make_config({"learning_rate": 0.1})
    with pytest.raises(UserError, match="did you mean epochs"):
        make_config({"epoch": 3})
    for key in APPLIES:
        assert key in TrainConfig.__dataclass_fields__
    with pytest.raises(UserError, match="momentum has no effect here"):
        make_config({"momentum": 0.5})
    assert make_config({"momentum": 0.5, "optimizer": "sgd"}).momentum == 0.5
    for strategy in ("lp-ft", "head-first", "layer-decay"):  # lp-ft's fine-tune trained the head
        with pytest.raises(UserError, match=f"freeze backbone leaves strategy {strategy} only"):
            make_config({"strategy": strategy, "freeze": "backbone"})
    assert make_config({"strategy": "lp-ft", "freeze": "2"}).freeze == "2"


def test_a_mistyped_choice_is_refused_with_the_closest_choice():
    for key, typo, hint in (
        ("strategy", "head-frist", "head-first"),
        ("optimizer", "adamW", "adamw"),
    ):
        with pytest.raises(
            UserError, match=f"{key} must be one of .* \\(did you mean {hint}\\?\\)"
        ):
            make_config({key: typo})
    with pytest.raises(UserError, match=r"got 'zzz'$"):  # nothing close: no guess
        make_config({"crop": "zzz"})


def test_a_number_is_read_as_written_or_refused_naming_it():
    # stop 54's cosmetic points: 1e-400 was "got 0.0"; a huge --set epochs was echoed rounded
    with pytest.raises(UserError, match=r"^lr 1e-400 is too small for a float: it reads as 0$"):
        make_config({"lr": "1e-400"})
    with pytest.raises(UserError, match=r"got 99999999999999999999$"):
        make_config({"epochs": "99999999999999999999"})
    with pytest.raises(UserError, match=r"lr must be > 0 .* got 0.0$"):
        make_config({"lr": "0e5"})  # a zero written as zero is refused by the range
    assert make_config({"epochs": " +7 "}).epochs == 7 and make_config({"lr": "1e-45"}).lr == 1e-45
    with pytest.raises(UserError, match=r"got '0' \(nothing frozen: freeze none\)$"):  # pass 45
        make_config({"freeze": "0"})
    with pytest.raises(UserError, match=r"got '-1'$"):
        make_config({"freeze": "-1"})
