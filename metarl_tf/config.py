"""Typed training configuration and named presets."""

from __future__ import annotations

import dataclasses
import math
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
        inner_steps: inner gradient steps during meta-training, each on freshly collected
            episodes (batch ``j`` sampled by the policy adapted ``j`` times).
        inner_step_size: inner step size α (initial value when ``meta_sgd``).
        meta_sgd: learn one step size per parameter entry (Meta-SGD).
        meta_sgd_per_step: with ``meta_sgd``, one set of step sizes per inner step (MAML++'s
            per-step learning rates): step ``j`` uses block ``j``; adaptations longer than
            ``inner_steps`` reuse the last block.
        first_order: drop second-order terms of the meta-gradient (FOMAML).
        every_step_objective: with ``inner_steps > 1`` (TRPO only), the outer objective is the
            mean of the surrogates after every inner step (each on the batch that step's policy
            collected) under the mean of their KLs, not the last step's alone.
        step_weights: with ``every_step_objective``, one positive weight per inner step for its
            surrogate and KL (normalized to sum 1; e.g. ``(3, 1)`` favours the first step); empty
            = equal weights. TRPO bounds the weighted mean KL, so a step of weight ``w`` may move
            its policy by up to about ``max_kl / w``.
        lvc: differentiate through the inner steps with the Hessian of ProMP's
            low-variance-curvature inner loss (TRPO only; second order only): the meta-gradient
            then credits the pre-adaptation policy for the data it collects. The adaptation
            itself (and so a bundle's use) is unchanged.
        log_std_shift: learn a shift of the Gaussian's ``log σ`` that the first inner step adds,
            and keep the pre-adaptation ``log σ`` at ``init_log_std`` (TRPO, Gaussian policies):
            the pre-adaptation policy explores with its own noise, the adapted one acts with
            less. Without it, one ``log σ`` serves both, and TRPO shrinks it for the adapted
            policy's precision at the cost of exploration.
        gamma: discount factor.
        gae_lambda: GAE λ (1.0 = Monte Carlo returns minus baseline).
        baseline: ``linear`` (rllab's linear feature baseline) or ``none``.
        outer: outer update, ``trpo``, ``ppo`` (clipped surrogate, several Adam epochs) or
            ``adam`` (one Adam step on the surrogate).
        max_kl: TRPO trust-region size (mean KL over tasks).
        cg_iterations: conjugate-gradient iterations of TRPO.
        cg_damping: damping added to the Fisher-vector product.
        ls_max_steps: maximum backtracking line-search steps.
        ls_backtrack_ratio: step shrink factor of the line search.
        outer_learning_rate: Adam learning rate (``outer="adam"`` or ``"ppo"``).
        ppo_epochs: Adam steps on the clipped surrogate per meta-iteration (``outer="ppo"``).
        ppo_clip: PPO's clip range ``ε`` on the likelihood ratio (``outer="ppo"``).
        iterations: meta-iterations.
        seed: seeds tasks, action noise and initialization.
        checkpoint_every: write a checkpoint every N iterations.
        algo: ``maml`` (meta-training) or ``pretrain`` (one policy trained jointly on all tasks
            with the outer update and no inner step: the *pretrained* / *oracle* baselines of
            ``metarl_tf.training.pretrain``).
        backend: where the sub-environments step: ``local`` (this process) or ``ray`` (Ray
            actors, :mod:`metarl_tf.envs.ray_backend`); the batches are the same.
        ray_address: with ``backend="ray"``: ``None`` starts Ray on this machine, ``auto`` or
            ``ray://host:port`` joins a cluster.
        num_env_workers: with ``backend="ray"``: actors stepping sub-environments (0 = one per
            CPU of the Ray cluster).
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
    meta_sgd_per_step: bool = False
    first_order: bool = False
    every_step_objective: bool = False
    step_weights: tuple[float, ...] = ()
    lvc: bool = False
    log_std_shift: bool = False
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
    ppo_epochs: int = 5
    ppo_clip: float = 0.2
    iterations: int = 500
    seed: int = 0
    checkpoint_every: int = 10
    algo: str = "maml"
    backend: str = "local"
    ray_address: str | None = None
    num_env_workers: int = 0

    def __post_init__(self):
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.outer not in ("trpo", "adam", "ppo"):
            raise ValueError(f"outer must be 'trpo', 'ppo' or 'adam', got {self.outer!r}")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 < self.ppo_clip < 1.0:
            raise ValueError(f"ppo_clip must be in (0, 1), got {self.ppo_clip}")
        if self.baseline not in ("linear", "none"):
            raise ValueError(f"baseline must be 'linear' or 'none', got {self.baseline!r}")
        if self.every_step_objective and self.outer != "trpo":
            raise ValueError(f"every_step_objective needs outer='trpo', got {self.outer!r}")
        if self.step_weights is None:  # JSON null / an explicit None: equal weights
            object.__setattr__(self, "step_weights", ())
        if self.hidden_sizes and min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be positive widths, got {self.hidden_sizes}")
        if self.step_weights:
            if not self.every_step_objective:
                raise ValueError("step_weights needs every_step_objective")
            objective_weights(self.inner_steps, self.step_weights)
        if self.lvc and (self.outer != "trpo" or self.first_order):
            raise ValueError(
                "lvc changes the second-order terms of the TRPO meta-step: it needs outer='trpo' "
                f"and first_order=False, got outer={self.outer!r}, first_order={self.first_order}"
            )
        if self.meta_sgd_per_step and not self.meta_sgd:
            raise ValueError("meta_sgd_per_step needs meta_sgd (learned step sizes)")
        if self.log_std_shift and (self.outer != "trpo" or self.algo != "maml"):
            raise ValueError(
                f"log_std_shift needs outer='trpo' and algo='maml', got outer={self.outer!r}, "
                f"algo={self.algo!r}"
            )
        if self.algo not in ("maml", "pretrain"):
            raise ValueError(f"algo must be 'maml' or 'pretrain', got {self.algo!r}")
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        if self.num_env_workers < 0:
            raise ValueError(f"num_env_workers must be >= 0, got {self.num_env_workers}")
        for name in (
            "meta_batch_size",
            "episodes_per_task",
            "horizon",
            "inner_steps",
            "iterations",
            "ppo_epochs",
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
        d["step_weights"] = list(self.step_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "num_workers" in d.get("task_kwargs", {}):  # chose worker processes, now ignored
            d["task_kwargs"] = {k: v for k, v in d["task_kwargs"].items() if k != "num_workers"}
        for name in ("hidden_sizes", "step_weights"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def objective_weights(levels: int, step_weights=None) -> list[float]:
    """The weights of the every-step objective's ``levels`` surrogates and KLs: equal without
    ``step_weights``, else those normalized to sum 1 (``ValueError`` on a wrong count or a
    weight that is not a positive finite number).

    The trust region bounds the *weighted* mean KL, so a level of weight ``w`` may move by up to
    about ``max_kl / w``: a zero weight would leave that level's policy unconstrained, hence
    weights must be positive."""
    if not step_weights:
        return [1.0 / levels] * levels
    weights = [float(w) for w in step_weights]
    if len(weights) != levels:
        raise ValueError(
            f"step_weights needs one weight per inner step ({levels}), got {len(weights)}"
        )
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"step_weights must be positive finite numbers, got {weights}")
    return [w / sum(weights) for w in weights]


PRESETS: dict[str, TrainConfig] = {
    # The MAML paper / pytorch-maml-rl 2D navigation setup: 20 tasks x 20 episodes, horizon 100,
    # one inner step of size 0.1, TRPO with max KL 0.01.
    "nav2d": TrainConfig(),
    # Same, with Meta-SGD per-parameter step sizes learned by TRPO.
    "nav2d-metasgd": TrainConfig(meta_sgd=True),
    # Meta-SGD from a narrower initial policy (σ = 0.2) and smaller initial step sizes: the base
    # of saved_models/nav2d-maml-1step (80 iterations) and, with --hidden-sizes 100,100
    # --activation relu --log-std-shift and then --meta-sgd-per-step --inner-steps 2
    # --every-step-objective, of the shipped saved_models/nav2d-maml (docs/RESULTS.md). With
    # σ = 1 most actions saturate the ±0.1 clip, and after adaptation the policy jitters around
    # the goal.
    "nav2d-metasgd-lowstd": TrainConfig(meta_sgd=True, init_log_std=-1.6, inner_step_size=0.05),
    # The MAML paper's own policy network for the RL experiments: two hidden layers of 100 ReLUs.
    "nav2d-paper-net": TrainConfig(hidden_sizes=(100, 100), activation="relu"),
    # The paper's reference code (cbfinn/maml_rl, maml_examples/maml_trpo_point.py): rllab's
    # `normalize` wrapper maps policy actions in [-1, 1] to velocities 0.1 * a (action_scale 0.1),
    # 2x100 ReLU, inner step 0.5, 40 tasks x 20 episodes, TRPO max KL 0.01, 100 iterations.
    "nav2d-paper": TrainConfig(
        task_kwargs={"action_scale": 0.1},
        hidden_sizes=(100, 100),
        activation="relu",
        inner_step_size=0.5,
        meta_batch_size=40,
        iterations=100,
    ),
    # `nav2d` (20 tasks, 2x64 tanh) with the reference code's normalized actions and step 0.5.
    "nav2d-normalized": TrainConfig(task_kwargs={"action_scale": 0.1}, inner_step_size=0.5),
    # First-order MAML.
    "nav2d-fo": TrainConfig(first_order=True),
    # `nav2d` with ProMP's outer step: 5 Adam epochs on the PPO-clipped surrogate (ε 0.2) of the
    # post-adaptation data, through the inner step, instead of TRPO. lr 3e-3: over 40 iterations
    # its training post-adaptation return beat lr 1e-3's (−17.2 vs −22.5; docs/RESULTS.md).
    "nav2d-ppo": TrainConfig(outer="ppo", outer_learning_rate=3e-3, ppo_epochs=5, ppo_clip=0.2),
    # `nav2d` with two inner steps during meta-training, each on freshly collected episodes.
    "nav2d-2step": TrainConfig(inner_steps=2),
    # Baselines (python -m metarl_tf train --algo pretrain): nav2d-metasgd-lowstd's network (2x64
    # tanh) and initial sigma, trained jointly on all tasks without adaptation (TRPO); the oracle
    # sees the goal.
    "nav2d-pretrain": TrainConfig(algo="pretrain", init_log_std=-1.6, inner_step_size=0.05),
    "nav2d-oracle": TrainConfig(
        task_distribution="nav2d-oracle", algo="pretrain", init_log_std=-1.6, inner_step_size=0.05
    ),
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

# Discrete task families (categorical policy; metarl_tf/envs/bandits.py, cartpole.py).
PRESETS["bandit-k5"] = TrainConfig(
    # 5-armed Bernoulli bandits, 10 pulls per episode, 20 tasks x 10 episodes (100 pulls per
    # task to adapt on). Pulls are independent (constant observation, no state), so γ = 0: a
    # pull's return is its own reward, and the other pulls' reward noise stays out of its
    # advantage. α = 0.1 as nav2d: in 60-iteration trial runs it adapted best of 0.1 / 0.5 / 2.0
    # (training post-adaptation return 8.0 / 7.9 / 7.6).
    task_distribution="bandit",
    task_kwargs={"k": 5},
    horizon=10,
    hidden_sizes=(32, 32),
    meta_batch_size=20,
    episodes_per_task=10,
    gamma=0.0,
    inner_step_size=0.1,
    iterations=200,
)
PRESETS["cartpole"] = TrainConfig(
    # CartPole with pole length, pole mass and cart mass ×U[0.5, 2]; horizon 200. 10 tasks x 10
    # episodes keeps an iteration around a second here; α = 0.1 and max KL 0.01 as nav2d.
    task_distribution="cartpole",
    horizon=200,
    hidden_sizes=(32, 32),
    meta_batch_size=10,
    episodes_per_task=10,
    gamma=0.99,
    inner_step_size=0.1,
    iterations=150,
)
# MuJoCo locomotion (metarl_tf/envs/mujoco.py), as in the MAML paper (Sec. 5.3 and appendix):
# 2x100 ReLU policy, one inner step of size 0.1, 40 tasks x 20 episodes per meta-batch, horizon
# 200, TRPO with max KL 0.01. (pytorch-maml-rl's configs/maml/halfcheetah-*.yaml and ant-dir.yaml
# use the same 40 x 20, fast-lr 0.1, max KL 0.01, cg 10 / 1e-5, line search 15 x 0.8, but a 2x64
# tanh policy and horizon 100.) Sub-envs step in this process; --backend ray steps them on Ray
# actors, in parallel.
_MUJOCO = TrainConfig(
    hidden_sizes=(100, 100),
    activation="relu",
    meta_batch_size=40,
    episodes_per_task=20,
    horizon=200,
    inner_step_size=0.1,
    max_kl=0.01,
)
PRESETS.update(
    {
        "halfcheetah-dir": _MUJOCO.replace(task_distribution="halfcheetah-dir"),
        "halfcheetah-vel": _MUJOCO.replace(task_distribution="halfcheetah-vel"),
        # pytorch-maml-rl's ant-dir config normalizes actions with scale 10: the policy's
        # action times 0.1 is the torque (metarl_tf/envs/mujoco.py).
        "ant-dir": _MUJOCO.replace(task_distribution="ant-dir", task_kwargs={"action_scale": 0.1}),
        # Baselines of halfcheetah-vel (train --algo pretrain is implied): one policy for all
        # target velocities, and the oracle that sees the target velocity in its observation.
        "halfcheetah-vel-pretrain": _MUJOCO.replace(
            task_distribution="halfcheetah-vel", algo="pretrain"
        ),
        "halfcheetah-vel-oracle": _MUJOCO.replace(
            task_distribution="halfcheetah-vel-oracle", algo="pretrain"
        ),
        # Meta-World ML1 reach-v3 (optional extra): ML1's training tasks; horizon 150 as in the
        # Meta-World paper's original protocol; 20 tasks x 10 episodes.
        "ml1-reach": _MUJOCO.replace(
            task_distribution="metaworld-ml1",
            task_kwargs={"env_name": "reach-v3"},
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


@dataclass(frozen=True)
class Leg:
    """One training command of a recipe: a preset, its overrides, and where the leg stops.

    Attributes:
        name: short label, used for the leg's folder (``<run dir>/leg<i>-<name>``).
        preset: the named configuration the leg starts from.
        overrides: ``TrainConfig`` fields that replace the preset's.
        iterations: the iteration count at the end of the leg, counted from the recipe's start
            (a leg that continues the previous bundle at iteration 100 to ``iterations=400``
            trains 300 iterations), as ``train --init-from ... --iterations`` counts.
        select: which iteration the leg's bundle holds: ``last`` or ``best`` (best
            post-adaptation training return, as ``train --select``).
    """

    name: str
    preset: str
    iterations: int
    overrides: dict[str, Any] = field(default_factory=dict)
    select: str = "last"

    def __post_init__(self):
        if self.select not in ("last", "best"):
            raise ValueError(f"select must be 'last' or 'best', got {self.select!r}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")

    def config(self) -> TrainConfig:
        """The leg's full configuration: the preset with the overrides and the iteration
        count applied."""
        return get_preset(self.preset).replace(**self.overrides, iterations=self.iterations)

    def to_dict(self) -> dict[str, Any]:
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in self.overrides.items()}
        return {
            "name": self.name,
            "preset": self.preset,
            "iterations": self.iterations,
            "overrides": overrides,
            "select": self.select,
        }


@dataclass(frozen=True)
class Recipe:
    """Legs that together make one bundle: each leg continues the bundle of the leg before
    (``train --init-from``); the last leg's bundle is the recipe's.

    Attributes:
        name: the recipe's name (``train --recipe NAME``).
        bundle: the shipped bundle the recipe reproduces (``saved_models/...``), or ``None``.
        legs: the legs in order.
    """

    name: str
    bundle: str | None
    legs: tuple[Leg, ...]

    def __post_init__(self):
        if not self.legs:
            raise ValueError(f"recipe {self.name!r} has no legs")
        counts = [leg.iterations for leg in self.legs]
        if counts != sorted(set(counts)):
            raise ValueError(f"recipe {self.name!r}: leg iterations must increase, got {counts}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bundle": self.bundle,
            "legs": [leg.to_dict() for leg in self.legs],
        }


# The shipped multi-leg bundles, one command each (`train --recipe NAME`); docs/RESULTS.md shows
# each bundle's meta-test table.
_NAV2D_NET = {"hidden_sizes": (100, 100), "activation": "relu", "log_std_shift": True}
_NAV2D_TWO_STEPS = {
    **_NAV2D_NET,
    "meta_sgd_per_step": True,
    "inner_steps": 2,
    "every_step_objective": True,
}
_MUJOCO_SMALL_BATCH = {"meta_batch_size": 20, "episodes_per_task": 10}
_TINY_TWO_STEPS = {
    "meta_sgd": True,
    "meta_sgd_per_step": True,
    "inner_steps": 2,
    "every_step_objective": True,
}


def _mujoco_recipe(preset: str, bundle: str, small_batch_to: int, paper_batch_to: int) -> Recipe:
    """A MuJoCo preset's two legs: 20 x 10 to ``small_batch_to``, then the preset's (the
    paper's) 40 x 20 to ``paper_batch_to``; the bundle ``saved_models/<bundle>``."""
    return Recipe(
        name=preset,
        bundle=f"saved_models/{bundle}",
        legs=(
            Leg("small-batch", preset, small_batch_to, _MUJOCO_SMALL_BATCH),
            Leg("paper-batch", preset, paper_batch_to),
        ),
    )


RECIPES: dict[str, Recipe] = {
    # One inner step first (the best of 100 iterations), then two inner steps with per-step
    # Meta-SGD step sizes and the every-step objective to 400 and on to 600, then larger
    # meta-batches: 40 tasks to 700, 80 tasks to 760; then GAE lambda 0.95 instead of 1 (a
    # lower-variance inner gradient; the step sizes re-learn for it) to 900, the iteration chosen
    # on 400 validation tasks (seeds 200-209) from every 20th between 780 and 1000.
    "nav2d": Recipe(
        name="nav2d",
        bundle="saved_models/nav2d-maml",
        legs=(
            Leg("one-step", "nav2d-metasgd-lowstd", 100, _NAV2D_NET, select="best"),
            Leg("two-steps", "nav2d-metasgd-lowstd", 400, _NAV2D_TWO_STEPS),
            Leg("two-steps-on", "nav2d-metasgd-lowstd", 600, _NAV2D_TWO_STEPS),
            Leg(
                "40-tasks", "nav2d-metasgd-lowstd", 700, {**_NAV2D_TWO_STEPS, "meta_batch_size": 40}
            ),
            Leg(
                "80-tasks", "nav2d-metasgd-lowstd", 760, {**_NAV2D_TWO_STEPS, "meta_batch_size": 80}
            ),
            Leg(
                "gae-0.95",
                "nav2d-metasgd-lowstd",
                900,
                {**_NAV2D_TWO_STEPS, "meta_batch_size": 80, "gae_lambda": 0.95},
            ),
        ),
    ),
    # The paper's batch (40 x 20) only after a cheaper start at 20 x 10. (saved_models/antdir-maml
    # is one run at 20 x 10: one command, docs/RESULTS.md "Ant".)
    "halfcheetah-dir": _mujoco_recipe("halfcheetah-dir", "halfcheetah-dir-maml", 500, 650),
    "halfcheetah-vel": _mujoco_recipe("halfcheetah-vel", "halfcheetah-vel-maml", 150, 249),
    # Seconds long, for tests and CI: the nav2d recipe's shape on the tiny preset.
    "tiny": Recipe(
        name="tiny",
        bundle=None,
        legs=(
            Leg("one-step", "tiny", 2, {"meta_sgd": True}, select="best"),
            Leg("two-steps", "tiny", 4, _TINY_TWO_STEPS),
        ),
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}") from None
