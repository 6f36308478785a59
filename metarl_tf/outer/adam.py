"""Plain first-order outer update: Adam on the post-adaptation policy-gradient surrogate,
differentiated through the inner step by reverse-mode autodiff (the simplest way to learn Meta-SGD
step sizes)."""

from __future__ import annotations

import tensorflow as tf

from metarl_tf.maml import adapt
from metarl_tf.outer.common import MetaBatch, surrogate_loss


def adam_meta_step(
    policy,
    step_sizes,
    optimizer,
    batch: MetaBatch,
    *,
    learn_step_sizes: bool,
    inner_steps: int,
    first_order: bool,
):
    """One Adam update of ``policy.parameters`` (and learned step sizes). Run inside ``tf.function``."""
    variables = list(policy.parameters) + (list(step_sizes) if learn_step_sizes else [])
    with tf.GradientTape() as tape:
        result = adapt(
            policy,
            policy.parameters,
            step_sizes,
            batch.inner_episodes,
            batch.inner_advantages,
            inner_steps,
            first_order,
        )
        dist = policy.forward(result.params, batch.outer_episodes.observations)
        old_log_prob = tf.stop_gradient(policy.log_prob(dist, batch.outer_episodes.actions))
        loss = surrogate_loss(
            policy, result.params, batch.outer_episodes, batch.outer_advantages, old_log_prob
        )
    grads = tape.gradient(loss, variables)
    optimizer.apply(grads, variables)
    return {"loss_before": loss, "inner_loss": tf.reduce_mean(result.losses[0])}
