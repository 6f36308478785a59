"""Typed training configuration and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    """Meta-training configuration (defaults = the MAML paper's 2D navigation setup).

    Attributes:
        task_distribution: registered task distribution id (``metarl_tf.envs``).
        task_kwargs: extra constructor arguments of the task distribution (besides ``horizon``).
        hidden_sizes: policy MLP hidden widths.
        activation: hidden activation, ``tanh`` or ``relu``.
        init_log_std: initial log standard deviation of the Gaussian policy.
        meta_batch_size: tasks per meta-iteration.
        episodes_per_task: episodes collected per task, before and after adaptation.
        horizon: maximum episode length.
        inner_steps: inner gradient steps during meta-training.
        inner_step_size: inner step size α (initial value when ``meta_sgd``).
        meta_sgd: learn one step size per parameter entry (Meta-SGD).
        first_order: drop second-order terms of the meta-gradient (FOMAML).
        gamma: discount factor.
        gae_lambda: GAE λ (1.0 = Monte Carlo returns minus baseline).
        baseline: ``linear`` (rllab's linear feature baseline) or ``none``.
        outer: outer update, ``trpo`` or ``adam``.
        max_kl: TRPO trust-region size (mean KL over tasks).
        cg_iterations: conjugate-gradient iterations of TRPO.
        cg_damping: damping added to the Fisher-vector product.
        ls_max_steps: maximum backtracking line-search steps.
        ls_backtrack_ratio: step shrink factor of the line search.
        outer_learning_rate: Adam learning rate (``outer="adam"``).
        iterations: meta-iterations.
        seed: seeds tasks, action noise and initialization.
        checkpoint_every: write a checkpoint every N iterations.
    """

    task_distribution: str = "nav2d"
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    init_log_std: float = 0.0
    meta_batch_size: int = 20
    episodes_per_task: int = 20
    horizon: int = 100
    inner_steps: int = 1
    inner_step_size: float = 0.1
    meta_sgd: bool = False
    first_order: bool = False
    gamma: float = 0.99
    gae_lambda: float = 1.0
    baseline: str = "linear"
    outer: str = "trpo"
    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8
    outer_learning_rate: float = 3e-4
    iterations: int = 500
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self):
        if self.outer not in ("trpo", "adam"):
            raise ValueError(f"outer must be 'trpo' or 'adam', got {self.outer!r}")
        if self.baseline not in ("linear", "none"):
            raise ValueError(f"baseline must be 'linear' or 'none', got {self.baseline!r}")
        for name in (
            "meta_batch_size",
            "episodes_per_task",
            "horizon",
            "inner_steps",
            "iterations",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def env_steps_per_iteration(self) -> int:
        """Upper bound on environment steps per meta-iteration (inner + outer batches)."""
        return (self.inner_steps + 1) * self.meta_batch_size * self.episodes_per_task * self.horizon

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "hidden_sizes" in d:
            d["hidden_sizes"] = tuple(d["hidden_sizes"])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, TrainConfig] = {
    # The MAML paper / pytorch-maml-rl 2D navigation setup: 20 tasks x 20 episodes, horizon 100,
    # one inner step of size 0.1, TRPO with max KL 0.01.
    "nav2d": TrainConfig(),
    # Same, with Meta-SGD per-parameter step sizes learned by TRPO.
    "nav2d-metasgd": TrainConfig(meta_sgd=True),
    # Meta-SGD from a narrower initial policy (σ = 0.2) and smaller initial step sizes: the
    # shipped saved_models/nav2d-maml. With σ = 1 most actions saturate the ±0.1 clip, and after
    # adaptation the policy jitters around the goal; see the README's figures.
    "nav2d-metasgd-lowstd": TrainConfig(meta_sgd=True, init_log_std=-1.6, inner_step_size=0.05),
    # The MAML paper's own policy network for the RL experiments: two hidden layers of 100 ReLUs.
    "nav2d-paper-net": TrainConfig(hidden_sizes=(100, 100), activation="relu"),
    # First-order MAML.
    "nav2d-fo": TrainConfig(first_order=True),
    # Seconds-long smoke run for tests and CI.
    "tiny": TrainConfig(
        hidden_sizes=(8,),
        meta_batch_size=2,
        episodes_per_task=2,
        horizon=5,
        iterations=2,
        checkpoint_every=1,
        cg_iterations=2,
        ls_max_steps=3,
    ),
}

# MuJoCo locomotion (metarl_tf/envs/mujoco.py), as in the MAML paper (Sec. 5.3 and appendix):
# 2x100 ReLU policy, one inner step of size 0.1, 40 tasks x 20 episodes per meta-batch, horizon
# 200, TRPO with max KL 0.01. (pytorch-maml-rl's configs/maml/halfcheetah-*.yaml and ant-dir.yaml
# use the same 40 x 20, fast-lr 0.1, max KL 0.01, cg 10 / 1e-5, line search 15 x 0.8, but a 2x64
# tanh policy and horizon 100.) Sub-envs step in 2 worker processes (task_kwargs num_workers).
_MUJOCO = TrainConfig(
    hidden_sizes=(100, 100),
    activation="relu",
    meta_batch_size=40,
    episodes_per_task=20,
    horizon=200,
    inner_step_size=0.1,
    max_kl=0.01,
    task_kwargs={"num_workers": 2},
)
PRESETS.update(
    {
        "halfcheetah-dir": _MUJOCO.replace(task_distribution="halfcheetah-dir"),
        "halfcheetah-vel": _MUJOCO.replace(task_distribution="halfcheetah-vel"),
        "ant-dir": _MUJOCO.replace(task_distribution="ant-dir"),
        # Meta-World ML1 reach-v3 (optional extra): ML1's training tasks; horizon 150 as in the
        # Meta-World paper's original protocol; 20 tasks x 10 episodes.
        "ml1-reach": _MUJOCO.replace(
            task_distribution="metaworld-ml1",
            task_kwargs={"env_name": "reach-v3", "num_workers": 2},
            horizon=150,
            meta_batch_size=20,
            episodes_per_task=10,
        ),
    }
)


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
