"""Time and memory traffic of the conjugate gradient's curvature products on a real meta-batch.

TRPO's conjugate gradient spends most of a meta-iteration in two products (``metarl_tf.curvature``):
the inner-loss Hessian ``H v`` (twice per CG iteration) and the Fisher ``F u`` (once). They stream
``[tasks, n, width]`` float32 tensors, so their time follows the bytes they move. This script
prints, per product: the time (least of 5 repeats of ``--products`` chained products, minus the
set-up), and the bytes read and written by the ops of the traced graph (every float32 tensor of
1 MB or more an op takes or gives, counted once per op), and their ratio. ``--compare-general``
also measures the inner-loss Hessian without its first-layer shortcut, in the same process.
Prints figures; asserts nothing.

    python bench/curvature_products.py [--preset nav2d] [--products 10] [--compare-general]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Measure this checkout's package (e.g. a git worktree), not whichever copy is installed; and
# share train_speed.py's timing (also when this file is loaded by path, as the tests do).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import _timed  # noqa: E402

import metarl_tf  # noqa: E402, F401  (environment for TensorFlow)

_IGNORED_OPS = {"Const", "Placeholder", "Identity", "ReadVariableOp", "NoOp", "Shape", "Reshape"}


def graph_traffic_bytes(concrete_function) -> int:
    """Bytes of the float32 tensors of 1 MB or more that each op of the graph reads or writes."""
    import tensorflow as tf

    total = 0
    for op in concrete_function.graph.get_operations():
        if op.type in _IGNORED_OPS:
            continue
        for t in [*op.inputs, *op.outputs]:
            if t.dtype == tf.float32 and t.shape.is_fully_defined():
                size = t.shape.num_elements() * 4
                if size >= 1_000_000:
                    total += size
    return total


def measure_product(make, point, vector, products: int) -> dict:
    """Per-product time and traffic of ``make(point)(v)``: ``products`` chained products minus
    the set-up alone, both as compiled functions."""
    import tensorflow as tf

    @tf.function
    def setup_only(point):
        return make(point).net.output

    @tf.function
    def chained(point, v):
        product = make(point)
        for _ in range(products):
            # rescaled so that the chain stays finite; parameter-sized, so it adds no traffic
            v = [x * 1e-3 for x in product(v)]
        return v

    def least_time(fn, *args):
        return _timed(lambda: [x.numpy() for x in tf.nest.flatten(fn(*args))], repeats=5)

    seconds = (least_time(chained, point, vector) - least_time(setup_only, point)) / products
    traffic = (
        graph_traffic_bytes(chained.get_concrete_function(point, vector))
        - graph_traffic_bytes(setup_only.get_concrete_function(point))
    ) / products
    return {
        "ms": round(seconds * 1e3, 2),
        "traffic_mb": round(traffic / 1e6, 1),
        # (a tiny batch can time within noise of its set-up: no rate then)
        "gb_per_s": round(traffic / seconds / 1e9, 1) if seconds > 0 else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nav2d")
    parser.add_argument("--products", type=int, default=10, help="chained products per timing")
    parser.add_argument(
        "--compare-general",
        action="store_true",
        help="also time the inner-loss Hessian without the first-layer shortcut",
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.products < 1:
        parser.error("--products must be at least 1")

    import tensorflow as tf

    from metarl_tf import curvature
    from metarl_tf.config import get_preset
    from metarl_tf.maml import tile_parameters
    from metarl_tf.training.trainer import MetaTrainer

    config = get_preset(args.preset)
    if config.inner_steps != 1:
        parser.error(
            f"preset {args.preset!r} has {config.inner_steps} inner steps; use a 1-step one"
        )
    trainer = MetaTrainer(config)
    policy = trainer.policy
    hessian_cls, fisher_cls = curvature.analytic_curvature_for(policy)
    tasks = trainer.dist.sample_tasks(config.meta_batch_size, 123)
    batch, _ = trainer.sample_meta_batch(tasks, [1], 0)
    inner, inner_adv = batch.inner_episodes[0], batch.inner_advantages[0]  # the one inner step's
    theta = tile_parameters(policy.parameters, config.meta_batch_size)
    vector = [tf.random.stateless_normal(t.shape, seed=[1, i]) for i, t in enumerate(theta)]

    def hessian(point):
        return hessian_cls(point, inner, inner_adv, policy.activation)

    def fisher(point):
        return fisher_cls(point, batch.outer_episodes, policy.activation)

    n = int(tf.reduce_sum(inner.mask))
    print(
        f"preset {args.preset}: {config.meta_batch_size} tasks, {n:,} inner steps, "
        f"hidden {tuple(config.hidden_sizes)} {config.activation}; per product:"
    )
    results = {"preset": args.preset, "products": {}}
    rows = [("inner-loss Hessian", hessian), ("Fisher", fisher)]
    if args.compare_general:
        rows.insert(1, ("inner-loss Hessian, general path", hessian))
    for name, make in rows:
        saved = curvature._NARROW_INPUT_MAX
        if name.endswith("general path"):
            curvature._NARROW_INPUT_MAX = 0  # every input takes the general R-backward
        try:
            row = measure_product(make, theta, vector, args.products)
        finally:
            curvature._NARROW_INPUT_MAX = saved
        results["products"][name] = row
        rate = "-" if row["gb_per_s"] is None else f"{row['gb_per_s']:.1f}"
        print(f"  {name:34s} {row['ms']:7.2f} ms  {row['traffic_mb']:7.1f} MB  {rate:>5s} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
