"""TF-Agents in, SavedModel out: collect with a TF-Agents driver, adapt over HTTP, export the
adapted policy as a SavedModel and run it with plain TensorFlow.

1. The bundle's meta-initialization as a TF-Agents policy (``as_tf_agents_policy``) collects
   episodes of a new Nav2D task in a ``DynamicEpisodeDriver`` into a ``TFUniformReplayBuffer``.
2. ``episodes_from_trajectories`` turns the buffer's trajectories into episodes; ``/adapt`` adapts
   the service's policy to them.
3. ``/export`` returns the adapted policy as a SavedModel (the client unpacks it); plain
   ``tf.saved_model.load`` runs it on the task: sampled actions (``action``), the environment
   clips them.

Prints the mean return before and after adaptation and the exported model's provenance; with
``--json``, writes them.

    python examples/tf_agents_roundtrip.py                  # starts the service on nav2d-maml
    python examples/tf_agents_roundtrip.py --url http://127.0.0.1:3000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a fresh clone without installing

# metarl_tf.agents first: it sets TF_USE_LEGACY_KERAS before TensorFlow and tf-agents load.
from metarl_tf.agents import as_tf_agents_policy, episodes_from_trajectories  # noqa: E402

# isort: split
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tf_agents.drivers import dynamic_episode_driver  # noqa: E402
from tf_agents.replay_buffers import tf_uniform_replay_buffer  # noqa: E402

from metarl_tf.bundle import load_bundle  # noqa: E402
from metarl_tf.envs.tf_agents_env import tf_agents_environment  # noqa: E402
from serving.client import AdaptationClient  # noqa: E402
from serving.launch import ServiceProcess  # noqa: E402

DEFAULT_BUNDLE = REPO_ROOT / "saved_models" / "nav2d-maml"
TEST_TASK_SEED = 10_000  # apart from the trainer's task seeds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--url", help="use this running service (serving --bundle) instead of starting one"
    )
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="the bundle the service serves")
    p.add_argument("--episodes", type=int, default=20, help="episodes collected by the driver")
    p.add_argument("--parallel", type=int, default=4, help="copies of the task in the driver")
    p.add_argument("--seed", type=int, default=0, help="seed of the task and the noise")
    p.add_argument(
        "--out", default=str(REPO_ROOT / "runs" / "tf_agents_roundtrip"),
        help="directory for the exported SavedModel (adapted-policy/ is replaced)",
    )  # fmt: skip
    p.add_argument("--json", help="write the results as JSON here")
    return p.parse_args(argv)


def collect_with_driver(bundle, task, episodes: int, parallel: int, seed: int):
    """Episodes of ``task`` collected by a TF-Agents driver running the meta-initialization."""
    policy = as_tf_agents_policy(bundle)
    env = tf_agents_environment(bundle.task_distribution, task, parallel=parallel, seed=seed)
    buffer = tf_uniform_replay_buffer.TFUniformReplayBuffer(
        policy.trajectory_spec, batch_size=parallel,
        max_length=(episodes // parallel + 2) * (bundle.task_distribution.horizon + 1),
    )  # fmt: skip
    driver = dynamic_episode_driver.DynamicEpisodeDriver(
        env, policy, observers=[buffer.add_batch], num_episodes=episodes
    )
    tf.random.set_seed(seed)
    driver.run()
    # The parallel envs may finish more episodes than asked in their last steps: keep the number
    # asked for (the service limits the episodes per request).
    return episodes_from_trajectories(buffer.gather_all())[:episodes]


def run_saved_model(path, dist, task, episodes: int, seed: int) -> np.ndarray:
    """Episode returns of the SavedModel at ``path`` on ``task`` (sampled actions, the
    environment clips them); only ``tf.saved_model.load`` and the model's signatures are used."""
    model = tf.saved_model.load(str(path))
    env = dist.make_batched_env([task], episodes)
    obs, returns = env.reset(), np.zeros(episodes)
    active = np.ones(episodes, bool)
    for t in range(dist.horizon):
        step = env.step(model.action(obs, seed=seed * 1000 + t)["raw_actions"].numpy())
        returns += np.where(active, step.reward, 0.0)
        active &= ~step.done
        obs = step.observation
        if not active.any():
            break
    return returns


def run(client: AdaptationClient, args) -> dict:
    bundle = load_bundle(args.bundle)
    served = client.metadata()
    if served["bundle"]["sha256"] != bundle.meta["files"]:
        raise SystemExit(f"the service at {client.url} serves another bundle than {args.bundle}")
    dist = bundle.task_distribution
    task = dist.sample_tasks(1, seed=TEST_TASK_SEED + args.seed)[0]
    print(f"bundle {bundle.name}, new task {task}")
    start = time.perf_counter()
    episodes = collect_with_driver(bundle, task, args.episodes, args.parallel, args.seed)
    before = np.array([r.sum() for _, _, r in episodes])
    print(f"1. TF-Agents driver: {len(episodes)} episodes, mean return {before.mean():.2f}")
    adapted = client.adapt(episodes, steps=1)
    print(f"2. /adapt: {adapted.policy_id} (inner loss {adapted.inner_losses[0]:.4f})")
    target = Path(args.out) / "adapted-policy"
    if target.exists():
        shutil.rmtree(target)
    client.export(adapted, target)
    metadata = json.loads((target / "assets" / "metarl_policy.json").read_text())
    print(f"3. /export: SavedModel in {target}, provenance {metadata['provenance']}")
    after = run_saved_model(target, dist, task, len(episodes), args.seed)
    print(f"4. plain TensorFlow: the adapted SavedModel's mean return {after.mean():.2f} "
          f"over {len(after)} episodes ({time.perf_counter() - start:.1f} s in all)")  # fmt: skip
    return {
        "bundle": bundle.name,
        "task": task,
        "policy_id": adapted.policy_id,
        "saved_model": str(target),
        "episodes": len(episodes),
        "mean_return_before": float(before.mean()),
        "mean_return_after": float(after.mean()),
        "provenance": metadata["provenance"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.url:
        with AdaptationClient(args.url, timeout=120) as client:
            client.wait_until_ready(timeout=120)
            result = run(client, args)
    else:
        with (
            ServiceProcess(bundle=args.bundle) as service,
            AdaptationClient(service.url, timeout=120) as client,
        ):
            result = run(client, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
