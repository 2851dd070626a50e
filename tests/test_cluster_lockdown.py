"""The shipped cluster is locked down: what the KubeRay manifests, ``cluster.yaml`` and the image build leave open.

The manifests are rendered (and the committed ones read) and checked for what an attacker on the cluster network
would try: the dashboard on every interface, Ray ports reachable from other pods, a pod without Ray's token
authentication, a secret written as a value, the API keys in a container that does not serve. The NetworkPolicies
are evaluated with Kubernetes' rules (rules OR-ed; a peer's namespace and pod selectors AND-ed; a rule without
``from`` or ``ports`` matches all) against the callers that matter.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from aigc.cluster import lockdown
from aigc.cluster.kuberay import NAMES, render

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
NAMESPACE = "ml"  # where the manifests are applied (any namespace but the operator's)
SPEC_KEY = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
FILE = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
# Ray's ports on a node: GCS, dashboard, client, dashboard agent, metrics, node manager, a worker's port.
RAY_PORTS = [6379, 8265, 10001, 52365, 8080, 6380, 10002]


def _committed() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in render():
        docs = list(yaml.safe_load_all((KUBERAY / name).read_text()))
        out[name] = docs if name == "networkpolicy.yaml" else docs[0]
    return out


@pytest.fixture(params=["rendered", "committed"])
def manifests(request) -> dict[str, Any]:
    return render() if request.param == "rendered" else _committed()


def _cluster(manifests: dict[str, Any], kind: str) -> dict[str, Any]:
    m = manifests[FILE[kind]]
    return m["spec"] if SPEC_KEY[kind] is None else m["spec"][SPEC_KEY[kind]]


def _groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _containers(spec: dict[str, Any]):
    for group in _groups(spec):
        pod = group["template"]
        for c in pod["spec"]["containers"]:
            yield group, pod, c


def _strings(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


# ------------------------------------------------------------------------------------------------- dashboard
def test_no_dashboard_on_every_interface(manifests):
    for kind in NAMES:
        for group in _groups(_cluster(manifests, kind)):
            assert "dashboard-host" not in group["rayStartParams"], kind  # KubeRay's default; the policy guards it
    serve_text = manifests["rayservice.yaml"]["spec"]["serveConfigV2"]
    outside_serve = [s for s in _strings(manifests) if s != serve_text]
    assert not [s for s in outside_serve if "0.0.0.0" in s]
    # The one address on every interface is Serve's HTTP proxy: the endpoint, behind API keys.
    serve = yaml.safe_load(serve_text)
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = serve["applications"]
    assert [s for s in _strings(app) if "0.0.0.0" in s] == ["serve.host=0.0.0.0"]


# ---------------------------------------------------------------------------------------------- token auth
def test_every_ray_container_runs_with_token_auth_from_the_secret(manifests):
    for kind in NAMES:
        spec = _cluster(manifests, kind)
        # KubeRay >= 1.6 takes the token from the same Secret for its own dashboard calls.
        assert spec["authOptions"] == {"mode": "token", "secretName": lockdown.RAY_TOKEN_SECRET}, kind
        for _, _, c in _containers(spec):
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", (kind, c["name"])
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": lockdown.RAY_TOKEN_SECRET, "key": "auth_token"}, (kind, c["name"])  # required


# ----------------------------------------------------------------------------------------- secrets by ref
KEY_LIKE = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # an AWS access key id
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),  # an OpenAI-style API key
    re.compile(r"\b[0-9a-f]{32,}\b"),  # a hex token (`openssl rand -hex`)
    re.compile(r"[A-Za-z0-9+/]{40}"),  # an AWS secret access key
]
PLAIN_ENV = {"RAY_SERVE_LOG_TO_STDERR", "RAY_AUTH_MODE"}  # settings, not secrets


def test_every_secret_is_a_reference_never_a_value(manifests):
    for kind in NAMES:
        for _, _, c in _containers(_cluster(manifests, kind)):
            for e in c["env"]:
                if e["name"] in PLAIN_ENV:
                    continue
                assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], (kind, e)
            assert "envFrom" not in c, (kind, c["name"])  # every variable named, none imported wholesale
    for s in _strings(manifests):
        for pattern in KEY_LIKE:
            assert not pattern.search(s), f"a key-like value in the manifests: {pattern.pattern} in {s[:80]!r}"
    # Nor through the Serve config: no runtime_env variables, no keys variable.
    serve = yaml.safe_load(manifests["rayservice.yaml"]["spec"]["serveConfigV2"])
    assert all("runtime_env" not in app for app in serve["applications"])
    assert "AIGC_API_KEYS" not in manifests["rayservice.yaml"]["spec"]["serveConfigV2"]


def test_storage_credentials_reach_every_container_that_reads_storage(manifests):
    for kind in NAMES:
        for _, _, c in _containers(_cluster(manifests, kind)):
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                # Optional: a pod role (IRSA, Workload Identity) may provide them instead.
                assert refs[key] == {"name": lockdown.STORAGE_SECRET, "key": key, "optional": True}, (kind, key)


def _api_key_uses(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """Where a container gets the API keys Secret: mount paths and variable names."""
    secret = lockdown.API_KEYS_SECRET
    volumes = {v["name"] for v in pod["spec"].get("volumes", []) if v.get("secret", {}).get("secretName") == secret}
    uses = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in volumes]
    refs = [(e["name"], e.get("valueFrom", {}).get("secretKeyRef", {})) for e in container["env"]]
    return uses + [name for name, ref in refs if ref.get("name") == secret]


def test_api_keys_are_mounted_only_where_the_serve_ingress_runs(manifests):
    from aigc.serve.ingress import INGRESS_CPUS, OpenAIIngress

    holders = []
    for kind in NAMES:
        spec = _cluster(manifests, kind)
        for group, pod, c in _containers(spec):
            if _api_key_uses(pod, c):
                holders.append((kind, group.get("groupName", "head"), _api_key_uses(pod, c)))
    assert holders == [("RayService", "head", [lockdown.API_KEYS_DIR])]
    # The ingress is pinned there: it asks for a resource that the RayService's head alone offers.
    serve = yaml.safe_load(manifests["rayservice.yaml"]["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    (ingress,) = [d for d in app["deployments"] if d["name"] == OpenAIIngress.name]
    assert ingress["ray_actor_options"] == {"num_cpus": INGRESS_CPUS, "resources": {lockdown.INGRESS_RESOURCE: 1}}
    for kind in NAMES:
        for group in _groups(_cluster(manifests, kind)):
            offered = json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))
            expected = 100 if (kind, group.get("groupName")) == ("RayService", None) else None
            assert offered.get(lockdown.INGRESS_RESOURCE) == expected, (kind, group.get("groupName"))
    # ... and reads the keys from the mounted file, failing closed without them.
    assert f"serve.api_keys_file={lockdown.API_KEYS_DIR}/keys" in app["args"]["overrides"]
    assert "serve.auth=keys" in app["args"]["overrides"]


# --------------------------------------------------------------------------------------- network policies
def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the only form the renderer writes
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(policy: dict[str, Any], policy_ns: str, ns: str, labels: dict[str, str], port: int) -> bool:
    """Whether ``policy`` (in ``policy_ns``) lets a pod (``ns``, ``labels``) in on TCP ``port``."""
    for rule in policy["spec"].get("ingress", []):
        if "ports" in rule and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"]):
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            ns_ok = (
                _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns})
                if "namespaceSelector" in peer
                else ns == policy_ns
            )
            if ns_ok and _selects(peer.get("podSelector", {}), labels):
                return True
    return False


def _pods(manifests: dict[str, Any], kind: str) -> list[dict[str, str]]:
    return [g["template"]["metadata"]["labels"] for g in _groups(_cluster(manifests, kind))]


def _policy_of(manifests: dict[str, Any], kind: str) -> dict[str, Any]:
    """The one policy selecting every pod of ``kind``'s cluster (and no other cluster's pod)."""
    policies = manifests["networkpolicy.yaml"]
    assert all(p["kind"] == "NetworkPolicy" and p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    mine = [p for p in policies if any(_selects(p["spec"]["podSelector"], pod) for pod in _pods(manifests, kind))]
    assert len(mine) == 1, f"{kind}: {len(mine)} NetworkPolicies select its pods"
    (policy,) = mine
    assert all(_selects(policy["spec"]["podSelector"], pod) for pod in _pods(manifests, kind)), kind
    for other in NAMES:
        if other != kind:
            assert not any(_selects(policy["spec"]["podSelector"], pod) for pod in _pods(manifests, other))
    return policy


OPERATOR = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"}
STRANGER = {"app": "web"}  # any other pod, in the same namespace


@pytest.mark.parametrize("kind", list(NAMES))
def test_ray_ports_admit_only_the_clusters_own_pods_and_the_operator(manifests, kind):
    policy = _policy_of(manifests, kind)
    own = _pods(manifests, kind)[0]
    sibling = _pods(manifests, next(k for k in NAMES if k != kind))[0]  # another aigc cluster's pod
    submitter = {"ray.io/originated-from-cr-name": NAMES[kind], "ray.io/originated-from-crd": "RayJob"}
    op_ns = lockdown.OPERATOR_NAMESPACE
    for port in RAY_PORTS:
        assert _admits(policy, NAMESPACE, NAMESPACE, own, port), (kind, port)
        outsiders = [("stranger", NAMESPACE, STRANGER), ("other cluster", NAMESPACE, sibling),
                     ("other namespace", "web", own), ("operator-like pod", NAMESPACE, OPERATOR)]  # fmt: skip
        for who, ns, labels in outsiders:
            assert not _admits(policy, NAMESPACE, ns, labels, port), (kind, port, who)
        calls_dashboard = kind != "RayCluster" and port == lockdown.DASHBOARD_PORT
        assert _admits(policy, NAMESPACE, op_ns, OPERATOR, port) == calls_dashboard, (kind, port, "operator")
        job_submitter = kind == "RayJob" and port == lockdown.DASHBOARD_PORT
        assert _admits(policy, NAMESPACE, NAMESPACE, submitter, port) == job_submitter, (kind, port, "submitter")
    # The endpoint's port admits anyone, on the RayService only.
    assert _admits(policy, NAMESPACE, "web", STRANGER, lockdown.SERVE_PORT) == (kind == "RayService"), kind


def test_the_operator_namespace_is_the_one_admitted():
    policies = render(operator_namespace="kuberay-system")["networkpolicy.yaml"]
    (service,) = [p for p in policies if p["metadata"]["name"] == f"{NAMES['RayService']}-ray"]
    assert _admits(service, NAMESPACE, "kuberay-system", OPERATOR, lockdown.DASHBOARD_PORT)
    assert not _admits(service, NAMESPACE, "default", OPERATOR, lockdown.DASHBOARD_PORT)


# ------------------------------------------------------------------------------------------- cluster.yaml
def _launcher() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_keeps_the_dashboard_on_loopback_and_auth_on():
    launcher = _launcher()
    (head_start,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    (worker_start,) = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    assert re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_start), head_start
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    for command in (head_start, worker_start):
        assert command.startswith("RAY_AUTH_MODE=token "), command  # fails to start without the token
    # The token reaches every node where `ray start` looks for it; the operator's own copy stays local.
    assert launcher["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert launcher["auth"]["ssh_user"] == "ubuntu"
    comments = (ROOT / "cluster.yaml").read_text()
    assert "ray dashboard cluster.yaml" in comments and "ray get-auth-token --generate" in comments


def _rsync_excludes(path: str, patterns: list[str]) -> bool:
    """Whether rsync's ``--exclude PATTERN`` rules drop ``path`` (or a directory above it): a pattern without an
    inner slash matches a name at any depth, a trailing slash matches directories only, ``*`` one name's
    characters. ``ray up`` passes ``rsync_exclude`` as ``--exclude`` and ``rsync_filter`` files as
    ``--filter 'dir-merge,- FILE'`` (the file's lines are exclude patterns)."""
    parts = path.split("/")
    for pattern in patterns:
        dir_only, name = pattern.endswith("/"), pattern.strip("/")
        candidates = parts[:-1] if dir_only else parts
        if "/" in name:  # anchored at the transfer's root
            depth = name.count("/") + 1
            if len(candidates) >= depth and fnmatch.fnmatchcase("/".join(parts[:depth]), name):
                return True
        elif any(fnmatch.fnmatchcase(part, name) for part in candidates):
            return True
    return False


def test_cluster_yaml_ships_the_project_only():
    launcher = _launcher()
    assert launcher["file_mounts"]["/home/ubuntu/aigc"] == "."
    excludes = launcher["rsync_exclude"]
    # The generated directories stay home on rsync_exclude alone (a copy of the project without .gitignore too).
    for path in [".venv/bin/python", "runs/demo/metrics.jsonl", "mlruns/0/meta.yaml", "runs/demo/checkpoints/c/x",
                 "checkpoints/x.pt", ".git/HEAD", "platform/aigc/__pycache__/storage.cpython-311.pyc"]:  # fmt: skip
        assert _rsync_excludes(path, excludes), f"`ray up` would ship {path}"
    # .gitignore is a filter too (anything else the project ignores), and every file of the project is shipped.
    assert launcher["rsync_filter"] == [".gitignore"]
    gitignore = [ln.strip() for ln in (ROOT / ".gitignore").read_text().splitlines()]
    rules = excludes + [ln for ln in gitignore if ln and not ln.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dropped = [f for f in tracked if _rsync_excludes(f, rules)]
    assert not dropped, f"`ray up` would leave project files behind: {dropped[:5]}"


# ------------------------------------------------------------------------------------------ docker build
def _dockerignore_regexes() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore's rules as (negated, regex), in order (Docker's syntax: ``**`` any depth, ``*`` one
    name's characters, a path excluded with its whole subtree, the last matching rule wins)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rules.append((negated, re.compile(regex.replace(r"\?", "[^/]"))))
    return rules


def _docker_excludes(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in _dockerignore_regexes():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_generated_directories_out_of_the_image():
    generated = [".venv/bin/python", ".git/HEAD", "runs/demo/checkpoint_000001/model.pt", "mlruns/0/meta.yaml",
                 "runs/demo/checkpoints/step-10/adapter_model.safetensors", "checkpoints/x.pt",
                 "platform/aigc/__pycache__/storage.cpython-311.pyc", ".pytest_cache/v/cache", ".ruff_cache/0.6/x",
                 "platform/aigc_platform.egg-info/PKG-INFO", "tensorboard/events.out"]  # fmt: skip
    for path in generated:
        assert _docker_excludes(path), f".dockerignore lets {path} into the build context"
    # Everything .gitignore calls generated stays out too.
    for entry in (ROOT / ".gitignore").read_text().splitlines():
        entry = entry.strip()
        if entry and not entry.startswith("#"):
            sample = entry.strip("/").replace("*", "x") + "/file"
            assert _docker_excludes(sample), f".gitignore's {entry} is not in .dockerignore"


def test_the_dockerfile_copies_the_project_by_name_and_nothing_it_needs_is_ignored():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    sources = []
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    assert sources and "." not in sources, "COPY names the project's files, never the whole context"
    for src in sources:
        tracked = subprocess.run(["git", "ls-files", "--", src], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()  # fmt: skip
        assert tracked, f"the Dockerfile copies {src}, which the project does not have"
        ignored = [f for f in tracked if _docker_excludes(f)]
        assert not ignored, f".dockerignore drops files the image needs: {ignored[:5]}"
