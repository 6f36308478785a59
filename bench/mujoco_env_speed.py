"""Environment steps per second of a MuJoCo task family's batched env (40 tasks x 20 episodes =
800 sub-envs by default), stepped in this process or in 1 or 2 worker processes, with uniform
random actions (no policy). Prints figures and the load average seen; asserts nothing.

    python bench/mujoco_env_speed.py [--family halfcheetah-dir] [--tasks 40] [--episodes 20]
        [--steps 20] [--workers 0 1 2] [--json bench/results/bench_mujoco_env_speed.json]

The machine's 2 cores are shared: figures measured under load are not comparable across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    import metarl_tf  # noqa: F401
    from metarl_tf.envs import make_task_distribution

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="halfcheetah-dir")
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after a reset)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    results = []
    for workers in args.workers:
        with make_task_distribution(args.family, horizon=1000, num_workers=workers) as dist:
            tasks = dist.sample_tasks(args.tasks, seed=0)
            t0 = time.perf_counter()
            env = dist.make_batched_env(tasks, args.episodes)
            env.seed(0)
            env.reset()
            setup = time.perf_counter() - t0
            rng = np.random.default_rng(0)
            act_dim = dist.action_spec.shape[0]
            actions = rng.uniform(-1, 1, (args.steps, env.num_envs, act_dim)).astype(np.float32)
            t0 = time.perf_counter()
            for a in actions:
                env.step(a)
            elapsed = time.perf_counter() - t0
        row = {
            "workers": workers,
            "sub_envs": env.num_envs,
            "setup_s": round(setup, 2),
            "steps_per_s": round(env.num_envs * args.steps / elapsed, 1),
            "load_avg_1min": os.getloadavg()[0],
        }
        results.append(row)
        print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"family": args.family, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
