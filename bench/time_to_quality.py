"""Time to quality: meta-trains a preset from scratch until the moving average of the training
post-adaptation return reaches a threshold (or a wall-clock budget runs out), writes the bundle
of that iteration, and meta-tests it on validation tasks. Prints figures; asserts nothing.

    python bench/time_to_quality.py                       # Nav2D, threshold -12, 15 min budget
    python bench/time_to_quality.py --preset nav2d --threshold -15 --budget-minutes 30

The default configuration is the first leg of the ``nav2d`` recipe (``nav2d-metasgd-lowstd`` with
a 2x100 ReLU network and the learned log-sigma shift). Reported: the wall-clock seconds (training
only, start-up excluded) and environment steps at which the ``--window``-iteration moving average
of ``returns/post_adaptation`` first reached ``--threshold``, and the mean return after 0, 1, ...
inner steps on ``--tasks`` x len(``--seeds``) validation tasks (seeds 100..109 by default: never
the test seed). The JSON also records the host's load average at start and end, because the
machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Measure this checkout's package (e.g. a git worktree), not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_OVERRIDES = {"hidden_sizes": (100, 100), "activation": "relu", "log_std_shift": True}


def moving_average(values: list[float], window: int) -> float | None:
    """Mean of the last ``window`` values, or None while fewer than ``window`` exist."""
    if len(values) < window:
        return None
    return statistics.fmean(values[-window:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nav2d-metasgd-lowstd")
    p.add_argument(
        "--plain-preset",
        action="store_true",
        help="use the preset as it is (without the recipe's 2x100 ReLU + log-sigma-shift overrides)",
    )
    p.add_argument("--threshold", type=float, default=-12.0)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--budget-minutes", type=float, default=15.0)
    p.add_argument("--max-iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--tasks", type=int, default=40, help="validation tasks per seed")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--steps", type=int, default=2, help="inner steps in the validation check")
    p.add_argument("--seeds", default=",".join(str(s) for s in range(100, 110)))
    p.add_argument("--json", default="bench/results/time_to_quality.json")
    args = p.parse_args(argv)

    from metarl_tf.bundle import load_bundle
    from metarl_tf.config import get_preset
    from metarl_tf.evaluation.report import evaluate, format_table
    from metarl_tf.training.run import make_trainer

    overrides = {} if args.plain_preset else dict(DEFAULT_OVERRIDES)
    config = get_preset(args.preset).replace(
        seed=args.seed, iterations=args.max_iterations, **overrides
    )
    load_start = os.getloadavg()
    budget_s = 60.0 * args.budget_minutes
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(config, Path(tmp) / "run")
        posts: list[float] = []
        env_steps = 0.0
        reached = None
        t0 = time.perf_counter()
        while trainer.iteration < config.iterations:
            m = trainer.train_iteration()
            posts.append(m["returns/post_adaptation"])
            env_steps += m["charts/env_steps"]
            elapsed = time.perf_counter() - t0
            ma = moving_average(posts, args.window)
            print(
                f"it {trainer.iteration:4d} post {posts[-1]:8.2f} "
                f"ma{args.window} {'-' if ma is None else f'{ma:8.2f}'} {elapsed:7.1f} s",
                flush=True,
            )
            if ma is not None and ma >= args.threshold:
                reached = {"iteration": trainer.iteration, "seconds": round(elapsed, 1),
                           "env_steps": int(env_steps), "moving_average": ma}  # fmt: skip
                break
            if elapsed >= budget_s:
                break
        train_s = time.perf_counter() - t0
        bundle_dir = Path(tmp) / "bundle"
        trainer.export_bundle(bundle_dir)
        bundle = load_bundle(bundle_dir)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        t1 = time.perf_counter()
        result = evaluate(bundle, args.tasks, args.episodes, args.steps, seeds=seeds)
        eval_s = time.perf_counter() - t1
    print(format_table(result))
    maml = result["methods"]["maml"]
    out = {
        "preset": args.preset,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "seed": args.seed,
        "threshold": args.threshold,
        "window": args.window,
        "budget_seconds": budget_s,
        "reached": reached,
        "iterations_trained": trainer.iteration,
        "training_seconds": round(train_s, 1),
        "env_steps": int(env_steps),
        "validation": {
            "tasks_per_seed": args.tasks,
            "episodes": args.episodes,
            "seeds": seeds,
            "mean_return": maml["mean_return"],
            "ci95": maml["ci95"],
            "seconds": round(eval_s, 1),
        },
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    if reached:
        print(
            f"moving average {reached['moving_average']:.2f} >= {args.threshold} at iteration "
            f"{reached['iteration']}: {reached['seconds']} s, {reached['env_steps']} env steps"
        )
    else:
        print(
            f"threshold {args.threshold} not reached in {train_s:.0f} s ({trainer.iteration} it.)"
        )
    one_step = maml["mean_return"][1] if len(maml["mean_return"]) > 1 else None
    print(f"validation after 1 step: {one_step:.2f} ({len(seeds) * args.tasks} tasks)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
