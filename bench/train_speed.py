"""Meta-training speed of the `nav2d` preset (MAML-TRPO: second order, 10 CG iterations, line
search), after warm-up: seconds per meta-iteration, environment steps per second, and where the
time goes. Prints figures; asserts nothing.

    python bench/train_speed.py [--iterations 8] [--warmup 2] [--preset nav2d]
        [--json bench/results/bench_train_speed.json]
    python bench/train_speed.py --outer ppo trpo --json bench/results/bench_ppo_vs_trpo.json

With several ``--outer`` values the same preset is measured once per outer step in this process
(the meta-step breakdown is TRPO's only) and the JSON holds one entry per outer step.

With ``--peer-script PATH`` (the reference's ``run_speed.sh``: pytorch-maml-rl on the same
configuration, 2 workers, 1 thread each, printing ``{"peer_median_s": ...}``) the reference runs
before and after the measurement, on the same host, and the JSON adds its seconds per iteration
and the ratio. Without it, the ratios are to figures of the reference measured on another host
of this machine kind (4.2 s in its fastest setting, 14.2 s with its defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Measure this checkout's package (e.g. a git worktree), not whichever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metarl_tf  # noqa: E402, F401  (environment for TensorFlow)

PYTORCH_MAML_RL_BEST_S = 4.2
PYTORCH_MAML_RL_DEFAULT_S = 14.2


def _timed(fn, repeats: int) -> float:
    """Least seconds of ``repeats`` calls of ``fn`` after one warm-up call (the least disturbed
    by the shared machine); bench/curvature_products.py uses it too."""
    fn()  # trace / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _after(t, tensors):
    """``tensors`` passed through an identity that runs only after the op ``t``: the ops that
    consume them start after ``t``."""
    import tensorflow as tf

    with tf.control_dependencies([t]):
        return tf.nest.map_structure(lambda x: None if x is None else tf.identity(x), tensors)


def trpo_pieces(trainer, config, repeats: int = 5) -> dict[str, float]:
    """Seconds of each piece of the TRPO meta-step (meta-gradient, natural direction by
    conjugate gradient, line search and update), each timed directly: one compiled function runs
    the three pieces of the trainer's own step (``trainer.outer_step``, a
    :class:`metarl_tf.outer.trpo.TRPOStep`) with ``tf.timestamp`` between them, every piece's
    inputs passed through an identity that waits for the timestamp before it. Median of
    ``repeats`` calls on one batch, the meta-parameters restored after each call so that every
    call does the same work (the same number of line-search steps)."""
    import tensorflow as tf

    step = trainer.outer_step
    tasks = trainer.dist.sample_tasks(config.meta_batch_size, 123)
    batch, _ = trainer.sample_meta_batch(tasks, list(range(1, config.inner_steps + 1)), 0)

    @tf.function(jit_compile=trainer._meta_step._jit_compile)
    def timed(batch):
        t0 = tf.timestamp()
        g = step.meta_gradient(_after(t0, batch))
        with tf.control_dependencies([*g.gradient, g.loss_before]):
            t1 = tf.timestamp()  # after the gradient; the next piece's inputs wait for it
        g = g._replace(gradient=_after(t1, g.gradient))
        full_step = step.natural_direction(g)
        with tf.control_dependencies(full_step):
            t2 = tf.timestamp()
        stats = step.line_search(g, _after(t2, full_step))
        with tf.control_dependencies(list(stats.values())):
            t3 = tf.timestamp()
        return t1 - t0, t2 - t1, t3 - t2

    saved = [v.numpy() for v in trainer._meta_variables]
    rows = []
    for _ in range(repeats + 1):  # the first call traces
        rows.append([float(x) for x in timed(batch)])
        for v, value in zip(trainer._meta_variables, saved, strict=True):
            v.assign(value)
    gradient_s, direction_s, line_search_s = (
        statistics.median(col) for col in zip(*rows[1:], strict=True)
    )
    return {
        "meta_step/meta_gradient": round(gradient_s, 4),
        "meta_step/natural_direction": round(direction_s, 4),
        "meta_step/line_search_and_update": round(line_search_s, 4),
    }


def measure(config, args) -> dict:
    """Trains ``args.warmup + args.iterations`` iterations of ``config`` and returns the figures."""
    from metarl_tf.training.trainer import MetaTrainer, peak_rss_mb

    trainer = MetaTrainer(config)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_iteration()
    warmup_s = time.perf_counter() - t0
    rows = [trainer.train_iteration() for _ in range(args.iterations)]

    per_it = statistics.median(r["time/iteration_s"] for r in rows)
    env_steps = statistics.median(r["charts/env_steps"] for r in rows)
    sampling = statistics.median(r["time/sampling_s"] for r in rows)
    adapt = statistics.median(r["time/adapt_s"] for r in rows)
    meta_step = statistics.median(r["time/meta_step_s"] for r in rows)
    breakdown = {
        "sampling": round(sampling, 4),
        "adapt_for_sampling": round(adapt, 4),
        "meta_step": round(meta_step, 4),
    }
    if config.outer == "trpo":
        breakdown.update(trpo_pieces(trainer, config))
    return {
        "preset": args.preset,
        "outer": config.outer,
        "iterations_measured": args.iterations,
        "seconds_per_iteration": round(per_it, 4),
        "env_steps_per_iteration": int(env_steps),
        "env_steps_per_second": round(env_steps / per_it, 1),
        "breakdown_s": breakdown,
        "warmup_s": round(warmup_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "speedup_vs_pytorch_maml_rl_best": round(PYTORCH_MAML_RL_BEST_S / per_it, 2),
        "speedup_vs_pytorch_maml_rl_default": round(PYTORCH_MAML_RL_DEFAULT_S / per_it, 2),
    }


def run_peer(script: str) -> float:
    """Seconds per meta-iteration of the reference, from its ``run_speed.sh``'s JSON line."""
    out = subprocess.run(["bash", script], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peer_median_s"])


def describe(config) -> str:
    if config.outer == "trpo":
        outer = f"TRPO ({config.cg_iterations} CG iterations, line search)"
    elif config.outer == "ppo":
        outer = f"PPO-clip ({config.ppo_epochs} Adam epochs, clip {config.ppo_clip})"
    else:
        outer = "Adam (one step)"
    return (
        f"{config.meta_batch_size} tasks x {config.episodes_per_task} episodes x horizon "
        f"{config.horizon}, {config.inner_steps} inner step(s), {outer}, "
        f"{'first' if config.first_order else 'second'} order"
    )


def main() -> None:
    """Runs the benchmark and prints (and optionally writes) its figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="nav2d")
    parser.add_argument(
        "--outer", nargs="+", choices=["trpo", "ppo", "adam"],
        help="outer step(s) to measure (default: the preset's)",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=8, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=2, help="iterations before measuring")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--peer-script", help="the reference's run_speed.sh, run before and after")
    args = parser.parse_args()

    from metarl_tf.config import get_preset

    preset = get_preset(args.preset)
    peer_s = [run_peer(args.peer_script)] if args.peer_script else []
    results = []
    for outer in args.outer or [preset.outer]:
        config = preset.replace(outer=outer)
        figures = measure(config, args)
        results.append(figures)
        per_it, env_steps = figures["seconds_per_iteration"], figures["env_steps_per_iteration"]
        print(f"preset {args.preset}: {describe(config)}")
        print(f"seconds per meta-iteration (median of {args.iterations}): {per_it:.3f}")
        print(
            f"environment steps per second: {env_steps / per_it:,.0f} ({env_steps:,} steps/iteration)"
        )
        for k, v in figures["breakdown_s"].items():
            print(f"  {k:<36} {v:8.3f} s")
        print(
            f"peak RSS: {figures['peak_rss_mb']:.0f} MiB; warm-up ({args.warmup} it incl. tracing): "
            f"{figures['warmup_s']:.1f} s"
        )
        print(f"vs pytorch-maml-rl reference (4.2 s best, 14.2 s default): "
              f"{figures['speedup_vs_pytorch_maml_rl_best']}x / {figures['speedup_vs_pytorch_maml_rl_default']}x")  # fmt: skip
    if args.peer_script:
        peer_s.append(run_peer(args.peer_script))
        peer = statistics.median(peer_s)
        for figures in results:
            figures["pytorch_maml_rl_same_host_s"] = [round(s, 4) for s in peer_s]
            figures["speedup_vs_pytorch_maml_rl_same_host"] = round(
                peer / figures["seconds_per_iteration"], 2
            )
            print(f"pytorch-maml-rl on this host: {peer_s} s per meta-iteration -> "
                  f"{figures['speedup_vs_pytorch_maml_rl_same_host']}x")  # fmt: skip
    if args.json:
        out = results[0] if len(results) == 1 else {"preset": args.preset, "runs": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
