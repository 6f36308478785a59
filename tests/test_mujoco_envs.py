"""MuJoCo task families: protocol, rewards against gymnasium's own env, seeding, envs reused
across batches. Horizons of a few steps keep this to seconds."""

import metarl_tf  # noqa: F401

# isort: split
import gymnasium
import keras
import numpy as np
import pytest

pytest.importorskip("mujoco")

from gymnasium.envs.mujoco.ant_v5 import AntEnv  # noqa: E402
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv  # noqa: E402
from numerics import assert_close, assert_exact

from metarl_tf.envs import (  # noqa: E402
    AntDir,
    HalfCheetahDir,
    HalfCheetahVel,
    check_task_distribution,
    make_task_distribution,
)
from metarl_tf.envs.gym_adapter import _sub_env_seeds  # noqa: E402
from metarl_tf.envs.workers import WorkerError  # noqa: E402
from metarl_tf.policy import GaussianMLPPolicy  # noqa: E402
from metarl_tf.rollout import LocalBackend, Sampler  # noqa: E402

FAMILIES = ["halfcheetah-vel", "halfcheetah-dir", "ant-dir"]


@pytest.mark.parametrize("name", FAMILIES)
def test_check_task_distribution(name):
    dist = make_task_distribution(name, horizon=5)
    check_task_distribution(dist)
    assert dist.config() == {"horizon": 5}
    assert dist.horizon == 5
    low, high = dist.action_spec.minimum, dist.action_spec.maximum
    assert_exact(low, -1.0)
    assert_exact(high, 1.0)
    assert dist.observation_spec.shape == ((105,) if name == "ant-dir" else (17,))


def test_tasks():
    vel = HalfCheetahVel().sample_tasks(200, seed=3)
    v = np.array([t["velocity"] for t in vel])
    assert v.min() >= 0.0 and v.max() <= 2.0 and v.std() > 0.4
    for cls in (HalfCheetahDir, AntDir):
        d = np.array([t["direction"] for t in cls().sample_tasks(200, seed=3)])
        assert set(d.tolist()) == {-1, 1}
    assert vel == HalfCheetahVel().sample_tasks(200, seed=3)
    assert vel != HalfCheetahVel().sample_tasks(200, seed=4)


def _reference_rewards(family, task, seed, actions):
    """Observations and rewards recomputed from gymnasium's own env and the MuJoCo state."""
    env = AntEnv(terminate_when_unhealthy=False) if family == "ant-dir" else HalfCheetahEnv()
    obs0, _ = env.reset(seed=seed)
    data, dt = env.data, env.dt
    observations, rewards = [obs0], []
    for a in actions:
        a = np.clip(a, -1.0, 1.0).astype(np.float64)
        x_before = data.body("torso").xpos[0] if family == "ant-dir" else data.qpos[0]
        obs, *_ = env.step(a)
        x_after = data.body("torso").xpos[0] if family == "ant-dir" else data.qpos[0]
        v = (x_after - x_before) / dt
        ctrl = float(np.sum(a**2))
        if family == "halfcheetah-vel":
            r = -abs(v - task["velocity"]) - 0.05 * ctrl
        elif family == "halfcheetah-dir":
            r = task["direction"] * v - 0.05 * ctrl
        else:
            contact = np.clip(data.cfrc_ext[1:], -1.0, 1.0)
            r = task["direction"] * v - 0.005 * ctrl - 0.0005 * np.sum(contact**2) + 0.05
        observations.append(obs)
        rewards.append(r)
    return np.array(observations, np.float32), np.array(rewards)


@pytest.mark.parametrize(
    "family,task",
    [
        ("halfcheetah-vel", {"velocity": 1.3}),
        ("halfcheetah-dir", {"direction": -1}),
        ("halfcheetah-dir", {"direction": 1}),
        ("ant-dir", {"direction": -1}),
    ],
)
def test_rewards_match_gymnasium(family, task):
    actions = np.random.default_rng(0).uniform(-1.5, 1.5, size=(6, 8 if family == "ant-dir" else 6))
    ref_obs, ref_rew = _reference_rewards(family, task, 11, actions)
    assert np.abs(ref_rew).max() > 0.01  # a non-trivial check

    # The registered single-task gymnasium env ...
    env_id = {"halfcheetah-vel": "HalfCheetahVel", "halfcheetah-dir": "HalfCheetahDir"}
    env = gymnasium.make(f"metarl_tf/{env_id.get(family, 'AntDir')}-v0", task=task, horizon=6)
    obs, info = env.reset(seed=11)
    assert info["task"] == task
    assert_exact(obs, ref_obs[0])
    for t, a in enumerate(actions):
        obs, r, terminated, truncated, _ = env.step(a.astype(np.float32))
        assert_close(obs, ref_obs[t + 1], ulps=8)
        assert_close(r, ref_rew[t], ulps=64, dtype=np.float32)  # a velocity: Δx / dt
        assert not terminated
        assert truncated == (t == len(actions) - 1)

    # ... and sub-env 0 of the batched env, whose reset seed derives from (seed, 0).
    dist = make_task_distribution(family, horizon=6)
    seed = 5
    sub_seed = _sub_env_seeds(seed, 2)[0]
    ref_obs, ref_rew = _reference_rewards(family, task, sub_seed, actions)
    batch = dist.make_batched_env([task, task], 1)
    batch.seed(seed)
    obs = batch.reset()
    assert_exact(obs[0], ref_obs[0])
    assert not np.array_equal(obs[0], obs[1])  # sub-envs get different initial states
    for t, a in enumerate(actions):
        ts = batch.step(np.stack([a, a]).astype(np.float32))
        assert_close(ts.observation[0], ref_obs[t + 1], ulps=8)
        assert_close(ts.reward[0], ref_rew[t], ulps=8, dtype=np.float32)


def test_action_scale_maps_policy_actions_to_torques():
    # pytorch-maml-rl's NormalizedActionWrapper(scale=10): torque = clip(0.1 * a, -1, 1)
    task = {"direction": 1}
    actions = np.random.default_rng(1).uniform(-15.0, 15.0, size=(4, 8)).astype(np.float32)
    torques = 0.1 * actions.astype(np.float64)  # what the env computes from a float32 action
    ref_obs, ref_rew = _reference_rewards("ant-dir", task, 11, torques)
    assert np.abs(torques).max() > 1.0  # some torques are clipped
    dist = make_task_distribution("ant-dir", horizon=4, action_scale=0.1)
    assert dist.config() == {"horizon": 4, "action_scale": 0.1}
    assert AntDir(**dist.config()).config() == dist.config()
    assert_close(dist.action_spec.minimum, -10.0, ulps=1)
    assert_close(dist.action_spec.maximum, 10.0, ulps=1)
    env = gymnasium.make("metarl_tf/AntDir-v0", task=task, horizon=4, action_scale=0.1)
    assert_close(env.action_space.high, 10.0, ulps=1)
    env.reset(seed=11)
    for t, a in enumerate(actions):
        obs, r, *_ = env.step(a)
        assert_close(obs, ref_obs[t + 1], ulps=8)
        assert_close(r, ref_rew[t], ulps=64, dtype=np.float32)  # a velocity: Δx / dt
    batch = dist.make_batched_env([task], 1)
    batch.seed(3)
    sub_seed = _sub_env_seeds(3, 1)[0]
    ref_obs, ref_rew = _reference_rewards("ant-dir", task, sub_seed, torques)
    batch.reset()
    for t, a in enumerate(actions):
        ts = batch.step(a[None])
        assert_close(ts.reward[0], ref_rew[t], ulps=8, dtype=np.float32)
    with pytest.raises(ValueError, match="action_scale must be a positive number"):
        AntDir(action_scale=-1.0)


def _sample(dist, seed, tasks=2, episodes=2):
    keras.utils.set_random_seed(0)  # the same policy weights every time
    policy = GaussianMLPPolicy(
        dist.observation_spec.shape[0], dist.action_spec.shape[0], (8,), "tanh"
    )
    sampler = Sampler(dist, policy, episodes_per_task=episodes)
    return sampler.sample(policy.parameters, dist.sample_tasks(tasks, seed=0), seed=seed)


def test_horizon_ends_episodes_and_seeding():
    dist = HalfCheetahDir(horizon=5)
    a = _sample(dist, seed=1)
    assert a.observations.shape == (2, 2, 5, 17)
    assert_exact(a.mask, 1.0)  # never terminates early, exactly 5 steps
    env = dist.make_batched_env(dist.sample_tasks(2, 0), 1)
    env.reset()
    dones = [env.step(np.zeros((2, 6), np.float32)).done.copy() for _ in range(5)]
    assert_exact(np.array(dones)[:, 0], [False] * 4 + [True])

    b = _sample(dist, seed=1)
    for x, y in zip(a, b, strict=True):
        assert_exact(x, y)
    c = _sample(dist, seed=2)
    assert not np.array_equal(a.observations[:, :, 0], c.observations[:, :, 0])  # initial states


def _fresh_sample(dist, seed, tasks):
    """Samples with a new backend (new envs), as a first batch."""
    keras.utils.set_random_seed(0)
    policy = GaussianMLPPolicy(17, 6, (8,), "tanh")
    sampler = Sampler(dist, policy, 2, LocalBackend())
    return sampler, policy, sampler.sample(policy.parameters, dist.sample_tasks(tasks, 0), seed)


def test_reused_envs_sample_as_new_ones():
    dist = HalfCheetahVel(horizon=4)
    sampler, policy, _ = _fresh_sample(dist, seed=1, tasks=3)
    envs = list(sampler.backend._workers[dist]._group.envs)
    # a later batch of other tasks (and fewer) on the same, reconfigured envs ...
    tasks = dist.sample_tasks(2, seed=5)
    reused = sampler.sample(policy.parameters, tasks, seed=3)
    assert sampler.backend._workers[dist]._group.envs[:4] == envs[:4]  # not rebuilt
    # ... equals the batch of envs built for it
    fresh = Sampler(dist, policy, 2, LocalBackend()).sample(policy.parameters, tasks, seed=3)
    for x, y in zip(reused, fresh, strict=True):
        assert_exact(x, y)
    sampler.backend.close()


def test_an_older_batched_env_may_not_step_reused_envs():
    worker = HalfCheetahDir(horizon=5).in_process()
    env = worker.make_batched_env(worker.sample_tasks(2, 0), 1)
    env.reset()
    assert env.step(np.zeros((2, 6), np.float32)).observation.shape == (2, 17)
    newer = worker.make_batched_env(worker.sample_tasks(2, 1), 1)
    with pytest.raises(WorkerError, match="newer make_batched_env"):
        env.step(np.zeros((2, 6), np.float32))
    newer.reset()
    worker.close()


def test_bundles_that_chose_worker_processes_still_load():
    from metarl_tf.config import TrainConfig

    dist = make_task_distribution("halfcheetah-vel", horizon=200, num_workers=2)  # a bundle's
    assert dist.config() == {"horizon": 200}
    saved = TrainConfig(task_distribution="halfcheetah-vel", task_kwargs={"num_workers": 2})
    assert TrainConfig.from_dict(saved.to_dict()).task_kwargs == {}


def test_bad_task_is_reported():
    env = gymnasium.make("metarl_tf/HalfCheetahDir-v0", task={"direction": 1})
    with pytest.raises(ValueError, match="direction must be -1 or \\+1"):
        env.unwrapped.set_task({"direction": 0.5})
    with pytest.raises(ValueError, match="needs 'velocity'"):
        gymnasium.make("metarl_tf/HalfCheetahVel-v0", task={"direction": 1})


@pytest.mark.parametrize("name", FAMILIES)
def test_presets_build_their_distribution(name):
    from metarl_tf.cli import _train_config, build_parser
    from metarl_tf.config import TrainConfig, get_preset

    c = get_preset(name)
    assert (c.hidden_sizes, c.activation, c.horizon) == ((100, 100), "relu", 200)
    assert (c.meta_batch_size, c.episodes_per_task, c.inner_step_size, c.max_kl) == (
        40,
        20,
        0.1,
        0.01,
    )
    assert c.task_kwargs == ({"action_scale": 0.1} if name == "ant-dir" else {})
    assert TrainConfig.from_dict(c.to_dict()) == c
    dist = make_task_distribution(c.task_distribution, horizon=c.horizon, **c.task_kwargs)
    assert dist.name == name and dist.horizon == 200
    args = build_parser().parse_args(
        ["train", "--preset", name, "--meta-batch-size", "3", "--episodes-per-task", "2"]
    )
    small = _train_config(args)
    assert (small.meta_batch_size, small.episodes_per_task) == (3, 2)
    assert small.replace(meta_batch_size=40, episodes_per_task=20) == c
