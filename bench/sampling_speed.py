"""Environment steps per second of the sampler at the MAML paper's batch (40 tasks x 20 episodes
x horizon 200), Nav2D and HalfCheetahVel, on each way of stepping the sub-environments:

- ``local_1``: this process (``--backend local``);
- ``ray_1``, ``ray_2``: 1 or 2 Ray actors stepping slices, one batched policy call per step in
  this process (``--backend ray``);
- ``ray_2_rollouts``: 2 Ray actors that each run their tasks' whole rollout with a numpy copy of
  the policy (no per-step round trip; a prototype defined here, to compare with ``ray_2``).

Every setup samples one batch first (start-up: worker processes, actors, envs built), then the
setups take turns for ``--rounds`` rounds, so that a load change on a shared machine hits them
all alike; the median of the rounds is reported, with every round's figure, the ratios to
``local_1`` and the load average. Asserts nothing.

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


class RolloutWorker:
    """A Ray actor body that runs whole rollouts of its tasks with a numpy policy (prototype)."""

    def __init__(self):
        from metarl_tf.envs.ray_backend import EnvWorker

        self.envs = EnvWorker()

    def rollout(self, key, dist, tasks, episodes, params, noise, env_seed, offset, total, act):
        from metarl_tf.policy import numpy_forward

        per_env = [t for t in tasks for _ in range(episodes)]
        self.envs.configure(key, dist, per_env, offset, total)
        obs = self.envs.reset(True, env_seed)
        n, horizon = len(per_env), noise.shape[0]
        rewards = np.zeros((horizon, n), np.float32)
        observations = np.zeros((horizon, n, obs.shape[1]), np.float32)
        actions = np.zeros((horizon, n, noise.shape[-1]), np.float32)
        active = np.ones(n, bool)
        steps = 0
        for t in range(horizon):
            mean, log_std = numpy_forward(params, obs.reshape(len(tasks), episodes, -1), act)
            a = (mean + np.exp(log_std) * noise[t]).reshape(n, -1)
            obs_next, reward, done = self.envs.step(a)
            observations[t], actions[t] = obs, a
            rewards[t] = np.where(active, reward, 0.0)
            steps += int(active.sum())
            active &= ~done
            obs = obs_next
            if not active.any():
                break
        return observations, actions, rewards, steps


def _rollouts_sampler(ray, dist, policy, episodes, workers):
    """``sample(params, tasks, seed) -> env steps`` on ``workers`` RolloutWorker actors, each
    with a contiguous block of whole tasks (so each runs the per-task matmuls locally)."""
    import uuid

    actors = [ray.remote(RolloutWorker).options(num_cpus=1).remote() for _ in range(workers)]
    key, ref = uuid.uuid4().hex, ray.put(dist.in_process())

    def sample(params, tasks, seed):
        params = [np.asarray(p, np.float32) for p in params]
        params = [np.broadcast_to(p, (len(tasks), *p.shape)) for p in params]
        rng = np.random.default_rng(seed)
        noise = policy.sample_noise(rng, (dist.horizon, len(tasks), episodes))
        env_seed = int(rng.integers(2**31))
        bounds = np.linspace(0, len(tasks), workers + 1).round().astype(int)
        refs = [
            actor.rollout.remote(
                key,
                ref,
                tasks[a:b],
                episodes,
                [p[a:b] for p in params],
                noise[:, a:b],
                env_seed,
                a * episodes,
                len(tasks) * episodes,
                policy.activation,
            )  # fmt: skip
            for actor, a, b in zip(actors, bounds[:-1], bounds[1:], strict=True)
        ]
        parts = ray.get(refs)
        return sum(part[3] for part in parts)

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
        runners["ray_2_rollouts"] = functools.partial(
            _rollouts_sampler(ray, local, policy, args.episodes, 2), params
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
