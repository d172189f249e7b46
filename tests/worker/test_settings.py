"""Settings: precedence, validation messages that name the key, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.core.exceptions import ConfigError
from worker.core.settings import FIELDS, Settings, describe_settings, env_name, load_settings


def test_defaults_without_sources() -> None:
    s = load_settings(environ={})
    assert s == Settings()
    assert s.topic("items") == "adacode.items"


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('topic_prefix = "file."\npoll_max_records = 10\n[kafka]\nbootstrap = "f:1"\n')
    s = load_settings(cfg, environ={})
    assert (s.topic_prefix, s.poll_max_records, s.kafka_bootstrap) == ("file.", 10, "f:1")
    s = load_settings(cfg, environ={"ADACODE_POLL_MAX_RECORDS": "20"})
    assert s.poll_max_records == 20 and s.topic_prefix == "file."
    s = load_settings(cfg, {"poll_max_records": "30"}, environ={"ADACODE_POLL_MAX_RECORDS": "20"})
    assert s.poll_max_records == 30


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text('state_dir = "/x"\n')
    assert load_settings(environ={"ADACODE_CONFIG": str(cfg)}).state_dir == "/x"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"ADACODE_POLL_MAX_RECORDS": "many"}, "'poll_max_records'"),
        ({"ADACODE_POLL_MAX_RECORDS": "0"}, "below the minimum"),
        ({"ADACODE_LOG_FORMAT": "xml"}, "choose one of human, json"),
        ({"ADACODE_SYNC_WRITES": "maybe"}, "expected true or false"),
        ({"ADACODE_POL_MAX_RECORDS": "5"}, "did you mean poll_max_records"),
        ({"ADACODE_DOMAIN_PATTERN": "(["}, "not a valid regular expression"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert needle in str(info.value)


def test_unknown_key_in_file_and_bad_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[kafka]\nbootstrapp = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'kafka_bootstrapp'.*kafka_bootstrap"):
        load_settings(cfg, environ={})
    cfg.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_secrets_are_redacted_but_passed_to_kafka() -> None:
    s = load_settings(
        environ={
            "ADACODE_KAFKA_SASL_MECHANISM": "PLAIN",
            "ADACODE_KAFKA_SASL_USERNAME": "bob",
            "ADACODE_KAFKA_SASL_PASSWORD": "hunter2",
            "ADACODE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        }
    )
    assert s.redacted()["kafka_sasl_password"] == "***"
    assert "hunter2" not in repr(s.redacted())
    conf = s.kafka_common()
    assert conf["sasl_plain_password"] == "hunter2"
    assert conf["security_protocol"] == "SASL_SSL"


def test_every_setting_is_documented() -> None:
    text = describe_settings()
    for key in FIELDS:
        assert key in text and env_name(key) in text
        assert FIELDS[key].metadata["help"]


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.state_dir = "x"  # type: ignore[misc]
