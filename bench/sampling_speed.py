"""Environment steps per second of the sampler at the MAML paper's batch (40 tasks x 20 episodes
x horizon 200), Nav2D and HalfCheetahVel, on each way of stepping the sub-environments:

- ``local_1``: this process (``--backend local``);
- ``ray_1``, ``ray_2``: 1 or 2 Ray actors, each running the whole episodes of a block of tasks
  with the numpy policy (``--backend ray``, :mod:`metarl_tf.envs.ray_backend`);
- ``ray_2_stepping``: 2 Ray actors that step their sub-envs one time step per call, with one
  batched policy call per step in this process (a prototype defined here: the other design the
  Ray backend was measured against).

Every setup samples one batch first (start-up: actors and envs built), then the setups take turns
for ``--rounds`` rounds, so that a load change on a shared machine hits them all alike; the median
of the rounds is reported, with every round's figure, the ratios to ``local_1`` and the load
average. Asserts nothing.

    python bench/sampling_speed.py [--rounds 5] [--json bench/results/sampling_speed.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import numpy as np

FAMILIES = {"nav2d": "nav2d", "halfcheetah-vel": "halfcheetah-vel"}  # name -> training preset


class SteppingWorker:
    """A Ray actor body that holds a block of sub-envs and steps them once per call (prototype)."""

    def __init__(self):
        self.dist = self.env = None

    def reset(self, dist, tasks, episodes, seed, offset, total):
        if self.dist is None:
            self.dist = dist.in_process()
        self.env = self.dist.make_batched_env(list(tasks), episodes)
        self.env.seed(seed, offset, total)
        return self.env.reset()

    def step(self, actions):
        return tuple(self.env.step(actions))


class SteppedOnActors:
    """A :class:`~metarl_tf.envs.base.BatchedEnv` whose blocks of tasks live on
    ``SteppingWorker`` actors: observations gathered and actions scattered every step."""

    def __init__(self, ray, actors, dist_ref, tasks, episodes):
        self.ray, self.actors, self.dist_ref = ray, actors, dist_ref
        self.tasks, self.episodes = tasks, episodes
        bounds = np.linspace(0, len(tasks), len(actors) + 1).round().astype(int)
        self.blocks = list(zip(bounds[:-1], bounds[1:], strict=True))

    def seed(self, seed, offset=0, total=None):
        self._seed = seed

    def reset(self):
        total = len(self.tasks) * self.episodes
        refs = [
            actor.reset.remote(
                self.dist_ref,
                self.tasks[a:b],
                self.episodes,
                self._seed,
                int(a) * self.episodes,
                total,
            )
            for actor, (a, b) in zip(self.actors, self.blocks, strict=True)
        ]
        return np.concatenate(self.ray.get(refs))

    def step(self, actions):
        from metarl_tf.envs.base import TimeStep

        refs = [
            actor.step.remote(actions[a * self.episodes : b * self.episodes])
            for actor, (a, b) in zip(self.actors, self.blocks, strict=True)
        ]
        parts = self.ray.get(refs)
        return TimeStep(*(np.concatenate(x) for x in zip(*parts, strict=True)))


def _stepping_sampler(ray, dist, policy, episodes, workers):
    """``sample(params, tasks, seed) -> env steps`` with ``workers`` SteppingWorker actors."""
    from metarl_tf.envs.base import run_episodes

    actors = [ray.remote(SteppingWorker).options(num_cpus=1).remote() for _ in range(workers)]
    dist_ref = ray.put(dist.in_process())
    actor = policy.numpy_actor()

    def sample(params, tasks, seed):
        params = [np.repeat(np.asarray(p, np.float32)[None], len(tasks), axis=0) for p in params]
        rng = np.random.default_rng(seed)
        noise = policy.sample_noise(rng, (dist.horizon, len(tasks), episodes))
        env = SteppedOnActors(ray, actors, dist_ref, tasks, episodes)
        env.seed(int(rng.integers(2**31)))
        arrays = run_episodes(env, actor.stepper(params, noise, episodes, False), dist.horizon)
        return int(arrays.mask.sum())

    return sample


def _sample_steps(sampler, params, tasks, seed) -> int:
    return sampler.sample(params, tasks, seed).num_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    import metarl_tf  # noqa: F401
    from metarl_tf.config import get_preset
    from metarl_tf.envs import make_task_distribution
    from metarl_tf.envs.ray_backend import RayBackend, connect, import_ray
    from metarl_tf.policy import make_policy
    from metarl_tf.rollout import LocalBackend, Sampler

    # Logical CPUs: the setups take turns, so their actors never step at the same time.
    connect(num_cpus=8)
    ray = import_ray()
    results: dict = {"load_avg_1min": {}, "rounds": args.rounds}
    for family in args.families:
        config = get_preset(FAMILIES[family])
        local = make_task_distribution(family, horizon=args.horizon)
        policy = make_policy(
            local.observation_spec, local.action_spec, config.hidden_sizes, config.activation, 0.0
        )
        params = policy.get_parameters()
        setups = {"local_1": Sampler(local, policy, args.episodes, LocalBackend())}
        for n in (1, 2):
            setups[f"ray_{n}"] = Sampler(local, policy, args.episodes, RayBackend(num_workers=n))

        runners = {
            name: functools.partial(_sample_steps, sampler, params)
            for name, sampler in setups.items()
        }
        runners["ray_2_stepping"] = functools.partial(
            _stepping_sampler(ray, local, policy, args.episodes, 2), params
        )
        times: dict[str, list[float]] = {name: [] for name in runners}
        warm_tasks = local.sample_tasks(args.tasks, seed=100)
        for name, fn in runners.items():  # start-up, not timed
            fn(warm_tasks, 100)
            print(f"{family} {name}: started", flush=True)
        steps = {}
        for r in range(args.rounds):
            tasks = local.sample_tasks(args.tasks, seed=r)
            for name, fn in runners.items():
                t0 = time.perf_counter()
                steps[name] = fn(tasks, r)
                times[name].append(time.perf_counter() - t0)
            print(f"{family} round {r}: " + ", ".join(
                f"{name} {steps[name] / times[name][-1]:.0f}/s" for name in runners
            ), flush=True)  # fmt: skip
        rates = {name: round(steps[name] / statistics.median(times[name]), 1) for name in runners}
        results[family] = rates
        results[family + "_per_round"] = {
            name: [round(steps[name] / t, 1) for t in times[name]] for name in runners
        }
        results[family + "_ratio_to_local_1"] = {
            name: round(rate / rates["local_1"], 3) for name, rate in rates.items()
        }
        results["load_avg_1min"][family] = round(os.getloadavg()[0], 2)
        results[family + "_env_steps_per_batch"] = steps["local_1"]
        for sampler in setups.values():
            sampler.backend.close()
        print(json.dumps({family: rates}), flush=True)
    results["cpus"] = os.cpu_count()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
