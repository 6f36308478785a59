"""The TF-Agents PPO-from-scratch baseline: the gymnasium -> TF-Agents environment adapter, the
episode-return bookkeeping, and a tiny end-to-end run."""

import json

import gymnasium
import numpy as np
import pytest
from fresh_python import run_python
from numerics import assert_close, assert_exact

import metarl_tf  # noqa: F401  (TF_USE_LEGACY_KERAS before TF-Agents loads)
from metarl_tf.scratch import (
    GymnasiumPyEnvironment,
    PPOConfig,
    episode_returns,
    scratch_baseline,
    steps_to_reach,
    train_on_task,
    ts,  # tf_agents.trajectories.time_step, imported after metarl_tf set TF_USE_LEGACY_KERAS
)


def nav_env(goal, horizon=100):
    env = gymnasium.make("metarl_tf/Navigation2D-v0", task={"goal": goal}, horizon=horizon)
    return GymnasiumPyEnvironment(env, seed=0)


def test_adapter_maps_termination_truncation_and_auto_reset():
    env = nav_env([0.05, 0.0])
    first = env.reset()
    assert first.step_type == ts.StepType.FIRST
    assert_exact(first.observation, [0.0, 0.0])
    done = env.step(np.array([0.05, 0.0], np.float32))  # onto the goal: terminated
    assert done.step_type == ts.StepType.LAST and done.discount == 0.0
    assert_close(done.reward, 0.0, ulps=8, scale=1.0, dtype=np.float32)  # at the goal
    again = env.step(np.array([0.0, 0.0], np.float32))  # auto-reset
    assert again.step_type == ts.StepType.FIRST
    assert_exact(again.observation, [0.0, 0.0])

    env = nav_env([0.4, 0.4], horizon=2)
    env.reset()
    mid = env.step(np.array([0.1, 0.0], np.float32))
    assert mid.step_type == ts.StepType.MID and mid.discount == 1.0
    assert_close(mid.reward, -np.hypot(0.3, 0.4), ulps=8)
    cut = env.step(np.array([0.1, 0.0], np.float32))  # horizon reached: truncated
    assert cut.step_type == ts.StepType.LAST and cut.discount == 1.0
    assert_close(env.action_spec().maximum, 0.1, ulps=8, dtype=np.float32)


def test_episode_returns_skips_boundaries_and_unfinished_episodes():
    reward = np.array([[1.0, 2.0, 9.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    boundary = np.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
    last = np.array([[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]], bool)
    assert_exact(episode_returns(reward, boundary, last), [3.0, 7.0])


def test_steps_to_reach_uses_a_trailing_mean():
    curve = {"env_steps": [10, 20, 30, 40], "mean_return": [-9.0, -1.0, -5.0, -1.0]}
    assert steps_to_reach(curve, -5.0, window=1) == 20
    assert steps_to_reach(curve, -5.0, window=2) == 20  # mean(-9, -1) = -5
    assert steps_to_reach(curve, -2.0, window=2) is None
    assert steps_to_reach(curve, -2.0, window=1) == 20


def test_unknown_distribution_is_named():
    with pytest.raises(ValueError, match="no single-task gymnasium view of 'nope'"):
        scratch_baseline("nope", [{}], 10, 0)


@pytest.mark.slow
def test_tiny_ppo_run_gives_a_finite_curve():
    config = PPOConfig(episodes_per_iteration=2, hidden_sizes=(8,), epochs=2)
    curve = train_on_task("metarl_tf/Navigation2D-v0", {"goal": [0.3, -0.2]}, 300, 0, config)
    assert len(curve["env_steps"]) == 2  # 2 episodes x <= 100 steps per update
    assert curve["env_steps"][-1] >= 300 and np.all(np.diff(curve["env_steps"]) > 0)
    assert all(-150 < r <= 0 for r in curve["mean_return"])


@pytest.mark.slow
def test_tf_agents_networks_refuse_keras_3_as_tf_keras():
    """With Keras 3 imported first, tf.keras is Keras 3 and TF-Agents' networks silently train
    nothing: the baseline refuses with the fix in the message."""
    code = (
        "import metarl_tf.training.run\n"
        "import metarl_tf.scratch as s\n"
        "try:\n    s.require_legacy_tf_keras()\nexcept RuntimeError as e:\n    print('REFUSED', e)"
    )
    out = run_python(["-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED tf.keras is Keras 3" in out.stdout and "import metarl_tf.scratch" in out.stdout


@pytest.mark.slow
def test_scratch_ppo_command_runs_tf_agents_on_legacy_tf_keras(tmp_path):
    """`python -m metarl_tf scratch-ppo` imports the baseline before Keras 3 (the CLI imports the
    training package for its errors)."""
    from metarl_tf.config import get_preset
    from metarl_tf.training.trainer import MetaTrainer

    bundle = MetaTrainer(get_preset("tiny")).export_bundle(tmp_path / "tiny")
    out_json = tmp_path / "scratch.json"
    args = ["-m", "metarl_tf", "scratch-ppo", str(bundle), "--tasks", "1", "--episodes", "2"]
    args += ["--steps", "1", "--env-steps", "20", "--json", str(out_json)]
    out = run_python(args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out_json.read_text())["ppo_scratch"]["per_task_curves"]
