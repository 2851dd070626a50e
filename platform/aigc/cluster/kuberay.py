"""KubeRay manifests rendered from the project's own files, so Kubernetes runs what ``cluster.yaml`` and
``serve run serve_apps/openai.yaml`` run.

    aigc kuberay [--image REPO:TAG] [--storage s3://my-bucket/aigc] [--out deploy/kuberay]

writes three manifests (``apiVersion: ray.io/v1``):

- ``raycluster.yaml``: a long-lived cluster shaped like ``cluster.yaml`` (a CPU head, 0-4 autoscaled one-GPU
  workers) for ``ray job submit`` / ``aigc submit``;
- ``rayjob.yaml``: a fine-tune (``jobs/finetune.py``) on a cluster of its own, deleted when the job ends;
- ``rayservice.yaml``: the endpoint; its ``serveConfigV2`` is ``serve_apps/openai.yaml`` with paths made
  absolute inside the image, the HTTP proxy on 0.0.0.0 (the Kubernetes Service reaches it there) and API keys
  required, read from the ``aigc-api-keys`` Secret.

Every pod runs one image: ``deploy/kuberay/Dockerfile`` (Ray's image of the same Ray version as
``cluster.yaml``'s, plus this project installed as ``cluster.yaml``'s ``setup_commands`` install it).
``tests/test_kuberay.py`` checks that the committed manifests are what this module renders.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import yaml

__all__ = ["DEFAULT_IMAGE", "RAY_VERSION", "cluster_spec", "dump", "render", "serve_config", "write_manifests"]

RAY_VERSION = "2.60.0"  # as in cluster.yaml and pyproject.toml
DEFAULT_IMAGE = "ghcr.io/your-org/aigc:latest"  # built from deploy/kuberay/Dockerfile
IMAGE_ROOT = "/home/ray/aigc"  # where the Dockerfile puts the project (WORKDIR)
API_KEYS_SECRET = "aigc-api-keys"  # kubectl create secret generic aigc-api-keys --from-literal=keys=name:KEY
_HEADER = "# Rendered by `aigc kuberay` from serve_apps/openai.yaml and cluster.yaml's shape: edit those, re-render.\n"


def _container(name: str, image: str, cpu: str, memory: str, gpus: int = 0, ports: dict[str, int] | None = None):
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
            {
                "name": "AIGC_API_KEYS",
                "valueFrom": {"secretKeyRef": {"name": API_KEYS_SECRET, "key": "keys", "optional": True}},
            },  # fmt: skip
        ],
    }
    if ports:
        c["ports"] = [{"name": n, "containerPort": p} for n, p in ports.items()]
    return c


def cluster_spec(image: str) -> dict[str, Any]:
    """A RayCluster spec shaped like ``cluster.yaml``: a CPU head (8 CPUs) and 0-4 workers with one GPU each."""
    head_ports = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,  # cluster.yaml's autoscaler: GPU workers come and go with demand
        "autoscalerOptions": {"idleTimeoutSeconds": 600},  # cluster.yaml: idle_timeout_minutes: 10
        "headGroupSpec": {
            # The head runs the drivers, the Train/Tune controllers and the Serve ingress; no GPU, as in
            # cluster.yaml (num-cpus keeps Ray from counting the node's cores instead of the pod's limit).
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "8"},
            "template": {"spec": {"containers": [_container("ray-head", image, "8", "32Gi", ports=head_ports)]}},
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers",
                "replicas": 0,
                "minReplicas": 0,
                "maxReplicas": 4,  # cluster.yaml: max_workers: 4
                "rayStartParams": {"num-cpus": "8", "num-gpus": "1"},
                "template": {"spec": {"containers": [_container("ray-worker", image, "8", "32Gi", gpus=1)]}},
            }
        ],
    }


def serve_config(serve_yaml: str, storage: str) -> dict[str, Any]:
    """``serve_apps/openai.yaml`` as a RayService runs it: config paths absolute in the image, registry and
    outputs on shared storage, HTTP on 0.0.0.0 with API keys required (from the Secret, via the pods' env)."""
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
            "serve.host=0.0.0.0",  # what the proxy binds: keys become required (serve.auth: auto)
            "serve.api_keys_env=AIGC_API_KEYS",
        ]
        app["args"] = args
    return cfg


def render(image: str = DEFAULT_IMAGE, storage: str = "s3://my-bucket/aigc",
           serve_yaml: str = "serve_apps/openai.yaml") -> dict[str, dict[str, Any]]:  # fmt: skip
    """The three manifests, by file name.

    Args:
        image: the image every pod runs (built from ``deploy/kuberay/Dockerfile``).
        storage: shared storage both the job and the service see (``registry/`` and ``runs/`` under it).
        serve_yaml: the Serve config the RayService embeds.
    """
    labels = {"app.kubernetes.io/part-of": "aigc"}
    finetune = (
        f"python {IMAGE_ROOT}/jobs/finetune.py --config {IMAGE_ROOT}/configs/demo.yaml "
        f"output_dir={storage}/runs/demo registry_dir={storage}/registry"
    )
    return {
        "raycluster.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": "aigc", "labels": labels},
            "spec": cluster_spec(image),
        },
        "rayjob.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": "aigc-finetune", "labels": labels},
            "spec": {
                "entrypoint": finetune,
                "shutdownAfterJobFinishes": True,  # the job's cluster goes away with it ...
                "ttlSecondsAfterFinished": 600,  # ... 10 minutes after, so its logs can still be read
                "rayClusterSpec": cluster_spec(image),
            },
        },
        "rayservice.yaml": {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "metadata": {"name": "aigc-serve", "labels": labels},
            "spec": {
                # A string, as KubeRay takes it; an edit here is applied in place (a Serve redeploy).
                "serveConfigV2": yaml.safe_dump(serve_config(serve_yaml, storage), sort_keys=False),
                "rayClusterConfig": cluster_spec(image),
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (``serveConfigV2``) as literal blocks, readable and diffable in the manifest."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dump(manifest: dict[str, Any]) -> str:
    """One manifest as the text ``write_manifests`` writes (header included)."""
    return _HEADER + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)


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
