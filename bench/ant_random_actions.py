"""What random actions do to the ant at two action scales: the return's spread and how often the
torso leaves gymnasium's healthy height range ``[0.2, 1.0]`` (the ant flips or jumps).

Actions are standard normal (a Gaussian policy's initial σ = 1 around a zero mean); the env
multiplies them by ``action_scale`` and clips the torque to ``[-1, 1]``. Prints JSON; asserts
nothing.

    python bench/ant_random_actions.py [--episodes 10] [--json bench/results/ant_random_actions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import metarl_tf  # noqa: E402, F401  (environment for TensorFlow)
from metarl_tf.envs.mujoco import MuJoCoTaskEnv  # noqa: E402


def random_episodes(action_scale: float, episodes: int, horizon: int = 200) -> dict:
    rng = np.random.default_rng(0)
    env = MuJoCoTaskEnv("ant-dir", {"direction": 1}, horizon, action_scale)
    returns, left_healthy = [], []
    for episode in range(episodes):
        env.reset(seed=episode)
        total, unhealthy = 0.0, False
        for _ in range(horizon):
            _, reward, *_ = env.step(rng.normal(size=env.action_space.shape))
            total += reward
            unhealthy |= not env._env.is_healthy  # gymnasium's Ant: torso z in [0.2, 1.0]
        returns.append(total)
        left_healthy.append(unhealthy)
    return {
        "action_scale": action_scale,
        "episodes": episodes,
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "left_healthy_range": int(np.sum(left_healthy)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    out = {"results": [random_episodes(s, args.episodes) for s in (1.0, 0.1)]}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
