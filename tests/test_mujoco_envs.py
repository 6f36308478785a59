"""MuJoCo task families: protocol, rewards against gymnasium's own env, seeding, parallel
stepping and worker life cycle. Horizons of a few steps keep this to seconds."""

import metarl_tf  # noqa: F401

# isort: split
import time

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
from metarl_tf.rollout import Sampler  # noqa: E402

FAMILIES = ["halfcheetah-vel", "halfcheetah-dir", "ant-dir"]


@pytest.mark.parametrize("name", FAMILIES)
def test_check_task_distribution(name):
    dist = make_task_distribution(name, horizon=5, num_workers=0)
    check_task_distribution(dist)
    assert dist.config() == {"horizon": 5, "num_workers": 0}
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
    dist = make_task_distribution(family, horizon=6, num_workers=0)
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


def _sample(dist, seed, tasks=2, episodes=2):
    keras.utils.set_random_seed(0)  # the same policy weights every time
    policy = GaussianMLPPolicy(
        dist.observation_spec.shape[0], dist.action_spec.shape[0], (8,), "tanh"
    )
    sampler = Sampler(dist, policy, episodes_per_task=episodes)
    return sampler.sample(policy.parameters, dist.sample_tasks(tasks, seed=0), seed=seed)


def test_horizon_ends_episodes_and_seeding():
    dist = HalfCheetahDir(horizon=5, num_workers=0)
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


def test_parallel_matches_serial_and_shuts_down():
    serial = _sample(HalfCheetahVel(horizon=4, num_workers=0), seed=3, tasks=3)
    with HalfCheetahVel(horizon=4, num_workers=2) as dist:
        parallel = _sample(dist, seed=3, tasks=3)
        again = _sample(dist, seed=3, tasks=3)  # reuses the workers and their envs
        procs = list(dist._pool._procs)
        assert all(p.is_alive() for p in procs)
    for x, y, z in zip(serial, parallel, again, strict=True):
        assert_exact(x, y)
        assert_exact(x, z)
    assert not any(p.is_alive() for p in procs)  # the context manager stopped them


@pytest.mark.parametrize("wait_for_death", [False, True], ids=["racing", "dead"])
def test_worker_crash_raises_instead_of_hanging(wait_for_death):
    dist = HalfCheetahDir(horizon=5, num_workers=2)
    env = dist.make_batched_env(dist.sample_tasks(2, 0), 1)
    env.reset()
    dist._pool._procs[1].kill()
    if wait_for_death:  # its pipe may be closed before the step is sent: still named
        dist._pool._procs[1].join()
    start = time.perf_counter()
    with pytest.raises(WorkerError, match="worker 1 died"):
        env.step(np.zeros((2, 6), np.float32))
    assert time.perf_counter() - start < 30.0  # the parent noticed; no hang
    # A new batched env starts fresh workers.
    env = dist.make_batched_env(dist.sample_tasks(2, 0), 1)
    env.reset()
    assert env.step(np.zeros((2, 6), np.float32)).observation.shape == (2, 17)
    # An older batched env of the same distribution may not step the reassigned workers.
    newer = dist.make_batched_env(dist.sample_tasks(2, 0), 1)
    with pytest.raises(WorkerError, match="newer make_batched_env"):
        env.step(np.zeros((2, 6), np.float32))
    del newer
    dist.close()


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
    assert TrainConfig.from_dict(c.to_dict()) == c
    dist = make_task_distribution(c.task_distribution, horizon=c.horizon, **c.task_kwargs)
    assert dist.name == name and dist.horizon == 200 and dist.num_workers == 2
    args = build_parser().parse_args(
        ["train", "--preset", name, "--meta-batch-size", "3", "--episodes-per-task", "2"]
    )
    small = _train_config(args)
    assert (small.meta_batch_size, small.episodes_per_task) == (3, 2)
    assert small.replace(meta_batch_size=40, episodes_per_task=20) == c
