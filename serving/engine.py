"""What the endpoints compute, without HTTP: adaptation through the bundle's compiled
:class:`metarl_tf.maml.Adapter` (the trainer's own ``adapt``) and actions from a numpy forward pass.

Adaptation pads every request to fixed sizes so the compiled function is reused: time to the
maximum episode length and the episode count to a bucket (:func:`episode_buckets`). Padding adds only masked steps and masked episodes, which change no loss, baseline or
advantage (``metarl_tf.episodes.pad_episodes``), so the result equals an unpadded ``adapt``.

Actions come from the policy's own numpy sampler (``sample_noise`` and ``numpy_act``, what the
trainer's sampler runs): for one observation a numpy forward pass of the small MLP takes
microseconds, far less than a TensorFlow call. A Gaussian policy's actions are clipped to the
action bounds (the raw sample is returned too); a categorical policy's are integer indices.
``tests/test_serving.py`` and ``tests/test_serving_discrete.py`` check them against the Keras
policy.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from metarl_tf.bundle import AdaptedPolicy, Bundle
from metarl_tf.client_weights import WeightsError, parameters_from_weights, weights_to_json
from metarl_tf.episodes import pad_episodes
from metarl_tf.export import saved_model_archive
from serving.settings import ServiceSettings, SettingsError, unsupported_bundle_reason
from serving.store import PolicyNotFound, PolicyStore, RedisPolicyStore, StoreUnavailable
from serving.validation import RequestError

META_ID = "meta"


@contextlib.contextmanager
def _quiet_retracing_warnings():
    """Hides TensorFlow's "triggered tf.function retracing" warning while warming up."""

    def keep(record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()

    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addFilter(keep)
    try:
        yield
    finally:
        tf_logger.removeFilter(keep)


def episode_buckets(max_episodes: int) -> list[int]:
    """Padded episode counts: 1, 2, 4, then each power of two and 1.5 times it (6, 8, 12, 16, 24,
    32, 48, 64, ...), capped at ``max_episodes`` (itself the last bucket). Padding wastes at most a
    third of a batch; the number of buckets (compilations) grows with the log of the limit."""
    candidates, p = {1, 2}, 4
    while p < max_episodes:
        candidates.update((p, p + p // 2))
        p *= 2
    return sorted({b for b in candidates if b < max_episodes} | {max_episodes})


def _store_unavailable(err: StoreUnavailable) -> RequestError:
    return RequestError(
        f"{err}; the request was not served",
        "service",
        "a retry after Retry-After seconds (the policy store is back)",
        status=503,
    )


@dataclass
class AdaptOutcome:
    """Result of :meth:`AdaptationEngine.adapt`.

    Attributes:
        policy_id: the stored policy's id.
        parent: the id it was adapted from.
        steps: inner steps taken.
        parameters: adapted weights, unbatched ``[*shape]`` float32, canonical order.
        inner_losses: ``[steps]`` inner loss before each step.
        num_episodes, num_transitions: size of the submitted data.
    """

    policy_id: str
    parent: str
    steps: int
    parameters: list[np.ndarray]
    inner_losses: list[float]
    num_episodes: int
    num_transitions: int


class AdaptationEngine:
    """Holds a bundle, its compiled adapter, the meta-parameters and the store of adapted policies.

    Args:
        bundle: the loaded bundle.
        settings: limits and store configuration.
    """

    def __init__(self, bundle: Bundle, settings: ServiceSettings):
        self.bundle, self.settings = bundle, settings
        meta = bundle.meta
        reason = unsupported_bundle_reason(meta)
        if reason:
            raise SettingsError(f"bundle {bundle.name!r}: {reason}")
        self.policy = bundle.policy
        self.obs_dim = int(meta["observation_spec"]["shape"][0])
        action_spec = meta["action_spec"]
        # A scalar integer action spec: a categorical policy, actions are indices.
        self.discrete = len(action_spec["shape"]) == 0
        # Width of an episode's actions as the adapter takes them: a categorical action is its
        # index as a float, [T, 1].
        self.act_dim = 1 if self.discrete else int(action_spec["shape"][0])
        self.action_low = np.asarray(action_spec["minimum"], np.float32)
        self.action_high = np.asarray(action_spec["maximum"], np.float32)
        self.num_actions = (
            int(action_spec["maximum"]) - int(action_spec["minimum"]) + 1 if self.discrete else None
        )
        self.action_range = (
            (int(action_spec["minimum"]), int(action_spec["maximum"])) if self.discrete else None
        )
        self.parameter_names = list(bundle.policy.parameter_names)
        self.parameter_shapes = [list(s) for s in bundle.policy.parameter_shapes]
        horizon = bundle.horizon
        self.max_episode_length = min(settings.max_episode_length or horizon, horizon)
        # A bundle with a log σ shift (train --log-std-shift) takes one step per batch: its
        # later steps expect episodes of the adapted policy, not of the exploring one.
        self.step_rule = bundle.step_rule
        self.default_steps = bundle.default_steps
        self.buckets = episode_buckets(settings.max_episodes)
        self.meta_parameters = bundle.policy.get_parameters()
        self.adapter = bundle.make_adapter()
        # The adapter's input for parent "meta", converted once instead of per request.
        self._meta_tensors = [tf.constant(p) for p in self.meta_parameters]
        if settings.store_url:
            self.store = RedisPolicyStore(settings.store_url, bundle.checksum, settings.store_ttl_s)
        else:
            self.store = PolicyStore(settings.store_size, settings.store_ttl_s)
        self.shared_store = settings.store_url is not None
        self._rng = np.random.default_rng()
        self._rng_lock = threading.Lock()
        self.ready = False
        self.warmup: dict[str, Any] = {"done": False, "compiled": [], "seconds": None}

    # -- warm-up -------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compiles the adapter for every episode bucket and each warm-up step count, then sets
        :attr:`ready` (what ``/readyz`` reports)."""
        start = time.perf_counter()
        # The configured step counts within the limit, else what a request without `steps` gets.
        max_steps = self.settings.max_steps
        wanted = {s for s in self.settings.warmup_steps if s <= max_steps}
        steps_list = sorted(wanted or {min(self.default_steps, max_steps)})
        rng = np.random.default_rng(0)
        length = self.max_episode_length
        actions = (
            rng.integers(0, self.num_actions, (length, 1))
            if self.discrete
            else rng.normal(size=(length, self.act_dim))
        )
        episode = (
            rng.normal(size=(length, self.obs_dim)).astype(np.float32),
            actions.astype(np.float32),
            rng.normal(size=length).astype(np.float32),
        )
        with _quiet_retracing_warnings():  # one trace per bucket is the point here
            for bucket in self.buckets:
                batch = pad_episodes([episode], length=length, num_episodes=bucket)
                for steps in steps_list:
                    params, _, _ = self.adapter(self.meta_parameters, batch, steps)
                    stored = [p.numpy()[0] for p in params]  # unbatched, as in the store
                    self.warmup["compiled"].append([bucket, steps])
                    # and adapting a stored policy further (its depth clamped, Adapter)
                    for depth in range(1, self.adapter.last_distinct_step + 1):
                        self.adapter(stored, batch, steps, first_step=depth)[0][0].numpy()
        self.numpy_act(self.meta_parameters, np.zeros((1, self.obs_dim), np.float32), True, None)
        self.warmup.update(done=True, seconds=round(time.perf_counter() - start, 3))
        # Move everything alive now (TensorFlow, Keras, the bundle: millions of objects) out of
        # the collector's reach, so the full collections that request garbage triggers stay short.
        gc.collect()
        gc.freeze()
        self.ready = True

    def tracing_count(self) -> int:
        """How many times the adapter's ``tf.function`` has been traced (constant once warm)."""
        return self.adapter.tracing_count

    # -- policies ------------------------------------------------------------------------------

    def lookup(self, policy_id: str, field: str = "policy_id") -> list[np.ndarray]:
        """Weights of ``"meta"`` or a stored policy; unknown/expired ids raise a 404."""
        if policy_id == META_ID:
            return self.meta_parameters
        return self.lookup_stored(policy_id, field).parameters

    def lookup_stored(self, policy_id: str, field: str = "policy_id"):
        """The stored policy (weights and depth); unknown/expired ids raise a 404."""
        try:
            return self.store.get(policy_id)
        except PolicyNotFound as err:
            raise RequestError(
                err.reason, field, "'meta' or a live policy_id returned by /adapt", status=404
            ) from None
        except StoreUnavailable as err:
            raise _store_unavailable(err) from None

    def parameters_from_weights(self, weights: Any, field: str = "weights") -> list[np.ndarray]:
        """Inline weights ``{name: nested list}`` -> checked float32 arrays (400 naming the
        parameter otherwise)."""
        try:
            return parameters_from_weights(weights, self.parameter_names, self.parameter_shapes)
        except WeightsError as err:
            where = f"{field}.{err.name}" if err.name else field
            raise RequestError(str(err), where, err.expected) from None

    def weights_json(self, parameters: list[np.ndarray]) -> dict[str, list]:
        return weights_to_json(parameters, self.parameter_names)

    # -- endpoints' work -----------------------------------------------------------------------

    def adapt(
        self,
        episodes: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
        steps: int,
        parent: str = META_ID,
    ) -> AdaptOutcome:
        """``steps`` inner steps from ``parent`` on one task's (already checked) episodes."""
        if parent == META_ID:
            start_params, depth = self._meta_tensors, 0
        else:
            stored = self.lookup_stored(parent, "parent")
            start_params, depth = stored.parameters, stored.extra.get("depth", 0)
        if self.step_rule.needs_adapted_episodes(depth, steps):
            raise RequestError(
                f"this bundle explores with its own noise before adaptation (a log σ shift is "
                f"added by the first inner step), so its later steps need episodes collected by "
                f"the adapted policy: {steps} steps on episodes of 'meta' would adapt on the "
                "wrong noise; adapt with steps 1, collect episodes with the returned policy_id, "
                "and call /adapt again with parent=<that policy_id>",
                "steps",
                "1 when parent is 'meta' (then one /adapt per batch, passing parent)",
                status=422,
            )
        bucket = next(b for b in self.buckets if b >= len(episodes))
        batch = pad_episodes(episodes, length=self.max_episode_length, num_episodes=bucket)
        # depth: the inner steps the parent took from the meta-initialization, so that per-step
        # step sizes and a log σ shift apply as in training (metarl_tf.maml.adapt's first_step)
        params, losses, _ = self.adapter(start_params, batch, steps, first_step=depth)
        adapted = [p.numpy()[0] for p in params]
        losses = np.asarray(losses)[:, 0]
        if not (np.isfinite(losses).all() and all(np.isfinite(p).all() for p in adapted)):
            raise RequestError(
                "adaptation produced NaN or inf (the inner loss or the adapted weights); the "
                "submitted rewards or observations are probably of an extreme scale",
                "episodes",
                "rewards and observations of the scale the bundle was trained on",
                status=422,
            )
        try:
            stored = self.store.add(
                adapted, parent=parent, steps=steps, depth=depth + steps,
                num_episodes=len(episodes),
                num_transitions=int(sum(len(r) for _, _, r in episodes)),
                inner_losses=[float(x) for x in losses],
            )  # fmt: skip
        except StoreUnavailable as err:
            raise _store_unavailable(err) from None
        return AdaptOutcome(
            stored.policy_id,
            parent,
            steps,
            adapted,
            [float(x) for x in losses],
            len(episodes),
            stored.extra["num_transitions"],
        )

    def export_archive(self, policy_id: str) -> bytes:
        """``"meta"`` or a stored policy as a SavedModel ``.tar.gz``
        (:func:`metarl_tf.export.saved_model_archive`), with the stored policy's provenance;
        unknown/expired ids raise a 404."""
        if policy_id == META_ID:
            return saved_model_archive(self.bundle)
        stored = self.lookup_stored(policy_id)
        extra = stored.extra  # what adapt() stored with the weights; -1: a store without it
        adapted = AdaptedPolicy(
            bundle=self.bundle,
            parameters=stored.parameters,
            parent=stored.parent,
            steps=stored.steps,
            depth=extra.get("depth", -1),
            num_episodes=extra.get("num_episodes", -1),
            num_transitions=extra.get("num_transitions", -1),
            inner_losses=extra.get("inner_losses", []),
            policy_id=policy_id,
        )
        return saved_model_archive(adapted)

    def numpy_act(
        self,
        parameters: list[np.ndarray],
        observations: np.ndarray,
        deterministic: bool,
        seed: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(actions, raw actions)`` for ``observations [N, obs_dim]``, drawn by the policy's own
        sampler (``policy.sample_noise`` then ``policy.numpy_act``, as the trainer samples).

        The noise comes from ``numpy.random.default_rng(seed)`` (a fresh stream without a seed):
        ``policy.sample_noise(rng, (N,))``, standard normal ``[N, act_dim]`` for a Gaussian
        policy, uniform ``[N]`` for a categorical one (inverse-CDF sampling).

        Gaussian: raw actions ``[N, act_dim]`` are the mean (deterministic) or ``mean + σ·noise``;
        actions are them clipped to the action bounds. Record the raw actions in episodes posted to
        ``/adapt``, as the trainer's sampler does: the policy-gradient loss uses the
        log-probability of the sampled action, and the environment does the clipping.
        Categorical: actions ``[N]`` are int64 indices (the most likely one when deterministic),
        offset by the spec's minimum; raw actions are the same.
        """
        if deterministic:
            noise = None
        elif seed is None:
            with self._rng_lock:
                noise = self.policy.sample_noise(self._rng, (len(observations),))
        else:
            noise = self.policy.sample_noise(np.random.default_rng(seed), (len(observations),))
        raw = self.policy.numpy_act(parameters, observations, noise, deterministic)
        if self.discrete:
            index = raw[..., 0].astype(np.int64) + int(self.action_low)
            return index, index
        return np.clip(raw, self.action_low, self.action_high), raw

    def metadata(self) -> dict[str, Any]:
        meta = self.bundle.meta
        return {
            "name": self.bundle.name,
            "bundle": {
                "format_version": meta.get("format_version"),
                "created": meta.get("created"),
                "sha256": meta.get("files", {}),
                "training": meta.get("training", {}),
            },
            "task_distribution": meta["task_distribution"],
            "observation_spec": meta["observation_spec"],
            "action_spec": meta["action_spec"],
            "actions": (
                {"kind": "discrete", "num_actions": self.num_actions}
                if self.discrete
                else {"kind": "continuous", "act_dim": self.act_dim}
            ),
            "policy": {
                "class": meta["policy"].get("class"),
                "config": meta["policy"]["config"],
                "parameter_names": self.parameter_names,
                "parameter_shapes": self.parameter_shapes,
            },
            "adaptation": {
                "default_steps": min(self.default_steps, self.settings.max_steps),
                "gamma": meta["adaptation"].get("gamma"),
                "gae_lambda": meta["adaptation"].get("gae_lambda"),
                "baseline": meta["adaptation"].get("baseline"),
                "learned_step_sizes": self.bundle.learned_step_sizes,
                "step_size": None if self.bundle.learned_step_sizes else self.bundle.step_sizes,
            },
            "limits": {
                "max_episodes": self.settings.max_episodes,
                "max_episode_length": self.max_episode_length,
                "max_steps": self.settings.max_steps,
                "max_observations": self.settings.max_observations,
                "max_body_bytes": self.settings.max_body_bytes,
            },
            "store": self.store.stats(),
            "episode_buckets": self.buckets,
            "ready": self.ready,
            "warmup": {**self.warmup, "tracing_count": self.tracing_count()},
            "settings": {**self.settings.to_json(), "bundle": self.bundle.name},
        }
