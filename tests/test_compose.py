"""docker-compose.yml cannot run here (no Docker engine); keep it consistent with the code
and with the Prometheus, Alertmanager and Grafana files it mounts."""
import json
from pathlib import Path

import pytest
import yaml

from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
KNOWN_SETTINGS = set(Settings.from_env({"ABSTREAM_KAFKA_SASL_USERNAME": "x", "ABSTREAM_KAFKA_SASL_PASSWORD": "y",
                                        "ABSTREAM_KAFKA_SECURITY_PROTOCOL": "z", "ABSTREAM_KAFKA_SASL_MECHANISM": "w",
                                        "ABSTREAM_KAFKA_SSL_CA_LOCATION": "v"}).to_env())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def abstream_services(compose: dict) -> dict[str, dict]:
    """The workers: services built from abstream's image that run `abstream worker`."""
    return {name: s for name, s in compose["services"].items() if "build" in s and s["command"][0] == "worker"}


def test_the_alerts_bridge_forwards_to_the_stacks_alertmanager(compose):
    bridge = compose["services"]["alerts-bridge"]
    assert bridge["command"][:2] == ["alerts-bridge", "--alertmanager"]
    host = bridge["command"][2].split("//")[1].split(":")[0]
    assert host in compose["services"] and host == "alertmanager"


def container_port(service: dict) -> int:
    return int(service["environment"]["ABSTREAM_WEB_PORT"])


def mounted(service: dict, target: str) -> Path:
    """The repository path mounted at ``target`` in the container."""
    for volume in service.get("volumes", []):
        source, destination = volume.split(":")[:2]
        if destination == target:
            return (ROOT / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def test_compose_parses_and_names_the_stack(compose):
    assert {"kafka", "clickhouse", "worker", "worker-2", "prometheus", "alertmanager", "alert-webhook",
            "grafana"} <= set(compose["services"])
    assert compose["services"]["kafka"]["image"].startswith("apache/kafka:3.9")


def test_two_workers_and_exactly_one_sink(compose):
    workers = abstream_services(compose)
    assert len(workers) == 2
    assert sorted("--sink" in s["command"] for s in workers.values()) == [False, True]
    assert all(s["command"][0] == "worker" for s in workers.values())


def test_compose_uses_only_real_settings(compose):
    for name, service in abstream_services(compose).items():
        env = service["environment"]
        assert set(env) <= KNOWN_SETTINGS, f"{name}: {sorted(set(env) - KNOWN_SETTINGS)} are not settings"
        settings = Settings.from_env({k: str(v) for k, v in env.items()})
        assert not settings.embedded_clickhouse  # containers share a ClickHouse server
        assert settings.kafka_bootstrap.split(":")[0] in compose["services"]
        assert settings.web_host == "0.0.0.0"  # reachable by Prometheus from its container


def test_host_ports_are_unique_and_reach_the_right_container_ports(compose):
    host_ports = [p.split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports
    for name, service in abstream_services(compose).items():
        assert [int(p.split(":")[1]) for p in service["ports"]] == [container_port(service)], name


def test_compose_mounts_and_builds_files_that_exist(compose):
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), source
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).exists()


def test_prometheus_scrapes_every_worker_loads_the_rules_and_alerts_alertmanager(compose):
    prometheus = compose["services"]["prometheus"]
    config_path = mounted(prometheus, "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(config_path.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "abstream"]
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{name}:{container_port(s)}" for name, s in abstream_services(compose).items()}
    # Rule files are relative to the config file; the rules folder is mounted beside it.
    assert mounted(prometheus, "/etc/prometheus/rules") == (config_path.parent / "rules").resolve()
    assert config["rule_files"] == ["rules/*.yml"]
    assert list((config_path.parent / "rules").glob("*.yml"))
    [alertmanagers] = config["alerting"]["alertmanagers"]
    [target] = alertmanagers["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"]


def test_alertmanager_webhooks_reach_the_webhook_service(compose):
    config = yaml.safe_load(mounted(compose["services"]["alertmanager"], "/etc/alertmanager/alertmanager.yml").read_text())
    urls = [w["url"] for r in config["receivers"] for w in r.get("webhook_configs", [])]
    assert urls
    for url in urls:
        host, port = url.split("//")[1].split("/")[0].split(":")
        assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"], url


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in compose["services"]["prometheus"]["ports"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "abstream.yml").read_text())["providers"]
    dashboards = mounted(grafana, provider["options"]["path"])
    assert (dashboards / "abstream.json").exists()
    dashboard = json.loads((dashboards / "abstream.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {datasource["uid"]}
