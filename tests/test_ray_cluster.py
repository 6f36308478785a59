"""Sampling on a multi-node Ray cluster, simulated by two Ray nodes on this machine (in a
subprocess with a timeout, tests/ray_cluster_runner.py): the sampler's actors are placed on both
nodes and the batch equals the one sampled in this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_exact

pytest.importorskip("ray", reason='the ray extra: pip install -e ".[ray]"')
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_actors_spread_over_two_nodes_and_the_batch_equals_local(tmp_path):
    from metarl_tf.envs import make_task_distribution
    from metarl_tf.policy import make_policy
    from metarl_tf.rollout import Sampler

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ray_cluster_runner.py"), str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    placement = json.loads((tmp_path / "placement.json").read_text())
    assert len(placement) == 2
    assert len({p["node"] for p in placement}) == 2  # one actor per node (SPREAD)

    dist = make_task_distribution("halfcheetah-vel", horizon=10)
    policy = make_policy(dist.observation_spec, dist.action_spec, (8,), "tanh", -0.5)
    tasks = dist.sample_tasks(3, seed=0)
    with np.load(tmp_path / "params.npz") as saved:
        params = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    local = Sampler(dist, policy, 2).sample(params, tasks, seed=4)
    with np.load(tmp_path / "ray.npz") as remote:
        for name in local._fields:
            assert_exact(remote[name], getattr(local, name), err_msg=name)
