"""The Ray cluster around the stages.

- :mod:`aigc.cluster.connect`: joining a cluster (or starting an embedded one) and keeping the console quiet;
- :mod:`aigc.cluster.submit`: stages as Ray jobs on a remote cluster (``aigc submit``, ``aigc jobs``);
- :mod:`aigc.cluster.kuberay`: KubeRay manifests (RayCluster, RayJob, RayService, NetworkPolicy) for a config;
- :mod:`aigc.cluster.lockdown`: what those manifests keep closed (token auth, secrets by reference, policies).
"""

from aigc.cluster.connect import in_submitted_job, init_ray, link_ray_logs, quiet_console, ray_logs_dir

__all__ = ["in_submitted_job", "init_ray", "link_ray_logs", "quiet_console", "ray_logs_dir"]
