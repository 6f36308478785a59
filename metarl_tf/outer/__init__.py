"""Outer (meta) updates: TRPO (the MAML paper's), PPO-clip (ProMP's) and plain Adam.

:func:`make_meta_step` is the one place that turns a training configuration into an outer
update; the meta-trainer and the pretrained baseline's joint trainer both call it. To add an
outer step: write ``<name>_meta_step(policy, step_sizes, ..., batch, *, learn_step_sizes,
inner_steps, first_order, ...)`` in its own module here, add a builder to :data:`OUTER_STEPS`,
and the name to ``TrainConfig.outer``'s choices (docs/architecture.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from metarl_tf.config import TrainConfig
from metarl_tf.outer.adam import adam_meta_step
from metarl_tf.outer.common import MetaBatch, mean_kl, surrogate_loss
from metarl_tf.outer.ppo import clipped_surrogate_loss, ppo_meta_step
from metarl_tf.outer.trpo import TRPOStep, conjugate_gradient, trpo_meta_step


def _trpo(c: TrainConfig, policy, step_sizes, optimizer, inner: dict, extra: dict) -> TRPOStep:
    return TRPOStep(
        policy, step_sizes, max_kl=c.max_kl, cg_iterations=c.cg_iterations,
        cg_damping=c.cg_damping, ls_max_steps=c.ls_max_steps,
        ls_backtrack_ratio=c.ls_backtrack_ratio, **inner, **extra,
    )  # fmt: skip


def _ppo(c: TrainConfig, policy, step_sizes, optimizer, inner: dict, extra: dict):
    return functools.partial(
        ppo_meta_step, policy, step_sizes, optimizer, epochs=c.ppo_epochs, clip=c.ppo_clip,
        **inner,
    )  # fmt: skip


def _adam(c: TrainConfig, policy, step_sizes, optimizer, inner: dict, extra: dict):
    return functools.partial(adam_meta_step, policy, step_sizes, optimizer, **inner)


# name -> builder(config, policy, step sizes, optimizer, inner-step settings, TRPO-only settings)
OUTER_STEPS: dict[str, Callable[..., Callable[[MetaBatch], dict[str, Any]]]] = {
    "trpo": _trpo,
    "ppo": _ppo,
    "adam": _adam,
}


def make_meta_step(
    config: TrainConfig, policy, step_sizes, optimizer=None, log_std_shift=None, *,
    joint: bool = False,
) -> Callable[[MetaBatch], dict[str, Any]]:  # fmt: skip
    """The outer update ``config.outer`` names, as ``step(batch) -> statistics`` (scalar
    tensors); run it inside a ``tf.function``. It updates ``policy.parameters`` (and learned
    step sizes, and a learned log σ shift) in place.

    Args:
        config: the outer step's settings and the inner step's (``meta_sgd``, ``inner_steps``,
            ``first_order``; TRPO: ``every_step_objective``, ``step_weights``, ``lvc``).
        policy: the policy; ``step_sizes`` the inner step sizes (variables when learned).
        optimizer: a built Keras optimizer for PPO and Adam (``None`` for TRPO).
        log_std_shift: the learned log σ shift variable (TRPO), or ``None``.
        joint: the pretrained baseline's update (:mod:`metarl_tf.training.pretrain`): step size zero, one
            first-order inner step, nothing else learned, so ``θ' = θ`` and the objective is the
            policy's own surrogate.
    """
    if config.outer not in OUTER_STEPS:
        raise ValueError(f"outer must be one of {sorted(OUTER_STEPS)}, got {config.outer!r}")
    c = config
    if joint:
        step_sizes, extra = 0.0, {}
        inner = {"learn_step_sizes": False, "inner_steps": 1, "first_order": True}
    else:
        inner = {
            "learn_step_sizes": c.meta_sgd,
            "inner_steps": c.inner_steps,
            "first_order": c.first_order,
        }
        extra = {
            "every_step_objective": c.every_step_objective,
            "lvc": c.lvc,
            "step_weights": c.step_weights,
            "log_std_shift": log_std_shift,
        }
    return OUTER_STEPS[c.outer](c, policy, step_sizes, optimizer, inner, extra)


__all__ = [
    "OUTER_STEPS",
    "MetaBatch",
    "TRPOStep",
    "adam_meta_step",
    "clipped_surrogate_loss",
    "conjugate_gradient",
    "make_meta_step",
    "mean_kl",
    "ppo_meta_step",
    "surrogate_loss",
    "trpo_meta_step",
]
