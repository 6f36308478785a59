"""``python -m metarl_tf`` / ``metarl-tf``: train | evaluate | export | export-savedmodel |
plot-training | scratch-ppo."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

import metarl_tf  # noqa: F401  (TensorFlow's environment, before TensorFlow loads)


def _list_of(kind, example: str):
    """argparse type of comma-separated ``kind`` values, e.g. ``3,1``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, e.g. {example}, got {text!r}"
            ) from None

    return parse


def _positive_int(text: str) -> int:
    """argparse type of an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_train(sub) -> None:
    from metarl_tf.config import PRESETS, RECIPES

    p = sub.add_parser(
        "train",
        help="meta-train a policy and write a bundle",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="named configuration (default: nav2d)")
    p.add_argument(
        "--recipe", choices=sorted(RECIPES),
        help="train a shipped bundle's legs in one resumable command (docs/training.md#recipes); "
        "takes only --out, --run-dir, --resume, --no-progress and the backend options "
        "(default out: saved_models/<recipe>-recipe)",
    )  # fmt: skip
    p.add_argument(
        "--algo", choices=["maml", "pretrain"],
        help="maml: meta-train (the default of most presets); pretrain: one policy trained jointly "
        "on all tasks without adaptation (the pretrained/oracle baselines of evaluate --baselines)",
    )  # fmt: skip
    p.add_argument(
        "--out",
        help="bundle directory (default: saved_models/<preset>-maml; with --algo pretrain "
        "saved_models/<task distribution>-pretrained, or saved_models/<dist> for an oracle one)",
    )
    p.add_argument(
        "--run-dir", help="checkpoints, metrics.jsonl, TensorBoard (default: runs/<bundle name>)"
    )
    p.add_argument("--iterations", type=int, help="meta-iterations (overrides the preset)")
    p.add_argument("--seed", type=int, help="random seed (overrides the preset)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoint")
    p.add_argument(
        "--init-from", metavar="BUNDLE",
        help="continue training from a bundle written with the same preset/options (its parameters, "
        "iteration count, wall-clock and metrics.jsonl), e.g. to train a shipped bundle longer",
    )  # fmt: skip
    p.add_argument(
        "--meta-sgd", action="store_true", default=None, help="learn per-parameter step sizes"
    )
    p.add_argument("--first-order", action="store_true", default=None, help="first-order MAML")
    p.add_argument(
        "--outer", choices=["trpo", "ppo", "adam"], help="outer update (overrides the preset)"
    )
    p.add_argument(
        "--inner-steps", type=int,
        help="inner steps during meta-training, each on freshly collected episodes",
    )  # fmt: skip
    p.add_argument(
        "--every-step-objective", action="store_true", default=None,
        help="with --inner-steps k > 1 (TRPO): maximize the mean return after every inner step, "
        "not only after the last",
    )  # fmt: skip
    p.add_argument(
        "--step-weights", type=_list_of(float, "3,1"),
        help="with --every-step-objective: comma-separated weight of each inner step's return "
        "in the objective (normalized; e.g. 3,1 favours the first step; default equal)",
    )  # fmt: skip
    p.add_argument(
        "--meta-sgd-per-step", action="store_true", default=None,
        help="with --meta-sgd: one set of step sizes per inner step (continuing a bundle with "
        "shared step sizes starts every step from them)",
    )  # fmt: skip
    p.add_argument(
        "--log-std-shift", action="store_true", default=None,
        help="TRPO, Gaussian policies: learn a shift of log σ that the first inner step adds, and "
        "keep the pre-adaptation log σ fixed (at --init-log-std, or the --init-from bundle's "
        "value): exploration noise apart from the adapted policy's",
    )  # fmt: skip
    p.add_argument(
        "--lvc", action="store_true", default=None,
        help="TRPO, second order: differentiate through the inner steps with the Hessian of "
        "ProMP's low-variance-curvature inner loss, which credits the pre-adaptation policy "
        "for the data it collects (the adaptation itself is unchanged)",
    )  # fmt: skip
    p.add_argument("--ppo-epochs", type=int, help="Adam epochs per iteration with --outer ppo")
    p.add_argument("--ppo-clip", type=float, help="PPO clip range ε with --outer ppo")
    p.add_argument(
        "--outer-learning-rate", type=float, help="Adam learning rate with --outer ppo/adam"
    )
    p.add_argument(
        "--inner-step-size", type=float, help="inner step size α (initial α with --meta-sgd)"
    )
    p.add_argument(
        "--init-log-std", type=float, help="initial log standard deviation of the policy"
    )
    p.add_argument(
        "--hidden-sizes", type=_list_of(int, "100,100"),
        help="the policy's hidden layer widths, e.g. 100,100",
    )  # fmt: skip
    p.add_argument("--activation", choices=["tanh", "relu"], help="the policy's hidden activation")
    p.add_argument(
        "--gamma",
        type=float,
        help="discount of the advantages (inner and outer); the reported returns stay undiscounted",
    )
    p.add_argument(
        "--gae-lambda", type=float,
        help="GAE λ of the advantages (inner and outer; 1 = Monte Carlo returns minus baseline)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=_positive_int, metavar="N",
        help="checkpoint every N >= 1 iterations (and always at the end or on SIGTERM/SIGINT)",
    )  # fmt: skip
    p.add_argument("--meta-batch-size", type=int, help="tasks per meta-iteration (overrides)")
    p.add_argument("--episodes-per-task", type=int, help="episodes per task (overrides)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    _add_backend_options(p, default=None)
    p.add_argument(
        "--select", choices=["last", "best"],
        help="bundle from the last iteration, or from the iteration with the best 10-iteration moving "
        "average of the *training* post-adaptation return (kept in the checkpoint)",
    )  # fmt: skip


def _add_backend_options(p, default) -> None:
    """--backend, --ray-address, --num-env-workers (train: defaults from the preset)."""
    p.add_argument(
        "--backend", choices=["local", "ray"], default=default,
        help="where the environments step: local (this process) or ray (Ray actors; same batches)",
    )  # fmt: skip
    p.add_argument(
        "--ray-address", default=None,
        help="with --backend ray: 'auto' or 'ray://host:port' joins a cluster (default: start Ray "
        "on this machine with all its cores)",
    )  # fmt: skip
    p.add_argument(
        "--num-env-workers", type=int, default=None,
        help="with --backend ray: actors stepping environments (default: one per CPU of the cluster)",
    )  # fmt: skip


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="meta-test a bundle on fresh tasks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bundle", help="bundle directory, e.g. saved_models/nav2d-maml")
    p.add_argument("--tasks", type=int, default=40, help="number of fresh test tasks")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task and step")
    p.add_argument("--steps", type=int, default=3, help="inner steps (each on fresh episodes)")
    p.add_argument("--seed", type=int, default=0, help="seed of test tasks and noise")
    p.add_argument(
        "--seeds", help="several seeds, e.g. 0,1,2 (overrides --seed): results per seed and "
        "aggregated over all tasks x seeds",
    )  # fmt: skip
    p.add_argument(
        "--baselines", default="",
        help="evaluate beside the bundle, comma-separated: random, pretrained, oracle",
    )  # fmt: skip
    p.add_argument(
        "--pretrained",
        help="pretrained bundle (default: saved_models/<dist>-pretrained beside the bundle)",
    )
    p.add_argument(
        "--oracle", help="oracle bundle (default: saved_models/<dist>-oracle beside the bundle)"
    )
    p.add_argument(
        "--baseline-step-size", default="grid",
        help="inner step size of the baselines: 'grid' (best of 0 (no adaptation),0.001,0.003,...,1 on separate "
        "validation tasks) or a number",
    )  # fmt: skip
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write PNG plots with this path prefix (curve, trajectories)")
    _add_backend_options(p, default="local")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a bundle from a training run's checkpoint")
    p.add_argument("run_dir", help="run directory holding checkpoint/")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--select", choices=["last", "best"], default="last", help="which checkpoint")


def _add_export_savedmodel(sub) -> None:
    p = sub.add_parser(
        "export-savedmodel",
        help="write a bundle's policy (optionally adapted to episodes) as a TensorFlow SavedModel",
        description="Writes the bundle's meta-initialization, or with --adapt-on the policy adapted "
        "to those episodes, as a SavedModel that plain TensorFlow loads (docs/serving.md).",
    )
    p.add_argument("bundle", help="bundle directory, e.g. saved_models/nav2d-maml")
    p.add_argument("out", help="SavedModel directory to write")
    p.add_argument(
        "--adapt-on", metavar="EPISODES_NPZ",
        help="adapt to the episodes in this .npz first: observations [E, T, obs_dim], actions "
        "[E, T, act_dim] (raw samples; categorical: the index), rewards [E, T] float32 and "
        "optionally lengths [E] (metarl_tf.episodes.save_episodes writes one)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, help="inner steps with --adapt-on (default: the bundle's)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an OUT this command wrote (anything else is refused)",
    )


def _add_plot_training(sub) -> None:
    p = sub.add_parser(
        "plot-training",
        help="PNG of the training curves (pre/post-adaptation return per iteration)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "runs", nargs="+",
        help="metrics.jsonl files, or run/bundle directories holding one (several: one colour each)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--window", type=int, default=10, help="moving-average window (iterations)")


def _add_scratch_ppo(sub) -> None:
    p = sub.add_parser(
        "scratch-ppo",
        help="environment steps a TF-Agents PPO agent trained from scratch on each new task needs "
        "to match the bundle after k inner steps",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bundle", help="bundle directory, e.g. saved_models/nav2d-maml")
    p.add_argument("--tasks", type=int, default=5, help="new tasks (PPO trains once per task)")
    p.add_argument("--episodes", type=int, default=20, help="episodes per MAML step and PPO update")
    p.add_argument("--steps", type=int, default=2, help="MAML inner steps to compare with")
    p.add_argument("--env-steps", type=int, default=100_000, help="PPO budget per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks (as evaluate's)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG (return vs. environment steps) here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metarl-tf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_export_savedmodel(sub)
    _add_plot_training(sub)
    _add_scratch_ppo(sub)
    return parser


def _train_config(args):
    from metarl_tf.config import get_preset

    config = get_preset(args.preset or "nav2d")
    overrides = {
        "iterations": args.iterations, "seed": args.seed, "meta_sgd": args.meta_sgd,
        "first_order": args.first_order, "outer": args.outer, "inner_step_size": args.inner_step_size,
        "checkpoint_every": args.checkpoint_every, "init_log_std": args.init_log_std,
        "inner_steps": args.inner_steps, "ppo_epochs": args.ppo_epochs, "ppo_clip": args.ppo_clip,
        "outer_learning_rate": args.outer_learning_rate,
        "algo": args.algo, "gae_lambda": args.gae_lambda, "gamma": args.gamma,
        "every_step_objective": args.every_step_objective, "lvc": args.lvc,
        "step_weights": args.step_weights, "hidden_sizes": args.hidden_sizes,
        "activation": args.activation,
        "meta_sgd_per_step": args.meta_sgd_per_step,
        "log_std_shift": args.log_std_shift,
    }  # fmt: skip
    overrides["meta_batch_size"] = args.meta_batch_size
    overrides["episodes_per_task"] = args.episodes_per_task
    overrides.update(_backend_overrides(args))
    return config.replace(**{k: v for k, v in overrides.items() if v is not None})


def _exit_at_once(signum, frame) -> None:
    os._exit(128 + signum)


def _backend_overrides(args) -> dict:
    """The sampling backend flags that were given (they change where environments step, not
    what a run computes, so a recipe takes them too)."""
    backend = {"backend": args.backend, "ray_address": args.ray_address,
               "num_env_workers": args.num_env_workers}  # fmt: skip
    return {k: v for k, v in backend.items() if v is not None}


# train flags a recipe accepts: everything else is fixed by the recipe's legs
_RECIPE_FLAGS = {"command", "recipe", "out", "run_dir", "resume", "no_progress", "backend",
                 "ray_address", "num_env_workers"}  # fmt: skip


def cmd_train_recipe(args) -> int:
    from metarl_tf.config import get_recipe
    from metarl_tf.training import run_recipe
    from metarl_tf.training.recipes import default_recipe_out

    given = sorted(
        "--" + k.replace("_", "-")
        for k, v in vars(args).items()
        if k not in _RECIPE_FLAGS and v not in (None, False)
    )
    if given:
        print(f"error: --recipe fixes every leg's configuration; drop {', '.join(given)} "
              "(it takes --out, --run-dir, --resume, --no-progress and the backend options)",
              file=sys.stderr)  # fmt: skip
        return 2
    recipe = get_recipe(args.recipe)
    backend = _backend_overrides(args)
    if backend:
        legs = tuple(
            dataclasses.replace(leg, overrides={**leg.overrides, **backend}) for leg in recipe.legs
        )
        recipe = dataclasses.replace(recipe, legs=legs)
    out = Path(args.out) if args.out else default_recipe_out(recipe)
    run_dir = Path(args.run_dir or f"runs/{recipe.name}-recipe")
    result = run_recipe(
        recipe, run_dir, out, resume=args.resume, progress=not args.no_progress,
        log=functools.partial(print, flush=True),
    )  # fmt: skip
    if result.stopped_by:
        print(f"{result.stopped_by}: stopped; every leg's checkpoint is saved. Resume with: "
              f"python -m metarl_tf train --recipe {recipe.name} --out {out} --run-dir {run_dir} "
              "--resume", file=sys.stderr)  # fmt: skip
    else:
        print(f"recipe {recipe.name}: bundle written to {out} (iteration {result.iteration}; "
              f"{len(recipe.legs)} legs in {run_dir})")  # fmt: skip
    return result.exit_code


def cmd_train(args) -> int:
    from metarl_tf.training import fit
    from metarl_tf.training.pretrain import default_bundle_path

    if args.recipe:
        return cmd_train_recipe(args)
    config = _train_config(args)
    default_out = (
        default_bundle_path(config)
        if config.algo == "pretrain"
        else f"saved_models/{args.preset or 'nav2d'}-maml"
    )
    out = Path(args.out or default_out)
    run_dir = Path(args.run_dir or f"runs/{out.name}")
    result = fit(
        config, run_dir, out, resume=args.resume, init_from=args.init_from,
        select=args.select or "last", progress=not args.no_progress,
        log=functools.partial(print, flush=True),
    )  # fmt: skip
    last = result.last_metrics
    if last:
        pre = sum(m["returns/pre_adaptation"] for m in last) / len(last)
        post = sum(m["returns/post_adaptation"] for m in last) / len(last)
        print(f"bundle written to {out} (iteration {result.iteration}; last {len(last)} iterations: "
              f"pre {pre:.2f}, post {post:.2f}; {result.elapsed:.0f} s of training)")  # fmt: skip
    else:
        print(f"bundle written to {out} (iteration {result.iteration})")
    if result.stopped_by:
        print(f"{result.stopped_by}: stopped after iteration {result.trained_iterations}; the "
              f"checkpoint and the bundle are saved. Resume with: python -m metarl_tf train "
              f"--preset {args.preset or 'nav2d'} --out {out} --run-dir {run_dir} --resume", file=sys.stderr)  # fmt: skip
    return result.exit_code


def cmd_evaluate(args) -> int:
    from metarl_tf.bundle import load_bundle
    from metarl_tf.evaluation.baselines import parse_baselines
    from metarl_tf.evaluation.plots import plot_curve, plot_method_trajectories, plot_trajectories
    from metarl_tf.evaluation.report import evaluate, format_paired, format_table
    from metarl_tf.rollout import make_backend

    if args.tasks < 2 or args.episodes < 1 or args.steps < 0:
        print("error: need --tasks >= 2, --episodes >= 1, --steps >= 0", file=sys.stderr)
        return 2
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise ValueError("--seeds needs at least one integer, e.g. --seeds 0,1,2")
    baselines = parse_baselines(args.baselines)
    if args.baseline_step_size == "grid":
        step_size = None
    else:
        try:
            step_size = float(args.baseline_step_size)
        except ValueError:
            raise ValueError(
                f"--baseline-step-size takes 'grid' or a number, got {args.baseline_step_size!r}"
            ) from None
    bundle = load_bundle(args.bundle)
    backend = make_backend(args.backend, args.ray_address, args.num_env_workers or 0)
    t0 = time.perf_counter()
    result = evaluate(
        bundle, args.tasks, args.episodes, args.steps, seeds=seeds, baselines=baselines,
        pretrained=args.pretrained, oracle=args.oracle, baseline_step_size=step_size,
        backend=backend,
    )  # fmt: skip
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {','.join(map(str, seeds))}"
    print(f"{bundle.name}: {args.tasks} fresh tasks, {args.episodes} episodes per step, {seed_text} "
          f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    print("mean return ± 95% CI after k inner steps"
          + (f" (over {args.tasks} tasks x {len(seeds)} seeds)" if len(seeds) > 1 else ""))  # fmt: skip
    print(format_table(result))
    for name, m in result["methods"].items():
        sel = m.get("step_size_selection", {})
        how = f", chosen by {sel['criterion']}" if "grid" in sel else ""
        lam = f", GAE lambda {sel['gae_lambda']}" if "gae_lambda" in sel else ""
        print(f"  {name}: step size {m['step_size']}{lam}{how}; {m['source']}")
    if baselines:
        print("maml minus baseline, paired over the same tasks and noise (mean ± 95% CI)")
        print(format_paired(result))
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(public, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_curve(result, f"{args.plot}_curve.png")
        print(f"wrote {args.plot}_curve.png")
        if bundle.task_distribution.name == "nav2d":
            plot_trajectories(result, f"{args.plot}_trajectories.png")
            print(f"wrote {args.plot}_trajectories.png")
            if baselines:
                plot_method_trajectories(result, f"{args.plot}_trajectories_methods.png")
                print(f"wrote {args.plot}_trajectories_methods.png")
    return 0


def cmd_export(args) -> int:
    from metarl_tf.training import export_run

    result = export_run(args.run_dir, args.out, select=args.select)
    print(f"bundle written to {args.out} from iteration {result.iteration}")
    return 0


def cmd_export_savedmodel(args) -> int:
    from metarl_tf.bundle import load_bundle
    from metarl_tf.episodes import load_episodes
    from metarl_tf.export import export_saved_model

    if args.steps is not None and not args.adapt_on:
        print("error: --steps needs --adapt-on", file=sys.stderr)
        return 2
    bundle = load_bundle(args.bundle)
    source = bundle
    if args.adapt_on:
        source = bundle.adapt(load_episodes(args.adapt_on), steps=args.steps)
    try:
        export_saved_model(source, args.out, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if source is bundle:
        print(f"SavedModel of {bundle.name}'s meta-initialization written to {args.out}")
    else:
        losses = ", ".join(f"{x:.4g}" for x in source.inner_losses)
        print(f"SavedModel of {bundle.name} adapted by {source.steps} inner step(s) on "
              f"{source.num_episodes} episodes (inner losses {losses}) written to {args.out}")  # fmt: skip
    return 0


def cmd_plot_training(args) -> int:
    from metarl_tf.evaluation.plots import plot_training, read_metrics

    if args.window < 1:
        print("error: --window must be >= 1", file=sys.stderr)
        return 2
    runs = {}
    for run in args.runs:
        name = Path(run).parent.name if Path(run).is_file() else Path(run).name
        runs[name if name not in runs else run] = read_metrics(run)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_training(runs, args.out, args.window)
    for name, rows in runs.items():
        last = rows[-args.window :]
        post = sum(r["returns/post_adaptation"] for r in last) / len(last)
        print(f"{name}: {len(rows)} iterations, last {len(last)}: post-adaptation {post:.2f}")
    print(f"wrote {args.out}")
    return 0


def cmd_scratch_ppo(args) -> int:
    # first: it sets TF_USE_LEGACY_KERAS for tf-agents before Keras 3 loads (metarl_tf.scratch)
    from metarl_tf.scratch import PPOConfig, compare_with_bundle, plot_comparison

    # isort: split
    from tqdm import tqdm

    from metarl_tf.bundle import load_bundle

    if args.tasks < 1 or args.episodes < 1 or args.steps < 1 or args.env_steps < 1:
        print("error: need --tasks, --episodes, --steps and --env-steps >= 1", file=sys.stderr)
        return 2
    bundle = load_bundle(args.bundle)
    t0 = time.perf_counter()
    with tqdm(total=args.tasks, unit="task", desc="PPO from scratch", dynamic_ncols=True) as bar:
        result = compare_with_bundle(
            bundle, args.tasks, args.episodes, args.steps, args.env_steps, args.seed,
            PPOConfig(episodes_per_iteration=args.episodes),
            progress=lambda done, total: bar.update(1),
        )  # fmt: skip
    result["seconds"] = round(time.perf_counter() - t0, 1)
    m = result["maml"]
    print(f"{bundle.name}: {args.tasks} new tasks (seed {args.seed}), {args.episodes} episodes per "
          f"step/update, PPO budget {args.env_steps} env steps per task ({result['seconds']} s)")  # fmt: skip
    print(
        f"{'MAML inner steps':>16} {'return':>9} {'env steps':>10}   PPO from scratch: env steps to match"
    )
    for k, row in enumerate(result["steps_to_match_maml"], 1):
        per_task = row["ppo_env_steps_per_task"]
        reached = [s for s in per_task if s is not None]
        text = (f"median {int(np.median(reached))} over {len(reached)}/{len(per_task)} tasks"
                if reached else "not within the budget on any task")  # fmt: skip
        print(f"{k:>16} {m['mean_return'][k]:>9.2f} {int(m['env_steps'][k]):>10}   {text}")
    curve = result["ppo_scratch"]
    print(
        f"PPO mean return after {curve['env_steps'][-1]} env steps: {curve['mean_return'][-1]:.2f}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_comparison(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "train":  # the process is this command
        # Outside fit's loop (its set-up checks, and once it returned with everything written)
        # nothing is half done: SIGTERM/SIGINT there end the process at once, with status
        # 128 + the signal's number, as fit does after the iteration under way.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _exit_at_once)
    if args.command == "scratch-ppo":
        # before anything imports Keras 3: it sets TF_USE_LEGACY_KERAS for tf-agents
        import metarl_tf.scratch  # noqa: F401
    from metarl_tf.training.run import RunError  # after parsing: --help imports no TensorFlow

    try:
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export,
                    "export-savedmodel": cmd_export_savedmodel,
                    "plot-training": cmd_plot_training, "scratch-ppo": cmd_scratch_ppo}  # fmt: skip
        return commands[args.command](args)
    except RunError as err:  # refused or failed runs: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, FileNotFoundError) as err:  # user errors: say what is wrong, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ImportError, ConnectionError) as err:  # --backend ray: Ray missing or unreachable
        if isinstance(err, ImportError) and err.name != "ray":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
