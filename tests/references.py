"""Reference implementations the tests compare the library against, shared by several test
files: written out independently of the code under test (plain autodiff, numpy, central finite
differences), never by calling the function being checked."""

import math

import numpy as np
import tensorflow as tf


def hessian_vector_product(fn, params, v):
    """``∇²fn(params) v`` by reverse-over-reverse autodiff."""
    with tf.GradientTape() as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            value = fn(params)
        grads = inner.gradient(value, params)
        gv = tf.add_n([tf.reduce_sum(g * x) for g, x in zip(grads, v, strict=True)])
    return outer.gradient(gv, params)


def numpy_log_prob(policy, params, episodes):
    """``log N(a; μ, σ²)`` of a Gaussian policy at ``params`` on ``episodes``, in numpy float64."""
    mean, log_std = (
        x.numpy().astype(np.float64) for x in policy.forward(params, episodes.observations)
    )
    a = np.asarray(episodes.actions, np.float64)
    return np.sum(
        -0.5 * ((a - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi), -1
    )


def numpy_mean_kl(policy, old_params, new_params, episodes):
    """``mean_i [Σ mask KL(old || new) / Σ mask]`` of a Gaussian policy, in numpy float64."""
    m0, s0 = (
        x.numpy().astype(np.float64) for x in policy.forward(old_params, episodes.observations)
    )
    m1, s1 = (
        x.numpy().astype(np.float64) for x in policy.forward(new_params, episodes.observations)
    )
    kl = np.sum(s1 - s0 + (np.exp(2 * s0) + (m0 - m1) ** 2) / (2 * np.exp(2 * s1)) - 0.5, -1)
    m = np.asarray(episodes.mask, np.float64)
    return float(np.mean(np.sum(kl * m, (1, 2)) / m.sum((1, 2))))


def reference_mean_kl(policy, params, episodes, old_mean, old_log_std):
    """``mean_i [Σ mask KL(old || new) / Σ mask]`` for diagonal Gaussians, written out."""
    mean, log_std = policy.forward(params, episodes.observations)
    kl = tf.reduce_sum(
        log_std
        - old_log_std
        + (tf.exp(2 * old_log_std) + tf.square(old_mean - mean)) / (2 * tf.exp(2 * log_std))
        - 0.5,
        axis=-1,
    )
    m = episodes.mask
    return tf.reduce_mean(tf.reduce_sum(kl * m, [1, 2]) / tf.reduce_sum(m, [1, 2]))


def central_differences(fn, values, eps=1e-6):
    """``∂fn/∂x`` for every entry of every tensor in ``values`` (float64)."""
    grads = []
    for j, v in enumerate(values):
        flat = v.numpy().ravel()
        g = np.zeros_like(flat)
        for k in range(flat.size):
            shifted = []
            for sign in (1.0, -1.0):
                x = flat.copy()
                x[k] += sign * eps
                shifted.append(tf.constant(x.reshape(v.shape)))
            plus = [*values[:j], shifted[0], *values[j + 1 :]]
            minus = [*values[:j], shifted[1], *values[j + 1 :]]
            g[k] = (float(fn(plus)) - float(fn(minus))) / (2 * eps)
        grads.append(g.reshape(v.shape))
    return grads


def reference_loss(params, obs, act, mask, adv):
    """The inner loss of ONE task, written out: ``-Σ mask·log N(a; μ(s), σ²)·Â / Σ mask`` for a
    one-hidden-layer tanh MLP. ``obs [E, T, obs_dim]``, unbatched ``params``."""
    k0, b0, k1, b1, log_std = params
    hidden = tf.tanh(tf.tensordot(obs, k0, axes=1) + b0)
    mean = tf.tensordot(hidden, k1, axes=1) + b1
    z = (act - mean) / tf.exp(log_std)
    log_prob = tf.reduce_sum(-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi), axis=-1)
    return -tf.reduce_sum(mask * log_prob * adv) / tf.reduce_sum(mask)
