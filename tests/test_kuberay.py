"""KubeRay manifests: the committed files are what ``aigc kuberay`` renders, carry the fields KubeRay requires,
and embed the Serve config of ``serve_apps/openai.yaml``, which builds the platform's app.

No KubeRay Python client with the CRD schemas is on the package index, so the required fields of the
``ray.io/v1`` CRDs are checked here (RayCluster ``spec.headGroupSpec`` / ``workerGroupSpecs``, RayJob
``spec.entrypoint`` / ``rayClusterSpec``, RayService ``spec.serveConfigV2`` / ``rayClusterConfig``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray
import yaml

from aigc.cluster.kuberay import IMAGE_ROOT, RAY_VERSION, dump, render, write_manifests

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def test_committed_manifests_are_what_the_renderer_writes(tmp_path):
    """Edit serve_apps/openai.yaml or aigc/cluster/kuberay.py, then `aigc kuberay`: this fails until they agree."""
    for name, manifest in render().items():
        assert (KUBERAY / name).read_text() == dump(manifest), f"re-render deploy/kuberay/{name} (aigc kuberay)"
    written = write_manifests(str(tmp_path), image="example.com/aigc:1", storage="gs://b/x")
    names = ["networkpolicy.yaml", "raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
    assert sorted(Path(p).name for p in written) == names
    assert "example.com/aigc:1" in Path(written[0]).read_text() and "gs://b/x/registry" in Path(written[2]).read_text()


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == RAY_VERSION == ray.__version__, where
    head = spec["headGroupSpec"]
    groups = [("head", head), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]
    images = set()
    for name, group in groups:
        assert DNS_1123.match(name), (where, name)
        params = group["rayStartParams"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), (where, name, params)
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers), (where, name)
        images |= {c["image"] for c in containers}
        for c in containers:
            limits = c["resources"]["limits"]
            assert limits["cpu"] == params["num-cpus"], (where, name)  # Ray counts what the pod may use
            assert limits.get("nvidia.com/gpu", "0") == params.get("num-gpus", "0"), (where, name)
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (where, g["groupName"])
    assert len(images) == 1, f"{where}: every pod runs the one image, got {images}"
    # KubeRay's default address (where its operator reaches it); the NetworkPolicy keeps it in the cluster.
    assert "dashboard-host" not in head["rayStartParams"], where


@pytest.mark.parametrize(
    ("name", "kind", "spec_key"),
    [("raycluster.yaml", "RayCluster", None), ("rayjob.yaml", "RayJob", "rayClusterSpec"),
     ("rayservice.yaml", "RayService", "rayClusterConfig")],
)  # fmt: skip
def test_required_fields(name, kind, spec_key):
    m = _load(name)
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", kind)
    assert DNS_1123.match(m["metadata"]["name"]) and len(m["metadata"]["name"]) <= 63
    _check_cluster_spec(m["spec"] if spec_key is None else m["spec"][spec_key], name)


def test_the_shape_matches_cluster_yaml():
    launcher = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    spec = _load("raycluster.yaml")["spec"]
    gpu = launcher["available_node_types"]["gpu_worker"]
    (group,) = spec["workerGroupSpecs"]
    assert group["maxReplicas"] == gpu["max_workers"] and group["minReplicas"] == gpu["min_workers"]
    assert group["rayStartParams"] == {
        "num-cpus": str(gpu["resources"]["CPU"]),
        "num-gpus": str(gpu["resources"]["GPU"]),
    }
    head_cpus = launcher["available_node_types"]["head"]["resources"]["CPU"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == str(head_cpus)
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == launcher["idle_timeout_minutes"] * 60
    # The image: Ray's own of the Ray version cluster.yaml installs.
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-" in dockerfile
    assert f"ray[default,data,train,tune,serve]=={RAY_VERSION}" in " ".join(launcher["setup_commands"])
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile


def test_rayjob_runs_the_finetune_job_on_shared_storage():
    spec = _load("rayjob.yaml")["spec"]
    script, config = re.match(r"python (\S+) --config (\S+)", spec["entrypoint"]).group(1, 2)
    for path in (script, config):
        assert path.startswith(IMAGE_ROOT + "/") and (ROOT / path.removeprefix(IMAGE_ROOT + "/")).is_file()
    assert script.endswith("jobs/finetune.py")
    assert "output_dir=s3://" in spec["entrypoint"] and "registry_dir=s3://" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_embeds_openai_yaml_and_builds_the_platforms_app():
    from ray.serve.schema import ServeDeploySchema

    from aigc.serve.builder import build_app

    embedded = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)  # what `serve deploy` and KubeRay accept (deployment overrides too)
    local = yaml.safe_load((ROOT / "serve_apps" / "openai.yaml").read_text())
    assert embedded["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert embedded["proxy_location"] == local["proxy_location"]
    (app,) = embedded["applications"]
    (local_app,) = local["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == local_app[key], key
    assert app["args"]["config"] == f"{IMAGE_ROOT}/{local_app['args']['config']}"
    overrides = app["args"]["overrides"]
    assert "serve.host=0.0.0.0" in overrides and "serve.auth=keys" in overrides
    assert "serve.api_keys_file=/etc/aigc/api-keys/keys" in overrides  # the mounted Secret (test_cluster_lockdown)
    # The args build the app the platform serves: the ingress in front of the generator.
    args = {**app["args"], "config": str(ROOT / local_app["args"]["config"])}
    built = build_app(args)._bound_deployment
    assert built.name == "OpenAIIngress"
    assert [a._bound_deployment.name for a in built.init_args] == ["Generator"]
    assert built.init_kwargs["registry_dir"] == "s3://my-bucket/aigc/registry"
    assert built.init_kwargs["security"].api_keys_file == "/etc/aigc/api-keys/keys"
