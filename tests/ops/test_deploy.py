"""deploy/: Kubernetes manifests against the API schemas, compose and Dockerfiles statically, Prometheus rules
with promtool, the Grafana dashboard's queries; all of them against the server's real config and metric names."""
from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest
import yaml
from kvstore_server.config import ServerConfig, settable_keys
from kvstore_server.metrics import declared_names

from .conftest import DEPLOY, ROOT, needs_promtool

K8S_VERSION = "1.30.0"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kvstore.json"
METRIC = re.compile(r"\bkvstore_[a-z0-9_]+\b")


def _documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return _documents()


@pytest.fixture(scope="module")
def k8s_config(k8s) -> ServerConfig:
    return ServerConfig.from_dict(yaml.safe_load(k8s["ConfigMap"]["data"]["server.yaml"]))


# --- Kubernetes --------------------------------------------------------------------------


def test_manifests_validate_against_the_kubernetes_schemas(k8s):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip package kubernetes-validate")
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"} <= set(k8s)
    for kind, doc in k8s.items():
        if kind != "ServiceMonitor":           # a CRD: checked structurally below
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = copy.deepcopy(k8s["StatefulSet"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_statefulset_runs_one_shard_per_pod_on_its_own_volume(k8s, k8s_config):
    spec = k8s["StatefulSet"]["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["serviceName"] == k8s["Service"]["metadata"]["name"]
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == k8s_config.data_dir
    assert pod["terminationGracePeriodSeconds"] > k8s_config.grace_seconds
    assert pod["enableServiceLinks"] is False, "a Service named kvstore would inject KVSTORE_PORT"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": k8s_config.port, "metrics": k8s_config.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == k8s_config.port
    assert k8s_config.host == "0.0.0.0"
    config_path = container["args"][container["args"].index("--config") + 1]
    assert mounts["config"]["mountPath"] == config_path
    secret_dir = mounts["auth"]["mountPath"]
    assert k8s_config.auth_token_file.startswith(secret_dir + "/")


def test_headless_service_and_scrape_annotations_name_the_metrics_port(k8s, k8s_config):
    service = k8s["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == k8s["StatefulSet"]["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc": k8s_config.port, "metrics": k8s_config.metrics_port}
    for annotated in (service["metadata"], k8s["StatefulSet"]["spec"]["template"]["metadata"]):
        annotations = annotated["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == k8s_config.metrics_port


def test_service_monitor_selects_the_service_and_its_metrics_port(k8s):
    monitor = k8s["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = k8s["Service"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in k8s["Service"]["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"] and "metrics" in port_names


# --- docker ------------------------------------------------------------------------------


def test_compose_runs_kvstore_scraped_by_prometheus_shown_by_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"kvstore", "prometheus", "grafana"}
    build = services["kvstore"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port} would be reachable from other hosts"
    server_config = ServerConfig.from_dict(yaml.safe_load((DEPLOY / "server.yaml").read_text()))
    assert int(services["kvstore"]["stop_grace_period"].rstrip("s")) > server_config.grace_seconds
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["kvstore:9090"] and job["job_name"] == "kvstore"
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    assert sources["datasources"][0]["uid"] == json.loads(DASHBOARD.read_text())["panels"][0]["datasource"]["uid"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_run_the_server_unprivileged_on_all_interfaces(dockerfile):
    text = (DEPLOY / dockerfile).read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    keywords = [parts[0] for parts in instructions]
    assert keywords.index("FROM") < keywords.index("COPY") < keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert dict(instructions)["ENTRYPOINT"] == '["kvstore-server"]'
    assert dict(instructions)["USER"] not in ("root", "0")
    assert "EXPOSE 50051 9090" in text and "KVSTORE_HOST=0.0.0.0" in text
    assert ("[server,gpu]" in text) == (dockerfile == "Dockerfile.gpu")
    assert ("KVSTORE_CACHE_DEVICE=cuda" in text) == (dockerfile == "Dockerfile.gpu")   # GPU image: GPU tables
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not ignored & {"kvstore", "server", "client", "protos", "native", "pyproject.toml", "README.md"}
    # the host cache's loops are compiled into the image, in the folder Numba is told to use
    assert "NUMBA_CACHE_DIR=/opt/kvstore-numba" in text and "host_kernels.warm()" in text
    assert text.index("NUMBA_CACHE_DIR=/opt/kvstore-numba") < text.index("host_kernels.warm()")


def test_statefulset_copies_the_images_compiled_loops_to_a_writable_cache(k8s):
    """Numba uses only a writable cache folder and the pod's root file system is read-only: an
    init container copies the image's compiled loops into the /tmp volume the server's
    NUMBA_CACHE_DIR names."""
    pod = k8s["StatefulSet"]["spec"]["template"]["spec"]
    (init,), (server,) = pod["initContainers"], pod["containers"]
    assert init["image"] == server["image"]
    assert init["command"] == ["cp", "-r", "/opt/kvstore-numba/.", "/tmp/kvstore-numba/"]
    env = {item["name"]: item.get("value") for item in server["env"]}
    assert env["NUMBA_CACHE_DIR"] == "/tmp/kvstore-numba"
    tmp = {mount["name"]: mount["mountPath"] for mount in init["volumeMounts"]}
    assert tmp == {"tmp": "/tmp"} and {"name": "tmp", "mountPath": "/tmp"} in server["volumeMounts"]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


# --- Prometheus and Grafana ----------------------------------------------------------------


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    checked = _promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
         .replace("$table", ".*")} for i, expr in enumerate(_dashboard_queries())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = _promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alerts_and_dashboard_use_only_metrics_the_server_defines():
    alerts = (PROMETHEUS / "alerts.yml").read_text()
    recorded = set(re.findall(r"record: (\S+)", alerts))
    used = set(METRIC.findall(alerts)) | {m for q in _dashboard_queries() for m in METRIC.findall(q)}
    exposed = declared_names() | {f"kvstore_rpc_duration_seconds_{s}" for s in ("bucket", "count", "sum")}
    assert used - exposed - recorded == set()
    panels = " ".join(_dashboard_queries())
    for needed in ("kvstore_rpc_duration_seconds_bucket", "kvstore_cache_hits_total", "kvstore_evictions_total",
                   "kvstore_rocksdb_live_sst_bytes"):
        assert needed in panels


def test_operations_doc_lists_every_metric_and_config_key():
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert {name for name in declared_names() if f"`{name}`" not in doc} == set()
    keys = {key for key in settable_keys() if f"`{key}`" not in doc and key not in ("tls_cert", "tls_key")}
    assert keys == set() and "`tls_cert`, `tls_key`" in doc


# --- scale-out -------------------------------------------------------------------------------


def test_statefulset_pod_ordinal_is_the_shard_index(k8s):
    from kvstore_server.cluster_service import shard_index_of

    (container,) = k8s["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--shard-index") + 1] == "$(POD_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    name = k8s["StatefulSet"]["metadata"]["name"]
    assert [shard_index_of(f"{name}-{i}") for i in (0, 1, 12)] == [0, 1, 12]
    assert not any(e.startswith("KVSTORE_") for e in env), "unknown KVSTORE_* variables stop the server"


def test_statefulset_shard_names_are_the_clients_shard_list(k8s):
    from kvstore_client.shard_map import statefulset_addresses

    service, statefulset = k8s["Service"], k8s["StatefulSet"]
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    host = f"{service['metadata']['name']}.default.svc.cluster.local:{port}"
    replicas = statefulset["spec"]["replicas"]
    assert statefulset_addresses(host, replicas) == [
        f"{statefulset['metadata']['name']}-{i}.{service['metadata']['name']}.default.svc.cluster.local:{port}"
        for i in range(replicas)]
    assert service["spec"]["publishNotReadyAddresses"] is True, "a restarting shard must keep its DNS name"


def test_sharded_compose_runs_two_shards_each_on_its_own_volume():
    compose = yaml.safe_load((DEPLOY / "docker-compose.shards.yml").read_text())
    services = compose["services"]
    assert set(services) == {"kvstore-0", "kvstore-1"}
    volumes, ports = set(), set()
    server_config = ServerConfig.from_dict(yaml.safe_load((DEPLOY / "server.yaml").read_text()))
    for index, name in enumerate(sorted(services)):
        service = services[name]
        command = service["command"]
        assert command[command.index("--shard-index") + 1] == str(index)
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        data = [v for v in service["volumes"] if v.endswith(":/data")]
        assert len(data) == 1 and data[0].split(":")[0] in compose["volumes"]
        volumes.add(data[0])
        (port,) = service["ports"]
        assert port.startswith("127.0.0.1:") and port.endswith(f":{server_config.port}")
        ports.add(port)
        assert int(service["stop_grace_period"].rstrip("s")) > server_config.grace_seconds
    assert len(volumes) == len(ports) == 2
