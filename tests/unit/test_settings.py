"""Settings: defaults < ZHUGE_* env < overrides, validation, Kafka security kwargs, README table."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from app.settings import Settings, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_env_values_are_parsed_to_field_types():
    s = Settings.from_env({"ZHUGE_TOPIC_PARTITIONS": "3", "ZHUGE_LINK_MBPS": "625.5", "ZHUGE_DEVICE": "cpu"})
    assert (s.topic_partitions, s.link_mbps, s.device) == (3, 625.5, "cpu")
    assert isinstance(s.topic_partitions, int) and isinstance(s.link_mbps, float)


def test_empty_env_value_keeps_the_default():
    assert Settings.from_env({"ZHUGE_SLOT_S": ""}).slot_s == Settings().slot_s


def test_overrides_beat_env_and_none_is_ignored():
    env = {"ZHUGE_KAFKA_BOOTSTRAP": "env:1", "ZHUGE_REDIS_URL": "redis://env:2/0"}
    s = Settings.from_env(env, kafka_bootstrap="flag:3", redis_url=None)
    assert s.kafka_bootstrap == "flag:3"
    assert s.redis_url == "redis://env:2/0"


def test_a_mistyped_variable_is_named_with_the_setting_it_likely_meant():
    env = {"ZHUGE_KAFKA": "broker:9092", "ZHUGE_REDIS_URLL": "redis://x/0", "ZHUGE_COLOUR": "1",
           "ZHUGE_DEVICE": "cpu", "ZHUGE_LAB_TRACES": "/traces", "ZHUGE_TEST_KAFKA": "x", "PATH": "/bin"}  # fmt: skip
    assert Settings.unknown_env(env) == [
        "ZHUGE_COLOUR is not a zhuge setting and is ignored",
        "ZHUGE_KAFKA is not a zhuge setting and is ignored (did you mean ZHUGE_KAFKA_BOOTSTRAP?)",
        "ZHUGE_REDIS_URLL is not a zhuge setting and is ignored (did you mean ZHUGE_REDIS_URL?)",
    ]
    assert Settings.unknown_env({"ZHUGE_KAFKA_SASL_PASSWORD": "s3cret"}) == []


def test_the_cli_warns_about_them_on_stderr_without_their_values(monkeypatch):
    from typer.testing import CliRunner

    from app.cli import cli

    monkeypatch.setenv("ZHUGE_REDIS_PASWORD", "s3cret")
    res = CliRunner().invoke(cli, ["services", "--help"])
    assert res.exit_code == 0
    assert "warning: ZHUGE_REDIS_PASWORD is not a zhuge setting and is ignored (did you mean ZHUGE_REDIS_PASSWORD?)" in res.stderr
    assert "s3cret" not in res.output + res.stderr


def test_from_env_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("ZHUGE_REDIS_PREFIX", "test:")
    assert Settings.from_env().redis_prefix == "test:"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ZHUGE_SLOT_S": "five"}, "ZHUGE_SLOT_S='five': expected int"),
        ({"ZHUGE_LINK_MBPS": "fast"}, "expected float"),
        ({"ZHUGE_DEVICE": "tpu"}, "auto, cpu or gpu"),
        ({"ZHUGE_SLOT_S": "0"}, "slot_s must be positive"),
        ({"ZHUGE_WINDOW_SPAN_S": "300"}, "at least two slots"),
        ({"ZHUGE_HORIZON_S": "10"}, "at least one slot"),
        ({"ZHUGE_KAFKA_SECURITY_PROTOCOL": "TLS"}, "unknown Kafka security protocol"),
        ({"ZHUGE_MAX_ROUNDS": "0"}, "must be positive"),
    ],
)
def test_invalid_values_raise_clear_errors(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_unknown_override_is_a_type_error():
    with pytest.raises(TypeError, match="unknown setting 'kafka_servers'"):
        Settings.from_env({}, kafka_servers="x")


def test_replace_validates_and_leaves_the_original_alone():
    s = Settings.from_env({})
    t = s.replace(slot_s=60, redis_prefix=None)
    assert (s.slot_s, t.slot_s, t.redis_prefix) == (300, 60, s.redis_prefix)
    with pytest.raises(ValueError):
        s.replace(device="npu")


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().slot_s = 1  # type: ignore[misc]


def test_kafka_host_port_takes_the_first_bootstrap_address():
    s = Settings.from_env({}, kafka_bootstrap="10.0.0.5:9094, 10.0.0.6:9094")
    assert s.kafka_host_port == ("10.0.0.5", 9094)
    assert Settings.from_env({}, kafka_bootstrap=":29092").kafka_host_port == ("127.0.0.1", 29092)


def test_plaintext_kwargs_carry_no_credentials():
    kw = Settings.from_env({}, kafka_bootstrap="b:1").aiokafka_kwargs()
    assert kw == {"bootstrap_servers": "b:1", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_kwargs_have_tls_context_and_credentials():
    env = {
        "ZHUGE_KAFKA_BOOTSTRAP": "broker.example:9096",
        "ZHUGE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "ZHUGE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "ZHUGE_KAFKA_SASL_USERNAME": "zhuge",
        "ZHUGE_KAFKA_SASL_PASSWORD": "s3cret",
    }
    s = Settings.from_env(env)
    kw = s.aiokafka_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("SCRAM-SHA-512", "zhuge", "s3cret")
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    assert kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert "s3cret" not in repr(s)  # the password never reaches logs through repr


def test_sasl_plaintext_defaults_to_plain_and_has_no_tls():
    kw = Settings.from_env({"ZHUGE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}).aiokafka_kwargs()
    assert kw["sasl_mechanism"] == "PLAIN"
    assert "ssl_context" not in kw


def test_table_lists_every_field_and_hides_the_password_default():
    table = settings_table()
    for name in Settings.__dataclass_fields__:
        assert f"`ZHUGE_{name.upper()}`" in table
    assert "| `ZHUGE_KAFKA_SASL_PASSWORD` | `` |" in table


def test_readme_settings_table_is_current():
    text = README.read_text()
    begin, end = "<!-- settings:begin -->", "<!-- settings:end -->"
    assert begin in text and end in text, "README.md lost its settings markers"
    current = text.split(begin, 1)[1].split(end, 1)[0].strip()
    assert current == settings_table(), "README settings table is stale: run `make readme-settings`"
