"""Exact curvature products of the MLP policies, with the forward/backward pass cached.

TRPO's conjugate gradient applies the same Hessians ~20 times per meta-iteration at a fixed point.
Reverse/forward-mode autodiff recomputes the network's forward and backward pass for every
product; here they are computed once per point and every product only runs the R-operator
passes (Pearlmutter, 1994): directional derivatives of the forward and backward recursions.

- :class:`InnerLossHessian` — ``∇²L(θ) v`` of the inner policy-gradient loss
  ``L = −Σ mask·Â·log N(a; μ_θ(s), σ²) / Σ mask`` of every task (and ``L``, ``∇L`` themselves,
  from the same cached passes).
- :class:`GaussianFisher` — ``F u`` of the mean-over-tasks KL of the policy at its own point
  (``diag(1/σ²)`` on the mean, 2 on ``log σ``).

- :class:`CategoricalInnerLossHessian`, :class:`CategoricalFisher` — the same for the
  categorical policy (``L = −Σ mask·Â·log softmax(z)[a] / Σ mask``; the Fisher is
  ``diag(p) − ppᵀ`` per sample in logit space).

The products are bound by memory traffic (they stream ``[tasks, n, width]`` tensors; a 64-wide
matmul costs about as much as an elementwise pass), so the code counts passes: biases ride in the
matmuls on a constant-1 feature, the output's per-sample tensors are laid out with the samples
last (output-major, :class:`_MLP`) because a 2-wide last axis vectorizes poorly, and for a narrow
input (Nav2D's position) the inner-loss Hessian's R-backward below the second layer reduces to
small cached tensors (:class:`_FirstLayerTerms`), and for a narrow output (Nav2D's 2-wide mean)
the Fisher products pass the first layer through its cached per-sample Jacobian
(:class:`_FirstLayerJacobian`).

All equal the autodiff products (``metarl_tf.maml.inner_hvp``,
``metarl_tf.outer.trpo.fisher_vector_product``) to float tolerance; ``tests/test_curvature.py``
checks that. Parameters are per task (``[tasks, *shape]``), in the policy's parameter order.
:func:`analytic_curvature_for` picks the pair for a policy.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from metarl_tf.policy import categorical_log_prob, gaussian_log_prob, split_parameters


def _flatten(x, trailing: int):
    """``[tasks, E, T, *rest] -> [tasks, E*T, *rest]``."""
    shape = tf.shape(x)
    return tf.reshape(x, tf.concat([shape[:1], [-1], shape[x.shape.rank - trailing :]], 0))


def _unflatten(x, like):
    """``[tasks, E*T, d] -> [tasks, E, T, d]``, the leading axes of ``like [tasks, E, T, ...]``."""
    return tf.reshape(x, tf.concat([tf.shape(like)[:3], tf.shape(x)[2:]], 0))


def _with_ones(x):
    """``[..., n, d] -> [..., n, d + 1]``: a constant-1 feature, so one matmul applies a layer's
    kernel and bias (``[x, 1] [[W], [b]]``) and one gives both their gradients."""
    return tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)


def _transpose(x):
    """``[tasks, n, d] -> [tasks, d, n]``."""
    return tf.transpose(x, [0, 2, 1])


def _stack_bias(kernel, bias):
    """``[tasks, in, out]``, ``[tasks, out]`` -> ``[tasks, in + 1, out]``."""
    return tf.concat([kernel, bias[:, None, :]], axis=1)


def _times_kernel_t(x, kernel, output_major: bool):
    """``x Wᵀ`` ``[tasks, n, in]`` for ``x`` ``[tasks, n, out]``, or output-major
    ``[tasks, out, n]`` (see :class:`_MLP`), and a kernel ``W [tasks, in, out]``."""
    return tf.matmul(x, kernel, transpose_a=output_major, transpose_b=True)


def _split_bias(grad):
    """Inverse of :func:`_stack_bias` for gradients: ``(kernel part, bias part)``."""
    return grad[:, :-1, :], grad[:, -1, :]


# Narrow layers (e.g. the policy head, 2 outputs) take their two backward products as one matmul
# of concatenated operands; for wide ones the concatenation would copy more than it saves.
_CONCAT_MAX_WIDTH = 16
# Inputs at most this wide (with the constant-1 feature) get the first-layer shortcut of the
# inner-loss Hessian (:class:`_FirstLayerTerms`); its set-up grows with the width.
_NARROW_INPUT_MAX = 8


class _FirstLayerTerms(NamedTuple):
    """The direction-independent parts of R-backward below the second layer, for a narrow input.

    The R-backward pass streams ``[tasks, n, width]`` tensors and is bound by memory traffic, not
    by arithmetic. Below the second layer it only serves the first layer's gradient
    ``x̃ᵀ R(δ_1)``, with ``x̃ = [x, 1]`` a few features wide (Nav2D: 3). With ``a = act'(z_1)``,
    ``R(h_1) = a ⊙ (x̃ Ṽ_1)`` and ``R(δ_1) = a ⊙ (R(δ_2) W_2ᵀ + δ_2 V_2ᵀ) + c ⊙ R(h_1)``
    (``c`` the tanh cross term), three of its terms contract over the samples with a factor that
    does not depend on the direction, so they reduce to small cached tensors. (Layers are numbered
    from 1 here: ``a = dact[0]``; ``W_2, V_2 = kernels[1], v_kernels[1]``, kernels only, as no
    bias reaches ``h_1``; ``δ_2 = deltas[1]``, the output's δ with one hidden layer; ``Ṽ_1`` the
    stacked first-layer direction ``[V_1; v_b1]``, bias row last; ``c = cross_terms[1] =
    −2 h_1 ⊙ δ_2 W_2ᵀ`` with tanh, none with ReLU.)

    - ``R(h_1)ᵀ δ_2`` (the second layer's kernel): ``Σ_k Ṽ_1[k, j] P[k, j, m]``;
    - ``x̃ᵀ (a ⊙ δ_2 V_2ᵀ)``: ``Σ_m V_2[j, m] P[k, j, m]``;
    - ``x̃ᵀ (c ⊙ R(h_1))``: ``Σ_l Ṽ_1[l, j] Q[k, l, j]``;

    with ``P[k, j, m] = Σ_n x̃_k a_j δ_2,m`` and ``Q[k, l, j] = Σ_n x̃_k x̃_l c_j a_j``. Only
    ``x̃ᵀ (a ⊙ R(δ_2) W_2ᵀ)`` is left to stream: per product, two wide matmuls (one concatenated
    one when the second layer is at most ``_CONCAT_MAX_WIDTH`` wide) and three elementwise passes
    fewer with tanh, one with ReLU (no cross term). (Stored ``[tasks, j, k, m]`` and
    ``[tasks, j, k, l]``, so each term is one batched matmul over ``(tasks, j)``.)
    """

    p: tf.Tensor  # [tasks, j, k, m]
    q: tf.Tensor | None  # [tasks, j, k, l]; None without a cross term

    @classmethod
    def build(cls, x_tilde, dact, delta, cross):
        """From the first layer's input ``x̃``, ``a = act'(z_1)``, ``δ_2`` and ``c`` (or None)."""
        shape = tf.shape(x_tilde)
        tasks, n = shape[0], shape[1]
        k, width, width_next = x_tilde.shape[-1], dact.shape[-1], delta.shape[-1]
        d = tf.reshape(x_tilde[..., :, None] * dact[..., None, :], [tasks, n, k * width])
        p = tf.reshape(tf.matmul(d, delta, transpose_a=True), [tasks, k, width, width_next])
        q = None
        if cross is not None:
            pairs = tf.reshape(x_tilde[..., :, None] * x_tilde[..., None, :], [tasks, n, k * k])
            q = tf.reshape(tf.matmul(pairs, cross * dact, transpose_a=True), [tasks, k, k, width])
            q = tf.transpose(q, [0, 3, 1, 2])
        return cls(tf.transpose(p, [0, 2, 1, 3]), q)

    @staticmethod
    def direction(v_kernel, v_bias):
        """The first layer's direction, stacked ``[V_1; v_b1]`` and laid out ``[tasks, j, k]``
        as both terms below take it."""
        return tf.transpose(_stack_bias(v_kernel, v_bias), [0, 2, 1])

    def second_kernel_term(self, v_first):
        """``R(h_1)ᵀ δ_2`` ``[tasks, j, m]`` for the first-layer :meth:`direction`."""
        return tf.matmul(v_first[:, :, None, :], self.p)[:, :, 0, :]  # [tasks, j, 1, k] @ P

    def first_layer_terms(self, v_first, v_second_kernel):
        """``x̃ᵀ (a ⊙ δ_2 V_2ᵀ + c ⊙ R(h_1))`` ``[tasks, k, j]`` (stacked kernel and bias)."""
        out = tf.matmul(self.p, v_second_kernel[..., None])  # [tasks, j, k, 1]
        if self.q is not None:
            out += tf.matmul(self.q, v_first[..., None])  # [tasks, j, k, l] @ [tasks, j, l, 1]
        return tf.transpose(out[..., 0], [0, 2, 1])


# Outputs at most this wide get the Fisher products' first-layer shortcut
# (:class:`_FirstLayerJacobian`); its cache and per-product reads grow with the width.
_NARROW_OUTPUT_MAX = 2


class _FirstLayerJacobian(NamedTuple):
    """The Fisher products' shortcut through the first layer, for a narrow output.

    A Fisher product is a JVP and a VJP of the network. Through the first layer the JVP streams
    ``R(h_1) = act'(z_1) ⊙ (x̃ Ṽ_1)`` and ``R(h_1) W_2`` forward, and the VJP streams
    ``δ_1 = act'(z_1) ⊙ (δ_2 W_2ᵀ)`` back (``x̃ = [x, 1]``, ``Ṽ_1`` the stacked first-layer
    direction): per product two wide matmuls and four elementwise passes over
    ``[tasks, n, width]`` tensors. With the per-sample Jacobian
    ``J[o, n, j] = ∂output_o/∂z_1,j`` cached (``out`` such tensors), the first layer's part
    of ``R(output)`` is ``Σ_j J[o, n, j] (x̃ Ṽ_1)[n, j] = Σ_k x̃[n, k] (J Ṽ_1ᵀ)[o, n, k]`` and its
    gradient ``Σ_{o, n} x̃[n] ⊗ d_out[o, n] J[o, n]``: one read of ``J`` each way. Worth it while
    ``out`` is small (at most ``_NARROW_OUTPUT_MAX``). The inner-loss Hessian cannot use it:
    its R-backward needs ``R(h_1)``'s successors for the curvature of the activations.
    """

    jacobian: tf.Tensor  # [tasks, out * n, width_1], rows ordered (output, sample)

    @classmethod
    def build(cls, net):
        """From a cached forward pass ``net`` (:class:`_MLP`) with at least one hidden layer."""
        # ∂output_o/∂z_{L−1} = act'(z_{L−1}) ⊙ W_L[:, o], then back through the hidden layers
        jac = net.dact[-1][:, None] * _transpose(net.kernels[-1])[:, :, None, :]  # [t, o, n, w]
        for i in range(len(net.kernels) - 2, 0, -1):
            jac = tf.matmul(jac, net.kernels[i][:, None], transpose_b=True)
            jac *= net.dact[i - 1][:, None]
        return cls(tf.reshape(jac, [tf.shape(jac)[0], -1, jac.shape[-1]]))

    @staticmethod
    def applies(net) -> bool:
        """Whether ``net`` gets the shortcut: a hidden layer, and a narrow output."""
        width = net.kernels[-1].shape[-1]
        return len(net.kernels) > 1 and width is not None and width <= _NARROW_OUTPUT_MAX

    def r_output(self, x_tilde_t, v_first, out: int):
        """The first layer's part of ``R(output)`` ``[tasks, out, n]``, for the input
        ``x̃ᵀ [tasks, k, n]``, the stacked direction ``Ṽ_1 [tasks, k, width_1]`` and the output's
        (static) width."""
        jv = tf.matmul(v_first, self.jacobian, transpose_b=True)  # [t, k, out * n]
        shape = tf.shape(x_tilde_t)
        jv = tf.reshape(jv, [shape[0], shape[1], out, shape[2]])  # samples last: [t, k, out, n]
        return tf.reduce_sum(jv * x_tilde_t[:, :, None, :], axis=1)

    def gradient(self, x_tilde_t, d_output):
        """The first layer's stacked gradient ``[tasks, k, width_1]`` of ``Σ d_output · output``,
        for ``x̃ᵀ [tasks, k, n]`` and an output-major ``d_output [tasks, out, n]``."""
        left = x_tilde_t[:, :, None, :] * d_output[:, None]  # [t, k, out, n]
        shape = tf.shape(left)
        return tf.matmul(tf.reshape(left, [shape[0], shape[1], -1]), self.jacobian)


def _first_layer_jacobian(net):
    """:class:`_FirstLayerJacobian` of ``net`` where it applies, else None."""
    return _FirstLayerJacobian.build(net) if _FirstLayerJacobian.applies(net) else None


class _Carried:
    """A cached curvature object whose tensors can leave the ``tf.function`` that computed them
    and enter another: :meth:`carry` gives them as a nest (sub-objects as nested dicts),
    :meth:`restore` rebuilds the object from that nest without recomputing anything. The trainer
    caches the inner loss's passes while it adapts for sampling and the TRPO meta-step reuses
    them (``MetaBatch.inner_curvature``); :func:`recording_gradients` and
    :func:`restoring_gradients` are the two ends, the only code that carries.
    """

    _static: tuple[str, ...] = ()  # Python-valued attributes: not carried, given to restore
    _parts: dict[str, type[_Carried]] = {}  # attribute -> class of a carried sub-object
    # Tensors only the constructor needs: not carried (a restored object has no such attribute),
    # so they do not stay alive from the sampling adaptation to the end of the meta-step.
    _set_up_only: tuple[str, ...] = ()

    def carry(self) -> dict:
        """The object's tensors (``None`` and lists/tuples of them included), as a nest."""
        return {
            k: v.carry() if isinstance(v, _Carried) else v
            for k, v in vars(self).items()
            if k not in self._static and k not in self._set_up_only
        }

    @classmethod
    def restore(cls, carried: dict, **static):
        """The object :meth:`carry` came from; ``static`` holds every Python-valued attribute of
        it and of its parts (e.g. ``activation=``, ``lvc=``)."""
        obj = cls.__new__(cls)
        for k, v in carried.items():
            part = cls._parts.get(k)
            setattr(obj, k, v if part is None else part.restore(v, **static))
        for k in cls._static:
            setattr(obj, k, static[k])
        return obj


def recording_gradients(hessian_cls, activation: str, carried: list):
    """The ``gradients`` hook of :func:`metarl_tf.maml.adapt` that takes every inner step's loss
    and gradient from an inner-loss Hessian built at its point (``hessian_cls``) and appends the
    Hessian's :meth:`_Carried.carry` to ``carried``: the sampling adaptation's end of the carry
    (:meth:`metarl_tf.maml.Adapter.with_curvature`)."""

    def gradients(point, episodes, advantages):
        hessian = hessian_cls(point, episodes, advantages, activation)
        carried.append(hessian.carry())
        return hessian.loss, hessian.gradient

    return gradients


def restoring_gradients(hessian_cls, carried: list, activation: str, lvc: bool, hessians: list):
    """The meta-step's end of the carry: the ``gradients`` hook of :func:`metarl_tf.maml.adapt`
    that restores inner step ``j``'s Hessian from ``carried[j]`` (``MetaBatch.inner_curvature``)
    instead of recomputing its passes, appends it to ``hessians`` and returns its loss and
    gradient. The first one is checked against the point it is used at: a batch sampled before
    the last update is refused."""
    carried = list(carried)

    def gradients(point, episodes, advantages):
        hessians.append(hessian_cls.restore(carried.pop(0), activation=activation, lvc=lvc))
        if len(hessians) == 1:
            tf.debugging.assert_equal(
                hessians[0].net.kernels[0], point[0],
                message="batch.inner_curvature was computed at other parameters than the "
                "policy's current ones (sample the batch again after an update)",
            )  # fmt: skip
        return hessians[-1].loss, hessians[-1].gradient

    return gradients


class _MLP(_Carried):
    """Cached forward pass of the network at per-task ``params`` on ``x [tasks, n, obs]``.

    ``has_log_std``: the last parameter is the Gaussian's ``log_std`` (not a layer). ``output``
    is the network's output ``[tasks, n, out]``: the Gaussian mean, or the categorical logits.

    The products below are memory-bound on ``[tasks, n, width]`` activations (an elementwise pass
    costs about as much as a 64x64 matmul here), so they fold biases into matmuls through a
    cached constant-1 input feature and precompute what does not depend on the direction.

    **Output-major layout.** Everything in the output's space that the products touch (``R(output)``
    from :meth:`r_forward`, the ``d_output`` of :meth:`backward`, the ``r_delta`` of
    :meth:`r_backward`, the output layer's ``δ``) is ``[tasks, out, n]``, the samples last: the
    output is narrow (Nav2D: 2), and ``[tasks, n, 2]`` tensors vectorize poorly: the output
    layer's part of a Hessian product, timed alone, took 3.2 ms in the ``[tasks, n, out]``
    layout and 2.1 ms in this one (Nav2D, 20 tasks x 2000 samples). Hidden layers stay
    ``[tasks, n, width]``.
    ``inv_var`` is ``[tasks, out, 1]`` accordingly.
    """

    _static = ("activation",)
    _set_up_only = ("biases", "hidden", "output")

    def __init__(self, params, x, activation: str, has_log_std: bool = True):
        if activation not in ("tanh", "relu"):
            raise ValueError(f"no analytic curvature for activation {activation!r}")
        self.activation = activation
        self.kernels, self.biases, self.log_std = split_parameters(params, has_log_std)
        self.inputs = [_with_ones(x)]  # [h_l, 1] for every layer input h_0 .. h_{L-1}
        self.hidden = []  # h_1 .. h_{L-1}
        self.dact = []  # act'(z_l) of every hidden layer
        for kernel, bias in zip(self.kernels[:-1], self.biases[:-1], strict=True):
            z = tf.matmul(self.inputs[-1], _stack_bias(kernel, bias))
            if activation == "tanh":
                h = tf.tanh(z)
                self.dact.append(1.0 - tf.square(h))
            else:
                h = tf.nn.relu(z)
                self.dact.append(tf.cast(z > 0, z.dtype))
            self.hidden.append(h)
            self.inputs.append(_with_ones(h))
        self.output = tf.matmul(self.inputs[-1], _stack_bias(self.kernels[-1], self.biases[-1]))
        # [tasks, d + 1, n] copies: gradients contract over the samples, and a plain matmul with
        # the samples as inner dimension runs faster than a transposed one here (0.6 vs 0.9 ms
        # for a 2-wide output, 1.4 vs 1.6 ms for 64). The output layer's input is also the
        # right operand of the output-major R(output).
        self.inputs_t = [_transpose(h) for h in self.inputs]
        if has_log_std:
            self.inv_var = tf.exp(-2.0 * self.log_std)[:, :, None]  # [tasks, A, 1]

    @property
    def has_log_std(self) -> bool:
        return self.log_std is not None

    def r_forward(self, tangent, first=None):
        """``(R(h_l) for every layer input, R(output) [tasks, out, n])`` along ``tangent`` (same
        structure as params). With a :class:`_FirstLayerJacobian` ``first``, ``R(output)`` takes
        the first layer's part from it, and ``R(h_1)`` and what it feeds are not formed (its
        entry of the first list is None)."""
        v_kernels, v_biases, _ = split_parameters(tangent, self.has_log_std)
        start = 0 if first is None else 1
        r_inputs = [None] * (start + 1)  # R(h_0) = 0: observations do not depend on θ
        r_h = None
        last = len(self.kernels) - 1
        for i in range(start, last):
            r_z = tf.matmul(self.inputs[i], _stack_bias(v_kernels[i], v_biases[i]))
            if r_h is not None:
                r_z += tf.matmul(r_h, self.kernels[i])
            r_h = self.dact[i] * r_z
            r_inputs.append(r_h)
        # output-major: [Ṽ; v_b]ᵀ [h, 1]ᵀ + Wᵀ R(h)ᵀ
        v_stacked = _stack_bias(v_kernels[last], v_biases[last])
        r_out = tf.matmul(v_stacked, self.inputs_t[last], transpose_a=True)
        if r_h is not None:
            r_out += tf.matmul(self.kernels[last], r_h, transpose_a=True, transpose_b=True)
        if first is not None:
            v_first = _stack_bias(v_kernels[0], v_biases[0])
            r_out += first.r_output(self.inputs_t[0], v_first, self.kernels[last].shape[-1])
        return r_inputs, r_out

    def backward(self, d_output, first=None):
        """Gradients of ``Σ d_output · output`` w.r.t. every kernel and bias, for an output-major
        ``d_output [tasks, out, n]``; also the ``δ_z`` (the output layer's output-major) and
        ``δ_h`` of every layer (for R-backward). With a :class:`_FirstLayerJacobian` ``first``,
        the first layer's gradient comes from it and no ``δ`` below the second layer is formed
        (None)."""
        last = len(self.kernels) - 1
        grads, deltas, delta_hs = [], [], []
        delta = d_output
        for i in reversed(range(len(self.kernels))):
            if i == 0 and first is not None:
                grads.append(_split_bias(first.gradient(self.inputs_t[0], d_output)))
                deltas.append(None)
                delta_hs.append(None)
                continue
            deltas.append(delta)
            if i == last:  # [tasks, out, in + 1] -> [tasks, in + 1, out]
                grads.append(_split_bias(_transpose(tf.matmul(delta, self.inputs[i]))))
            else:
                grads.append(_split_bias(tf.matmul(self.inputs_t[i], delta)))
            if i > 1 or (i == 1 and first is None):
                delta_h = _times_kernel_t(delta, self.kernels[i], output_major=i == last)
                delta_hs.append(delta_h)
                delta = delta_h * self.dact[i - 1]
            else:
                delta_hs.append(None)
        return grads[::-1], deltas[::-1], delta_hs[::-1]

    def activation_cross_terms(self, delta_hs):
        """``δ_h ⊙ ∂act'(z)/∂h`` per hidden layer, the direction-independent factor of
        ``δ_h ⊙ R(act'(z))`` in R-backward (tanh: ``−2 h δ_h``; ReLU: none, act'' = 0)."""
        if self.activation != "tanh":
            return [None] * len(self.kernels)
        return [None] + [-2.0 * h * d for h, d in zip(self.hidden, delta_hs[1:], strict=True)]

    def r_backward_cache(self, deltas, delta_hs):
        """What :meth:`r_backward` needs from the loss's backward pass (``deltas``, ``delta_hs``
        of :meth:`backward`), computed once per point: the transposed ``δ``, the
        :meth:`activation_cross_terms`, and the :class:`_FirstLayerTerms` when the input is
        narrow (``None`` otherwise, or without a hidden layer)."""
        cross_terms = self.activation_cross_terms(delta_hs)
        first = None
        width = self.inputs[0].shape[-1]
        last = len(self.kernels) - 1
        if last > 0 and width is not None and width <= _NARROW_INPUT_MAX:
            delta = _transpose(deltas[1]) if last == 1 else deltas[1]  # [tasks, n, width]
            first = _FirstLayerTerms.build(self.inputs[0], self.dact[0], delta, cross_terms[1])
        # r_backward needs no δ for the first layer (R(x) = 0), none for the second with the
        # shortcut, which gives its terms, and the transposed δ (for R(h)ᵀ δ) of neither, nor
        # of the output layer, whose δ is output-major already.
        unused = [i == 0 or (first is not None and i == 1) for i in range(len(deltas))]
        deltas_t = [
            None if skip or i == last else _transpose(d)
            for i, (skip, d) in enumerate(zip(unused, deltas, strict=True))
        ]
        deltas = [None if skip else d for skip, d in zip(unused, deltas, strict=True)]
        return _BackwardCache(deltas, deltas_t, cross_terms, first)

    def r_backward(self, r_delta, r_inputs, cache, tangent_layers):
        """R-operator of :meth:`backward`: given ``R(∂L/∂output)``, the ``R(h)`` of
        :meth:`r_forward`, the :meth:`r_backward_cache` of the loss's backward pass and the
        direction's kernels and biases (flat list), the Hessian-vector product's kernel and bias
        parts (flat list)."""
        deltas, deltas_t, cross_terms, first = cache
        v_kernels, v_biases, _ = split_parameters(tangent_layers, has_log_std=False)
        v_first = None if first is None else first.direction(v_kernels[0], v_biases[0])
        last = len(self.kernels) - 1
        out = []
        for i in reversed(range(len(self.kernels))):
            delta = deltas[i]
            output_major = i == last  # r_delta and δ are [tasks, out, n]
            if output_major:
                g_stacked = _transpose(tf.matmul(r_delta, self.inputs[i]))
                delta_t = delta
            else:
                g_stacked = tf.matmul(self.inputs_t[i], r_delta)
                delta_t = deltas_t[i]
            if i == 0 and first is not None:
                g_stacked += first.first_layer_terms(v_first, v_kernels[1])
            g_kernel, g_bias = _split_bias(g_stacked)
            if i == 1 and first is not None:
                g_kernel += first.second_kernel_term(v_first)
            elif r_inputs[i] is not None:  # R(h)ᵀ δ = (δᵀ R(h))ᵀ, the big operand untransposed
                g_kernel += _transpose(tf.matmul(delta_t, r_inputs[i]))
            out.append((g_kernel, g_bias))
            if i == 0:
                continue
            if i == 1 and first is not None:
                # Only x̃ᵀ (act' ⊙ R(δ) Wᵀ) streams; the rest of R(δ_1) is in `first`.
                r_delta = _times_kernel_t(r_delta, self.kernels[i], output_major) * self.dact[0]
                continue
            # R(δ_h) = R(δ) Wᵀ + δ Vᵀ; R(δ_{z, i-1}) = R(δ_h) ⊙ act' + cross ⊙ R(h_i).
            width = delta.shape[-2 if output_major else -1]
            if width is not None and width <= _CONCAT_MAX_WIDTH:
                r_delta_h = _times_kernel_t(
                    tf.concat([r_delta, delta], -2 if output_major else -1),
                    tf.concat([self.kernels[i], v_kernels[i]], -1),
                    output_major,
                )
            else:
                r_delta_h = _times_kernel_t(r_delta, self.kernels[i], output_major)
                r_delta_h += _times_kernel_t(delta, v_kernels[i], output_major)
            r_delta = r_delta_h * self.dact[i - 1]
            if cross_terms[i] is not None:
                r_delta += cross_terms[i] * r_inputs[i]
        return _flat_list(out[::-1])


class _BackwardCache(NamedTuple):
    """:meth:`_MLP.r_backward_cache`: ``δ`` per layer and their transposes (``None`` where
    :meth:`_MLP.r_backward` needs none), the activation cross terms, and the first-layer shortcut
    (or ``None``)."""

    deltas: list
    deltas_t: list
    cross_terms: list
    first: _FirstLayerTerms | None


def _flat_list(grads):
    return [g for pair in grads for g in pair]


def _gaussian_log_prob_gradient(net, actions, weight, first=None):
    """The gradient of ``−Σ_n w_n log N(a_n; μ(s_n), σ²)`` of every task, from the cached pass
    ``net`` (a Gaussian's), for actions ``[tasks, n, A]`` and output-major weights ``w``
    ``[tasks, 1, n]``: ``−w r / σ²`` on the mean (``r = a − μ``), ``−Σ w (r²/σ² − 1)`` on
    ``log σ``.

    Returns:
        ``(gradient (flat list, the policy's parameter order), r [tasks, A, n],
        r²/σ² − 1 [tasks, A, n], deltas, delta_hs)``, the last two from :meth:`_MLP.backward`
        (with its ``first``).
    """
    residual = _transpose(actions - net.output)
    grads, deltas, delta_hs = net.backward(-weight * residual * net.inv_var, first)
    score_log_std = tf.square(residual) * net.inv_var - 1.0
    g_log_std = -tf.reduce_sum(weight * score_log_std, axis=2)
    return [*_flat_list(grads), g_log_std], residual, score_log_std, deltas, delta_hs


def _surrogate_weights(fisher, episodes, advantages):
    """``mask·Â / (Σ mask · tasks)`` ``[tasks, 1, n]`` (output-major), the weight of every sample's
    ``log π`` in the surrogate's gradient at the Fisher's point: the KL's weights times ``Â``."""
    adv = _flatten(tf.convert_to_tensor(advantages, tf.float32), 0)
    return fisher.weight * adv[:, None, :]


class InnerLossHessian(_Carried):
    """``v ↦ ∇²L_i(θ_i) v_i`` for every task, at a fixed point ``params``.

    Args:
        params: per-task weights ``[tasks, *shape]``.
        episodes: ``EpisodeBatch`` ``[tasks, E, T, ...]``.
        advantages: ``[tasks, E, T]``.
        activation: the policy's hidden activation.
        lvc: the Hessian of the low-variance-curvature loss
            (``metarl_tf.maml.policy_gradient_loss``): adds ``−Σ w (∇log π·v) ∇log π``.
    """

    _static = ("lvc",)
    _parts = {"net": _MLP}

    def __init__(self, params, episodes, advantages, activation: str, lvc: bool = False):
        self.lvc = lvc
        x = _flatten(tf.convert_to_tensor(episodes.observations, tf.float32), 1)
        a = _flatten(tf.convert_to_tensor(episodes.actions, tf.float32), 1)
        mask = _flatten(tf.convert_to_tensor(episodes.mask, tf.float32), 0)
        adv = _flatten(tf.convert_to_tensor(advantages, tf.float32), 0)
        self.net = net = _MLP(params, x, activation)
        w = mask * adv / tf.reduce_sum(mask, axis=1, keepdims=True)  # [t, n]
        # Per-sample terms in the output's space are output-major [t, A, n] (see _MLP).
        self.weight = w[:, None, :]  # [t, 1, n]
        # The loss and its gradient come with the cached passes (metarl_tf.maml.adapt's
        # ``gradients`` hook): L = −Σ w log N. The residual r = a − μ and the per-sample
        # ∂log N/∂log σ stay for the products (the LVC term needs the latter).
        self.gradient, self.residual, self.score_log_std, deltas, delta_hs = (
            _gaussian_log_prob_gradient(net, a, self.weight)
        )
        log_prob = gaussian_log_prob(net.output, net.log_std[:, None, :], a)
        self.loss = -tf.reduce_sum(w * log_prob, axis=1)
        # The products' direction-independent factors: w/σ², w r/σ² [t, A, n], Σ_n w r²/σ² [t, A].
        self.w_iv = self.weight * net.inv_var
        self.w_iv_r = self.w_iv * self.residual
        self.w_iv_r2 = tf.reduce_sum(self.w_iv_r * self.residual, axis=2)
        self.backward_cache = net.r_backward_cache(deltas, delta_hs)

    def __call__(self, v):
        net, w, r = self.net, self.weight, self.residual
        v_log_std = v[-1][:, :, None]
        r_inputs, r_mean = net.r_forward(v)
        # R(∂L/∂μ) = w/σ² (R(μ) + 2 r v_ls);  R(∂L/∂log σ) = 2 Σ_n w/σ² r (R(μ) + r v_ls)
        r_delta = self.w_iv * r_mean + (2.0 * v_log_std) * self.w_iv_r
        g_log_std = 2.0 * (
            tf.reduce_sum(self.w_iv_r * r_mean, axis=2) + v_log_std[..., 0] * self.w_iv_r2
        )
        if self.lvc:
            # −Σ w (∇log N · v) ∇log N, with ∇log N = (r/σ² on μ, r²/σ² − 1 on log σ).
            score_v = tf.reduce_sum(
                r * net.inv_var * r_mean + self.score_log_std * v_log_std, 1, keepdims=True
            )
            r_delta -= w * score_v * r * net.inv_var
            g_log_std -= tf.reduce_sum(w * score_v * self.score_log_std, axis=2)
        grads = net.r_backward(r_delta, r_inputs, self.backward_cache, v[:-1])
        return [*grads, g_log_std]


def _kl_sample_weights(episodes):
    """``(observations [tasks, N, obs_dim], weights [tasks, 1, N], tasks)`` of the mean KL over
    tasks of the per-task mean over valid steps (``mean_kl``): each valid step weighs
    ``1 / (its task's valid steps * tasks)``, padding 0. (The weights are output-major, see
    :class:`_MLP`.)"""
    x = _flatten(tf.convert_to_tensor(episodes.observations, tf.float32), 1)
    mask = _flatten(tf.convert_to_tensor(episodes.mask, tf.float32), 0)
    tasks = tf.cast(tf.shape(mask)[0], tf.float32)
    return x, (mask / tf.reduce_sum(mask, axis=1, keepdims=True) / tasks)[:, None, :], tasks


class GaussianFisher:
    """``u ↦ F u`` for ``mean_i E_{s∈D_i} KL(π_i,old(·|s) || π_i(·|s))`` at ``params`` (= old).

    Args:
        params: per-task weights ``[tasks, *shape]``.
        episodes: ``EpisodeBatch`` (only observations and mask are used).
        activation: the policy's hidden activation.
    """

    def __init__(self, params, episodes, activation: str):
        x, self.weight, self.tasks = _kl_sample_weights(episodes)
        self.net = _MLP(params, x, activation)
        self.first = _first_layer_jacobian(self.net)

    def distribution(self, observations):
        """The policy's ``forward`` output ``(mean, log_std)`` at ``params`` on the episodes'
        ``observations``, from the cached pass (differentiable in ``params``)."""
        mean = _unflatten(self.net.output, observations)
        log_std = self.net.log_std[:, None, None, :]
        return mean, tf.broadcast_to(log_std, tf.shape(mean))

    def surrogate_gradient(self, episodes, advantages):
        """The gradient of the TRPO surrogate ``−mean_i E[π/π_old · Â]`` at ``params`` (= old) on
        ``episodes`` (these, with their actions), from the cached pass: ``−Σ w ∇log π``,
        ``w = mask·Â / (Σ mask · tasks)``. Flat list, the policy's parameter order."""
        a = _flatten(tf.convert_to_tensor(episodes.actions, tf.float32), 1)
        w = _surrogate_weights(self, episodes, advantages)
        return _gaussian_log_prob_gradient(self.net, a, w, self.first)[0]

    def __call__(self, u):
        net = self.net
        _, r_mean = net.r_forward(u, self.first)
        grads, _, _ = net.backward(self.weight * net.inv_var * r_mean, self.first)
        return [*_flat_list(grads), 2.0 * u[-1] / self.tasks]


def _one_hot_actions(actions, num_actions: int):
    """Float-encoded action indices ``[tasks, n, 1]`` -> one-hot ``[tasks, n, num_actions]``."""
    return tf.one_hot(tf.cast(tf.round(actions[..., 0]), tf.int32), num_actions)


def _softmax_jvp(p, t):
    """``(diag(p) − ppᵀ) t`` along the class axis of output-major ``[tasks, K, n]`` tensors (the
    softmax's Jacobian, symmetric)."""
    return p * t - p * tf.reduce_sum(p * t, axis=1, keepdims=True)


class CategoricalInnerLossHessian(_Carried):
    """``v ↦ ∇²L_i(θ_i) v_i`` of the categorical policy's inner loss, at a fixed point ``params``.

    ``∂L/∂z = w (p − onehot(a))`` per sample (``w = mask·Â / Σ mask``), so
    ``R(∂L/∂z) = w (diag(p) − ppᵀ) R(z)``.

    Args:
        params: per-task weights ``[tasks, *shape]`` (``CategoricalMLPPolicy`` order).
        episodes: ``EpisodeBatch`` ``[tasks, E, T, ...]`` with float-encoded actions ``[..., 1]``.
        advantages: ``[tasks, E, T]``.
        activation: the policy's hidden activation.
        lvc: as :class:`InnerLossHessian`.
    """

    _static = ("lvc",)
    _parts = {"net": _MLP}

    def __init__(self, params, episodes, advantages, activation: str, lvc: bool = False):
        self.lvc = lvc
        x = _flatten(tf.convert_to_tensor(episodes.observations, tf.float32), 1)
        a = _flatten(tf.convert_to_tensor(episodes.actions, tf.float32), 1)
        mask = _flatten(tf.convert_to_tensor(episodes.mask, tf.float32), 0)
        adv = _flatten(tf.convert_to_tensor(advantages, tf.float32), 0)
        self.net = net = _MLP(params, x, activation, has_log_std=False)
        w = mask * adv / tf.reduce_sum(mask, axis=1, keepdims=True)  # [t, n]
        # Per-sample terms in logit space are output-major [t, K, n] (see _MLP).
        self.weight = w[:, None, :]
        probs = tf.nn.softmax(net.output)
        one_hot = _one_hot_actions(a, net.output.shape[-1])
        self.probs = _transpose(probs)
        self.score = _transpose(one_hot - probs)  # ∂log p_a/∂z
        grads, deltas, delta_hs = net.backward(-self.weight * self.score)
        # As InnerLossHessian: the loss and its gradient from the cached passes.
        log_prob = categorical_log_prob(net.output, a)
        self.loss = -tf.reduce_sum(w * log_prob, axis=1)
        self.gradient = _flat_list(grads)
        self.backward_cache = net.r_backward_cache(deltas, delta_hs)

    def __call__(self, v):
        net = self.net
        r_inputs, r_logits = net.r_forward(v)
        r_delta = self.weight * _softmax_jvp(self.probs, r_logits)
        if self.lvc:  # −Σ w (∇log p_a · v) ∇log p_a
            r_delta -= (
                self.weight * tf.reduce_sum(self.score * r_logits, 1, keepdims=True) * self.score
            )
        return net.r_backward(r_delta, r_inputs, self.backward_cache, v)


class CategoricalFisher:
    """``u ↦ F u`` for ``mean_i E_{s∈D_i} KL(π_i,old(·|s) || π_i(·|s))`` of the categorical
    policy at ``params`` (= old): ``Jᵀ (diag(p) − ppᵀ) J`` per sample in logit space.

    Args:
        params: per-task weights ``[tasks, *shape]``.
        episodes: ``EpisodeBatch`` (only observations and mask are used).
        activation: the policy's hidden activation.
    """

    def __init__(self, params, episodes, activation: str):
        x, self.weight, _ = _kl_sample_weights(episodes)
        self.net = _MLP(params, x, activation, has_log_std=False)
        self.probs = _transpose(tf.nn.softmax(self.net.output))  # output-major, see _MLP
        self.first = _first_layer_jacobian(self.net)

    def distribution(self, observations):
        """The policy's ``forward`` output (logits) at ``params`` on the episodes'
        ``observations``, from the cached pass (differentiable in ``params``)."""
        return _unflatten(self.net.output, observations)

    def surrogate_gradient(self, episodes, advantages):
        """As :meth:`GaussianFisher.surrogate_gradient`: ``−Σ w ∇log p_a``, with
        ``∂log p_a/∂z = onehot(a) − p``."""
        a = _flatten(tf.convert_to_tensor(episodes.actions, tf.float32), 1)
        one_hot = _one_hot_actions(a, self.net.output.shape[-1])
        w = _surrogate_weights(self, episodes, advantages)
        grads, _, _ = self.net.backward(-w * (_transpose(one_hot) - self.probs), self.first)
        return _flat_list(grads)

    def __call__(self, u):
        _, r_logits = self.net.r_forward(u, self.first)
        d_logits = self.weight * _softmax_jvp(self.probs, r_logits)
        grads, _, _ = self.net.backward(d_logits, self.first)
        return _flat_list(grads)


ANALYTIC_CURVATURE = {
    "gaussian": (InnerLossHessian, GaussianFisher),
    "categorical": (CategoricalInnerLossHessian, CategoricalFisher),
}


def analytic_curvature_for(policy):
    """``(inner-loss Hessian class, Fisher class)`` for ``policy.distribution_type``."""
    kind = getattr(policy, "distribution_type", None)
    if kind not in ANALYTIC_CURVATURE:
        raise ValueError(
            f"no analytic curvature for distribution {kind!r}; pass analytic_curvature=False"
        )
    return ANALYTIC_CURVATURE[kind]
