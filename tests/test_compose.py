"""docker-compose.yml cannot run here (no Docker engine); keep it consistent with the code."""
from pathlib import Path

import yaml

from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_parses_and_names_the_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"kafka", "clickhouse", "worker", "prometheus", "grafana"} <= set(compose["services"])
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:3.9")


def test_compose_uses_only_real_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    known = set(Settings.from_env({"ABSTREAM_KAFKA_SASL_USERNAME": "x", "ABSTREAM_KAFKA_SASL_PASSWORD": "y",
                                   "ABSTREAM_KAFKA_SECURITY_PROTOCOL": "z", "ABSTREAM_KAFKA_SASL_MECHANISM": "w",
                                   "ABSTREAM_KAFKA_SSL_CA_LOCATION": "v"}).to_env())
    worker_env = compose["services"]["worker"]["environment"]
    assert set(worker_env) <= known
    settings = Settings.from_env({k: str(v) for k, v in worker_env.items()})
    assert not settings.embedded_clickhouse  # containers share a ClickHouse server


def test_compose_mounts_and_builds_files_that_exist():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), source
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).exists()
