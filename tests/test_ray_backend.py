"""Sampling on Ray (metarl_tf/envs/ray_backend.py): the same batches as in this process, actors
that die are restarted and the batch sampled again, and a training run on Ray writes the same
bundle as one in this process. Ray starts once for the module (2 CPUs, no dashboard)."""

import dataclasses
import json
import os
import signal
import sys

import numpy as np
import pytest
from numerics import assert_exact

from metarl_tf.envs import make_task_distribution
from metarl_tf.numpy_policy import NumpyActor
from metarl_tf.policy import make_policy
from metarl_tf.rollout import Sampler, make_backend

ray = pytest.importorskip("ray", reason='the ray extra: pip install -e ".[ray]"')
pytestmark = pytest.mark.slow  # Ray starts in seconds; the module takes about a minute

from metarl_tf.envs.ray_backend import RayBackend, connect  # noqa: E402

# The actors cannot import this test module: ship its classes (_KillingActor) by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def backend():
    connect(num_cpus=2)
    backend = make_backend("ray", num_workers=2)
    yield backend
    backend.close()
    ray.shutdown()


def _policy(dist, seed=0):
    policy = make_policy(dist.observation_spec, dist.action_spec, (8,), "tanh", -0.5)
    rng = np.random.default_rng(seed)  # weights that move the envs somewhere
    policy.set_parameters([rng.normal(0, 0.5, np.shape(p)) for p in policy.get_parameters()])
    return policy


def _assert_same_batch(a, b):
    for name, x, y in zip(a._fields, a, b, strict=True):
        assert_exact(x, y, err_msg=name)


@pytest.mark.parametrize(
    "name, kwargs, tasks, episodes",
    [
        ("nav2d", {"horizon": 30}, 3, 3),  # blocks of 2 and 1 tasks
        ("halfcheetah-vel", {"horizon": 12}, 3, 2),
        ("bandit", {"horizon": 6}, 3, 3),  # seeded rewards: the same draws on any slice
        ("cartpole", {"horizon": 40}, 3, 3),  # seeded initial states; episodes end early
    ],
)
def test_ray_batch_equals_local_batch(backend, name, kwargs, tasks, episodes):
    dist = make_task_distribution(name, **kwargs)
    policy = _policy(dist)
    task_list = dist.sample_tasks(tasks, seed=3)
    local = Sampler(dist, policy, episodes).sample(policy.parameters, task_list, seed=11)
    remote = Sampler(dist, policy, episodes, backend).sample(policy.parameters, task_list, seed=11)
    _assert_same_batch(remote, local)
    assert local.num_steps > 0
    # a second batch on the same actors (envs reused with new tasks) still matches
    task_list = dist.sample_tasks(tasks, seed=4)
    local = Sampler(dist, policy, episodes).sample(policy.parameters, task_list, seed=12)
    remote = Sampler(dist, policy, episodes, backend).sample(policy.parameters, task_list, seed=12)
    _assert_same_batch(remote, local)


def test_actors_own_contiguous_blocks_of_tasks(backend):
    assert backend.split(9) == [slice(0, 4), slice(4, 9)]
    assert backend.split(1) == [slice(0, 1)]  # no actor gets an empty slice
    pids = {pid for _, pid in backend.placement()}
    assert len(pids) == 2 and os.getpid() not in pids


@dataclasses.dataclass(frozen=True)
class _KillingActor:
    """The policy's numpy actor, except that the first sampling process to reach step ``at``
    kills itself (SIGKILL, as an out-of-memory killer or a lost node would); the marker file,
    created exclusively and holding that process's id, makes it happen once."""

    actor: NumpyActor
    marker: str
    at: int

    @property
    def discrete(self):
        return self.actor.discrete

    def stepper(self, params, noise, episodes_per_task, deterministic=False):
        choose = self.actor.stepper(params, noise, episodes_per_task, deterministic)

        def step(t, observations):
            if t == self.at:
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return choose(t, observations)

        return step


class _KillingPolicy:
    """Delegates to ``policy``; its numpy actor is a :class:`_KillingActor`."""

    def __init__(self, policy, marker, at):
        self._policy, self._marker, self._at = policy, marker, at

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def numpy_actor(self):
        return _KillingActor(self._policy.numpy_actor(), self._marker, self._at)


def test_killed_actor_is_restarted_and_the_batch_sampled_again(backend, tmp_path):
    dist = make_task_distribution("halfcheetah-vel", horizon=10)
    policy = _policy(dist, seed=1)
    tasks = dist.sample_tasks(2, seed=0)
    expected = Sampler(dist, policy, 2).sample(policy.parameters, tasks, seed=5)
    pids = [pid for _, pid in backend.placement()]
    marker = tmp_path / "killed"
    sampler = Sampler(dist, _KillingPolicy(policy, str(marker), at=4), 2, backend)
    batch = sampler.sample(policy.parameters, tasks, seed=5)
    assert sampler.retries == 1
    _assert_same_batch(batch, expected)  # the whole batch again, not a patched partial one
    killed = int(marker.read_text())
    assert killed in pids
    new_pids = [pid for _, pid in backend.placement()]
    assert killed not in new_pids and len(new_pids) == 2  # Ray restarted the actor


def test_train_on_ray_writes_the_same_bundle_as_local(backend, tmp_path):
    from metarl_tf.bundle import load_bundle
    from metarl_tf.cli import main

    outs = {}
    for name in ("local", "ray"):
        outs[name] = tmp_path / name
        argv = ["train", "--preset", "tiny", "--iterations", "2", "--no-progress"]
        argv += ["--out", str(outs[name]), "--run-dir", str(tmp_path / f"run-{name}")]
        if name == "ray":
            argv += ["--backend", "ray", "--num-env-workers", "2"]
        assert main(argv) == 0
    local, remote = load_bundle(outs["local"]), load_bundle(outs["ray"])
    for a, b in zip(remote.policy.get_parameters(), local.policy.get_parameters(), strict=True):
        assert_exact(a, b)  # same batches, same process, same ops: the same weights
    rows = (tmp_path / "run-ray" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["charts/sampling_retries"] for row in rows] == [0, 0]


def test_evaluate_on_ray_equals_local(backend):
    from metarl_tf.evaluation.protocol import method_curve

    dist = make_task_distribution("nav2d", horizon=15)
    policy = _policy(dist, seed=2)
    tasks = dist.sample_tasks(3, seed=0)

    def adapter(params, batch, steps, first_step):
        return [np.asarray(p) * 0.5 for p in params], None, None

    params = policy.get_parameters()
    local = method_curve(dist, policy, params, adapter, tasks, 2, 1, seed=0)
    remote = method_curve(dist, policy, params, adapter, tasks, 2, 1, seed=0, backend=backend)
    assert_exact(np.array(remote["per_task"]), np.array(local["per_task"]))


def test_shared_backend_per_process(backend):
    assert make_backend("ray", num_workers=2).actors == backend.actors
    assert isinstance(backend.backend, RayBackend) and backend.name == "ray"


def test_unreachable_address_is_one_clear_error(backend):
    from metarl_tf.envs.ray_backend import _check_reachable

    with pytest.raises(ConnectionError, match="no Ray cluster answers at 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(ValueError, match="--ray-address must be"):
        _check_reachable("nonsense")


def test_without_ray_the_cli_says_how_to_install_it(monkeypatch, capsys):
    import sys

    from metarl_tf.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = main(["evaluate", "saved_models/nav2d-maml", "--backend", "ray", "--tasks", "2"])
    assert code == 2
    assert (
        capsys.readouterr().err.strip()
        == 'error: the ray backend needs Ray: pip install -e ".[ray]"'
    )
