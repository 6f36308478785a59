"""MAML-TRPO outer step (Finn et al., 2017, Sec. 5.3; Schulman et al., 2015).

Maximize the post-adaptation surrogate subject to ``mean_i KL(π_θ'_i,old || π_θ'_i) ≤ max_kl``:
natural-gradient direction by conjugate gradient on Hessian-vector products of the mean KL
*through the inner adaptation*, then a backtracking line search that checks both the surrogate
improvement and the KL bound.

The Hessian-vector product. At the current point the KL and its gradient vanish, so its Hessian
is exactly the Gauss-Newton form ``Jᵀ F J``: ``J`` the Jacobian of the adaptation ``θ ↦ θ'``
(:func:`metarl_tf.maml.adaptation_jvp` / ``adaptation_vjp``), ``F`` the Fisher of the policy at
``θ'`` (Gaussian: ``diag(1/σ²)`` on the mean, 2 on ``log σ``; categorical: ``diag(p) − ppᵀ`` on the
logits), applied through one JVP and one VJP of the network. This is the same product a reverse-over-reverse HVP gives, without third-order terms
(``tests/test_trpo.py`` checks both agree).

With several inner steps, each on its own batch (``MetaBatch.inner_episodes`` a sequence), ``J`` is
the product of the per-step Jacobians ``I − α ⊙ H_j``, every ``H_j`` the inner-loss Hessian on
step ``j``'s batch at ``θ_{j−1}``: second order through the whole chain.

Meta-SGD step sizes, when learned, are meta-parameters too: they get their part of the gradient and
of ``J`` (``∂θ'/∂α = −g``), so TRPO updates ``θ`` and ``α`` under one KL bound.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import tensorflow as tf

from metarl_tf.config import objective_weights
from metarl_tf.curvature import analytic_curvature_for, restoring_gradients
from metarl_tf.maml import (
    adapt,
    adaptation_jvp,
    adaptation_vjp,
    inner_gradients,
    inner_hvp,
    per_step_batches,
)
from metarl_tf.outer.common import MetaBatch, mean_kl_from_dist, surrogate_from_log_prob
from metarl_tf.policy import LOG_STD


def _dot(a, b):
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b, strict=True)])


def conjugate_gradient(
    matvec, b, iterations: int = 10, tolerance: float = 1e-10, return_quadratic: bool = False
):
    """Solves ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``.

    ``b`` and ``x`` are lists of tensors (``matvec`` takes and returns such lists). Stops early
    when ``rᵀr < tolerance``. The iteration itself runs on one flat vector: a handful of ops per
    step instead of a few per tensor of the list.

    ``return_quadratic``: also return ``xᵀ A x``, computed from CG's residual ``r = b − A x`` as
    ``xᵀ (b − r)``: TRPO's step length needs it, and this saves the extra ``A x`` product
    (identical in exact arithmetic; the residual is updated by the products CG already made).
    """
    shapes = [t.shape for t in b]
    sizes = [int(s.num_elements()) for s in shapes]

    def flat(parts):
        return tf.concat([tf.reshape(t, [-1]) for t in parts], 0)

    def unflat(vector):
        return [tf.reshape(t, s) for t, s in zip(tf.split(vector, sizes), shapes, strict=True)]

    b_flat = flat(b)
    rdotr = tf.tensordot(b_flat, b_flat, 1)

    def cond(i, x, r, p, rdotr):
        return tf.logical_and(i < iterations, rdotr >= tolerance)

    def body(i, x, r, p, rdotr):
        z = flat(matvec(unflat(p)))
        v = rdotr / tf.tensordot(p, z, 1)
        x = x + v * p
        r = r - v * z
        new_rdotr = tf.tensordot(r, r, 1)
        p = r + (new_rdotr / rdotr) * p
        return i + 1, x, r, p, new_rdotr

    _, x, r, _, _ = tf.while_loop(
        cond, body, [tf.constant(0), tf.zeros_like(b_flat), b_flat, b_flat, rdotr]
    )
    if return_quadratic:
        return unflat(x), tf.tensordot(x, b_flat - r, 1)
    return unflat(x)


def fisher_vector_product(policy, params, episodes, u):
    """``F u`` for the mean-over-tasks KL of the policy (Gaussian or categorical) at per-task
    ``params``, by autodiff: a JVP of the network, the policy's ``output_fisher`` (the KL's Hessian
    in the distribution parameters), and a VJP.

    ``u`` and the result are per-task ``[tasks, *shape]``.
    """
    mask = tf.cast(episodes.mask, tf.float32)
    tasks = tf.cast(tf.shape(mask)[0], tf.float32)
    weight = mask / tf.reduce_sum(mask, axis=[1, 2], keepdims=True) / tasks  # [tasks, E, T]
    with tf.GradientTape() as tape:
        tape.watch(params)
        with tf.autodiff.ForwardAccumulator(params, u) as acc:
            dist = policy.forward(params, episodes.observations)
        d_dist = tf.nest.map_structure(acc.jvp, dist)
    # Hessian of KL(old || new) in the new distribution's parameters at new = old.
    out = tf.nest.map_structure(
        lambda h: tf.stop_gradient(weight[..., None] * h), policy.output_fisher(dist, d_dist)
    )
    return tape.gradient(tf.nest.flatten(dist), params, output_gradients=tf.nest.flatten(out))


class MetaGradient(NamedTuple):
    """The first piece of the TRPO meta-step (:func:`meta_gradient`): what the natural direction
    and the line search need. Lives inside one ``tf.function`` (it holds closures).

    Attributes:
        gradient: the meta-gradient of the surrogate, one tensor per meta-parameter (θ, then the
            learned step sizes, then the log σ shift); zero on the frozen pre-adaptation log σ.
        curvature: ``(v, damping) ↦ (H + damping I) v``, ``H`` the Gauss-Newton Hessian of the
            mean KL through the inner adaptation (restricted to the unfrozen subspace).
        evaluate: ``(values of the meta-parameters) ↦ (surrogate, mean KL)`` after adapting
            with them: the line search's test.
        variables: the meta-parameters the update assigns, in the order of ``gradient``.
        loss_before: the surrogate at the current meta-parameters.
        inner_loss: the first inner step's mean loss (a statistic).
    """

    gradient: list
    curvature: Any
    evaluate: Any
    variables: list
    loss_before: tf.Tensor
    inner_loss: tf.Tensor


def meta_gradient(
    policy,
    step_sizes,
    batch: MetaBatch,
    *,
    learn_step_sizes: bool,
    inner_steps: int,
    first_order: bool,
    analytic_curvature: bool = True,
    every_step_objective: bool = False,
    step_weights=None,
    lvc: bool = False,
    log_std_shift=None,
) -> MetaGradient:
    """The meta-gradient of the post-adaptation surrogate (through the inner steps), and the
    curvature product and line-search test at the same point; see :func:`trpo_meta_step` for
    the arguments."""
    theta = list(policy.parameters)
    alphas = list(step_sizes) if learn_step_sizes else []
    shifts = [log_std_shift] if log_std_shift is not None else []
    inner, inner_adv = batch.inner_episodes, batch.inner_advantages
    outer, outer_adv = batch.outer_episodes, batch.outer_advantages
    n_theta, n_alpha = len(theta), len(alphas)

    def adapted(values):
        sizes = values[n_theta : n_theta + n_alpha] if learn_step_sizes else step_sizes
        shift = values[-1] if shifts else None
        return adapt(
            policy, values[:n_theta], sizes, inner, inner_adv, inner_steps, first_order,
            log_std_shift=shift,
        )  # fmt: skip

    def frozen(vector):
        """With a learned shift the pre-adaptation log σ stays fixed: CG runs in the subspace
        without it (its gradient and curvature entries zero)."""
        if not shifts:
            return vector
        i = n_theta + LOG_STD  # the pre-adaptation log σ among the meta-parameters
        return [*vector[:i], tf.zeros_like(vector[i]), *vector[i + 1 :]]

    sizes = alphas if learn_step_sizes else step_sizes
    # The Hessian/Fisher products below run ~2 * cg_iterations times at the same points: cache
    # the network's forward/backward passes there (metarl_tf.curvature) instead of autodiff. The
    # inner steps take their loss and gradient from the same cached passes.
    # (First order needs no Hessian products: plain autodiff for its inner steps.)
    hessians = None
    if analytic_curvature:
        hessian_cls, fisher_cls = analytic_curvature_for(policy)
    if not first_order:
        hessians = []  # v ↦ H_j v of every inner step, recorded as adapt computes its gradients
        carried = list(batch.inner_curvature or []) if analytic_curvature else []
        if carried and len(carried) != inner_steps:
            raise ValueError(
                f"batch.inner_curvature: {inner_steps} (one per inner step) expected, "
                f"got {len(carried)}"
            )

        def gradients(point, episodes, adv):
            if analytic_curvature:
                hessians.append(hessian_cls(point, episodes, adv, policy.activation, lvc))
                return hessians[-1].loss, hessians[-1].gradient
            hessians.append(functools.partial(inner_hvp, policy, point, episodes, adv, lvc=lvc))
            return inner_gradients(policy, point, episodes, adv)

        if carried:  # computed while adapting for sampling, at these same points
            gradients = restoring_gradients(hessian_cls, carried, policy.activation, lvc, hessians)

        result = adapt(
            policy, theta, sizes, inner, inner_adv, inner_steps, False, gradients,
            log_std_shift=log_std_shift,
        )  # fmt: skip
    else:
        result = adapted(theta + alphas + shifts)
    # The objective's levels: θ' only, or with ``every_step_objective`` every θ_j on the batch
    # it collected (inner batch j for j < k, the outer batch for θ_k), weighted by
    # objective_weights (1/levels unless step_weights).
    inner_batches, inner_advs = per_step_batches(inner, inner_adv, inner_steps)
    levels = list(range(1, inner_steps + 1)) if every_step_objective else [inner_steps]
    data = [
        (outer, outer_adv) if j == inner_steps else (inner_batches[j], inner_advs[j])
        for j in levels
    ]
    weights = objective_weights(len(levels), step_weights if every_step_objective else None)

    def level_params(res):
        return [res.params if j == inner_steps else res.trace[j][0] for j in levels]

    params = [[tf.stop_gradient(p) for p in ps] for ps in level_params(result)]

    def objective(dists):
        """``(π_old's log-probabilities per level, the surrogate)`` from the levels' forward pass
        (π = π_old there: the ratio is 1, its gradient ``∇log π``)."""
        log_probs, losses = [], []
        for dist, (episodes, adv) in zip(dists, data, strict=True):
            log_prob = policy.log_prob(dist, episodes.actions)
            log_probs.append(tf.stop_gradient(log_prob))
            losses.append(surrogate_from_log_prob(log_prob, log_probs[-1], adv, episodes.mask))
        return log_probs, tf.add_n([w * x for w, x in zip(weights, losses, strict=True)])

    if analytic_curvature:  # the Fisher's cached pass gives π_old and the surrogate's gradient
        fishers = [
            fisher_cls(ps, episodes, policy.activation)
            for ps, (episodes, _) in zip(params, data, strict=True)
        ]
        dists = [f.distribution(ep.observations) for f, (ep, _) in zip(fishers, data, strict=True)]
        old_log_probs, loss_before = objective(dists)
        grad_levels = [
            [w * g for g in f.surrogate_gradient(*level)]
            for f, level, w in zip(fishers, data, weights, strict=True)
        ]
    else:
        fishers = [
            functools.partial(fisher_vector_product, policy, ps, episodes)
            for ps, (episodes, _) in zip(params, data, strict=True)
        ]
        with tf.GradientTape() as tape:  # one forward pass: π_old and the surrogate at θ'
            tape.watch(params)
            dists = [
                policy.forward(ps, episodes.observations)
                for ps, (episodes, _) in zip(params, data, strict=True)
            ]
            old_log_probs, loss_before = objective(dists)
        grad_levels = tape.gradient(loss_before, params)
    old_dists = [tf.nest.map_structure(tf.stop_gradient, d) for d in dists]

    def to_cotangents(per_level):
        """Per-level cotangents -> (cotangent of θ_k, of θ_1 .. θ_{k−1}) for adaptation_vjp."""
        by_step = dict(zip(levels, per_level, strict=True))
        return by_step[inner_steps], [by_step.get(j) for j in range(1, inner_steps)]

    last, intermediate = to_cotangents(grad_levels)
    g_theta, g_alpha, *g_shift = adaptation_vjp(
        policy, result, sizes, inner, inner_adv, last, learn_step_sizes, first_order, hessians,
        intermediate, with_shift=bool(shifts),
    )  # fmt: skip
    grads = frozen(g_theta + (g_alpha or []) + g_shift)

    def curvature(v, damping):
        v = frozen(v)
        us = adaptation_jvp(
            policy, result, sizes, inner, inner_adv, v[:n_theta],
            v[n_theta : n_theta + n_alpha] if learn_step_sizes else None, first_order, hessians,
            every_step=True, v_shift=v[-1] if shifts else None,
        )  # fmt: skip
        fu = [
            [w * x for x in fisher(us[j - 1])]
            for j, w, fisher in zip(levels, weights, fishers, strict=True)
        ]
        last, intermediate = to_cotangents(fu)
        h_theta, h_alpha, *h_shift = adaptation_vjp(
            policy, result, sizes, inner, inner_adv, last, learn_step_sizes, first_order,
            hessians, intermediate, with_shift=bool(shifts),
        )  # fmt: skip
        products = h_theta + (h_alpha or []) + h_shift
        return frozen([h + damping * vi for h, vi in zip(products, v, strict=True)])

    def evaluate(candidate):
        cand = level_params(adapted(candidate))
        loss, kl = 0.0, 0.0
        for ps, (episodes, adv), old_lp, old, weight in zip(
            cand, data, old_log_probs, old_dists, weights, strict=True
        ):
            dist = policy.forward(ps, episodes.observations)  # one pass: surrogate and KL
            log_prob = policy.log_prob(dist, episodes.actions)
            loss += weight * surrogate_from_log_prob(log_prob, old_lp, adv, episodes.mask)
            kl += weight * mean_kl_from_dist(policy, dist, episodes, *tf.nest.flatten(old))
        return loss, kl

    return MetaGradient(
        gradient=grads,
        curvature=curvature,
        evaluate=evaluate,
        variables=theta + alphas + shifts,
        loss_before=loss_before,
        inner_loss=tf.reduce_mean(result.losses[0]),
    )


def natural_direction(g: MetaGradient, *, max_kl: float, cg_iterations: int, cg_damping: float):
    """The full step ``s = √(2 δ / xᵀ(H + damping)x) · x`` with ``x ≈ (H + damping)⁻¹ ∇`` by
    ``cg_iterations`` of conjugate gradient: the step that reaches ``KL = max_kl`` (``δ``) in the
    quadratic model. Returns one tensor per meta-parameter."""
    # sᵀ(H + damping) s from CG's residual, not an 11th product (see conjugate_gradient).
    direction, s_h_s = conjugate_gradient(
        lambda v: g.curvature(v, cg_damping), g.gradient, cg_iterations, return_quadratic=True
    )
    shs = 0.5 * s_h_s
    lagrange = tf.sqrt(tf.maximum(shs, 1e-12) / max_kl)
    return [d / lagrange for d in direction]


def line_search(
    g: MetaGradient, full_step, *, max_kl: float, ls_max_steps: int, ls_backtrack_ratio: float
):
    """Backtracks from the full step (``scale = 1, r, r², ...``) until the surrogate improves and
    the mean KL stays below ``max_kl``, then assigns the meta-parameters; with no acceptable step
    within ``ls_max_steps`` they keep their values (as rllab/pytorch-maml-rl).

    Returns:
        dict of scalar tensors: ``loss_before``, ``loss_after``, ``kl``, ``line_search_steps``,
        ``accepted``, ``inner_loss``.
    """
    loss_before = g.loss_before
    old_values = [tf.identity(v) for v in g.variables]

    def cond(k, scale, accepted, loss, kl):
        return tf.logical_and(k < ls_max_steps, tf.logical_not(accepted))

    def body(k, scale, accepted, loss, kl):
        candidate = [v - scale * s for v, s in zip(old_values, full_step, strict=True)]
        loss, kl = g.evaluate(candidate)
        accepted = tf.logical_and(loss < loss_before, kl < max_kl)
        new_scale = tf.where(accepted, scale, scale * ls_backtrack_ratio)
        return k + 1, new_scale, accepted, loss, kl

    k, scale, accepted, loss_after, kl = tf.while_loop(
        cond,
        body,
        [tf.constant(0), tf.constant(1.0), tf.constant(False), loss_before, tf.constant(0.0)],
    )
    scale = tf.where(accepted, scale, 0.0)
    for var, old, step in zip(g.variables, old_values, full_step, strict=True):
        var.assign(old - scale * step)
    return {
        "loss_before": loss_before,
        "loss_after": tf.where(accepted, loss_after, loss_before),
        "kl": tf.where(accepted, kl, 0.0),
        "line_search_steps": k,
        "accepted": tf.cast(accepted, tf.float32),
        "inner_loss": g.inner_loss,
    }


def trpo_meta_step(
    policy,
    step_sizes,
    batch: MetaBatch,
    *,
    learn_step_sizes: bool,
    inner_steps: int,
    first_order: bool,
    max_kl: float,
    cg_iterations: int,
    cg_damping: float,
    ls_max_steps: int,
    ls_backtrack_ratio: float,
    analytic_curvature: bool = True,
    every_step_objective: bool = False,
    step_weights=None,
    lvc: bool = False,
    log_std_shift=None,
):
    """One MAML-TRPO update of ``policy.parameters`` (and Meta-SGD ``step_sizes`` variables when
    ``learn_step_sizes``): :func:`meta_gradient`, :func:`natural_direction`, :func:`line_search`.
    Meant to run inside a ``tf.function``.

    ``analytic_curvature=False`` uses plain autodiff Hessian/Fisher products (same numbers,
    slower; for policies without the cached curvature of ``metarl_tf.curvature``).
    ``every_step_objective``: with ``k > 1`` inner steps, maximize the mean of the surrogates after
    every step (θ_j on inner batch j + 1, which θ_j collected; θ_k on the outer batch) under the
    mean of their KLs, instead of the last step's alone: adaptation that keeps improving step by
    step. The same one JVP/VJP pass through the chain serves all levels.
    ``step_weights``: with ``every_step_objective``, the weights of the steps' surrogates and KLs
    (one positive weight per inner step, normalized to sum 1) instead of equal ones; the trust
    region then bounds the weighted mean KL.
    ``lvc``: differentiate through the inner steps with the Hessian of the low-variance-curvature
    inner loss (:func:`metarl_tf.maml.policy_gradient_loss`); the adaptation itself is unchanged.
    ``log_std_shift``: a variable ``[action_dim]`` the first inner step adds to ``log σ``
    (:func:`metarl_tf.maml.adapt`), learned here like the step sizes; the pre-adaptation
    ``log σ`` (the policy's own) then stays fixed: exploration noise apart from the adapted one.

    Returns:
        dict of scalar tensors: ``loss_before``, ``loss_after``, ``kl``, ``line_search_steps``,
        ``accepted``, ``inner_loss``.
    """
    return TRPOStep(
        policy, step_sizes, max_kl=max_kl, cg_iterations=cg_iterations, cg_damping=cg_damping,
        ls_max_steps=ls_max_steps, ls_backtrack_ratio=ls_backtrack_ratio,
        learn_step_sizes=learn_step_sizes, inner_steps=inner_steps, first_order=first_order,
        analytic_curvature=analytic_curvature, every_step_objective=every_step_objective,
        step_weights=step_weights, lvc=lvc, log_std_shift=log_std_shift,
    )(batch)  # fmt: skip


class TRPOStep:
    """:func:`trpo_meta_step` with its settings bound: ``step(batch)`` runs the three pieces,
    which are also callable one by one (``bench/train_speed.py`` times each).

    Args:
        policy, step_sizes, log_std_shift: as for :func:`trpo_meta_step`.
        gradient: the keyword arguments of :func:`meta_gradient`.
        max_kl, cg_iterations, cg_damping, ls_max_steps, ls_backtrack_ratio: the trust region,
            conjugate gradient and line search settings.
    """

    def __init__(
        self, policy, step_sizes, *, max_kl, cg_iterations, cg_damping, ls_max_steps,
        ls_backtrack_ratio, **gradient,
    ):  # fmt: skip
        self.policy, self.step_sizes, self.gradient_settings = policy, step_sizes, gradient
        self.max_kl = max_kl
        self.cg_iterations, self.cg_damping = cg_iterations, cg_damping
        self.ls_max_steps, self.ls_backtrack_ratio = ls_max_steps, ls_backtrack_ratio

    def meta_gradient(self, batch: MetaBatch) -> MetaGradient:
        return meta_gradient(self.policy, self.step_sizes, batch, **self.gradient_settings)

    def natural_direction(self, g: MetaGradient) -> list:
        return natural_direction(
            g, max_kl=self.max_kl, cg_iterations=self.cg_iterations, cg_damping=self.cg_damping
        )

    def line_search(self, g: MetaGradient, full_step) -> dict:
        return line_search(
            g, full_step, max_kl=self.max_kl, ls_max_steps=self.ls_max_steps,
            ls_backtrack_ratio=self.ls_backtrack_ratio,
        )  # fmt: skip

    def __call__(self, batch: MetaBatch) -> dict:
        g = self.meta_gradient(batch)
        return self.line_search(g, self.natural_direction(g))
