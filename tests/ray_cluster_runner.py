"""Run by tests/test_ray_cluster.py in a subprocess (so a stuck cluster cannot hang pytest):
builds a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, one CPU per node),
joins it by address as ``--ray-address host:port`` does, samples one HalfCheetahVel batch on two
actors and writes ``placement.json`` (node id and pid per actor), the batch (``ray.npz``) and the
policy parameters it used (``params.npz``) to the directory given as the only argument."""

import json
import sys
from pathlib import Path

import numpy as np

import metarl_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def main(out: Path) -> None:
    from ray.cluster_utils import Cluster

    from metarl_tf.envs import make_task_distribution
    from metarl_tf.envs.ray_backend import connect
    from metarl_tf.policy import make_policy
    from metarl_tf.rollout import Sampler, make_backend

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=120)
        connect(cluster.address)
        backend = make_backend("ray", cluster.address, num_workers=2)
        dist = make_task_distribution("halfcheetah-vel", horizon=10)
        policy = make_policy(dist.observation_spec, dist.action_spec, (8,), "tanh", -0.5)
        tasks = dist.sample_tasks(3, seed=0)
        params = policy.get_parameters()
        batch = Sampler(dist, policy, 2, backend).sample(params, tasks, seed=4)
        np.savez(out / "ray.npz", **batch._asdict())
        np.savez(out / "params.npz", *params)
        placement = [{"node": node, "pid": pid} for node, pid in backend.placement()]
        (out / "placement.json").write_text(json.dumps(placement))
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
