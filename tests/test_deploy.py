"""deploy/: the sidecar image's Dockerfile, the compose stack, the Prometheus scrape and
Alertmanager examples and the prometheus-adapter rules. No Docker engine or cluster runs here, so
each file is checked for structure and against the things it must agree with (Settings defaults,
the catalogue, the chart, the generated rules' job selector); promtool and amtool check the
Prometheus-side files for real.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter import catalogue
from exporter.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
DEFAULTS = Settings()
SETTINGS_ENV = {env_name(f.name) for f in dataclasses.fields(Settings)}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh test installs it)")
    return path


def _job_selected_by_rules() -> str:
    slo = yaml.safe_load((DEPLOY / "prometheus" / "slo.yaml").read_text())
    match = re.search(r'job="([^"]+)"', slo["selector"])
    assert match, "deploy/prometheus/slo.yaml selector names no job"
    return match.group(1)


# --- Dockerfile ----------------------------------------------------------------------------------

def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined: list[str] = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            joined.append(re.sub(r"\s+", " ", line))
    stages: list[list[str]] = []
    for line in joined:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "build wheels in one stage, run from another"
    final = stages[-1]
    assert re.match(r"FROM python:\S*-slim", final[0]), final[0]
    assert any(i.startswith("COPY --from=") for i in final)
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "a numeric USER lets runAsNonRoot verify it"
    final_text = "\n".join(final)
    for compiler in ("build-essential", "gcc", "g++", "clang", "make "):
        assert compiler not in final_text, f"{compiler} in the final stage"
    assert 'ENTRYPOINT ["llm-exporter"]' in final and 'CMD ["serve"]' in final


def test_dockerfile_installs_no_engine_extra() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    install_lines = [line for line in text.splitlines() if "pip" in line]
    assert install_lines
    assert not any("torch" in line or "[engine" in line for line in install_lines)


def test_dockerfile_exposes_the_settings_ports() -> None:
    exposed = {int(p) for i in dockerfile_stages()[-1] if i.startswith("EXPOSE ")
               for p in i.split()[1:]}
    assert {DEFAULTS.port, DEFAULTS.metrics_port, 4318} <= exposed


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    copies = [i.split()[1:-1] for stage in dockerfile_stages() for i in stage
              if i.startswith("COPY ") and "--from=" not in i]
    sources = [s for srcs in copies for s in srcs]
    assert sources
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not missing, f"the build context lacks {missing}"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert set(sources) <= allowed, "allow the copied files in Dockerfile.dockerignore"


# --- compose -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yaml").read_text())


def _bind_sources(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def test_compose_services_and_mounted_files_exist(compose: dict[str, Any]) -> None:
    assert {"engine", "sidecar", "prometheus", "grafana"} <= set(compose["services"])
    named = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name}: volume {source} is not declared"
        for source, _ in _bind_sources(service):
            assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
    build = compose["services"]["sidecar"]["build"]
    context = COMPOSE_DIR / build["context"]
    assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


def test_compose_sidecar_shares_the_engine_namespaces_like_a_pod(
        compose: dict[str, Any]) -> None:
    engine, sidecar = compose["services"]["engine"], compose["services"]["sidecar"]
    assert sidecar["network_mode"] == "service:engine"
    assert sidecar["pid"] == "service:engine"
    env = sidecar["environment"]
    assert {k for k in env if k.startswith("LLM_EXPORTER_")} <= SETTINGS_ENV
    args = engine["command"]
    engine_port = args[args.index("--port") + 1]
    assert env["LLM_EXPORTER_UPSTREAM"] == f"http://127.0.0.1:{engine_port}"
    receiver = env["LLM_EXPORTER_OTLP_RECEIVER_PORT"]
    assert args[args.index("--otlp-traces-endpoint") + 1] == \
        f"http://127.0.0.1:{receiver}/v1/traces"
    assert engine["environment"]["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    published = {p.split(":")[-1].strip('"') for p in engine["ports"]}
    assert {str(DEFAULTS.port), str(DEFAULTS.metrics_port)} <= published
    assert sidecar["read_only"] is True and sidecar["cap_drop"] == ["ALL"]
    # The sidecar judges requests by the SLO file the rules were generated from.
    assert dict(_bind_sources(sidecar))["../prometheus/slo.yaml"] == env["LLM_EXPORTER_SLO"]


def test_compose_prometheus_scrapes_the_sidecar_as_the_rules_expect(
        compose: dict[str, Any], tmp_path: Path) -> None:
    config_path = COMPOSE_DIR / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    job = next(j for j in config["scrape_configs"]
               if f"engine:{DEFAULTS.metrics_port}" in j["static_configs"][0]["targets"])
    assert job["job_name"] == _job_selected_by_rules()
    mounts = dict(_bind_sources(compose["services"]["prometheus"]))
    rules_target = mounts["../prometheus/rules.yaml"]
    assert any(Path(rules_target).match(pattern) for pattern in config["rule_files"])
    promtool = _tool("promtool")
    result = subprocess.run([promtool, "check", "config", str(config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_grafana_provisions_the_generated_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(_bind_sources(grafana))
    assert (COMPOSE_DIR / "../../dashboards").resolve() == ROOT / "dashboards"
    dashboards_target = mounts["../../dashboards"]
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "llm-exporter.yaml").read_text())
    assert providers["apiVersion"] == 1
    assert [p["options"]["path"] for p in providers["providers"]] == [dashboards_target]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (datasource,) = sources["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    port = compose["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["url"] == f"http://prometheus:{port}"


# --- Prometheus, Alertmanager, prometheus-adapter ------------------------------------------------

def test_prometheus_example_config_is_valid_and_keeps_the_sidecar_port(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yaml").read_text())
    k8s = next(j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j)
    assert k8s["job_name"] == _job_selected_by_rules()
    keep = next(r for r in k8s["relabel_configs"] if r.get("action") == "keep")
    # The chart names the sidecar container llm-exporter and its port llm-metrics.
    assert keep["regex"] == "llm-exporter;llm-metrics"
    assert keep["source_labels"] == ["__meta_kubernetes_pod_container_name",
                                     "__meta_kubernetes_pod_container_port_name"]
    promtool = _tool("promtool")
    # Debian's promtool is built without Kubernetes service discovery: check the rest.
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
    rules = DEPLOY / "prometheus" / "rules.yaml"
    if rules.exists():
        shutil.copy(rules, tmp_path / "rules.yaml")
    else:
        config["rule_files"] = []
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_example_is_valid_and_routes_the_rules_severities() -> None:
    path = DEPLOY / "prometheus" / "alertmanager.yaml"
    config = yaml.safe_load(path.read_text())
    routed = {m.split("=")[1].strip().strip('"') for r in config["route"]["routes"]
              for m in r["matchers"]}
    rules = DEPLOY / "prometheus" / "rules.yaml"
    if rules.exists():
        severities = {r["labels"]["severity"] for g in yaml.safe_load(rules.read_text())["groups"]
                      for r in g["rules"] if "alert" in r}
        # Anything not routed explicitly goes to the default receiver; pages must be routed.
        assert "page" in severities and "page" in routed
    amtool = _tool("amtool")
    result = subprocess.run([amtool, "check-config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_adapter_rules_serve_catalogue_metrics_with_valid_queries(
        tmp_path: Path) -> None:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert {r["name"]["as"] for r in rules} >= {
        catalogue.SATURATION.exposed, catalogue.QUEUED.exposed, catalogue.ENGINE_WAITING.exposed}
    groups = []
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        assert series == rule["name"]["as"]
        assert catalogue.by_name(series).kind is catalogue.Kind.GAUGE
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                  "pod": {"resource": "pod"}}
        expr = (rule["metricsQuery"].replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"p-.*"')
                .replace("<<.GroupBy>>", "pod"))
        groups.append({"record": f"adapter:{series}", "expr": expr})
    # promtool parses every query, as the adapter will send it, inside a rules file.
    promtool = _tool("promtool")
    (tmp_path / "adapter.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "adapter", "rules": groups}]}))
    result = subprocess.run([promtool, "check", "rules", str(tmp_path / "adapter.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
