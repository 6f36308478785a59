"""Inner adaptation: MAML and Meta-SGD (one function, used by the trainer, evaluator and service).

For task ``T_i`` with episodes ``D_i`` collected by ``π_θ`` (Finn et al., 2017, Eq. 1; Li et al.,
2017, Meta-SGD):

    θ'_i = θ − α ⊙ ∇_θ L_{T_i}(θ; D_i)        repeated ``steps`` times,

with the policy-gradient loss ``L = −Σ mask·log π(a|s)·Â / Σ mask`` and ``α`` a scalar (MAML) or
one step size per parameter entry (Meta-SGD). All tasks adapt in one batched computation:
parameters carry a leading ``[tasks]`` axis.

Several steps run either on one batch (the service: the client sends one batch and asks for
``steps``) or on one batch per step (meta-training and evaluation: step ``j`` on fresh episodes
``D_i^j`` collected by ``π_θ_{j−1}``, so ``θ_j = θ_{j−1} − α ⊙ ∇L(θ_{j−1}; D_i^j)``). Every function
below that takes ``episodes, advantages`` accepts both: one ``EpisodeBatch`` and its advantages, or
a sequence of them, one per step (:func:`per_step_batches`).

Besides :func:`adapt`, this module gives the Jacobian-vector and vector-Jacobian products of the
adaptation map ``(θ, α) ↦ θ'`` (:func:`adaptation_jvp`, :func:`adaptation_vjp`), built from
forward-over-reverse Hessian-vector products of the inner loss. The TRPO outer step uses them for
its meta-gradient and its Gauss-Newton Fisher product; the tests check them against plain
reverse-mode autodiff through :func:`adapt` and against finite differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from metarl_tf.advantages import compute_advantages
from metarl_tf.curvature import recording_gradients
from metarl_tf.policy import LOG_STD, tile_parameters


def policy_gradient_loss(policy, params, episodes, advantages, lvc: bool = False):
    """The inner loss ``−Σ mask·log π(a|s)·Â / Σ mask`` of every task.

    ``lvc``: ProMP's low-variance curvature form (Rothfuss et al., 2019): ``log π`` replaced by
    ``⊥log π + π/⊥π − 1`` (``⊥`` = stop-gradient). Same value and gradient at the point; its
    Hessian adds ``−Σ mask·Â·∇log π ∇log πᵀ / Σ mask``, the per-step part of how the
    *pre-adaptation sampling* changes the inner gradient, which plain MAML drops. Through that
    term the meta-gradient credits the pre-adaptation policy for exploring well.

    Args:
        policy: provides ``forward(params, observations)`` and ``log_prob(dist, actions)``
            (Gaussian or categorical).
        params: per-task weights ``[tasks, *shape]``.
        episodes: ``EpisodeBatch`` ``[tasks, episodes, T, ...]``.
        advantages: ``[tasks, episodes, T]`` (constants).
        lvc: use the low-variance-curvature form (changes second derivatives only).

    Returns:
        ``[tasks]`` losses.
    """
    log_prob = policy.log_prob(policy.forward(params, episodes.observations), episodes.actions)
    if lvc:
        fixed = tf.stop_gradient(log_prob)
        log_prob = fixed + tf.exp(log_prob - fixed) - 1.0
    mask = tf.cast(episodes.mask, log_prob.dtype)
    total = tf.reduce_sum(mask * log_prob * advantages, axis=[1, 2])
    return -total / tf.reduce_sum(mask, axis=[1, 2])


def inner_gradients(policy, params, episodes, advantages, lvc: bool = False):
    """``(losses [tasks], ∇_θ L_i for every task [tasks, *shape])``."""
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses = policy_gradient_loss(policy, params, episodes, advantages, lvc)
        total = tf.reduce_sum(losses)  # tasks are independent: ∂total/∂θ_i = ∇L_i(θ_i)
    return losses, tape.gradient(total, params)


def inner_hvp(policy, params, episodes, advantages, vector, lvc: bool = False):
    """``∇²L_i(θ_i) v_i`` for every task (forward-over-reverse: a JVP of the gradient)."""
    with tf.autodiff.ForwardAccumulator(params, vector) as acc:
        _, grads = inner_gradients(policy, params, episodes, advantages, lvc)
    return [acc.jvp(g, unconnected_gradients=tf.UnconnectedGradients.ZERO) for g in grads]


class AdaptResult(NamedTuple):
    """Result of :func:`adapt`.

    Attributes:
        params: adapted weights ``[tasks, *shape]``.
        losses: ``[steps, tasks]`` inner loss before each step.
        trace: ``(θ_{j−1}, g_j)`` per step (the point and the gradient of step ``j``), for the
            JVP/VJP of the adaptation map.
    """

    params: list
    losses: tf.Tensor
    trace: list


def per_step_batches(episodes, advantages, steps: int | None = None) -> tuple[list, list]:
    """The episodes and advantages of every inner step, as two lists of length ``steps``.

    Args:
        episodes: one ``EpisodeBatch`` (reused by every step) or a sequence of them, one per step.
        advantages: its advantages ``[tasks, episodes, T]``, or a sequence, one per step.
        steps: the number of steps; ``None`` means 1 for one batch, the sequence's length otherwise.

    Raises:
        ValueError: if the sequences' lengths differ from each other or from ``steps``.
    """
    if hasattr(episodes, "mask"):  # one EpisodeBatch (itself a NamedTuple, hence this test)
        steps = 1 if steps is None else int(steps)
        return [episodes] * steps, [advantages] * steps
    episodes, advantages = list(episodes), list(advantages)
    steps = len(episodes) if steps is None else int(steps)
    if not (len(episodes) == len(advantages) == steps) or steps < 1:
        raise ValueError(
            f"one inner batch per step: got {len(episodes)} episode batches and "
            f"{len(advantages)} advantage tensors for {steps} inner steps; pass one EpisodeBatch "
            "(reused by every step) or exactly one batch and one advantage tensor per step"
        )
    return episodes, advantages


def step_size_blocks(step_sizes, n_params: int) -> int:
    """How many per-step blocks ``step_sizes`` holds: 1 for a scalar ``α`` or one tensor per
    parameter (Meta-SGD, every step), ``b`` for a flat list of ``b × n_params`` tensors."""
    if not isinstance(step_sizes, (list, tuple)):
        return 1
    blocks, rest = divmod(len(step_sizes), n_params)
    if rest or blocks < 1:
        raise ValueError(
            f"{len(step_sizes)} step size tensors for {n_params} parameters: expected one per "
            "parameter, or whole per-step blocks of them"
        )
    return blocks


class StepRule:
    """The inner step rule: how step ``j`` of a chain (``j = 0`` the first step from the
    meta-initialization) turns ``θ_j`` and its gradient ``g`` into ``θ_{j+1}``.

        θ_{j+1} = θ_j − α_j ⊙ g          (+ s on log σ when j = 0)

    ``α_j``: a scalar ``α`` (MAML), one step size per parameter entry (Meta-SGD), or per-step
    blocks of them (``meta_sgd_per_step``): block ``b`` for step ``b``, steps past the last block
    reuse it. ``s``: an optional learned shift of the Gaussian's ``log σ`` (the last parameter,
    :data:`metarl_tf.policy.LOG_STD`) that the first step adds: the adapted policy's noise apart
    from the pre-adaptation (exploration) noise (``TrainConfig.log_std_shift``).

    The one owner of the rule: :func:`adapt` applies it, :func:`adaptation_jvp` and
    :func:`adaptation_vjp` differentiate it, and the :class:`Adapter` (hence the trainer, the
    evaluator and the service) and the bundle ask it how a chain of steps may be split.

    Args:
        step_sizes: scalar ``α``, or a flat list of per-parameter tensors (``blocks × n``).
        num_parameters: ``n``, the number of parameter tensors of the policy.
        log_std_shift: ``[act_dim]`` or ``None``.
    """

    def __init__(self, step_sizes, num_parameters: int, log_std_shift=None):
        self.step_sizes = step_sizes
        self.num_parameters = int(num_parameters)
        self.log_std_shift = log_std_shift
        self.blocks = step_size_blocks(step_sizes, self.num_parameters)

    def block(self, step: int) -> int:
        """The index of step ``step``'s block of step sizes."""
        return min(step, self.blocks - 1)

    def sizes(self, step: int, values=None):
        """Step ``step``'s step sizes: the scalar, or its block's ``n`` tensors; ``values``
        (laid out as ``step_sizes``, e.g. their tangents) instead of the step sizes if given."""
        values = self.step_sizes if values is None else values
        if self.blocks == 1:
            return values
        n, b = self.num_parameters, self.block(step)
        return values[b * n : (b + 1) * n]

    @staticmethod
    def scale(sizes, i: int):
        """Parameter ``i``'s step size in ``sizes`` (one of :meth:`sizes`)."""
        return sizes[i] if isinstance(sizes, (list, tuple)) else sizes

    def shifts(self, step: int) -> bool:
        """Whether step ``step`` adds the log σ shift (the first step, when there is one)."""
        return self.log_std_shift is not None and step == 0

    def apply(self, params: list, grads: list, step: int, log_std_shift=None) -> list:
        """``θ_{step+1}`` from ``θ_step`` and its gradient (``log_std_shift``: another value for
        the shift, e.g. a candidate of the TRPO line search; default the rule's own)."""
        sizes = self.sizes(step)
        new = [
            p - self.scale(sizes, i) * g for i, (p, g) in enumerate(zip(params, grads, strict=True))
        ]
        if self.shifts(step):
            shift = self.log_std_shift if log_std_shift is None else log_std_shift
            new[LOG_STD] = new[LOG_STD] + shift
        return new

    @property
    def last_distinct_step(self) -> int:
        """From this step index on every step follows the same rule (the last block of step
        sizes, no shift): a chain continued from a deeper step adapts as from this one."""
        return max(self.blocks - 1, 1 if self.log_std_shift is not None else 0)

    def default_steps(self, configured: int) -> int:
        """Inner steps one adaptation takes by default: ``configured`` (the bundle's or the
        config's), or 1 with a log σ shift (its later steps need episodes of the adapted
        policy)."""
        return 1 if self.log_std_shift is not None else int(configured)

    def needs_adapted_episodes(self, depth: int, steps: int) -> bool:
        """Whether ``steps`` steps from a policy ``depth`` steps deep on ONE batch of episodes
        would be wrong: after the first step's log σ shift, the policy that collected the batch
        (the exploring one) is no longer the one being adapted."""
        return self.log_std_shift is not None and depth == 0 and steps > 1


def adapt(
    policy,
    params: Sequence,
    step_sizes,
    episodes,
    advantages,
    steps: int | None = None,
    first_order: bool = False,
    gradients=None,
    log_std_shift=None,
    first_step: int = 0,
) -> AdaptResult:
    """``steps`` inner gradient steps ``θ_j = θ_{j−1} − α ⊙ ∇L(θ_{j−1}; D^j)`` for every task.

    Differentiable: called under a ``GradientTape``, gradients flow through the inner step
    (second order) unless ``first_order=True`` (the inner gradient is then a constant).

    Args:
        policy: provides ``forward(params, observations)``.
        params: weights ``[tasks, *shape]`` or shared ``[*shape]`` (tiled to every task).
        step_sizes: scalar ``α`` or, for Meta-SGD, one tensor per parameter with its shape (or
            per-step blocks of them, :class:`StepRule`).
        episodes: ``EpisodeBatch`` ``[tasks, episodes, T, ...]`` collected by ``params`` (every
            step uses it), or a sequence of them, one per step (``D^j`` collected by ``θ_{j−1}``).
        advantages: ``[tasks, episodes, T]`` from :func:`metarl_tf.advantages.compute_advantages`,
            or a sequence, one per step.
        steps: number of inner steps; default 1 for one batch, the number of batches otherwise.
        first_order: drop the second-order terms (FOMAML).
        gradients: ``(params, episodes, advantages) -> (losses [tasks], grads)`` computing the
            inner loss and its gradient; default :func:`inner_gradients` (autodiff). TRPO passes
            the analytic one of :mod:`metarl_tf.curvature`, which it needs at the same points.
        log_std_shift: optional ``[action_dim]`` added to the Gaussian's ``log_std`` (the last
            parameter) by the first step: the adapted policy's noise apart from the
            pre-adaptation (exploration) noise (``TrainConfig.log_std_shift``).
        first_step: how many inner steps ``params`` already took from the meta-initialization
            (when a chain is adapted one call per step): picks per-step step sizes and whether
            the shift is still to be added.
    """
    episodes, advantages = per_step_batches(episodes, advantages, steps)
    tasks = episodes[0].mask.shape[0]
    params = list(params)
    rule = StepRule(step_sizes, len(params), log_std_shift)
    if len(params[0].shape) == len(policy.parameter_shapes[0]):
        params = tile_parameters(params, tasks)
    losses, trace = [], []
    for batch, adv in zip(episodes, advantages, strict=True):
        if gradients is None:
            loss, grads = inner_gradients(policy, params, batch, adv)
        else:
            loss, grads = gradients(params, batch, adv)
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
        step = first_step + len(trace)  # this step's index in the whole chain
        trace.append((params, grads))
        losses.append(loss)
        params = rule.apply(params, grads, step)
    return AdaptResult(params, tf.stack(losses), trace)


def _hvp_fn(policy, point, episodes, advantages, hessian):
    if hessian is not None:
        return hessian
    return lambda v: inner_hvp(policy, point, episodes, advantages, v)


def adaptation_jvp(
    policy, result: AdaptResult, step_sizes, episodes, advantages, v_params, v_steps=None,
    first_order=False, hessians=None, every_step=False, v_shift=None,
):  # fmt: skip
    """``dθ' = J_θ v_θ + J_α v_α`` for the map ``(θ, α) ↦ θ'`` traced in ``result``.

    Per step: ``dθ_j = (I − α ⊙ H_j) dθ_{j−1} − g_j ⊙ dα`` with ``H_j = ∇²L(θ_{j−1}; D^j)``.

    Args:
        episodes, advantages: as given to :func:`adapt` for ``result`` (one batch, or one per step).
        v_params: tangent of the shared ``θ`` (``[*shape]`` each).
        v_steps: tangent of Meta-SGD step sizes (``[*shape]`` each), or ``None``.
        hessians: optional ``v ↦ H_j v`` callables per step (e.g. the cached
            :class:`metarl_tf.curvature.InnerLossHessian`); default: autodiff :func:`inner_hvp`.

        every_step: return the tangents of every ``θ_1 .. θ_k``, not only of ``θ' = θ_k``.
        v_shift: tangent of a learned ``log_std_shift`` (see :func:`adapt`), or ``None``.

    Returns:
        per-task tangents ``[tasks, *shape]`` (a list of them per step with ``every_step``).
    """
    episodes, advantages = per_step_batches(episodes, advantages, len(result.trace))
    u = tile_parameters(v_params, episodes[0].mask.shape[0])
    rule = StepRule(step_sizes, len(u))
    levels = []
    for j, (point, grads) in enumerate(result.trace):
        if first_order:
            hu = [tf.zeros_like(x) for x in u]
        else:
            hvp = _hvp_fn(policy, point, episodes[j], advantages[j], hessians and hessians[j])
            hu = hvp(u)
        sizes = rule.sizes(j)
        u = [ui - rule.scale(sizes, i) * h for i, (ui, h) in enumerate(zip(u, hu, strict=True))]
        if v_steps is not None:
            dv_j = rule.sizes(j, v_steps)
            u = [ui - g * dv for ui, g, dv in zip(u, grads, dv_j, strict=True)]
        if v_shift is not None and j == 0:  # the rule's shift (StepRule.apply)
            u = [*u[:LOG_STD], u[LOG_STD] + v_shift]
        levels.append(u)
    return levels if every_step else u


def adaptation_vjp(
    policy, result: AdaptResult, step_sizes, episodes, advantages, w, with_steps=False,
    first_order=False, hessians=None, intermediate=None, with_shift=False,
):  # fmt: skip
    """``(J_θᵀ w, J_αᵀ w)`` for per-task cotangents ``w`` ``[tasks, *shape]`` of ``θ'``.

    Reverse of :func:`adaptation_jvp`, using the symmetry of the Hessians:
    ``w_{j−1} = w_j − H_j (α ⊙ w_j)`` and ``w_α += −Σ_tasks g_j ⊙ w_j``, ``H_j`` on step ``j``'s
    batch (``episodes, advantages`` as given to :func:`adapt`: one batch, or one per step).

    ``intermediate``: cotangents of ``θ_1 .. θ_{k−1}`` too (a list of ``k − 1``, entries may be
    ``None``), for an objective on every step's adapted parameters: the result is then the
    cotangent of all of them together, in one backward pass.

    ``with_shift``: also return the cotangent of a ``log_std_shift`` (:func:`adapt`), third.

    Returns:
        ``(cotangent of θ [*shape] each, cotangent of α [*shape] each or None)``; the task axis is
        summed because ``θ`` and ``α`` are shared by all tasks.
    """
    episodes, advantages = per_step_batches(episodes, advantages, len(result.trace))
    intermediate = list(intermediate or [None] * (len(result.trace) - 1))
    if len(intermediate) != len(result.trace) - 1:
        raise ValueError(
            f"intermediate: {len(result.trace) - 1} cotangents expected (θ_1 .. θ_k−1), "
            f"got {len(intermediate)}"
        )
    w = list(w)
    n = len(w)
    rule = StepRule(step_sizes, n)
    w_steps = [tf.zeros_like(s) for s in step_sizes] if with_steps else None
    w_shift = None
    for j in reversed(range(len(result.trace))):
        point, grads = result.trace[j]
        if j == 0 and with_shift:  # w is the cotangent of θ_1, where the shift is added
            w_shift = tf.reduce_sum(w[LOG_STD], axis=0)
        sizes, b = rule.sizes(j), rule.block(j)
        if with_steps:
            for i, (g, wi) in enumerate(zip(grads, w, strict=True)):
                w_steps[b * n + i] -= tf.reduce_sum(g * wi, axis=0)
        if not first_order:
            aw = [rule.scale(sizes, i) * wi for i, wi in enumerate(w)]
            hvp = _hvp_fn(policy, point, episodes[j], advantages[j], hessians and hessians[j])
            haw = hvp(aw)
            w = [wi - h for wi, h in zip(w, haw, strict=True)]
        if j > 0 and intermediate[j - 1] is not None:  # w is now the cotangent of θ_j
            w = [wi + ci for wi, ci in zip(w, intermediate[j - 1], strict=True)]
    if with_shift:
        return [tf.reduce_sum(wi, axis=0) for wi in w], w_steps, w_shift
    return [tf.reduce_sum(wi, axis=0) for wi in w], w_steps


class Adapter:
    """Advantages + :func:`adapt`, compiled once: the adaptation the trainer, the evaluator and
    the service all run (so an adaptation over HTTP equals the in-process one). With
    second-order TRPO the trainer calls :meth:`with_curvature`: the same step, its gradient from
    the cached passes the meta-step reuses (equal to autodiff's to float rounding).

    Args:
        policy: the policy (its ``forward``).
        step_sizes: scalar ``α`` or Meta-SGD per-parameter step sizes (tensors/variables).
        gamma, gae_lambda, baseline: advantage settings (see ``compute_advantages``).
        first_order: only matters when differentiated through; adaptation itself is the same.
    """

    def __init__(
        self, policy, step_sizes, gamma: float, gae_lambda: float = 1.0, baseline: str = "linear",
        log_std_shift=None,
    ):  # fmt: skip
        self.policy = policy
        self.step_sizes = step_sizes
        self.log_std_shift = log_std_shift
        self.rule = StepRule(step_sizes, len(policy.parameter_shapes), log_std_shift)
        self.gamma, self.gae_lambda, self.baseline = gamma, gae_lambda, baseline
        self._compiled = tf.function(self._adapt)
        # Concrete functions by (steps, input shapes): calling one skips tf.function's argument
        # matching, about 0.6 ms of a ~4 ms service adaptation (bench/serve_latency.py).
        self._concrete: dict[tuple, Any] = {}

    def _adapt(self, params, episodes, steps: int, first_step: int = 0, hessian_cls=None):
        advantages = compute_advantages(episodes, self.gamma, self.gae_lambda, self.baseline)
        carried, gradients = [], None
        if hessian_cls is not None:
            gradients = recording_gradients(hessian_cls, self.policy.activation, carried)
        result = adapt(
            self.policy, params, self.step_sizes, episodes, advantages, steps,
            gradients=gradients, log_std_shift=self.log_std_shift, first_step=first_step,
        )  # fmt: skip
        if hessian_cls is not None:
            return result.params, result.losses, advantages, carried[0]
        return result.params, result.losses, advantages

    @property
    def tracing_count(self) -> int:
        """How many times the compiled adaptation was traced (one per input shape, step count and
        gradient path: autodiff, or a :meth:`with_curvature` Hessian class)."""
        return int(self._compiled.experimental_get_tracing_count())

    @property
    def last_distinct_step(self) -> int:
        """:attr:`StepRule.last_distinct_step`: ``first_step`` is clamped to it, so a service
        chaining many adaptations compiles at most this many + 1 variants."""
        return self.rule.last_distinct_step

    def __call__(self, params, episodes, steps: int = 1, first_step: int = 0):
        """Adapts ``params`` (shared ``[*shape]`` or per-task ``[tasks, *shape]``) on ``episodes``.

        ``first_step``: the inner steps ``params`` already took from the meta-initialization
        (a chain adapted one call per step passes ``0, 1, ...``; see :func:`adapt`).

        Returns:
            ``(adapted params [tasks, *shape], inner losses [steps, tasks], advantages)``.
        """
        return self._run(params, episodes, steps, first_step)

    def with_curvature(self, params, episodes, hessian_cls, first_step: int = 0):
        """One inner step as :meth:`__call__`, its loss and gradient from the cached passes of
        ``hessian_cls`` (an inner-loss Hessian of :mod:`metarl_tf.curvature`) at ``params``.

        Returns:
            ``(adapted params, inner losses [1, tasks], advantages, carried)``: ``carried`` is
            the Hessian's :meth:`~metarl_tf.curvature._Carried.carry`, which the TRPO meta-step
            takes back (``MetaBatch.inner_curvature``) instead of recomputing those passes.
        """
        return self._run(params, episodes, 1, first_step, hessian_cls)

    def _run(self, params, episodes, steps, first_step, hessian_cls=None):
        episodes = type(episodes)(*[tf.convert_to_tensor(x, tf.float32) for x in episodes])
        params = [tf.convert_to_tensor(p, tf.float32) for p in params]
        steps = int(steps)
        first_step = min(int(first_step), self.last_distinct_step)  # no retrace beyond it
        key = (steps, first_step, hessian_cls, type(episodes))
        key += tuple(tuple(x.shape) for x in (*params, *episodes))
        fn = self._concrete.get(key)
        if fn is None:
            fn = self._concrete[key] = self._compiled.get_concrete_function(
                params, episodes, steps, first_step, hessian_cls
            )
        # The inputs match the traced signature by construction (same key): call with the flat
        # tensor list, skipping the per-call signature binding and casts (~0.7 ms of a ~4 ms
        # service adaptation; TensorFlow is pinned to 2.21, where `_call_flat` has this form).
        return fn._call_flat([*params, *episodes], fn.captured_inputs)
