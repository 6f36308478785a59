"""Outer (meta) updates: TRPO (the MAML paper's) and plain Adam."""

from metarl_tf.outer.adam import adam_meta_step
from metarl_tf.outer.common import MetaBatch, mean_kl, surrogate_loss
from metarl_tf.outer.trpo import conjugate_gradient, trpo_meta_step

__all__ = [
    "MetaBatch",
    "adam_meta_step",
    "conjugate_gradient",
    "mean_kl",
    "surrogate_loss",
    "trpo_meta_step",
]
