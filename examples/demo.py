"""Demo: adapt the meta-learned Nav2D policy to new tasks over HTTP (``make demo``).

Starts the adaptation service on a free loopback port (or uses ``--url``), then for each of a few
Nav2D tasks the bundle never saw:

1. collects episodes with the meta-initialization, one ``/act`` call per time step for all of the
   task's episodes at once (sampled actions; the raw, unclipped ones are recorded, as the trainer
   records them);
2. posts them to ``/adapt`` and collects fresh episodes with the adapted policy;
3. adapts once more from that policy (``parent``) on those fresh episodes and collects again.

Prints the mean return after 0, 1 and 2 adaptation steps, writes ``{"mean_return": [r0, r1, r2]}``
to the file named by ``DEMO_JSON`` (if set), draws the trajectories before and after adaptation
(mean actions, goal marked; as in the MAML paper's Fig. 2) and stops the service.

This program imports no TensorFlow: it is a plain HTTP client plus the numpy environment.

    python examples/demo.py                       # start the service on saved_models/nav2d-maml
    python examples/demo.py --url http://127.0.0.1:3000 --tasks 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a fresh clone without installing

from metarl_tf.envs import make_task_distribution  # noqa: E402  (numpy environments only)
from serving.client import AdaptationClient, token_from_env  # noqa: E402
from serving.launch import ServiceProcess  # noqa: E402

DEFAULT_BUNDLE = REPO_ROOT / "saved_models" / "nav2d-maml"
TEST_TASK_SEED = 10_000  # the trainer's task seeds come from SeedSequence([seed, iteration])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="use this running service instead of starting one")
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle to serve (no --url)")
    p.add_argument("--tasks", type=int, default=5, help="number of new tasks")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task and step")
    p.add_argument("--steps", type=int, default=2, help="adaptation steps (each on fresh data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks and the action noise")
    p.add_argument(
        "--plot",
        default=str(REPO_ROOT / "runs" / "demo" / "nav2d_adaptation.png"),
        help="PNG of the trajectories ('' for none)",
    )
    p.add_argument("--json", default=os.environ.get("DEMO_JSON"), help="results JSON (DEMO_JSON)")
    p.add_argument(
        "--token",
        default=token_from_env(),
        help="bearer token of the service (default: METARL_API_TOKEN / METARL_API_TOKEN_FILE)",
    )
    p.add_argument(
        "--min-improvement",
        type=float,
        help="exit 1 unless the 1-step mean return beats the 0-step one by this much",
    )
    return p.parse_args(argv)


def collect(client, dist, task, policy, episodes: int, act_dim: int, rng, deterministic=False):
    """Runs ``episodes`` episodes of ``task`` with ``policy`` through ``/act``.

    Returns:
        ``(episodes as (obs [T, obs_dim], raw actions [T, act_dim], rewards [T]), returns)``.
    """
    env = dist.make_batched_env([task], episodes)
    obs = env.reset()
    buffers = [([], [], []) for _ in range(episodes)]
    active = np.ones(episodes, bool)
    for _ in range(dist.horizon):
        idx = np.flatnonzero(active)
        seed = None if deterministic else int(rng.integers(2**31))
        result = client.act_full(policy, obs[idx], deterministic=deterministic, seed=seed)
        actions = np.zeros((episodes, act_dim), np.float32)
        actions[idx] = result.actions
        step = env.step(actions)
        for j, i in enumerate(idx):
            buffers[i][0].append(obs[i])
            buffers[i][1].append(result.raw_actions[j])
            buffers[i][2].append(step.reward[i])
        active &= ~step.done
        obs = step.observation
        if not active.any():
            break
    data = [(np.array(o), np.array(a), np.array(r, np.float32)) for o, a, r in buffers]
    returns = np.array([r.sum() for _, _, r in data])
    return data, returns


def run(client: AdaptationClient, args) -> dict:
    meta = client.metadata()
    td = meta["task_distribution"]
    dist = make_task_distribution(td["name"], **td.get("config", {}))
    act_dim = int(meta["action_spec"]["shape"][0])
    tasks = dist.sample_tasks(args.tasks, seed=TEST_TASK_SEED + args.seed)
    rng = np.random.default_rng(args.seed)
    print(
        f"bundle {meta['name']!r} ({td['name']}), {args.tasks} new tasks, "
        f"{args.episodes} episodes per task and step, {args.steps} adaptation steps"
    )
    per_task = np.zeros((args.steps + 1, len(tasks)))
    paths: list[list[np.ndarray]] = []  # [task][k] mean-action trajectory
    start = time.perf_counter()
    for i, task in enumerate(tasks):
        policy, task_paths, losses = "meta", [], []
        for k in range(args.steps + 1):
            episodes, returns = collect(client, dist, task, policy, args.episodes, act_dim, rng)
            per_task[k, i] = returns.mean()
            (path, *_), _ = collect(client, dist, task, policy, 1, act_dim, rng, deterministic=True)
            task_paths.append(path[0])
            if k < args.steps:
                result = client.adapt(episodes, steps=1, parent=policy)
                policy = result.policy_id
                losses.append(result.inner_losses[0])
        paths.append(task_paths)
        goal = ", ".join(f"{g:+.2f}" for g in task["goal"])
        curve = "  ".join(f"{r:8.2f}" for r in per_task[:, i])
        print(f"  task {i} goal ({goal}): return after 0..{args.steps} steps: {curve}")
    mean = per_task.mean(axis=1)
    print(f"mean return after 0..{args.steps} steps: " + "  ".join(f"{r:.2f}" for r in mean))
    if args.steps >= 1:
        print(f"improvement after 1 step: {mean[1] - mean[0]:+.2f}")
    print(f"({time.perf_counter() - start:.1f} s over HTTP at {client.url})")
    return {
        "mean_return": mean.tolist(),
        "per_task": per_task.T.tolist(),
        "tasks": tasks,
        "episodes": args.episodes,
        "bundle": meta["name"],
        "paths": paths,
    }


def plot(result: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, paths = result["tasks"], result["paths"]
    steps = len(result["mean_return"]) - 1
    # Later steps drawn thinner on top, so overlapping paths stay visible.
    styles = [
        {"color": "tab:gray", "lw": 3.0, "ls": "-"},
        {"color": "tab:orange", "lw": 2.0, "ls": "-"},
        {"color": "tab:red", "lw": 1.2, "ls": "--"},
        {"color": "tab:purple", "lw": 1.0, "ls": ":"},
    ]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.1 * len(tasks), 3.4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for k in range(steps + 1):
            xy = paths[i][k]
            label = "pre-update" if k == 0 else f"{k} step{'s' if k > 1 else ''}"
            ax.plot(xy[:, 0], xy[:, 1], label=label, **styles[min(k, len(styles) - 1)])
        gx, gy = tasks[i]["goal"]
        ax.plot([gx], [gy], marker="*", ms=15, color="gold", mec="k", ls="", label="goal")
        ax.plot([0], [0], marker="o", color="k", ms=4, ls="")
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        returns = ", ".join(f"{r:.1f}" for r in result["per_task"][i])
        ax.set_title(f"task {i}\nreturns {returns}", fontsize=8)
        if i == 0:
            ax.legend(loc="lower left", fontsize=7)
    fig.suptitle("Nav2D over HTTP: mean-action trajectories before and after adaptation")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.url:
        client = AdaptationClient(args.url, timeout=60, token=args.token)
        client.wait_until_ready(timeout=60)
        with client:
            result = run(client, args)
    else:
        bundle = Path(args.bundle)
        if not (bundle / "meta.json").is_file():
            print(
                f"error: no bundle at {bundle}. Train one with\n"
                f"  python -m metarl_tf train --preset nav2d --out {bundle}\n"
                "or pass --bundle PATH (or --url of a running service).",
                file=sys.stderr,
            )
            return 2
        service = ServiceProcess(bundle=bundle)
        print(
            f"starting the service on {service.url} (bundle {bundle}, log {service.log_path}) ..."
        )
        t0 = time.perf_counter()
        with service:
            print(f"ready after {time.perf_counter() - t0:.1f} s")
            with AdaptationClient(service.url, timeout=60, token=args.token) as client:
                result = run(client, args)
        print("service stopped")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {k: v for k, v in result.items() if k != "paths"}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.min_improvement is not None and len(result["mean_return"]) > 1:
        gain = result["mean_return"][1] - result["mean_return"][0]
        if gain < args.min_improvement:
            print(f"FAIL: 1-step improvement {gain:.2f} < {args.min_improvement}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
