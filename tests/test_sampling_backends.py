"""The sampler's backend contract without Ray: a batch split into slices (each seeded as part of
the whole batch) steps exactly as the whole batch, and a backend that loses a worker makes the
sampler sample the batch again, up to ``max_retries`` times."""

import numpy as np
import pytest
from numerics import assert_exact

from metarl_tf.envs import make_task_distribution
from metarl_tf.envs.base import RecoverableSamplingError
from metarl_tf.envs.ray_backend import EnvWorker
from metarl_tf.policy import make_policy
from metarl_tf.rollout import LocalBackend, Sampler, make_backend


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("nav2d", {"horizon": 8}),
        ("nav2d-oracle", {"horizon": 8}),
        ("bandit", {"horizon": 8}),
        ("cartpole", {"horizon": 8}),
        ("halfcheetah-vel", {"horizon": 8}),
    ],
)
def test_slices_seeded_as_parts_of_the_batch_step_as_the_whole_batch(name, kwargs):
    dist = make_task_distribution(name, **kwargs)
    tasks = dist.sample_tasks(3, seed=1)
    per_env = [t for t in tasks for _ in range(2)]
    whole = dist.make_batched_env(tasks, 2)
    whole.seed(7)
    workers = [EnvWorker(), EnvWorker()]
    cuts = [slice(0, 1), slice(1, 6)]  # uneven, and cutting through a task's episodes
    for w, s in zip(workers, cuts, strict=True):
        w.configure("key", dist, per_env[s], s.start, len(per_env))
    obs = [whole.reset()]
    parts = [np.concatenate([w.reset(True, 7) for w in workers])]
    rng = np.random.default_rng(0)
    spec = dist.action_spec
    for _ in range(dist.horizon):
        if np.issubdtype(np.dtype(spec.dtype.as_numpy_dtype), np.integer):
            actions = rng.integers(0, int(spec.maximum) + 1, size=6)
        else:
            actions = rng.uniform(-1, 1, size=(6, *spec.shape)).astype(np.float32)
        ts = whole.step(actions)
        steps = [w.step(actions[s]) for w, s in zip(workers, cuts, strict=True)]
        obs.append(ts.observation)
        parts.append(np.concatenate([p[0] for p in steps]))
        assert_exact(np.concatenate([p[1] for p in steps]), ts.reward)
        assert_exact(np.concatenate([p[2] for p in steps]), ts.done)
    assert_exact(np.stack(parts), np.stack(obs))


def test_seed_rejects_a_slice_outside_the_batch():
    env = make_task_distribution("bandit").make_batched_env([{"means": [0.1, 0.9] * 2 + [0.5]}], 2)
    with pytest.raises(ValueError, match="not in a batch of 3"):
        env.seed(0, offset=2, total=3)


class _FlakyBackend(LocalBackend):
    """Local envs whose ``step`` fails (as a lost worker) the first ``failures`` times."""

    name = "flaky"

    def __init__(self, failures):
        super().__init__()
        self.failures = failures

    def make_batched_env(self, dist, tasks, episodes_per_task):
        env = super().make_batched_env(dist, tasks, episodes_per_task)
        step, backend = env.step, self

        def flaky_step(actions):
            if backend.failures > 0:
                backend.failures -= 1
                raise RecoverableSamplingError("worker lost")
            return step(actions)

        env.step = flaky_step
        return env


def test_sampler_samples_the_batch_again_after_a_lost_worker():
    dist = make_task_distribution("nav2d", horizon=6)
    policy = make_policy(dist.observation_spec, dist.action_spec, (4,), "tanh", 0.0)
    tasks = dist.sample_tasks(2, seed=0)
    expected = Sampler(dist, policy, 2).sample(policy.parameters, tasks, seed=3)
    sampler = Sampler(dist, policy, 2, _FlakyBackend(failures=2), max_retries=2)
    batch = sampler.sample(policy.parameters, tasks, seed=3)
    assert sampler.retries == 2
    for x, y in zip(batch, expected, strict=True):
        assert_exact(x, y)
    sampler = Sampler(dist, policy, 2, _FlakyBackend(failures=3), max_retries=2)
    with pytest.raises(RecoverableSamplingError, match="failed 3 times in a row on the flaky"):
        sampler.sample(policy.parameters, tasks, seed=3)


def test_make_backend_names():
    assert isinstance(make_backend("local"), LocalBackend)
    with pytest.raises(ValueError, match="backend must be one of local, ray"):
        make_backend("dask")


def test_the_ray_backend_starts_nothing_before_its_first_batch():
    ray = pytest.importorskip("ray", reason='the ray extra: pip install -e ".[ray]"')
    if ray.is_initialized():
        pytest.skip("Ray already runs in this process")
    backend = make_backend("ray", address="127.0.0.1:1")  # nothing listens there
    assert backend.name == "ray" and not ray.is_initialized()
    with pytest.raises(ConnectionError, match="no Ray cluster answers at 127.0.0.1:1"):
        backend.make_batched_env(None, [], 1)
