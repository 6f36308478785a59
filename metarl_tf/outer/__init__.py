"""Outer (meta) updates: TRPO (the MAML paper's), PPO-clip (ProMP's) and plain Adam."""

from metarl_tf.outer.adam import adam_meta_step
from metarl_tf.outer.common import MetaBatch, mean_kl, surrogate_loss
from metarl_tf.outer.ppo import clipped_surrogate_loss, ppo_meta_step
from metarl_tf.outer.trpo import conjugate_gradient, trpo_meta_step

__all__ = [
    "MetaBatch",
    "adam_meta_step",
    "clipped_surrogate_loss",
    "conjugate_gradient",
    "mean_kl",
    "ppo_meta_step",
    "surrogate_loss",
    "trpo_meta_step",
]
