"""The user-env recipe of docs/environments.md, run as written, and GymTaskDistribution's checks."""

import metarl_tf  # noqa: F401

# isort: split
import re
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from numerics import assert_close, assert_exact, assert_not_close

from metarl_tf.envs import TASK_DISTRIBUTIONS, GymTaskDistribution

DOC = Path(__file__).resolve().parents[1] / "docs" / "environments.md"


@pytest.fixture
def recipe():
    """Executes the recipe's code block (the one defining ``PointGoal1D``); yields its namespace;
    unregisters it after."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "class PointGoal1D(" in b]
    namespace: dict = {"__name__": "recipe"}
    exec(compile(block, str(DOC), "exec"), namespace)  # runs check_task_distribution too
    yield namespace
    TASK_DISTRIBUTIONS.pop("point-goal-1d", None)


def test_recipe_distribution(recipe):
    dist = TASK_DISTRIBUTIONS["point-goal-1d"](horizon=7)
    assert dist.config() == {"horizon": 7}
    assert dist.observation_spec.shape == (1,) and dist.action_spec.shape == (1,)
    assert_close(dist.action_spec.maximum, 0.1, ulps=1)
    tasks = dist.sample_tasks(2, seed=0)
    goals = np.random.default_rng(0).uniform(-1.0, 1.0, size=2)
    assert tasks == [{"goal": float(g)} for g in goals]

    # Against a plain loop over the recipe's own env: clipping, rewards, termination, horizon.
    env = dist.make_batched_env(tasks, 1)
    env.seed(3)
    obs = env.reset()
    refs = [recipe["PointGoal1D"](t) for t in tasks]
    from metarl_tf.envs.gym_adapter import _sub_env_seeds

    ref_obs = [r.reset(seed=s)[0] for r, s in zip(refs, _sub_env_seeds(3, 2), strict=True)]
    assert_exact(obs, np.stack(ref_obs))
    # Sub-env 0 walks straight to its goal and terminates; sub-env 1 keeps going.
    direction = np.sign(tasks[0]["goal"] - obs[0, 0])
    ended = np.zeros(2, bool)
    for t in range(7):
        actions = np.array([[5.0 * direction], [-3.0]], np.float32)  # clipped to +-0.1
        ts = env.step(actions)
        for i, ref in enumerate(refs):
            if ended[i]:
                assert ts.reward[i] == 0.0 and ts.done[i]
                continue
            o, r, term, trunc, _ = ref.step(np.clip(actions[i], -0.1, 0.1))
            assert_close(ts.observation[i], o, ulps=8)
            assert_close(ts.reward[i], r, ulps=8)
            assert ts.done[i] == (term or trunc or t == 6)
            ended[i] = ts.done[i]
    assert ended.all()


def test_recipe_trains(recipe, tmp_path):
    from metarl_tf.bundle import load_bundle
    from metarl_tf.config import get_preset
    from metarl_tf.training.trainer import MetaTrainer

    config = get_preset("tiny").replace(task_distribution="point-goal-1d", horizon=6)
    trainer = MetaTrainer(config)
    before = [p.numpy().copy() for p in trainer.policy.parameters]
    metrics = [trainer.train_iteration() for _ in range(2)]
    assert all(np.isfinite(m["returns/post_adaptation"]) for m in metrics)
    assert metrics[0]["charts/env_steps"] > 0
    after = [p.numpy() for p in trainer.policy.parameters]
    assert_not_close(after, before)
    bundle = load_bundle(trainer.export_bundle(tmp_path / "bundle"))
    assert bundle.task_distribution.name == "point-goal-1d"
    assert bundle.task_distribution.horizon == 6


class _DiscreteEnv(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gymnasium.spaces.Discrete(3)

    def __init__(self, task):
        pass


def test_bad_spaces_are_reported():
    dist = GymTaskDistribution(_DiscreteEnv, lambda n, rng: [{}] * n, horizon=5)
    with pytest.raises(TypeError, match="action space must be a gymnasium Box"):
        _ = dist.action_spec
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        GymTaskDistribution(_DiscreteEnv, lambda n, rng: [{}] * n, horizon=0)
