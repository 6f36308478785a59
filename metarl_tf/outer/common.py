"""The outer objective shared by the outer updates."""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class MetaBatch(NamedTuple):
    """What one meta-step consumes.

    Attributes:
        inner_episodes: ``D_i``, collected by ``π_θ``; ``EpisodeBatch`` ``[tasks, episodes, T, ...]``.
            With ``k > 1`` inner steps, a tuple of ``k`` batches: ``D_i^j`` collected by
            ``π_θ_{j−1}`` (``θ_0 = θ``), step ``j`` adapts on it (see ``maml.per_step_batches``).
        inner_advantages: ``Â`` of ``D_i``, ``[tasks, episodes, T]`` (a tuple, one per batch, with
            several inner batches).
        outer_episodes: ``D'_i``, collected by the adapted ``π_θ'_i``.
        outer_advantages: ``Â`` of ``D'_i``.
        inner_curvature: optional, one per inner step: the cached passes of the inner loss at the
            point that step adapted from (``Adapter.with_curvature``'s ``carried``, the policy's
            inner-loss Hessian class of :mod:`metarl_tf.curvature`). The TRPO meta-step (second
            order, analytic curvature) then takes the inner losses, gradients and Hessians from
            them instead of recomputing them; they must come from the current parameters.
    """

    inner_episodes: tuple
    inner_advantages: tf.Tensor
    outer_episodes: tuple
    outer_advantages: tf.Tensor
    inner_curvature: tuple | None = None


def _masked_task_mean(x, mask):
    """Mean over each task's valid steps, then over tasks: ``[tasks, E, T] -> []``."""
    mask = tf.cast(mask, x.dtype)
    per_task = tf.reduce_sum(x * mask, axis=[1, 2]) / tf.reduce_sum(mask, axis=[1, 2])
    return tf.reduce_mean(per_task)


def surrogate_loss(policy, params, episodes, advantages, old_log_prob):
    """TRPO surrogate ``−E[π_new/π_old · Â]`` on the post-adaptation episodes (averaged per task,
    then over tasks)."""
    log_prob = policy.log_prob(policy.forward(params, episodes.observations), episodes.actions)
    return surrogate_from_log_prob(log_prob, old_log_prob, advantages, episodes.mask)


def surrogate_from_log_prob(log_prob, old_log_prob, advantages, mask):
    """:func:`surrogate_loss` from the new policy's ``log π(a|s)`` ``[tasks, E, T]``."""
    return -_masked_task_mean(tf.exp(log_prob - old_log_prob) * advantages, mask)


def mean_kl(policy, params, episodes, *old_dist):
    """``mean_i E_{s∈D'_i} KL(π_old(·|s) || π_params(·|s))``.

    ``old_dist`` is the old policy's ``forward`` output, unpacked: ``old_mean, old_log_std`` for a
    Gaussian policy, ``old_logits`` for a categorical one.
    """
    return mean_kl_from_dist(
        policy, policy.forward(params, episodes.observations), episodes, *old_dist
    )


def mean_kl_from_dist(policy, dist, episodes, *old_dist):
    """:func:`mean_kl` from the new policy's ``forward`` output ``dist``."""
    old = old_dist[0] if len(old_dist) == 1 else tuple(old_dist)
    return _masked_task_mean(policy.kl(old, dist), episodes.mask)
