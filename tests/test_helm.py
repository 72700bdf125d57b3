"""The Helm chart, rendered by the real Helm engine (helm-python-sdk) for the default values and
each ci/*-values.yaml scenario: lint, Kubernetes schemas (1.30 and the newest), the Prometheus
Operator and KEDA models with no unknown keys, promtool on the rules, the values schema, and
freshness of everything generated (synced rules and dashboards, the README values table).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

hp = pytest.importorskip("helm_python", reason="helm-python-sdk is a test extra")
kv = pytest.importorskip("kubernetes_validate")
from cloudcoil.models.keda import v1alpha1 as keda  # noqa: E402
from cloudcoil.models.prometheus_operator import v1 as monitoring  # noqa: E402
from pydantic import BaseModel, RootModel  # noqa: E402

from exporter import catalogue  # noqa: E402
from exporter.settings import Settings, env_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "llm-exporter"
RULES_SOURCE = ROOT / "deploy" / "prometheus" / "rules.yaml"
DASHBOARDS_SOURCE = ROOT / "dashboards"
ADAPTER_VALUES = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
RELEASE, NAMESPACE = "llm", "inference"

SCENARIOS = ["default", *sorted(p.name.removesuffix("-values.yaml")
                                for p in (CHART / "ci").glob("*-values.yaml"))]
KUBE_VERSIONS = ("1.30.0", kv.latest_version())
CUSTOM_MODELS: dict[str, type[BaseModel]] = {
    "ServiceMonitor": monitoring.ServiceMonitor,
    "PodMonitor": monitoring.PodMonitor,
    "PrometheusRule": monitoring.PrometheusRule,
    "ScaledObject": keda.ScaledObject,
}
# Monitor fields newer than the models in the lock (cloudcoil-models-prometheus-operator
# 0.80.1.0 follows prometheus-operator v0.80.1): convertClassicHistogramsToNHCB came with v0.81.0
# (prometheus-operator#7448, "Add convertClassicHistogramsToNHCB field to ServiceMonitor,
# PodMonitor, Probe and ScrapeConfig CRDs").
NEWER_THAN_MODELS = {".spec.convertClassicHistogramsToNHCB"}
METRIC_RE = re.compile(r"\b(?:llm_exporter|gen_ai_server)_[a-z0-9_]*[a-z0-9]")


def scenario_values(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) or {}


def render(chart: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt and empty templates left out)."""
    out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        objects += [d for d in yaml.safe_load_all(text) if d]
    return objects


@pytest.fixture(scope="module")
def chart() -> Any:
    return hp.Chart.load(CHART)


@pytest.fixture(scope="module")
def rendered(chart: Any) -> dict[str, list[dict[str, Any]]]:
    """Each scenario rendered once per module."""
    return {name: render(chart, scenario_values(name)) for name in SCENARIOS}


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def sidecar_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The sidecar container, from the Deployment or (sidecar-only) from the ConfigMap."""
    if find(objects, "Deployment"):
        return container(objects, "llm-exporter")
    cm = next(o for o in find(objects, "ConfigMap") if o["metadata"]["name"].endswith("-sidecar"))
    return yaml.safe_load(cm["data"]["container.yaml"])


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


# --- lint and schemas ----------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict_is_clean(scenario: str) -> None:
    report = hp.lint(CHART, values=scenario_values(scenario), strict=True, kube_version="v1.30.0")
    findings = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not report["errors"] and not findings, report


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_builtin_objects_validate_strict(rendered: dict[str, list[dict[str, Any]]],
                                         scenario: str, version: str) -> None:
    builtin = [o for o in rendered[scenario] if o["kind"] not in CUSTOM_MODELS]
    assert builtin
    for obj in builtin:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{scenario}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                        f"Kubernetes {version}: {e}")


def unknown_keys(value: Any, annotation: Any, path: str = "") -> list[str]:
    """Keys in ``value`` that the pydantic model behind ``annotation`` does not declare (the
    cloudcoil models accept unknown fields silently)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return unknown_keys(value, args[0], path)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if isinstance(value, dict):
            options = [a for a in options if _is_mapping_type(a)]
        elif isinstance(value, list):
            options = [a for a in options if typing.get_origin(a) is list]
        results = [unknown_keys(value, a, path) for a in options]
        return min(results, key=len) if results else []
    if origin is list and isinstance(value, list):
        return [k for i, v in enumerate(value) for k in unknown_keys(v, args[0], f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [k for n, v in value.items() for k in unknown_keys(v, args[1], f"{path}.{n}")]
    if isinstance(annotation, type) and issubclass(annotation, RootModel):
        return unknown_keys(value, annotation.model_fields["root"].annotation, path)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            and isinstance(value, dict):
        fields = {(f.alias or n): f for n, f in annotation.model_fields.items()}
        out = []
        for key, v in value.items():
            if key not in fields:
                out.append(f"{path}.{key}")
            else:
                out += unknown_keys(v, fields[key].annotation, f"{path}.{key}")
        return out
    return []


def _is_mapping_type(a: Any) -> bool:
    return typing.get_origin(a) is dict or (isinstance(a, type) and issubclass(a, BaseModel))


def test_unknown_keys_finds_typos() -> None:
    obj = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
           "metadata": {"name": "x", "lables": {}},
           "spec": {"selector": {}, "endpoints": [{"port": "metrics", "intervall": "5s"}]}}
    assert sorted(unknown_keys(obj, monitoring.ServiceMonitor)) == [
        ".metadata.lables", ".spec.endpoints[0].intervall"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_custom_resources_match_operator_and_keda_models(
        rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    for obj in rendered[scenario]:
        model = CUSTOM_MODELS.get(obj["kind"])
        if model is None:
            continue
        model.model_validate(obj)
        unknown = set(unknown_keys(obj, model)) - NEWER_THAN_MODELS
        assert not unknown, f"{scenario}: {obj['kind']} has unknown keys {unknown}"


def test_native_histograms_switch(rendered: dict[str, list[dict[str, Any]]]) -> None:
    spec = one(rendered["nhcb"], "PodMonitor")["spec"]
    assert spec["convertClassicHistogramsToNHCB"] is True
    assert spec["scrapeClassicHistograms"] is False
    assert "convertClassicHistogramsToNHCB" not in one(rendered["default"],
                                                       "ServiceMonitor")["spec"]


def test_each_scenario_renders_what_it_is_for(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {name: {o["kind"] for o in objs} for name, objs in rendered.items()}
    assert {"Deployment", "Service", "ServiceMonitor"} <= kinds["default"]
    assert not {"HorizontalPodAutoscaler", "ScaledObject", "NetworkPolicy"} & kinds["default"]
    assert "ScaledObject" in kinds["keda"] and "HorizontalPodAutoscaler" not in kinds["keda"]
    assert {"HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds["hpa"]
    assert "Deployment" not in kinds["sidecar-only"] and "PodMonitor" in kinds["sidecar-only"]
    assert not {"ServiceMonitor", "PodMonitor", "PrometheusRule"} & kinds["no-operator"]
    if RULES_SOURCE.exists():
        assert "PrometheusRule" in kinds["default"]


# --- the pod -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sidecar_is_locked_down_and_probed_on_metrics_port(
        rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    side = sidecar_of(rendered[scenario])
    sc = side["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {m["mountPath"]: m for m in side["volumeMounts"]}
    assert set(mounts) <= {"/tmp", "/etc/llm-exporter"}
    assert mounts.get("/etc/llm-exporter", {"readOnly": True})["readOnly"] is True
    assert side["resources"]["requests"] and side["resources"]["limits"]
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "llm-metrics"}
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "llm-metrics"}
    assert "llm-metrics" in {p["name"] for p in side["ports"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sidecar_env_names_are_settings(rendered: dict[str, list[dict[str, Any]]],
                                        scenario: str) -> None:
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    env = env_of(sidecar_of(rendered[scenario]))
    unknown = {k for k in env if k.startswith("LLM_EXPORTER_")} - known
    assert not unknown, f"not in exporter.settings: {unknown}"


def test_default_pod_wires_service_sidecar_and_engine(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["default"]
    engine, side = container(objs, "engine"), container(objs, "llm-exporter")
    engine_port = engine["ports"][0]["containerPort"]
    assert env_of(side)["LLM_EXPORTER_UPSTREAM"] == f"http://127.0.0.1:{engine_port}"
    svc = one(objs, "Service")
    side_ports = {p["name"] for p in side["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= side_ports
    assert svc["spec"]["selector"] == \
        one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    # vLLM sends its spans to the sidecar's OTLP/HTTP receiver.
    receiver = env_of(side)["LLM_EXPORTER_OTLP_RECEIVER_PORT"]
    assert engine["command"] == ["vllm", "serve"]
    args = engine["args"]
    assert args[args.index("--otlp-traces-endpoint") + 1] == \
        f"http://127.0.0.1:{receiver}/v1/traces"
    assert env_of(engine)["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert engine["securityContext"]["allowPrivilegeEscalation"] is False
    assert engine["startupProbe"]["httpGet"]["port"] == "engine"
    names = [p["name"] for c in (engine, side) for p in c["ports"]]
    assert len(names) == len(set(names)) and all(len(n) <= 15 for n in names)


@pytest.mark.parametrize(("flavor", "image", "first_args"), [
    ("sglang", "lmsysorg/sglang:latest", ["--model-path", "org/model"]),
    ("tgi", "ghcr.io/huggingface/text-generation-inference:latest", ["--model-id", "org/model"]),
    ("llamacpp", "ghcr.io/ggml-org/llama.cpp:server-cuda", ["--host", "0.0.0.0"]),
    ("custom", "example.org/engine:1", ["--listen", "8080"]),
])
def test_engine_flavors_render_valid_pods(chart: Any, flavor: str, image: str,
                                          first_args: list[str]) -> None:
    engine_values: dict[str, Any] = {"flavor": flavor, "model": "org/model"}
    if flavor == "custom":
        engine_values |= {"image": {"repository": "example.org/engine", "tag": "1"},
                          "command": ["engine"], "args": ["--listen", "8080"]}
    objs = render(chart, {"engine": engine_values})
    engine = container(objs, "engine")
    assert engine["image"] == image
    assert engine["args"][:2] == first_args
    assert "--otlp-traces-endpoint" not in engine["args"]
    kv.validate(one(objs, "Deployment"), KUBE_VERSIONS[0], strict=True)


def test_gpu_scenario_shards_and_tolerates(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["gpu"]
    engine = container(objs, "engine")
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert engine["args"][engine["args"].index("--tensor-parallel-size") + 1] == "2"
    assert engine["args"][-4:] == ["--max-model-len", "16384", "--gpu-memory-utilization", "0.9"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["runtimeClassName"] == "nvidia"
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert env_of(container(objs, "llm-exporter"))["LLM_EXPORTER_GPU_HOURLY_COST"] == "2.5"


def test_sidecar_only_snippet_merges_into_a_valid_deployment(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["sidecar-only"]
    values = scenario_values("sidecar-only")
    cm = next(o for o in find(objs, "ConfigMap") if o["metadata"]["name"].endswith("-sidecar"))
    side = yaml.safe_load(cm["data"]["container.yaml"])
    volumes = yaml.safe_load(cm["data"]["volumes.yaml"])
    assert env_of(side)["LLM_EXPORTER_UPSTREAM"] == \
        f"http://127.0.0.1:{values['sidecarOnly']['enginePort']}"
    labels = values["sidecarOnly"]["podSelector"]
    user_deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "my-vllm"},
        "spec": {"selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}, side],
                     "volumes": volumes}}}}
    for version in KUBE_VERSIONS:
        kv.validate(user_deployment, version, strict=True)
    patch = yaml.safe_load(cm["data"]["kustomize-patch.yaml"])
    assert patch["metadata"]["name"] == values["sidecarOnly"]["workload"]["name"]
    assert patch["spec"]["template"]["spec"]["containers"] == [side]
    assert patch["spec"]["template"]["spec"]["volumes"] == volumes
    # Everything else selects the user's pods.
    assert one(objs, "Service")["spec"]["selector"] == labels
    assert one(objs, "PodMonitor")["spec"]["selector"]["matchLabels"] == labels
    assert one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels


def test_network_policy_admits_scrapes_only_from_monitoring(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["hpa"]
    policy = one(objs, "NetworkPolicy")
    metrics_rule, proxy_rule = policy["spec"]["ingress"]
    assert metrics_rule["ports"] == [{"port": "llm-metrics", "protocol": "TCP"}]
    assert [p["namespaceSelector"]["matchLabels"] for p in metrics_rule["from"]] == \
        [{"kubernetes.io/metadata.name": "monitoring"}]
    assert proxy_rule["ports"] == [{"port": "llm-proxy", "protocol": "TCP"}]
    assert "engine" not in json.dumps(policy["spec"]["ingress"])
    assert policy["spec"]["podSelector"]["matchLabels"] == \
        one(objs, "Deployment")["spec"]["selector"]["matchLabels"]


# --- monitoring and autoscaling ------------------------------------------------------------------

def test_monitor_scrapes_the_sidecar_metrics_port(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["default"]
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    svc = one(objs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_monitor_sets_the_job_the_generated_rules_select(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    slo = ROOT / "deploy" / "prometheus" / "slo.yaml"
    if not slo.exists():
        pytest.skip("deploy/prometheus/slo.yaml not written yet")
    job = re.search(r'job="([^"]+)"', yaml.safe_load(slo.read_text())["selector"])
    assert job, "slo.yaml selector names no job"
    for scenario in ("default", "sidecar-only"):
        monitor = next(o for o in rendered[scenario]
                       if o["kind"] in ("ServiceMonitor", "PodMonitor"))
        endpoint = monitor["spec"].get("endpoints", monitor["spec"].get("podMetricsEndpoints"))[0]
        assert {"targetLabel": "job", "replacement": job.group(1)} in endpoint["relabelings"]


def adapter_metrics() -> set[str]:
    return {r["name"]["as"] for r in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}


def test_hpa_scales_on_a_catalogue_metric_served_by_prometheus_adapter(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    hpa = one(rendered["hpa"], "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == catalogue.QUEUED.exposed
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(rendered["hpa"], "Deployment")[
        "metadata"]["name"]
    assert "replicas" not in one(rendered["hpa"], "Deployment")["spec"]
    served = adapter_metrics()
    assert name in served


@pytest.mark.parametrize("metric", ["saturation", "sidecarQueue", "engineQueue", "capacity"])
def test_every_autoscaling_metric_is_served_by_the_adapter(chart: Any, metric: str) -> None:
    objs = render(chart, {"autoscaling": {"enabled": True, "metric": metric, "target": 0.8},
                          "sidecar": {"capacity": {"requestsPerSecond": 2.5}}})
    name = one(objs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert one(objs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["target"][
        "averageValue"] == "800m"
    catalogue.by_name(name)
    served = adapter_metrics()
    assert name in served


def test_scaled_object_queries_saturation_of_this_release(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    so = one(rendered["keda"], "ScaledObject")
    trigger = so["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert query.startswith(f"sum({catalogue.SATURATION.exposed}{{")
    assert f'namespace="{NAMESPACE}"' in query
    assert trigger["metadata"]["threshold"] == "0.8"
    behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert so["spec"]["scaleTargetRef"]["name"] == \
        one(rendered["keda"], "Deployment")["metadata"]["name"]


def test_calibrate_values_file_is_taken_as_is(chart: Any, tmp_path: Path) -> None:
    """What `llm-exporter calibrate` writes (exporter.calibrate.chart_values) renders as is:
    the sidecar gets the capacity and thresholds, the HPA scales on the capacity load."""
    from exporter import calibrate

    step = calibrate.Step("concurrency", 4, 10.0, [calibrate.Result(True, 0.1, 0.5, [], 8)] * 25)
    step.samples = {"engine_waiting": [1.5, 2.5], "kv_usage": [0.6, 0.72]}
    step.counters = {"good": 25, "bad": 0}
    values = {**calibrate.chart_values(step, 0.95, 0.8)}
    values["autoscaling"] = {**values["autoscaling"], "enabled": True}
    assert values["sidecar"]["capacity"]["requestsPerSecond"] == 2.5
    objs = render(chart, values)
    env = env_of(sidecar_of(objs))
    assert env["LLM_EXPORTER_CAPACITY_RPS"] == "2.5"
    assert float(env["LLM_EXPORTER_SATURATION_QUEUE_THRESHOLD"]) == 2.0  # engine queue mean
    assert env["LLM_EXPORTER_SATURATION_KV_THRESHOLD"] == "0.72"
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]
    assert hpa["metric"]["name"] == catalogue.CAPACITY_LOAD.exposed
    assert hpa["target"]["averageValue"] == "800m"


def test_capacity_scaling_without_a_capacity_fails_with_the_fix(chart: Any) -> None:
    with pytest.raises(Exception, match=r"sidecar\.capacity\.requestsPerSecond"):
        render(chart, {"autoscaling": {"enabled": True, "metric": "capacity"}})


def chart_text_files() -> list[Path]:
    files = [*(CHART / "templates").iterdir(), CHART / "values.yaml", CHART / "values.schema.json",
             CHART / "README.md", *(CHART / "ci").glob("*.yaml")]
    deploy = ROOT / "deploy"
    files += [p for p in deploy.rglob("*") if p.is_file() and p != RULES_SOURCE]
    return files


def test_every_metric_name_in_chart_and_deploy_is_in_the_catalogue() -> None:
    referenced: dict[str, Path] = {}
    for path in chart_text_files():
        for name in METRIC_RE.findall(path.read_text()):
            referenced.setdefault(re.sub(r"_(bucket|count|sum|created)$", "", name), path)
    assert referenced, "no metric names found: the pattern is broken"
    missing = {}
    for name, path in referenced.items():
        try:
            catalogue.by_name(name)
        except KeyError:
            missing[name] = str(path.relative_to(ROOT))
    assert not missing, f"not in exporter/catalogue.py: {missing}"


# --- rules and dashboards ------------------------------------------------------------------------

def test_chart_rules_copy_is_fresh() -> None:
    copy = CHART / "files" / "rules.yaml"
    if not RULES_SOURCE.exists():
        pytest.skip(f"{RULES_SOURCE.relative_to(ROOT)} not generated yet")
    assert copy.exists() and copy.read_bytes() == RULES_SOURCE.read_bytes(), \
        "helm/llm-exporter/files/rules.yaml is stale: run scripts/sync-chart.sh"


def test_chart_slo_copy_is_fresh() -> None:
    source, copy = ROOT / "deploy" / "prometheus" / "slo.yaml", CHART / "files" / "slo.yaml"
    if not source.exists():
        pytest.skip("deploy/prometheus/slo.yaml not written yet")
    assert copy.exists() and copy.read_bytes() == source.read_bytes(), \
        "helm/llm-exporter/files/slo.yaml is stale: run scripts/sync-chart.sh"


@pytest.mark.parametrize("scenario", ["default", "sidecar-only"])
def test_sidecar_judges_requests_by_the_slo_file_behind_the_rules(
        rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    copy = CHART / "files" / "slo.yaml"
    if not copy.exists():
        pytest.skip("the chart has no files/slo.yaml yet")
    objs = rendered[scenario]
    side = sidecar_of(objs)
    path = Path(env_of(side)["LLM_EXPORTER_SLO"])
    mount = next(m for m in side["volumeMounts"] if m["mountPath"] == str(path.parent))
    cm = next(o for o in find(objs, "ConfigMap") if o["metadata"]["name"].endswith("-slo"))
    if scenario == "sidecar-only":
        sidecar_cm = next(o for o in find(objs, "ConfigMap")
                          if o["metadata"]["name"].endswith("-sidecar"))
        volumes = yaml.safe_load(sidecar_cm["data"]["volumes.yaml"])
    else:
        volumes = one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert yaml.safe_load(cm["data"][path.name]) == yaml.safe_load(copy.read_text())


def test_chart_dashboard_copies_are_fresh() -> None:
    sources = sorted(DASHBOARDS_SOURCE.glob("*.json"))
    if not sources:
        pytest.skip("dashboards/*.json not generated yet")
    copies = sorted((CHART / "files" / "dashboards").glob("*.json"))
    assert [p.name for p in copies] == [p.name for p in sources], \
        "chart dashboards differ from dashboards/: run scripts/sync-chart.sh"
    for src, copy in zip(sources, copies, strict=True):
        assert copy.read_bytes() == src.read_bytes(), f"{copy} is stale: run scripts/sync-chart.sh"


def test_prometheus_rule_carries_the_generated_rules(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    if not (CHART / "files" / "rules.yaml").exists():
        pytest.skip("the chart has no files/rules.yaml yet (deploy/prometheus/rules.yaml "
                    "not generated)")
    rule = one(rendered["default"], "PrometheusRule")
    source = yaml.safe_load((CHART / "files" / "rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(spec)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmaps_are_labelled_for_grafana(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    copies = sorted((CHART / "files" / "dashboards").glob("*.json"))
    if not copies:
        pytest.skip("the chart has no dashboards yet (dashboards/*.json not generated)")
    cms = [o for o in find(rendered["default"], "ConfigMap") if "-dashboard-" in
           o["metadata"]["name"]]
    assert len(cms) == len(copies)
    by_key = {k: v for cm in cms for k, v in cm["data"].items()}
    for cm in cms:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    for copy in copies:
        assert json.loads(by_key[copy.name]) == json.loads(copy.read_text())


# --- values --------------------------------------------------------------------------------------

BAD_VALUES = [
    ({"mode": "sidecar"}, "/mode", "'full', 'sidecar-only'"),
    ({"sidecar": {"port": 70000}}, "/sidecar/port", "maximum"),
    ({"sidecar": {"maxConcurency": 4}}, "/sidecar", "'maxConcurency' not allowed"),
    ({"autoscaling": {"kind": "vpa"}}, "/autoscaling/kind", "'hpa', 'keda'"),
    ({"autoscaling": {"metric": "gpu"}}, "/autoscaling/metric", "'saturation'"),
    ({"monitor": {"kind": "Probe"}}, "/monitor/kind", "'ServiceMonitor', 'PodMonitor'"),
    ({"monitor": {"interval": "15"}}, "/monitor/interval", "does not match pattern"),
    ({"engine": {"gpu": {"count": -1}}}, "/engine/gpu/count", "minimum"),
    ({"sidecar": {"logLevel": "verbose"}}, "/sidecar/logLevel", "'debug'"),
    ({"mode": "sidecar-only"}, "/sidecarOnly/podSelector", "minProperties"),
    ({"autoscaling": {"minReplicas": 0}}, "/autoscaling/minReplicas", "minimum"),
]


@pytest.mark.parametrize(("values", "where", "why"), BAD_VALUES,
                         ids=[w for _, w, _ in BAD_VALUES])
def test_schema_rejects_bad_values_clearly(chart: Any, values: dict[str, Any], where: str,
                                           why: str) -> None:
    with pytest.raises(hp.HelmValuesError) as err:
        chart.validate_schema(values)
    assert f"at '{where}'" in str(err.value) and why in str(err.value), str(err.value)
    with pytest.raises(hp.HelmError):
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(("values", "why"), [
    ({"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}},
     "autoscaling.maxReplicas (2) must be at least autoscaling.minReplicas (3)"),
    ({"sidecar": {"metricsPort": 8080}}, "sidecar.metricsPort and the engine port are both 8080"),
    ({"mode": "sidecar-only", "sidecarOnly": {"podSelector": {"app": "x"}},
      "autoscaling": {"enabled": True}}, "needs sidecarOnly.workload.name"),
    ({"engine": {"flavor": "custom"}}, "engine.flavor custom needs engine.image.repository"),
])
def test_templates_reject_inconsistent_values_clearly(chart: Any, values: dict[str, Any],
                                                       why: str) -> None:
    with pytest.raises(hp.HelmError) as err:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    assert why in str(err.value)


def _leaves(values: Any, prefix: str = "") -> set[str]:
    if isinstance(values, dict) and values:
        return {leaf for k, v in values.items() for leaf in _leaves(v, f"{prefix}{k}.")}
    return {prefix.rstrip(".")}


def _schema_leaves(schema: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for k, prop in schema.get("properties", {}).items():
        assert prop.get("description"), f"{prefix}{k} has no description in values.schema.json"
        if prop.get("type") == "object" and "properties" in prop:
            out |= _schema_leaves(prop, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def test_every_value_is_in_the_schema_with_a_description() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = _schema_leaves(schema)
    # Free-form objects (resources, probes, ...) are one schema leaf with keys below it.
    undocumented = {leaf for leaf in _leaves(values)
                    if not any(leaf == d or leaf.startswith(d + ".") for d in documented)}
    assert not undocumented, f"values.yaml keys missing from values.schema.json: {undocumented}"
    unset = {d for d in documented if d != "global"
             and not any(leaf == d or leaf.startswith(d + ".") for leaf in _leaves(values))}
    assert not unset, f"schema keys without a default in values.yaml: {unset}"


def test_readme_values_table_is_fresh() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("values_table", ROOT / "helm" / "values_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (CHART / "README.md").read_text()
    assert module.render_readme(readme) == readme, \
        "helm/llm-exporter/README.md values table is stale: run scripts/sync-chart.sh"
