"""Exact curvature products of the Gaussian MLP policy, with the forward/backward pass cached.

TRPO's conjugate gradient applies the same Hessians ~20 times per meta-iteration at a fixed point.
Reverse/forward-mode autodiff recomputes the network's forward and backward pass for every
product; here they are computed once per point and every product only runs the R-operator
passes (Pearlmutter, 1994): directional derivatives of the forward and backward recursions.

- :class:`InnerLossHessian` — ``∇²L(θ) v`` of the inner policy-gradient loss
  ``L = −Σ mask·Â·log N(a; μ_θ(s), σ²) / Σ mask`` of every task.
- :class:`GaussianFisher` — ``F u`` of the mean-over-tasks KL of the policy at its own point
  (``diag(1/σ²)`` on the mean, 2 on ``log σ``).

Both equal the autodiff products (``metarl_tf.maml.inner_hvp``,
``metarl_tf.outer.trpo.fisher_vector_product``) to float tolerance; ``tests/test_curvature.py``
checks that. Parameters are per task (``[tasks, *shape]``), in ``GaussianMLPPolicy`` order.
"""

from __future__ import annotations

import tensorflow as tf


def _flatten(x, trailing: int):
    """``[tasks, E, T, *rest] -> [tasks, E*T, *rest]``."""
    shape = tf.shape(x)
    return tf.reshape(x, tf.concat([shape[:1], [-1], shape[x.shape.rank - trailing :]], 0))


class _MLP:
    """Cached forward pass of the mean network at per-task ``params`` on ``x [tasks, n, obs]``."""

    def __init__(self, params, x, activation: str):
        if activation not in ("tanh", "relu"):
            raise ValueError(f"no analytic curvature for activation {activation!r}")
        self.activation = activation
        *layers, self.log_std = params
        self.kernels, self.biases = layers[0::2], layers[1::2]
        self.inputs = [x]  # h_0 .. h_{L-1}: the input of every layer
        self.dact = []  # act'(z_l) of every hidden layer
        h = x
        for kernel, bias in zip(self.kernels[:-1], self.biases[:-1], strict=True):
            z = tf.matmul(h, kernel) + bias[:, None, :]
            if activation == "tanh":
                h = tf.tanh(z)
                self.dact.append(1.0 - tf.square(h))
            else:
                h = tf.nn.relu(z)
                self.dact.append(tf.cast(z > 0, z.dtype))
            self.inputs.append(h)
        self.mean = tf.matmul(h, self.kernels[-1]) + self.biases[-1][:, None, :]
        self.inv_var = tf.exp(-2.0 * self.log_std)[:, None, :]  # [tasks, 1, A]

    def r_forward(self, tangent):
        """``(R(h_l) for every layer input, R(μ))`` along ``tangent`` (same structure as params)."""
        *layers, _ = tangent
        v_kernels, v_biases = layers[0::2], layers[1::2]
        r_inputs = [None]  # R(h_0) = 0: observations do not depend on θ
        r_h = None
        for i in range(len(self.kernels)):
            r_z = tf.matmul(self.inputs[i], v_kernels[i]) + v_biases[i][:, None, :]
            if r_h is not None:
                r_z += tf.matmul(r_h, self.kernels[i])
            if i == len(self.kernels) - 1:
                return r_inputs, r_z
            r_h = self.dact[i] * r_z
            r_inputs.append(r_h)
        raise AssertionError("unreachable")

    def backward(self, d_mean):
        """Gradients of ``Σ d_mean · μ`` w.r.t. every kernel and bias; also the ``δ_z`` and
        ``δ_h`` of every layer (for R-backward)."""
        grads, deltas, delta_hs = [], [], []
        delta = d_mean
        for i in reversed(range(len(self.kernels))):
            deltas.append(delta)
            grads.append(
                (tf.matmul(self.inputs[i], delta, transpose_a=True), tf.reduce_sum(delta, 1))
            )
            if i > 0:
                delta_h = tf.matmul(delta, self.kernels[i], transpose_b=True)
                delta_hs.append(delta_h)
                delta = delta_h * self.dact[i - 1]
            else:
                delta_hs.append(None)
        return grads[::-1], deltas[::-1], delta_hs[::-1]


def _flat_list(grads):
    return [g for pair in grads for g in pair]


class InnerLossHessian:
    """``v ↦ ∇²L_i(θ_i) v_i`` for every task, at a fixed point ``params``.

    Args:
        params: per-task weights ``[tasks, *shape]``.
        episodes: ``EpisodeBatch`` ``[tasks, E, T, ...]``.
        advantages: ``[tasks, E, T]``.
        activation: the policy's hidden activation.
    """

    def __init__(self, params, episodes, advantages, activation: str):
        x = _flatten(tf.convert_to_tensor(episodes.observations, tf.float32), 1)
        a = _flatten(tf.convert_to_tensor(episodes.actions, tf.float32), 1)
        mask = _flatten(tf.convert_to_tensor(episodes.mask, tf.float32), 0)
        adv = _flatten(tf.convert_to_tensor(advantages, tf.float32), 0)
        self.net = net = _MLP(params, x, activation)
        self.weight = (mask * adv / tf.reduce_sum(mask, axis=1, keepdims=True))[
            ..., None
        ]  # [t, n, 1]
        self.residual = a - net.mean  # r = a − μ
        # ∂L/∂μ = −w r / σ²
        d_mean = -self.weight * self.residual * net.inv_var
        _, self.deltas, self.delta_hs = net.backward(d_mean)

    def __call__(self, v):
        net, w, r = self.net, self.weight, self.residual
        v_log_std = v[-1][:, None, :]
        r_inputs, r_mean = net.r_forward(v)
        # R(∂L/∂μ) = w/σ² (R(μ) + 2 r v_ls);  R(∂L/∂log σ) = 2 Σ_n w/σ² r (R(μ) + r v_ls)
        r_delta = w * net.inv_var * (r_mean + 2.0 * r * v_log_std)
        g_log_std = 2.0 * tf.reduce_sum(w * net.inv_var * r * (r_mean + r * v_log_std), axis=1)
        *layers, _ = v
        v_kernels = layers[0::2]
        out = []
        for i in reversed(range(len(net.kernels))):
            delta = self.deltas[i]
            g_kernel = tf.matmul(net.inputs[i], r_delta, transpose_a=True)
            if r_inputs[i] is not None:
                g_kernel += tf.matmul(r_inputs[i], delta, transpose_a=True)
            out.append((g_kernel, tf.reduce_sum(r_delta, 1)))
            if i > 0:
                r_delta_h = tf.matmul(r_delta, net.kernels[i], transpose_b=True) + tf.matmul(
                    delta, v_kernels[i], transpose_b=True
                )
                r_dact = -2.0 * net.inputs[i] * r_inputs[i] if net.activation == "tanh" else 0.0
                r_delta = r_delta_h * net.dact[i - 1] + self.delta_hs[i] * r_dact
        return [*_flat_list(out[::-1]), g_log_std]


class GaussianFisher:
    """``u ↦ F u`` for ``mean_i E_{s∈D_i} KL(π_i,old(·|s) || π_i(·|s))`` at ``params`` (= old).

    Args:
        params: per-task weights ``[tasks, *shape]``.
        episodes: ``EpisodeBatch`` (only observations and mask are used).
        activation: the policy's hidden activation.
    """

    def __init__(self, params, episodes, activation: str):
        x = _flatten(tf.convert_to_tensor(episodes.observations, tf.float32), 1)
        mask = _flatten(tf.convert_to_tensor(episodes.mask, tf.float32), 0)
        tasks = tf.cast(tf.shape(mask)[0], tf.float32)
        self.net = _MLP(params, x, activation)
        self.weight = (mask / tf.reduce_sum(mask, axis=1, keepdims=True) / tasks)[..., None]
        self.tasks = tasks

    def __call__(self, u):
        net = self.net
        _, r_mean = net.r_forward(u)
        grads, _, _ = net.backward(self.weight * net.inv_var * r_mean)
        return [*_flat_list(grads), 2.0 * u[-1] / self.tasks]
