"""The sampler's backend contract without Ray: a batch split into blocks of whole tasks (each
seeded as part of the whole batch, with its tasks' weights and noise) runs exactly as the whole
batch, and a backend that loses a worker makes the sampler sample the batch again, up to
``max_retries`` times."""

import numpy as np
import pytest
from numerics import assert_exact

from metarl_tf.envs import make_task_distribution
from metarl_tf.envs.base import RecoverableSamplingError, run_episodes
from metarl_tf.envs.ray_backend import EnvWorker
from metarl_tf.policy import make_policy
from metarl_tf.rollout import LocalBackend, Sampler, make_backend


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("nav2d", {"horizon": 8}),
        ("nav2d-oracle", {"horizon": 8}),
        ("bandit", {"horizon": 8}),
        ("cartpole", {"horizon": 40}),  # episodes end at different steps in the two blocks
        ("halfcheetah-vel", {"horizon": 8}),
    ],
)
def test_blocks_of_tasks_run_as_parts_of_the_batch_equal_the_whole_batch(name, kwargs):
    dist = make_task_distribution(name, **kwargs)
    policy = make_policy(dist.observation_spec, dist.action_spec, (8,), "tanh", -0.5)
    tasks, episodes = dist.sample_tasks(3, seed=1), 2
    rng = np.random.default_rng(0)  # per-task weights that move the envs somewhere
    params = [
        rng.normal(0, 0.5, (3, *np.shape(p))).astype(np.float32) for p in policy.get_parameters()
    ]
    noise = policy.sample_noise(rng, (dist.horizon, 3, episodes))
    actor = policy.numpy_actor()
    whole = LocalBackend().run_episodes(dist, tasks, episodes, 7, actor, params, noise)
    blocks = [slice(0, 1), slice(1, 3)]  # uneven blocks of whole tasks
    parts = [
        EnvWorker().run_episodes(
            "key",
            dist,
            tasks[b],
            episodes,
            b.start * episodes,
            3 * episodes,
            7,
            actor,
            [p[b] for p in params],
            noise[:, b],
            False,
        )  # fmt: skip
        for b in blocks
    ]
    for field, x, *ys in zip(whole._fields, whole, *parts, strict=True):
        assert_exact(np.concatenate(ys, axis=1), x, err_msg=field)
    assert whole.mask.sum() > 0
    if name == "cartpole":  # the blocks' loops stopped at different steps, the batch is the same
        lengths = whole.mask.sum(axis=0)
        assert lengths.min() < lengths.max()
        assert not whole.observations[whole.mask == 0].any()


def test_run_episodes_zeroes_what_follows_an_episode():
    dist = make_task_distribution("cartpole", horizon=60)
    env = dist.make_batched_env(dist.sample_tasks(2, seed=0), 2)
    env.seed(0)
    out = run_episodes(env, lambda t, obs: np.ones((len(obs), 1), np.float32), 60, discrete=True)
    lengths = out.mask.sum(axis=0)
    assert lengths.max() < 60  # always pushing right: every pole falls
    for i, n in enumerate(lengths.astype(int)):
        assert out.mask[:n, i].all() and not out.mask[n:, i].any()
        assert out.observations[:n, i].any(axis=-1).all()  # cartpole's state is never all 0
        assert not out.observations[n:, i].any() and not out.actions[n:, i].any()
        assert not out.rewards[n:, i].any() and out.rewards[:n, i].all()


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
        backend.placement()  # the first use starts (here: tries to join) Ray
