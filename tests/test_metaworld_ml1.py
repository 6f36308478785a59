"""Meta-World ML1 (optional extra): skipped when `metaworld` is not installed."""

import metarl_tf  # noqa: F401

# isort: split
import numpy as np
import pytest
from numerics import assert_close

metaworld = pytest.importorskip("metaworld")

from metarl_tf.envs import check_task_distribution, make_task_distribution  # noqa: E402
from metarl_tf.envs.metaworld_ml1 import ML1TaskEnv  # noqa: E402
from metarl_tf.evaluation.metaworld import success_rate  # noqa: E402
from metarl_tf.policy import GaussianMLPPolicy  # noqa: E402


def test_ml1_protocol_and_splits():
    dist = make_task_distribution("metaworld-ml1", horizon=5, num_workers=0)
    check_task_distribution(dist)
    assert dist.observation_spec.shape == (39,) and dist.action_spec.shape == (4,)
    train = dist.sample_tasks(50, seed=0)
    assert sorted(t["index"] for t in train) == list(range(50))  # no repeats up to 50
    assert {t["split"] for t in train} == {"train"}
    test = dist.with_split("test")
    assert test.config()["split"] == "test"
    assert {t["split"] for t in test.sample_tasks(3, seed=0)} == {"test"}

    # The env follows Meta-World's own env with the same task (the benchmark's, seed 0).
    ml1 = metaworld.ML1("reach-v3", seed=0)
    ref = ml1.test_classes["reach-v3"]()
    ref.set_task(ml1.test_tasks[7])
    env = ML1TaskEnv("reach-v3", {"split": "test", "index": 7}, horizon=3)
    o_ref, _ = ref.reset(seed=4)
    o, _ = env.reset(seed=4)
    assert_close(o, o_ref, ulps=16)
    rng = np.random.default_rng(0)
    for t in range(3):
        a = rng.uniform(-1, 1, 4).astype(np.float32)
        o_ref, r_ref, *_, info = ref.step(a)
        o, r, term, trunc, _ = env.step(a)
        assert_close(o, o_ref, ulps=16)
        assert_close(r, r_ref, ulps=16, dtype=np.float32)
        assert trunc == (t == 2)
        assert env.episode_success == bool(info["success"]) or env.episode_success


def test_success_rate_runs():
    dist = make_task_distribution("metaworld-ml1", split="test", horizon=4, num_workers=0)
    policy = GaussianMLPPolicy(39, 4, (8,), "tanh")
    rate = success_rate(dist, policy, policy.parameters, dist.sample_tasks(2, 0), 2, seed=0)
    assert 0.0 <= rate <= 1.0
