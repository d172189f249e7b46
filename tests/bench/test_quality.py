"""bench/quality.py's command line: the model and training overrides.

Fast unit tests: no dataset, no training.
"""

from __future__ import annotations

import pytest

from bench.quality import main, overrides
from quantize.table_model import ModelConfig
from quantize.train import TrainConfig


def test_overrides_are_typed_as_the_fields_defaults() -> None:
    got = overrides(
        ModelConfig,
        ["hidden=128", "temperature=0.05", "repeat_bias=false", "encoder=attention"],
    )
    assert got == {
        "hidden": 128,
        "temperature": 0.05,
        "repeat_bias": False,
        "encoder": "attention",
    }
    assert type(got["hidden"]) is int and type(got["temperature"]) is float
    config = ModelConfig(**got)  # type: ignore[arg-type]
    assert (config.hidden, config.encoder) == (128, "attention")


def test_an_optional_field_takes_a_number_or_none() -> None:
    assert overrides(TrainConfig, ["epochs=7", "max_seconds=2.5", "epoch_steps=none"]) == {
        "epochs": 7,
        "max_seconds": 2.5,
        "epoch_steps": None,
    }


def test_the_last_override_of_a_key_wins() -> None:
    assert overrides(TrainConfig, ["lr=0.01", "lr=0.002"]) == {"lr": 0.002}


@pytest.mark.parametrize("pair", ["hidden", "width=128", "=3"])
def test_an_unknown_key_or_a_pair_without_value_names_the_keys(pair: str) -> None:
    with pytest.raises(ValueError, match="expected KEY=VALUE with KEY one of") as info:
        overrides(ModelConfig, [pair])
    assert "'hidden'" in str(info.value) and repr(pair) in str(info.value)


@pytest.mark.parametrize("pair", ["hidden=wide", "repeat_bias=maybe", "epochs=few"])
def test_a_value_of_the_wrong_type_names_its_key(pair: str) -> None:
    config = TrainConfig if pair.startswith("epochs") else ModelConfig
    with pytest.raises(ValueError, match="takes a value like its default") as info:
        overrides(config, [pair])
    assert repr(pair) in str(info.value)


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        ("--model=hidden=wide", "takes a value like its default"),
        ("--model=width=3", "ModelConfig override"),
        ("--model=hidden=65", "not divisible by heads"),
        ("--train=lr=0", "lr must be > 0"),
    ],
)
def test_a_bad_override_exits_2_before_any_data_is_read(
    flag: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--dataset", "/nonexistent/dataset", flag])
    assert info.value.code == 2
    assert words in capsys.readouterr().err
