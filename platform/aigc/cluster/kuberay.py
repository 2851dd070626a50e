"""KubeRay manifests rendered from the project's own files, so Kubernetes runs what ``cluster.yaml`` and
``serve run serve_apps/openai.yaml`` run.

    aigc kuberay [--image REPO:TAG] [--storage s3://my-bucket/aigc] [--operator-namespace NS] [--out deploy/kuberay]

writes four manifests:

- ``raycluster.yaml``: a long-lived cluster shaped like ``cluster.yaml`` (a CPU head, 0-4 autoscaled one-GPU
  workers) for ``ray job submit`` / ``aigc submit``;
- ``rayjob.yaml``: a fine-tune (``jobs/finetune.py``) on a cluster of its own, deleted when the job ends;
- ``rayservice.yaml``: the endpoint; its ``serveConfigV2`` is ``serve_apps/openai.yaml`` with paths made
  absolute inside the image, the HTTP proxy on 0.0.0.0 (the Kubernetes Service reaches it there) and API keys
  required, read from the ``aigc-api-keys`` Secret mounted where the ingress runs;
- ``networkpolicy.yaml``: one NetworkPolicy per cluster above (:mod:`aigc.cluster.lockdown`: what each admits,
  and the token authentication and secrets every pod gets).

Every pod runs one image: ``deploy/kuberay/Dockerfile`` (Ray's image of the same Ray version as
``cluster.yaml``'s, plus this project installed as ``cluster.yaml``'s ``setup_commands`` install it).
``tests/test_kuberay.py`` checks that the committed manifests are what this module renders;
``tests/test_cluster_lockdown.py`` checks what they leave open.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import yaml

from aigc.cluster import lockdown

__all__ = [
    "DEFAULT_IMAGE",
    "NAMES",
    "RAY_VERSION",
    "cluster_spec",
    "dump",
    "render",
    "serve_config",
    "write_manifests",
]

RAY_VERSION = "2.60.0"  # as in cluster.yaml and pyproject.toml
DEFAULT_IMAGE = "ghcr.io/your-org/aigc:latest"  # built from deploy/kuberay/Dockerfile
IMAGE_ROOT = "/home/ray/aigc"  # where the Dockerfile puts the project (WORKDIR)
NAMES: dict[lockdown.Kind, str] = {"RayCluster": "aigc", "RayJob": "aigc-finetune", "RayService": "aigc-serve"}
INGRESS_CPUS = 0.1  # as aigc.serve.ingress declares it: a Serve config's ray_actor_options replace the code's
_HEADER = "# Rendered by `aigc kuberay` from serve_apps/openai.yaml and cluster.yaml's shape: edit those, re-render.\n"


def _container(name: str, image: str, cpu: str, memory: str, gpus: int = 0, ports: dict[str, int] | None = None,
               api_keys: bool = False) -> dict[str, Any]:  # fmt: skip
    resources: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        # Serve's log lines stay in the session's log files, as `init_ray` arranges for local runs.
        "env": [
            {"name": "RAY_SERVE_LOG_TO_STDERR", "value": "0"},
            *lockdown.ray_auth_env(),
            *lockdown.storage_env(),
        ],
    }
    if api_keys:
        c["volumeMounts"] = [lockdown.api_keys_mount()[1]]
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports.items()]
    return c


def _pod(name: str, container: dict[str, Any], api_keys: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container]}
    if api_keys:
        spec["volumes"] = [lockdown.api_keys_mount()[0]]
    return {"metadata": {"labels": lockdown.pod_labels(name)}, "spec": spec}


def cluster_spec(image: str, name: str, serves: bool = False) -> dict[str, Any]:
    """A RayCluster spec shaped like ``cluster.yaml``: a CPU head (8 CPUs) and 0-4 workers with one GPU each.

    Args:
        image: the image every pod runs.
        name: the RayCluster, RayJob or RayService it belongs to (its pods' labels, for its NetworkPolicy).
        serves: the endpoint's cluster: the head offers the ``aigc_ingress`` resource the Serve ingress asks
            for, and only the head gets the API keys.
    """
    head_ports = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
    # The head runs the drivers, the Train/Tune controllers and the Serve ingress; no GPU, as in cluster.yaml
    # (num-cpus keeps Ray from counting the node's cores instead of the pod's limit). No dashboard-host: KubeRay
    # binds the dashboard where its operator reaches it, and the NetworkPolicy admits only who needs it.
    head_params = {"num-cpus": "8"}
    if serves:
        # JSON quoted for the shell, as KubeRay hands it to `ray start --resources=...`: up to 100 ingress replicas.
        head_params["resources"] = json.dumps(json.dumps({lockdown.INGRESS_RESOURCE: 100}))
    head = _container("ray-head", image, "8", "32Gi", ports=head_ports, api_keys=serves)
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": lockdown.auth_options(),  # KubeRay >= 1.6: the operator uses the same token
        "enableInTreeAutoscaling": True,  # cluster.yaml's autoscaler: GPU workers come and go with demand
        "autoscalerOptions": {"idleTimeoutSeconds": 600},  # cluster.yaml: idle_timeout_minutes: 10
        "headGroupSpec": {"rayStartParams": head_params, "template": _pod(name, head, api_keys=serves)},
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 4,  # cluster.yaml: max_workers: 4
                "rayStartParams": {"num-cpus": "8", "num-gpus": "1"},
                "template": _pod(name, _container("ray-worker", image, "8", "32Gi", gpus=1)),
            }
        ],
    }


def serve_config(serve_yaml: str, storage: str) -> dict[str, Any]:
    """``serve_apps/openai.yaml`` as a RayService runs it: config paths absolute in the image, registry and
    outputs on shared storage, HTTP on 0.0.0.0 with API keys required, read from the mounted Secret by the
    ingress, which runs on the head (the only node offering the ``aigc_ingress`` resource, and holding the keys)."""
    with open(serve_yaml) as f:
        cfg = yaml.safe_load(f)
    cfg = copy.deepcopy(cfg)
    cfg["http_options"] = {"host": "0.0.0.0", "port": 8000}
    for app in cfg["applications"]:
        args = app.setdefault("args", {}) or {}
        if isinstance(args.get("config"), str) and not os.path.isabs(args["config"]):
            args["config"] = f"{IMAGE_ROOT}/{args['config']}"
        args["overrides"] = [
            *(args.get("overrides") or []),
            f"registry_dir={storage}/registry",
            f"output_dir={storage}/runs/serve",
            "serve.host=0.0.0.0",  # what the proxy binds
            "serve.auth=keys",  # no keys, no endpoint
            f"serve.api_keys_file={lockdown.API_KEYS_FILE}",
        ]
        app["args"] = args
        ingress = {"num_cpus": INGRESS_CPUS, "resources": {lockdown.INGRESS_RESOURCE: 1}}
        app["deployments"] = [
            *(d for d in app.get("deployments") or [] if d.get("name") != "OpenAIIngress"),
            {"name": "OpenAIIngress", "ray_actor_options": ingress},
        ]
    return cfg


def render(image: str = DEFAULT_IMAGE, storage: str = "s3://my-bucket/aigc",
           serve_yaml: str = "serve_apps/openai.yaml",
           operator_namespace: str = lockdown.OPERATOR_NAMESPACE) -> dict[str, Any]:  # fmt: skip
    """The manifests, by file name (``networkpolicy.yaml`` holds a list: one document per cluster).

    Args:
        image: the image every pod runs (built from ``deploy/kuberay/Dockerfile``).
        storage: shared storage both the job and the service see (``registry/`` and ``runs/`` under it).
        serve_yaml: the Serve config the RayService embeds.
        operator_namespace: the KubeRay operator's namespace, admitted to the dashboards it calls.
    """
    labels = {"app.kubernetes.io/part-of": "aigc"}
    finetune = (
        f"python {IMAGE_ROOT}/jobs/finetune.py --config {IMAGE_ROOT}/configs/demo.yaml "
        f"output_dir={storage}/runs/demo registry_dir={storage}/registry"
    )
    cluster, job, service = NAMES["RayCluster"], NAMES["RayJob"], NAMES["RayService"]
    return {
        "raycluster.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": cluster, "labels": labels},
            "spec": cluster_spec(image, cluster),
        },
        "rayjob.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": job, "labels": labels},
            "spec": {
                "entrypoint": finetune,
                "shutdownAfterJobFinishes": True,  # the job's cluster goes away with it ...
                "ttlSecondsAfterFinished": 600,  # ... 10 minutes after, so its logs can still be read
                "rayClusterSpec": cluster_spec(image, job),
            },
        },
        "rayservice.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": {"name": service, "labels": labels},
            "spec": {
                # A string, as KubeRay takes it; an edit here is applied in place (a Serve redeploy).
                "serveConfigV2": yaml.safe_dump(serve_config(serve_yaml, storage), sort_keys=False),
                "rayClusterConfig": cluster_spec(image, service, serves=True),
            },
        },
        "networkpolicy.yaml": [lockdown.network_policy(n, k, operator_namespace) for k, n in NAMES.items()],
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (``serveConfigV2``) as literal blocks, readable and diffable in the manifest."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dump(manifest: dict[str, Any] | list[dict[str, Any]]) -> str:
    """One manifest (or a list, as one YAML document each) as the text ``write_manifests`` writes."""
    docs = manifest if isinstance(manifest, list) else [manifest]
    return _HEADER + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)


def write_manifests(out_dir: str, **kwargs: Any) -> list[str]:
    """Render (see :func:`render`) into ``out_dir``; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, manifest in render(**kwargs).items():
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.write(dump(manifest))
        written.append(path)
    return written
