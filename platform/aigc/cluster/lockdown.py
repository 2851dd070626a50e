"""What keeps the KubeRay clusters closed: Ray's token authentication, secrets by reference, NetworkPolicies.

:mod:`aigc.cluster.kuberay` builds the RayCluster, RayJob and RayService from these pieces, so each property
holds in all three manifests:

1. **Ray's token authentication** (Ray >= 2.52) in every Ray container: ``RAY_AUTH_MODE=token`` and
   ``RAY_AUTH_TOKEN`` from the ``aigc-ray-token`` Secret. ``authOptions.secretName`` names the same Secret, so
   the KubeRay operator (>= 1.6) uses that token for the dashboard calls it makes (a RayService's Serve config,
   a RayJob's status) and gives it to the containers it adds (the autoscaler, a RayJob's submitter).
2. **Secrets by reference, only where needed.** The API keys (``aigc-api-keys``) are a read-only volume in the
   RayService's head container alone, where the Serve ingress is pinned (the head's ``aigc_ingress``
   resource); the kubelet updates a mounted Secret in place (within a minute or so), an environment variable
   only changes with a new pod. Storage credentials (``aigc-storage``) reach every Ray container, since
   drivers, Train workers and Serve replicas all read and write ``s3://``; each key is optional, so a pod role
   (IRSA, Workload Identity) works without it.
3. **One NetworkPolicy per cluster.** Ray's ports (GCS 6379, dashboard 8265, client 10001, the raylets'
   and workers' ports) admit only pods of the same cluster; the dashboard also admits the KubeRay operator
   (RayJob, RayService) and a RayJob's submitter pod; the Serve port 8000 admits anyone, on the RayService only.
   Egress stays open (storage, the model hub). Kubelet probes come from the pod's node, which a NetworkPolicy
   always admits, and ``kubectl port-forward svc/<name>-head-svc 8265`` enters the pod through the kubelet:
   that is how an operator reaches the dashboard (with the token).

The dashboard's address is KubeRay's default (the pod's interfaces, so the operator reaches it through the head
Service): the NetworkPolicy and the token are what keep it inside the cluster.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = [
    "API_KEYS_FILE",
    "API_KEYS_SECRET",
    "INGRESS_RESOURCE",
    "OPERATOR_NAMESPACE",
    "RAY_TOKEN_SECRET",
    "STORAGE_SECRET",
    "api_keys_mount",
    "auth_options",
    "network_policy",
    "pod_labels",
    "ray_auth_env",
    "storage_env",
]

RAY_TOKEN_SECRET = "aigc-ray-token"  # kubectl create secret generic aigc-ray-token --from-literal=auth_token=...
RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName requires
API_KEYS_SECRET = "aigc-api-keys"  # kubectl create secret generic aigc-api-keys --from-file=keys=...
API_KEYS_DIR = "/etc/aigc/api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"  # the Secret's `keys` entry, as serve.api_keys_file reads it
STORAGE_SECRET = "aigc-storage"  # kubectl create secret generic aigc-storage --from-literal=AWS_ACCESS_KEY_ID=...
STORAGE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
INGRESS_RESOURCE = "aigc_ingress"  # a custom Ray resource only the RayService's head offers
OPERATOR_NAMESPACE = "default"  # where `helm install kuberay-operator kuberay/kuberay-operator` puts it
OPERATOR_POD_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}  # the Helm chart's pod label
SERVE_PORT = 8000
DASHBOARD_PORT = 8265

Kind = Literal["RayCluster", "RayJob", "RayService"]


def auth_options() -> dict[str, str]:
    """``spec.authOptions`` of a RayCluster spec: token mode, with the token in our Secret."""
    return {"mode": "token", "secretName": RAY_TOKEN_SECRET}


def ray_auth_env() -> list[dict[str, Any]]:
    """Token authentication in a Ray container's environment (the token by reference, never its value).

    KubeRay adds the same variables when ``authOptions`` is set; writing them here keeps a pod authenticated
    even under an operator that ignores ``authOptions``, and a missing Secret stops the pod from starting.
    """
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": RAY_TOKEN_SECRET, "key": RAY_TOKEN_KEY}}},
    ]


def storage_env() -> list[dict[str, Any]]:
    """The object-store credentials, each from the ``aigc-storage`` Secret and optional (a pod role may
    provide them instead; boto3 and pyarrow read these standard variables)."""
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": STORAGE_SECRET, "key": key, "optional": True}}}
        for key in STORAGE_KEYS
    ]


def api_keys_mount() -> tuple[dict[str, Any], dict[str, Any]]:
    """The API keys Secret as ``(volume, volumeMount)``: read-only at ``API_KEYS_DIR``, and required (the
    endpoint does not start without its keys)."""
    volume = {"name": "api-keys", "secret": {"secretName": API_KEYS_SECRET}}
    mount = {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}
    return volume, mount


def pod_labels(name: str) -> dict[str, str]:
    """The labels every pod of the cluster named ``name`` carries, and its NetworkPolicy selects on.

    The workload's own name, not KubeRay's ``ray.io/cluster``: a RayJob's or RayService's RayCluster gets a
    generated name (and a RayService upgrade runs two of them for a while), the pod template's labels stay.
    """
    return {"app.kubernetes.io/part-of": "aigc", "app.kubernetes.io/instance": name}


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def network_policy(name: str, kind: Kind, operator_namespace: str = OPERATOR_NAMESPACE) -> dict[str, Any]:
    """The NetworkPolicy of the Ray cluster that the ``kind`` resource ``name`` runs.

    Args:
        name: the RayCluster, RayJob or RayService name (its pods carry :func:`pod_labels` of it).
        kind: what runs the cluster: decides which callers from outside it are admitted, and to what port.
        operator_namespace: the namespace of the KubeRay operator, admitted to the dashboard where it calls it.
    """
    own_pods = {"podSelector": {"matchLabels": pod_labels(name)}}
    # 1. Pods of the same cluster: every port (GCS, raylets, object managers and workers use many).
    ingress: list[dict[str, Any]] = [{"from": [own_pods]}]
    if kind in ("RayJob", "RayService"):
        # 2. The operator submits the Serve config and reads job and Serve status through the dashboard.
        operator = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}},
            "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)},
        }
        ingress.append({"from": [operator], "ports": _tcp(DASHBOARD_PORT)})
    if kind == "RayJob":
        # 3. The submitter pod KubeRay starts for the job (`ray job submit` against the dashboard).
        submitter = {"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob"}
        ingress.append({"from": [{"podSelector": {"matchLabels": submitter}}], "ports": _tcp(DASHBOARD_PORT)})
    if kind == "RayService":
        # 4. The endpoint: from anywhere (the API keys guard it).
        ingress.append({"ports": _tcp(SERVE_PORT)})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": {"app.kubernetes.io/part-of": "aigc"}},
        "spec": {"podSelector": {"matchLabels": pod_labels(name)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }
