from pathlib import Path

import pytest

from streams.settings import Settings, SettingsError


def test_defaults():
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.topic_prefix == "abstream."
    assert s.clickhouse_dsn == f"chdb://{(Path('.abstream') / 'clickhouse').resolve()}"
    assert s.embedded_clickhouse and s.topic("outcomes") == "abstream.outcomes"


def test_environment_and_security_passthrough():
    s = Settings.from_env({
        "ABSTREAM_KAFKA_BOOTSTRAP": "k1:9093,k2:9093",
        "ABSTREAM_CLICKHOUSE_DSN": "https://user:pw@ch.example:8443/",
        "ABSTREAM_TOPIC_PREFIX": "prod.",
        "ABSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "ABSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "ABSTREAM_KAFKA_SASL_USERNAME": "svc",
        "ABSTREAM_KAFKA_SASL_PASSWORD": "secret",
    })
    assert not s.embedded_clickhouse
    config = s.kafka_config()
    assert config.pop("logger").logger.name == "abstream.kafka"  # librdkafka's lines, at DEBUG
    assert config == {
        "bootstrap.servers": "k1:9093,k2:9093", "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "svc", "sasl.password": "secret",
    }


def test_to_env_round_trips():
    s = Settings.from_env({"ABSTREAM_PARTITIONS": "8", "ABSTREAM_KAFKA_SASL_USERNAME": "svc", "ABSTREAM_WEB_PORT": "7000"})
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize("env, words", [
    ({"ABSTREAM_CLICKHOUSE_DSN": "mysql://x"}, "ABSTREAM_CLICKHOUSE_DSN"),
    ({"ABSTREAM_PARTITIONS": "four"}, "ABSTREAM_PARTITIONS"),
    ({"ABSTREAM_PARTITIONS": "0"}, "ABSTREAM_PARTITIONS"),
    ({"ABSTREAM_CLICKHOUSE_DATABASE": "x; DROP"}, "ABSTREAM_CLICKHOUSE_DATABASE"),
])
def test_bad_values_name_the_variable(env, words):
    with pytest.raises(SettingsError, match=words):
        Settings.from_env(env)


def test_the_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("## Settings"):readme.index("## Metrics")]
    missing = [name for name in Settings.from_env({}).to_env() if f"`{name}`" not in table]
    assert not missing, f"settings missing from the README's table: {missing}"
