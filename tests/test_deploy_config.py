"""compose.yaml, the GitHub workflows, the ECS task definitions and the Kubernetes manifests: parsed
and cross-checked (references, ports, secrets, drain timing), then run through their validators
(check-jsonschema, kubernetes-validate) — and each validator is shown to reject a broken file.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import yaml

from rescue import cli
from rescue.guardrails import GuardrailConfig, Guardrails, MemoryStore
from rescue.protocol import SigningKey
from rescue.tokenservice import (
    ADMIN_PATHS,
    DEFAULT_ADMIN_PORT,
    PublishedKeys,
    TokenService,
    TokenServiceConfig,
    serve_token_service_admin,
)

from .conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
ECS = ROOT / "deploy" / "ecs"
K8S = ROOT / "deploy" / "k8s"
IMAGE = "ghcr.io/beach/beach-rescue"
SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSPHRASE|PSK", re.IGNORECASE)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd=ROOT)


def relay_drain_s() -> float:
    """The relay's default drain period, from its config (the number every stop timeout must cover)."""
    from rescue.relay import RelayConfig

    config = RelayConfig(keys="jwks.json")
    return float(config.drain_s + config.close_timeout_s)


def token_service_stop_s(argv: list[str], env: dict[str, str]) -> float:
    """How long a SIGTERM'd token service may take to exit as deployed (decision 0023): its drain
    (``--drain-s`` on the command line, else ``RESCUE_DRAIN_S``, else the default), then the
    in-flight requests' graceful period and the store close."""
    from rescue.commands.token_service import DEFAULT_DRAIN_S, stop_bound_s

    return stop_bound_s(token_service_drain_s(argv, env, DEFAULT_DRAIN_S))


def token_service_drain_s(argv: list[str], env: dict[str, str], default: float) -> float:
    words = [w for arg in argv for w in shlex.split(arg)]  # ECS: one `sh -c` string
    drain: str | None = env.get("RESCUE_DRAIN_S")
    for i, word in enumerate(words):
        if word.startswith("--drain-s="):
            drain = word.split("=", 1)[1]
        elif word == "--drain-s":
            drain = words[i + 1]
    return default if drain is None else float(drain)


# --- compose.yaml ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def test_compose_services_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"redis", "keygen", "token-service", "relay-1", "relay-2", "probe"}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in svc.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], volume
    assert services["token-service"]["depends_on"]["keygen"]["condition"] == "service_completed_successfully"
    assert services["token-service"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_relays_have_distinct_ids_and_point_at_the_fleet(compose: dict[str, Any]) -> None:
    services = compose["services"]
    ts = _flags(services["token-service"]["command"])
    ts_url = f"http://token-service:{ts['port']}"
    node_ids = set()
    host_ports: list[str] = []
    for name in ("relay-1", "relay-2"):
        svc = services[name]
        assert svc["command"][0] == "relay"
        flags = _flags(svc["command"])
        node_ids.add(flags["node-id"])
        assert flags["token-service"] == ts_url
        assert flags["keys"] == f"{ts_url}/v1/fallback/keys"
        assert flags["redis-url"].startswith("redis://redis:")
        assert svc["depends_on"]["token-service"]["condition"] == "service_healthy"
        published = {p.split(":")[-1]: p for p in svc["ports"]}
        assert flags["admin-port"] in published, "admin port not published"
        assert flags["port"] in published
        assert float(svc["stop_grace_period"].rstrip("s")) > relay_drain_s()
        host_ports += [":".join(p.split(":")[:2]) for p in svc["ports"]]
    assert len(node_ids) == 2
    assert len(set(host_ports)) == len(host_ports), "two relays publish the same host port"


def test_compose_token_service_drains_within_its_stop_grace_period(compose: dict[str, Any]) -> None:
    svc = compose["services"]["token-service"]
    env = {k: str(v) for k, v in svc.get("environment", {}).items()}
    # Docker's default (10 s) is the default drain alone: SIGKILL would cut the last requests
    assert float(svc["stop_grace_period"].rstrip("s")) > token_service_stop_s(svc["command"], env)


def test_compose_binds_everything_to_localhost(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        if svc.get("network_mode") == "host":  # no port mapping: it must bind localhost itself
            assert _flags(svc["command"])["host"] == "127.0.0.1", name


def test_compose_probe_reaches_every_relay_as_a_user_does(compose: dict[str, Any]) -> None:
    """The probe (host network) uses the token service's published port, and tokens name each relay
    by its published port (--public-url), so a session on either node is reachable from the host."""
    services = compose["services"]
    probe = services["probe"]
    assert probe["command"][0] == "probe"
    flags = _flags(probe["command"])
    published = {p.rsplit(":", 1)[1]: p.rsplit(":", 1)[0] for p in services["token-service"]["ports"]}
    assert flags["api"] == f"http://{published['8080']}"
    assert (
        probe["environment"]["RESCUE_HEALTHCHECK_URL"] == f"http://127.0.0.1:{flags['metrics-port']}/healthz"
    )
    for name in ("relay-1", "relay-2"):
        relay_flags = _flags(services[name]["command"])
        host_port = {p.split(":")[2]: p.split(":")[1] for p in services[name]["ports"]}[relay_flags["port"]]
        assert relay_flags["public-url"] == f"ws://127.0.0.1:{host_port}/v1/connect"
        assert probe["depends_on"][name]["condition"] == "service_healthy"


def test_deployed_commands_parse_with_the_real_cli(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every flag compose, Kubernetes and ECS pass to `rescue relay|token-service` exists in the CLI
    (commands not registered yet are reported as skipped)."""
    for var in [v for v in os.environ if v.startswith("RESCUE_")]:
        monkeypatch.delenv(var)
    # (argv, names of the RESCUE_* variables the deployment sets, from values or secrets)
    runs: list[tuple[list[str], set[str]]] = [
        (svc["command"], set(svc.get("environment", {})))
        for svc in compose["services"].values()
        if "command" in svc
    ]
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] in ("StatefulSet", "Deployment", "CronJob"):
                spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
                container = spec["template"]["spec"]["containers"][0]
                runs.append((container["args"], {e["name"] for e in container.get("env", [])}))
    (ecs_relay,) = _ecs("relay.json")["containerDefinitions"]
    ecs_env = {e["name"] for e in ecs_relay["environment"] + ecs_relay["secrets"]}
    runs.append(
        (ecs_relay["command"], ecs_env | {"RESCUE_NODE_ID", "RESCUE_PUBLIC_URL"})
    )  # ecs_launch sets these
    (ecs_probe,) = _ecs("probe.json")["containerDefinitions"]
    runs.append((ecs_probe["command"], {e["name"] for e in ecs_probe["environment"] + ecs_probe["secrets"]}))
    registered = set(cli.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    missing = set()
    assert sum(argv[0] == "probe" for argv, _ in runs) == 4  # compose, k8s Deployment and CronJob, ECS
    for argv, env_names in runs:
        if argv[0] not in ("relay", "token-service", "probe"):
            continue
        if argv[0] not in registered:
            missing.add(argv[0])
            continue
        with monkeypatch.context() as m:
            for name in env_names:
                if name.startswith("RESCUE_"):
                    m.setenv(name, "placeholder")
            cli.build_parser().parse_args(argv)
    if missing:
        pytest.skip(f"not registered yet: {sorted(missing)}")


# --- GitHub workflows ---------------------------------------------------------------------------------


def _workflow(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def _steps(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) + " " + str(step.get("uses", "")) for step in job["steps"])


def test_ci_workflow_runs_the_tests_redis_and_the_load_smoke() -> None:
    ci = _workflow("ci.yml")
    assert "push" in ci["on"]
    assert "pull_request" in ci["on"]
    assert ci["permissions"] == {"contents": "read"}
    test = _steps(ci["jobs"]["test"])
    assert "apt-get install -y -qq redis-server" in test
    assert "./run test" in test
    assert "actions/setup-python" in test
    assert "python -m bench.run --quick" in _steps(ci["jobs"]["loadtest-smoke"])  # bench imports as a package
    deploy = _steps(ci["jobs"]["deploy-bundle"])
    assert "apt-get install -y -qq prometheus" in deploy
    assert "scripts/validate-deploy" in deploy
    for job in ci["jobs"].values():
        assert job["timeout-minutes"] <= 30


def test_container_workflow_pushes_and_signs_only_on_version_tags() -> None:
    wf = _workflow("container.yml")
    assert wf["on"]["push"]["tags"] == ["v*"]
    assert wf["permissions"] == {"contents": "read"}
    job = wf["jobs"]["image"]
    assert job["permissions"]["id-token"] == "write"
    assert job["permissions"]["packages"] == "write"
    assert wf["env"]["IMAGE"] == IMAGE
    tag_only = "startsWith(github.ref, 'refs/tags/v')"
    by_name = {step.get("name", step.get("uses")): step for step in job["steps"]}
    push = by_name["Build and push (amd64 + arm64)"]
    assert push["if"] == tag_only
    assert push["with"]["push"] is True
    assert push["with"]["file"] == "Containerfile"
    login = by_name["Log in to ghcr.io"]
    assert login["if"] == tag_only
    assert login["with"]["registry"] == "ghcr.io"
    installer = next(
        s for s in job["steps"] if str(s.get("uses", "")).startswith("sigstore/cosign-installer@")
    )
    assert installer["if"] == tag_only
    sign = by_name["Sign the pushed image by digest (keyless)"]
    assert sign["if"] == tag_only
    assert "cosign sign --yes" in sign["run"]
    assert "${{ steps.push.outputs.digest }}" in sign["env"]["DIGEST"]
    assert "@${DIGEST}" in sign["run"]  # sign the digest, never a mutable tag
    smoke = by_name["Build for the smoke test (local, amd64)"]
    assert smoke["with"]["push"] is False
    assert smoke["with"]["load"] is True
    assert "hadolint Containerfile" in _steps(job)


def test_every_action_is_pinned_to_a_commit_sha() -> None:
    # a tag can be moved to other code; a commit SHA cannot (the tag stays readable in the comment)
    pinned = re.compile(r"uses: [\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*$")
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for line in path.read_text().splitlines():
            if "uses:" in line.split("#")[0]:
                assert pinned.search(line), (path.name, line)


def test_ci_runs_the_range_jobs_and_the_clean_install_test() -> None:
    ci = _workflow("ci.yml")
    assert ci["jobs"]["range"]["strategy"]["matrix"]["kind"] == ["lowest", "newest"]
    assert "scripts/range-check ${{ matrix.kind }}" in _steps(ci["jobs"]["range"])
    assert "./run pytest -m clean_install" in _steps(ci["jobs"]["test"])
    for name in ("deploy-bundle", "loadtest-smoke"):
        assert "--require-hashes -r requirements/dev.txt" in _steps(ci["jobs"][name])
    ci_run = (ROOT / ".ci" / "run").read_text()
    commands = ("./run test", "./run pytest -m clean_install", "./run range lowest", "./run range newest")
    for command in commands:
        assert command in ci_run, command


def test_image_runs_a_real_session_before_anything_is_signed_or_pushed() -> None:
    steps = _workflow("container.yml")["jobs"]["image"]["steps"]
    runs = [str(step.get("run", "")) for step in steps]
    session = next(i for i, run in enumerate(runs) if "scripts/smoke-session image beach-rescue:ci" in run)
    push = next(i for i, step in enumerate(steps) if step.get("id") == "push")
    sign = next(i for i, run in enumerate(runs) if "cosign sign" in run)
    assert session < push < sign


def test_workflows_pass_the_github_schema() -> None:
    tool = require_tool("check-jsonschema")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    result = run(tool, "--builtin-schema", "vendor.github-workflows", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    tool = require_tool("check-jsonschema")
    bad = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    bad["jobs"]["test"]["runs-on"] = {"not": "valid"}
    bad["jobs"]["test"]["stepz"] = bad["jobs"]["test"].pop("steps")
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(bad))
    assert run(tool, "--builtin-schema", "vendor.github-workflows", str(path)).returncode != 0


# --- ECS ---------------------------------------------------------------------------------------------------


def _ecs(name: str) -> dict[str, Any]:
    return json.loads((ECS / name).read_text())


def test_ecs_task_definitions_validate_against_our_schema() -> None:
    tool = require_tool("check-jsonschema")
    schema = ECS / "task-definition.schema.json"
    assert run(tool, "--check-metaschema", str(schema)).returncode == 0
    files = [str(ECS / name) for name in ("relay.json", "token-service.json", "probe.json")]
    result = run(tool, "--schemafile", str(schema), *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("mutation", "why"),
    [
        (
            lambda c: c["environment"].append({"name": "RESCUE_ADMIN_KEY", "value": "inline!"}),
            "inline secret",
        ),
        (lambda c: c["logConfiguration"].update(logDriver="json-file"), "not awslogs"),
        (lambda c: c.pop("healthCheck"), "no health check"),
        (lambda c: c.update(stopTimeout=300), "stop timeout beyond Fargate's 120 s"),
        (lambda c: c["secrets"].append({"name": "X", "valueFrom": "plaintext"}), "secret not an SSM/SM ARN"),
        (lambda c: c.update(image="docker.io/someone/else:latest"), "foreign image"),
        (lambda c: c.update(stopTimeut=30), "typo"),
    ],
)
def test_ecs_schema_rejects(tmp_path: Path, mutation: Any, why: str) -> None:
    tool = require_tool("check-jsonschema")
    doc = copy.deepcopy(_ecs("relay.json"))
    mutation(doc["containerDefinitions"][0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    result = run(tool, "--schemafile", str(ECS / "task-definition.schema.json"), str(path))
    assert result.returncode != 0, why


def test_ecs_relay_timing_ports_and_identity() -> None:
    (relay,) = _ecs("relay.json")["containerDefinitions"]
    assert relay["stopTimeout"] > relay_drain_s()
    assert relay["entryPoint"] == ["python", "/opt/rescue/ecs_launch.py"]
    args = relay["command"]
    assert args[0] == "relay"
    ports = {m["containerPort"] for m in relay["portMappings"]}
    assert int(args[args.index("--port") + 1]) in ports
    assert int(args[args.index("--admin-port") + 1]) in ports
    env = {e["name"]: e["value"] for e in relay["environment"]}
    assert "{node_id}" in env["RESCUE_PUBLIC_URL_TEMPLATE"]
    assert relay["user"] == "10001:10001"
    assert _ecs("relay.json")["cpu"] == "1024"  # one node per core


def test_ecs_token_service_drains_within_its_stop_timeout() -> None:
    (ts,) = _ecs("token-service.json")["containerDefinitions"]
    env = {e["name"]: e["value"] for e in ts["environment"]}
    assert ts["stopTimeout"] > token_service_stop_s(ts["command"], env)


def test_ecs_secrets_never_inline() -> None:
    for name in ("relay.json", "token-service.json", "probe.json"):
        (container,) = _ecs(name)["containerDefinitions"]
        for var in container.get("environment", []):
            assert not SECRETISH.search(var["name"]), f"{name}: {var['name']} looks secret but is inline"
        for secret in container.get("secrets", []):
            assert secret["valueFrom"].startswith(("arn:aws:ssm:", "arn:aws:secretsmanager:"))
    (ts,) = _ecs("token-service.json")["containerDefinitions"]
    assert {s["name"] for s in ts["secrets"]} >= {
        "RESCUE_ADMIN_KEY",
        "RESCUE_SIGNING_KEY_JWK",
        "RESCUE_REDIS_URL",
        "RESCUE_SERVICE_KEYS",
        "RESCUE_REPORT_KEYS",
    }
    env = {e["name"]: e["value"] for e in ts["environment"]}
    assert env["RESCUE_HEALTHCHECK_URL"].endswith(f":{DEFAULT_ADMIN_PORT}/livez")


# --- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_kubernetes_validate_strict() -> None:
    tool = require_tool("kubernetes-validate")
    result = run(tool, "--strict", "--quiet", *sorted(str(p) for p in K8S.glob("*.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_rejects_a_typo(tmp_path: Path) -> None:
    tool = require_tool("kubernetes-validate")
    text = (
        (K8S / "relay.yaml")
        .read_text()
        .replace("terminationGracePeriodSeconds", "terminationGracePeriodSecs")
    )
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run(tool, "--strict", "--quiet", str(path)).returncode != 0


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_relay_drains_within_grace_and_probes_the_admin_port(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    relay = k8s[("StatefulSet", "relay")]
    pod = relay["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > relay_drain_s()
    container = _container(relay)
    assert "lifecycle" not in container  # SIGTERM drains by itself; no preStop sleep
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--admin-port={ports['admin']}" in container["args"]
    assert f"--port={ports['ws']}" in container["args"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"] == "1"
    env = {e["name"]: e for e in container["env"]}
    assert env["RESCUE_NODE_ID"]["value"] == "$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert relay["spec"]["serviceName"] == "relay"
    assert k8s[("Service", "relay")]["spec"]["clusterIP"] == "None"


def test_k8s_token_service_drains_within_grace_and_past_a_readiness_probe(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    from rescue.commands.token_service import DEFAULT_DRAIN_S

    deployment = k8s[("Deployment", "token-service")]
    container = _container(deployment)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > token_service_stop_s(
        container["args"], env
    )
    # the drain outlasts a whole readiness period plus the probe's timeout: at least one probe sees
    # /readyz 503 "draining" while the replica still serves
    readiness = container["readinessProbe"]
    drain_s = token_service_drain_s(container["args"], env, DEFAULT_DRAIN_S)
    assert drain_s >= readiness["periodSeconds"] + readiness.get("timeoutSeconds", 1)
    assert "lifecycle" not in container  # SIGTERM drains by itself; no preStop sleep


def test_decision_0021_says_how_long_a_token_service_takes_to_leave_the_service(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Not ready after ``failureThreshold`` failed probes a period apart: 0021 said "within a
    readiness period (5 s)" while the manifest left the threshold at Kubernetes' default 3."""
    readiness = _container(k8s[("Deployment", "token-service")])["readinessProbe"]
    period, failures = readiness["periodSeconds"], readiness.get("failureThreshold", 3)
    text = " ".join((ROOT / "docs" / "decisions" / "0021-liveness-and-readiness.md").read_text().split())
    assert f"not ready {period * (failures - 1)}-{period * failures} s after it begins" in text


def test_k8s_relay_names_resolve_while_the_node_is_not_ready(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """The relays' headless Service names nodes for peers that must reach *that* node (a session's
    resume): a full node (/readyz 503 at max_sessions or its connection cap) or a draining one
    keeps its DNS name; new sessions are kept off it by the Redis registry (deploy/README.md)."""
    service = k8s[("Service", "relay")]["spec"]
    assert service["clusterIP"] == "None"
    assert service["publishNotReadyAddresses"] is True
    # readiness still matters where it should: rollouts and the PDB read the pod's /readyz
    relay = k8s[("StatefulSet", "relay")]
    assert _container(relay)["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert relay["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert k8s[("PodDisruptionBudget", "relay")]["spec"]["maxUnavailable"] == 1


def test_k8s_selectors_match_and_pdbs_cover_workloads(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    for kind, name in (("StatefulSet", "relay"), ("Deployment", "token-service")):
        workload = k8s[(kind, name)]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        service = k8s[("Service", name)]
        assert service["spec"]["selector"].items() <= labels.items()
        pdb = k8s[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        container_ports = {p["name"] for p in _container(workload)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    assert k8s[("PodDisruptionBudget", "relay")]["spec"]["maxUnavailable"] == 1


def test_k8s_pods_are_locked_down_and_secrets_come_from_secrets(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for kind, name in (
        ("StatefulSet", "relay"),
        ("Deployment", "token-service"),
        ("Deployment", "probe"),
        ("CronJob", "probe-once"),
    ):
        workload = k8s[(kind, name)]
        if kind == "CronJob":
            workload = workload["spec"]["jobTemplate"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        container = _container(workload)
        assert container["image"].startswith(IMAGE + ":") or container["image"].startswith(IMAGE + "@")
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        for var in container.get("env", []):
            if SECRETISH.search(var["name"]) or var["name"] == "RESCUE_REDIS_URL":
                assert "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {var['name']} inline"
    ts = _container(k8s[("Deployment", "token-service")])
    assert ts["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert ts["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    mounts = {m["name"]: m for m in ts["volumeMounts"]}
    assert mounts["signing-key"]["readOnly"] is True
    assert "--signing-key=/etc/rescue/keys/signing-key.json" in ts["args"]


def test_k8s_scrape_job_names_match_the_rules(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-k8s.yml").read_text())
    (job,) = scrape["scrape_configs"]
    job_relabel = next(r for r in job["relabel_configs"] if r.get("target_label") == "job")
    assert job_relabel["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    rules = (ROOT / "deploy" / "prometheus" / "rules" / "beach-rescue.rules.yml").read_text()
    for kind, name in (("StatefulSet", "relay"), ("Deployment", "token-service"), ("Deployment", "probe")):
        template = k8s[(kind, name)]["spec"]["template"]
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        job_name = job_relabel["replacement"].replace("$1", component)
        assert f'job="{job_name}"' in rules
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        port = int(template["metadata"]["annotations"]["prometheus.io/port"])
        assert port in {p["containerPort"] for p in _container(k8s[(kind, name)])["ports"]}
        if name != "probe":  # scraped where they are probed: the admin port (decision 0024)
            assert port == _own_port(name, _container(k8s[(kind, name)])["args"]), name


# --- health checks: liveness never follows the store (decision 0021) ---------------------------------
#
# What fails a liveness check is restarted: Kubernetes' livenessProbe (and startupProbe, which kills
# a container that never passes it), and the image's HEALTHCHECK wherever something acts on it (ECS
# and Swarm replace an unhealthy container; compose starts the relays once the token service is
# healthy). A Redis outage answers 503 on the token service's /healthz and /readyz (they read the
# kill switch) and, through its status polls, on the relays' /readyz: a liveness check on any of
# them restarted every replica into a crash loop that cannot bring Redis back. So every liveness
# check of both services asks /livez (which reads nothing) on the service's own port, and readiness
# asks /readyz.

LIVENESS_PATH = "/livez"
READINESS_PATH = "/readyz"


def _healthcheck_script() -> Any:
    """deploy/container/healthcheck.py (the image's HEALTHCHECK), imported by path."""
    spec = importlib.util.spec_from_file_location(
        "deploy_healthcheck", ROOT / "deploy" / "container" / "healthcheck.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _own_port(service: str, argv: list[str]) -> int:
    """The port a service's health endpoints and ``/metrics`` are asked on: its admin port, for the
    token service too (decision 0024: a flood of its API port's connection cap answered the probes
    503 ``server_busy`` there), named on the command line, never left to the default
    (``--admin-port=N``/``--admin-port N`` styles both, as the manifests use both)."""
    flag = "--admin-port"
    for i, arg in enumerate(argv):
        if arg == flag:
            return int(argv[i + 1])
        if arg.startswith(flag + "="):
            return int(arg.split("=", 1)[1])
    raise AssertionError(f"{service}: no {flag} in {argv}")


def health_checks(
    compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]
) -> list[tuple[str, str, str, str]]:
    """Every health check declared for the token service and the relay, as (where, service, kind,
    URL inside the container): kind ``liveness`` (restarts what fails it) or ``readiness``."""
    script = _healthcheck_script()
    found: list[tuple[str, str, str, str]] = []

    def image_check(where: str, service: str, env: dict[str, str], argv: list[str]) -> None:
        url = script.health_url(env)
        assert urlsplit(url).port == _own_port(service, argv), f"{where}: {url} is not {service}'s port"
        found.append((where, service, "liveness", url))

    for kind, name in (("Deployment", "token-service"), ("StatefulSet", "relay")):
        container = _container(k8s[(kind, name)])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, meaning in (
            ("livenessProbe", "liveness"),
            ("startupProbe", "liveness"),
            ("readinessProbe", "readiness"),
        ):
            if probe in container:
                get = container[probe]["httpGet"]
                port = ports[get["port"]]
                assert port == _own_port(name, container["args"]), f"k8s {name} {probe} port"
                found.append((f"k8s {probe}", name, meaning, f"http://127.0.0.1:{port}{get['path']}"))
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        image_check("k8s image HEALTHCHECK", name, env, container["args"])
    for file, name in (("token-service.json", "token-service"), ("relay.json", "relay")):
        (container,) = _ecs(file)["containerDefinitions"]
        assert container["healthCheck"]["command"] == ["CMD", "python", "/opt/rescue/healthcheck.py"]
        env = {e["name"]: e["value"] for e in container["environment"]}
        argv = (
            shlex.split(container["command"][-1])
            if container["entryPoint"][0] == "sh"
            else container["command"]
        )
        image_check("ecs healthCheck", name, env, argv)
    for svc_name, svc in compose["services"].items():
        name = svc.get("command", [""])[0]
        if name not in ("token-service", "relay"):
            continue
        assert "healthcheck" not in svc, f"compose {svc_name}: the image's HEALTHCHECK, not its own"
        image_check(
            f"compose {svc_name}",
            name,
            {k: str(v) for k, v in svc.get("environment", {}).items()},
            svc["command"],
        )
    return found


def test_probes_and_scrapes_of_both_services_ask_their_admin_port(
    compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """Decision 0024: the token service's probes and scrapes moved off its API port, whose
    connection cap a flood can fill (newcomers get 503 ``server_busy``: the kubelet restarted every
    replica, and the scrape failed during the attack). Health checks: :func:`health_checks` (each on
    :func:`_own_port`); here the scrapes, the ports each manifest declares, and the k8s Service,
    which carries the API only (the kubelet and Prometheus reach the pod itself)."""
    from rescue.relay import DEFAULT_ADMIN_PORT as RELAY_ADMIN_PORT

    scraped: dict[str, set[int]] = {}
    for kind, name in (("Deployment", "token-service"), ("StatefulSet", "relay")):
        workload = k8s[(kind, name)]
        container = _container(workload)
        admin = _own_port(name, container["args"])
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["admin"] == admin, name
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        scraped.setdefault(name, set()).add(int(annotations["prometheus.io/port"]))
    service_ports = k8s[("Service", "token-service")]["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == ["api"]
    for file, name in (("token-service.json", "token-service"), ("relay.json", "relay")):
        (container,) = _ecs(file)["containerDefinitions"]
        argv = (
            shlex.split(container["command"][-1])
            if container["entryPoint"][0] == "sh"
            else container["command"]
        )
        admin = _own_port(name, argv)
        assert admin in {m["containerPort"] for m in container["portMappings"]}, file
        scraped[name].add(int(container["dockerLabels"]["prometheus.io/port"]))
    # prometheus.yml's static targets are compose's services
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose["services"]
    for job, name in (("beach-rescue-token-service", "token-service"), ("beach-rescue-relay", "relay")):
        for target in jobs[job]["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            assert services[host]["command"][0] == name, target
            scraped[name].add(int(port))
            assert int(port) == _own_port(name, services[host]["command"]), target
    assert scraped == {"token-service": {DEFAULT_ADMIN_PORT}, "relay": {RELAY_ADMIN_PORT}}
    for where, service, _, url in health_checks(compose, k8s):  # what the admin port serves
        if service == "token-service":
            assert urlsplit(url).path in ADMIN_PATHS, where
    # every port the image serves on is declared in it
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Containerfile").read_text(), re.MULTILINE)
    assert exposed is not None
    assert {DEFAULT_ADMIN_PORT, RELAY_ADMIN_PORT} <= {int(p) for p in exposed.group(1).split()}


def test_every_health_check_of_both_services_is_found(
    compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """The collector sees every declaration (a check it skipped would go unchecked below)."""
    where = {(w, service, kind) for w, service, kind, _ in health_checks(compose, k8s)}
    assert where == {
        ("k8s livenessProbe", "token-service", "liveness"),
        ("k8s readinessProbe", "token-service", "readiness"),
        ("k8s image HEALTHCHECK", "token-service", "liveness"),
        ("k8s livenessProbe", "relay", "liveness"),
        ("k8s startupProbe", "relay", "liveness"),
        ("k8s readinessProbe", "relay", "readiness"),
        ("k8s image HEALTHCHECK", "relay", "liveness"),
        ("ecs healthCheck", "token-service", "liveness"),
        ("ecs healthCheck", "relay", "liveness"),
        ("compose token-service", "token-service", "liveness"),
        ("compose relay-1", "relay", "liveness"),
        ("compose relay-2", "relay", "liveness"),
    }


def test_liveness_never_asks_an_endpoint_that_follows_the_store(
    compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    for where, service, kind, url in health_checks(compose, k8s):
        path = urlsplit(url).path
        if kind == "liveness":
            assert path == LIVENESS_PATH, f"{where} ({service}) restarts on {path}, which follows Redis"
        else:
            assert path == READINESS_PATH, f"{where} ({service}) readiness on {path}"


async def test_the_declared_paths_answer_as_declared_while_the_store_is_down(
    compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    """The token service's declared liveness paths answer 200 on its admin port with its store down
    and its readiness path 503 (200 once the store is back). Real processes on a SIGSTOPped Redis,
    relay included: tests/test_health_probes.py."""
    paths = {
        kind: {
            urlsplit(url).path
            for _, service, k, url in health_checks(compose, k8s)
            if service == "token-service" and k == kind
        }
        for kind in ("liveness", "readiness")
    }
    store = MemoryStore()
    config = TokenServiceConfig(
        keys=PublishedKeys(SigningKey.generate()), disable_oidc=True, relay_url="ws://r/v1/connect"
    )
    service = TokenService(config, Guardrails(store, GuardrailConfig()))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_token_service_admin, service, "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                for available in (True, False, True):
                    store.available = available
                    for path in paths["liveness"]:
                        assert (await http.get(path)).status_code == 200, (path, available)
                    for path in paths["readiness"]:
                        assert (await http.get(path)).status_code == (200 if available else 503), (
                            path,
                            available,
                        )
            nursery.cancel_scope.cancel()


# --- the runbook's commands ---------------------------------------------------------------------------


def runbook_commands() -> list[list[str]]:
    """Every ``rescue …`` invocation in the runbook's shell blocks, as argv (redirections dropped)."""
    text = (ROOT / "docs" / "operations" / "runbook.md").read_text()
    commands: list[list[str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            # shell words, quotes respected (a `grep -E 'a|b'` is one word), split at | || && ;
            lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            parts: list[list[str]] = [[]]
            for word in lexer:
                if word and set(word) <= set("|&;"):
                    parts.append([])
                else:
                    parts[-1].append(word)
            for words in parts:
                if words[:1] != ["rescue"]:
                    continue
                argv: list[str] = []
                for word in words[1:]:
                    if word.startswith(">"):
                        break
                    argv.append(word)
                commands.append(argv)
    return commands


def test_runbook_rescue_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each `rescue …` line in the runbook is accepted by the real CLI parser (flags exist)."""
    for var in [v for v in os.environ if v.startswith("RESCUE_")]:
        monkeypatch.delenv(var)
    parser = cli.build_parser()
    commands = runbook_commands()
    assert len(commands) >= 8
    seen = {argv[0] if argv[0] != "admin" else f"admin {argv[1]}" for argv in commands}
    assert {"keygen", "mint", "verify", "token-service"} <= seen
    assert {"admin pause", "admin resume", "admin status", "admin cohort", "admin init-store"} <= seen
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse reports unknown flags this way (2); --version exits 0
            if exc.code != 0:
                pytest.fail(f"runbook command does not parse: rescue {shlex.join(argv)} ({exc})")


# --- the synthetic probe ------------------------------------------------------------------------------


def test_probe_deployments_serve_metrics_where_they_are_scraped_and_probed(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    probe = k8s[("Deployment", "probe")]
    container = _container(probe)
    flags = _flags(container["args"])
    assert container["args"][0] == "probe"
    assert "once" not in flags
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(flags["metrics-port"]) == ports["metrics"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert flags["api"].startswith("https://")  # the public URL, as users reach it
    assert flags["cohort"] == "probe"  # the cohort the activation-ratio rule leaves out
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["RESCUE_SERVICE_KEY"]["valueFrom"]
    cron = k8s[("CronJob", "probe-once")]
    assert cron["spec"]["suspend"] is True  # an alternative to the Deployment, not a second probe
    job = cron["spec"]["jobTemplate"]["spec"]
    (once,) = job["template"]["spec"]["containers"]
    assert "--once" in once["args"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["activeDeadlineSeconds"] > float(_flags(once["args"])["timeout"])
    rules = (ROOT / "deploy" / "prometheus" / "rules" / "beach-rescue.rules.yml").read_text()
    assert 'cohort!="probe"' in rules

    (ecs,) = _ecs("probe.json")["containerDefinitions"]
    args = ecs["command"]
    assert args[0] == "probe"
    assert int(args[args.index("--metrics-port") + 1]) in {m["containerPort"] for m in ecs["portMappings"]}
    assert ecs["dockerLabels"]["prometheus.io/job"] == "beach-rescue-probe"
    assert ecs["dockerLabels"]["prometheus.io/port"] == args[args.index("--metrics-port") + 1]
    env_ecs = {e["name"]: e["value"] for e in ecs["environment"]}
    assert (
        env_ecs["RESCUE_HEALTHCHECK_URL"]
        == f"http://127.0.0.1:{args[args.index('--metrics-port') + 1]}/healthz"
    )
    assert {s["name"] for s in ecs["secrets"]} == {"RESCUE_SERVICE_KEY"}
