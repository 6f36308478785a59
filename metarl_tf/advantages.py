"""Returns, GAE and the linear feature baseline: pure tensor functions on padded episodes.

Time-index convention (as in rlax): ``rewards[..., t]`` is the reward of the transition out of
``observations[..., t]``; ``mask[..., t]`` is 1 for a real step and 0 for padding after the episode
ended. An episode that ends (terminated or at the horizon) bootstraps with value 0, as in the MAML
paper's rllab code.

Discounted sums are computed as a product with a ``[T, T]`` upper-triangular discount matrix
``M[t', t] = c^(t' - t)`` for ``t' >= t``, which is exact for masked (zero-padded) sequences and much
faster inside a compiled step than a sequential scan. ``tests/test_advantages.py`` checks it against
a Python loop and against TF-Agents' ``value_ops``.
"""

from __future__ import annotations

import tensorflow as tf


def _check(rewards, mask) -> None:
    if rewards.shape.rank is not None and rewards.shape.rank < 1:
        raise ValueError(f"rewards must have a time axis [..., T], got shape {rewards.shape}")
    if mask.shape != rewards.shape:
        raise ValueError(f"mask shape {mask.shape} != rewards shape {rewards.shape}")


def discount_matrix(length: int, discount, dtype=tf.float32):
    """``M[t', t] = discount^(t' - t)`` if ``t' >= t`` else 0; ``x @ M`` gives discounted
    reverse cumulative sums ``y_t = sum_{t' >= t} discount^(t'-t) x_t'``."""
    idx = tf.range(length, dtype=dtype)
    power = idx[:, None] - idx[None, :]  # t' - t
    upper = tf.cast(power >= 0, dtype)
    return upper * tf.pow(tf.cast(discount, dtype), tf.maximum(power, 0.0))


def _discounted_cumsum(x, discount):
    """``y_t = sum_{t' >= t} discount^(t'-t) x_t'`` along the last axis."""
    length = tf.shape(x)[-1]
    m = discount_matrix(length, discount, x.dtype)
    flat = tf.reshape(x, [-1, length])
    return tf.reshape(tf.matmul(flat, m), tf.shape(x))


def discounted_returns(rewards, mask, gamma):
    """``G_t = sum_{k>=0} gamma^k r_{t+k}`` within each episode.

    Args:
        rewards: ``[..., T]`` float.
        mask: ``[..., T]`` float, 1 for real steps, 0 for padding.
        gamma: discount in ``[0, 1]``.

    Returns:
        ``[..., T]`` discounted returns (0 on padding).
    """
    rewards, mask = tf.convert_to_tensor(rewards), tf.convert_to_tensor(mask, rewards.dtype)
    _check(rewards, mask)
    return _discounted_cumsum(rewards * mask, gamma) * mask


def generalized_advantages(rewards, values, mask, gamma, lam):
    """GAE (Schulman et al., 2016): ``A_t = sum_k (gamma lam)^k delta_{t+k}`` with
    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``V = 0`` past the end of the episode.

    Args:
        rewards, values, mask: ``[..., T]``.
        gamma, lam: discount and GAE lambda (``lam = 1`` gives ``G_t - V_t``).

    Returns:
        ``[..., T]`` advantages (0 on padding).
    """
    rewards = tf.convert_to_tensor(rewards)
    mask = tf.convert_to_tensor(mask, rewards.dtype)
    _check(rewards, mask)
    values = tf.convert_to_tensor(values, rewards.dtype) * mask
    next_values = tf.concat([values[..., 1:], tf.zeros_like(values[..., :1])], axis=-1)
    deltas = (rewards + gamma * next_values - values) * mask
    return _discounted_cumsum(deltas, gamma * lam) * mask


def baseline_features(observations, mask):
    """rllab's linear-baseline features ``[o, o^2, t, t^2, t^3, 1]`` with ``t = step / 100`` and
    ``o`` clipped to [-10, 10]; zero on padding.

    Args:
        observations: ``[..., T, obs_dim]``; mask: ``[..., T]``.

    Returns:
        ``[..., T, 2 * obs_dim + 4]``.
    """
    obs = tf.clip_by_value(tf.convert_to_tensor(observations), -10.0, 10.0)
    t = tf.range(tf.shape(obs)[-2], dtype=obs.dtype) / 100.0
    t = tf.broadcast_to(t[:, None], tf.concat([tf.shape(obs)[:-1], [1]], 0))
    features = tf.concat([obs, obs * obs, t, t * t, t * t * t, tf.ones_like(t)], axis=-1)
    return features * tf.cast(mask, obs.dtype)[..., None]


def linear_baseline(observations, returns, mask, reg: float = 1e-5):
    """Per-task ridge regression of returns on :func:`baseline_features` (rllab's
    ``LinearFeatureBaseline``), fitted on every valid step of that task's episodes.

    Solves ``(X^T X + reg I) w = X^T G`` in float64 per task.

    Args:
        observations: ``[tasks, episodes, T, obs_dim]``.
        returns: ``[tasks, episodes, T]`` discounted returns (the regression targets).
        mask: ``[tasks, episodes, T]``.

    Returns:
        ``[tasks, episodes, T]`` baseline values (0 on padding).
    """
    x = tf.cast(baseline_features(observations, mask), tf.float64)
    tasks, n_feat = tf.shape(x)[0], x.shape[-1]
    x_flat = tf.reshape(x, [tasks, -1, n_feat])
    y_flat = tf.reshape(tf.cast(returns, tf.float64) * tf.cast(mask, tf.float64), [tasks, -1, 1])
    gram = tf.matmul(x_flat, x_flat, transpose_a=True) + reg * tf.eye(n_feat, dtype=tf.float64)
    w = tf.linalg.solve(gram, tf.matmul(x_flat, y_flat, transpose_a=True))  # [tasks, F, 1]
    values = tf.reshape(tf.matmul(x_flat, w), tf.shape(returns))
    return tf.cast(values, returns.dtype) * tf.cast(mask, returns.dtype)


def normalize_per_task(advantages, mask, eps: float = 1e-8):
    """``(A - mean) / (std + eps)`` with mean and std over each task's valid steps
    (axis 0 is the task axis)."""
    mask = tf.cast(mask, advantages.dtype)
    axes = list(range(1, advantages.shape.rank))
    count = tf.reduce_sum(mask, axis=axes, keepdims=True)
    mean = tf.reduce_sum(advantages * mask, axis=axes, keepdims=True) / count
    var = tf.reduce_sum(tf.square(advantages - mean) * mask, axis=axes, keepdims=True) / count
    return (advantages - mean) / (tf.sqrt(var) + eps) * mask


def compute_advantages(episodes, gamma, gae_lambda=1.0, baseline: str = "linear", normalize=True):
    """The advantages ``Â`` used by every loss here (DESIGN.md): discounted returns minus the
    per-task linear feature baseline (GAE with ``gae_lambda``), normalized per task.

    Args:
        episodes: an ``EpisodeBatch`` ``[tasks, episodes, T, ...]``.
        baseline: ``"linear"`` or ``"none"``.

    Returns:
        ``[tasks, episodes, T]`` float32, treated as constants by the losses.
    """
    rewards, mask = episodes.rewards, episodes.mask
    returns = discounted_returns(rewards, mask, gamma)
    if baseline == "linear":
        values = linear_baseline(episodes.observations, returns, mask)
    elif baseline == "none":
        values = tf.zeros_like(returns)
    else:
        raise ValueError(f"baseline must be 'linear' or 'none', got {baseline!r}")
    adv = generalized_advantages(rewards, values, mask, gamma, gae_lambda)
    if normalize:
        adv = normalize_per_task(adv, mask)
    return tf.stop_gradient(adv)
