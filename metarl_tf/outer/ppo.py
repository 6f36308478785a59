"""PPO-clip outer step (ProMP's outer objective; Rothfuss et al., 2019, Eq. 10 without the inner
KL penalty; Schulman et al., 2017).

Per meta-iteration the post-adaptation episodes ``D'_i`` and their advantages are fixed, and so is
``π_old = π_θ'_old`` — the adapted policy that collected them. For ``epochs`` epochs:

1. re-run the inner adaptation ``θ ↦ θ'_i(θ)`` from the *current* ``θ`` on the (fixed) inner
   episodes, differentiably (second order through every inner step unless ``first_order``);
2. take one Adam step on the clipped surrogate

       L^CLIP(θ) = −mean_i E_{D'_i}[min(r Â, clip(r, 1 − ε, 1 + ε) Â)],  r = π_θ'_i(a|s) / π_old(a|s)

   (averaged per task over its valid steps, then over tasks, as the TRPO surrogate).

At the first epoch ``θ = θ_old``, so ``r = 1``, no sample is clipped and the gradient is exactly the
vanilla surrogate's meta-gradient (the one TRPO and the Adam outer step use). Later epochs reuse the
same data; the clip removes the incentive to move ``r`` outside ``[1 − ε, 1 + ε]``. Learned
Meta-SGD step sizes are meta-parameters and take the same Adam steps.

What is left out of ProMP: its KL penalty between the pre- and post-update policies of the inner
step (optional in the brief; not implemented) and its low-variance inner-gradient estimator (the
inner loss here is the MAML one, the dependence of the sampling on ``θ`` ignored).
"""

from __future__ import annotations

import tensorflow as tf

from metarl_tf.maml import adapt
from metarl_tf.outer.common import MetaBatch, _masked_task_mean, mean_kl


def _clipped_objective(log_prob, old_log_prob, advantages, mask, clip: float):
    """``(L^CLIP, ratio)`` from log-probabilities ``[tasks, E, T]``."""
    ratio = tf.exp(log_prob - old_log_prob)
    clipped = tf.clip_by_value(ratio, 1.0 - clip, 1.0 + clip)
    objective = tf.minimum(ratio * advantages, clipped * advantages)
    return -_masked_task_mean(objective, mask), ratio


def clipped_surrogate_loss(policy, params, episodes, advantages, old_log_prob, clip: float):
    """PPO's clipped surrogate ``−E[min(r Â, clip(r, 1 − ε, 1 + ε) Â)]``, ``r = π_params/π_old``.

    Args:
        policy: provides ``forward(params, observations)``.
        params: per-task weights ``[tasks, *shape]`` (the adapted ``θ'_i``).
        episodes: ``EpisodeBatch`` ``[tasks, E, T, ...]`` (the post-adaptation episodes).
        advantages: ``[tasks, E, T]``.
        old_log_prob: ``log π_old(a|s)`` of ``episodes``, ``[tasks, E, T]`` (a constant).
        clip: ``ε`` (> 0).

    Returns:
        scalar loss, averaged per task over its valid steps and then over tasks.
    """
    log_prob = policy.log_prob(policy.forward(params, episodes.observations), episodes.actions)
    return _clipped_objective(log_prob, old_log_prob, advantages, episodes.mask, clip)[0]


def ppo_meta_step(
    policy,
    step_sizes,
    optimizer,
    batch: MetaBatch,
    *,
    learn_step_sizes: bool,
    inner_steps: int,
    first_order: bool,
    epochs: int,
    clip: float,
):
    """``epochs`` Adam steps on the clipped surrogate through the inner adaptation (see module
    docstring). Updates ``policy.parameters`` (and Meta-SGD ``step_sizes`` variables when
    ``learn_step_sizes``) in place. Meant to run inside a ``tf.function``.

    Returns:
        dict of scalar tensors: ``loss_before`` (first epoch, ``r = 1``: minus the mean advantage),
        ``loss_after`` (``L^CLIP`` at the updated parameters), ``kl`` (mean KL from ``π_old`` to
        the updated adapted policy on ``D'``), ``clip_fraction`` (share of ``D'`` steps with
        ``|r − 1| > ε`` after the update), ``inner_loss``.
    """
    if epochs < 1:
        raise ValueError(f"ppo epochs must be >= 1, got {epochs}")
    if not 0.0 < clip < 1.0:
        raise ValueError(f"ppo clip must be in (0, 1), got {clip}")
    variables = list(policy.parameters) + (list(step_sizes) if learn_step_sizes else [])
    inner, inner_adv = batch.inner_episodes, batch.inner_advantages
    outer, outer_adv = batch.outer_episodes, batch.outer_advantages

    def adapted():
        return adapt(
            policy, policy.parameters, step_sizes, inner, inner_adv, inner_steps, first_order
        )

    # π_old: the policy adapted from the current θ, the one that collected D'.
    result = adapted()
    old_dist = tf.nest.map_structure(
        tf.stop_gradient, policy.forward(result.params, outer.observations)
    )
    old_log_prob = policy.log_prob(old_dist, outer.actions)

    def epoch(i, loss_before):
        with tf.GradientTape() as tape:
            params = adapted().params
            loss = clipped_surrogate_loss(policy, params, outer, outer_adv, old_log_prob, clip)
        optimizer.apply(tape.gradient(loss, variables), variables)
        return i + 1, tf.where(tf.equal(i, 0), loss, loss_before)

    # A loop in the graph (not unrolled): one epoch's second-order graph, traced once.
    _, loss_before = tf.while_loop(
        lambda i, _: i < epochs, epoch, [tf.constant(0), tf.zeros([], old_log_prob.dtype)]
    )
    params = adapted().params
    log_prob = policy.log_prob(policy.forward(params, outer.observations), outer.actions)
    loss_after, ratio = _clipped_objective(log_prob, old_log_prob, outer_adv, outer.mask, clip)
    mask = tf.cast(outer.mask, ratio.dtype)
    clipped = tf.cast(tf.abs(ratio - 1.0) > clip, ratio.dtype) * mask
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "kl": mean_kl(policy, params, outer, *tf.nest.flatten(old_dist)),
        "clip_fraction": tf.reduce_sum(clipped) / tf.reduce_sum(mask),
        "inner_loss": tf.reduce_mean(result.losses[0]),
    }
