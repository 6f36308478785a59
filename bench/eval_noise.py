"""How much of an ``evaluate`` figure is action noise: the test tasks of one task seed, adapted
and scored under several noise seeds. Prints the mean return after 0..K inner steps per noise
seed, and their spread; asserts nothing.

    python bench/eval_noise.py saved_models/nav2d-maml [--seed 1] [--tasks 40]
        [--episodes 20] [--steps 2] [--noise-seeds 1,1001,1002,1003,1004,1005] [--json PATH]

``evaluate --seed S`` draws its tasks from seed ``S`` and its action noise from seed ``S`` too;
the first noise seed here defaults to ``S``, so that row is ``evaluate``'s own figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# Measure this checkout's package (e.g. a git worktree), not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metarl_tf  # noqa: E402, F401  (environment for TensorFlow)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--seed", type=int, default=1, help="task seed, as evaluate's --seed")
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--noise-seeds", help="comma-separated; default: --seed, then 1001..1005")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    try:
        noise_seeds = (
            [int(x) for x in args.noise_seeds.split(",")]
            if args.noise_seeds
            else [args.seed, *range(1001, 1006)]
        )
    except ValueError:
        p.error(f"--noise-seeds takes comma-separated integers, got {args.noise_seeds!r}")
    if len(set(noise_seeds)) != len(noise_seeds):
        p.error(f"--noise-seeds must be distinct, got {args.noise_seeds!r}")

    from metarl_tf.bundle import load_bundle
    from metarl_tf.evaluation.protocol import EVAL_SEED_SALT, adaptation_curve

    bundle = load_bundle(args.bundle)
    tasks = bundle.task_distribution.sample_tasks(args.tasks, seed=EVAL_SEED_SALT + args.seed)
    rows = {}
    print(f"{args.bundle}: {args.tasks} tasks of seed {args.seed} x {args.episodes} episodes")
    print(
        "noise seed   "
        + "".join(f"{f'{k} step' + ('s' if k != 1 else ''):>10}" for k in range(args.steps + 1))
    )
    for noise in noise_seeds:
        curve = adaptation_curve(bundle, tasks, args.episodes, args.steps, noise)
        rows[noise] = curve["mean_return"]
        print(f"{noise:>10}   " + "".join(f"{r:10.2f}" for r in curve["mean_return"]))
    by_step = list(zip(*rows.values(), strict=True))
    print("mean         " + "".join(f"{statistics.mean(c):10.2f}" for c in by_step))
    print("min .. max   " + "".join(f"{f'{min(c):.2f}..{max(c):.2f}':>16}" for c in by_step))
    if args.json:
        out = {
            "bundle": args.bundle,
            "task_seed": args.seed,
            "tasks": args.tasks,
            "episodes": args.episodes,
            "mean_return_by_noise_seed": {str(k): v for k, v in rows.items()},
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
