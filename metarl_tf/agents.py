"""TF-Agents in and out: a bundle's or an adapted policy as a TF-Agents ``TFPolicy``, and the
``Trajectory`` data TF-Agents drivers collect as the episodes adaptation takes.

    policy = as_tf_agents_policy(bundle)                 # or bundle.adapt(...)
    env = tf_agents_environment(bundle.task_distribution, task, parallel=4)   # metarl_tf.envs
    buffer = TFUniformReplayBuffer(policy.trajectory_spec, batch_size=4, max_length=...)
    DynamicEpisodeDriver(env, policy, [buffer.add_batch], num_episodes=20).run()
    adapted = bundle.adapt(episodes_from_trajectories(buffer.gather_all()))

The policy emits raw (unclipped) samples by default, as the trainer's sampler does: the
policy-gradient loss of the adaptation needs the log-probability of the action actually sampled,
and the environment clips (:class:`metarl_tf.envs.tf_agents_env.TaskPyEnvironment` does; so does
every task distribution's batched environment).

Importing this module imports tf-agents, which builds its networks with the legacy ``tf.keras``
(tf-keras, ``TF_USE_LEGACY_KERAS=1``). TensorFlow reads that variable when ``tf.keras`` is first
used, so it is set below, before TensorFlow is imported; only modules that import tf-agents set
it. Our policies are Keras 3 (``import keras``) and unaffected; nothing here builds a Keras layer.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# isort: split
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from tf_agents.policies import tf_policy
from tf_agents.trajectories import policy_step
from tf_agents.trajectories import time_step as ts

from metarl_tf.bundle import AdaptedPolicy, Bundle
from metarl_tf.policy import gaussian_mlp_forward, mlp_forward


class MetaRLPolicy(tf_policy.TFPolicy):
    """A bundle's meta-initialization or an adapted policy as a TF-Agents policy, with the task
    distribution's ``time_step_spec`` and ``action_spec``.

    ``distribution()`` is a diagonal Gaussian ``N(mean, exp(log_std)²)`` (a
    ``tfp.distributions.MultivariateNormalDiag``) or a ``Categorical`` over the action indices
    (of the action spec's integer dtype); ``action()`` samples it. The weights are variables
    (``variables()``), copied from the source.

    Args:
        source: a :class:`~metarl_tf.bundle.Bundle` or an :class:`~metarl_tf.bundle.AdaptedPolicy`.
        clip: clip actions to the action spec's bounds (TF-Agents' ``clip``). Off by default:
            episodes for adaptation must hold the raw samples (see the module docstring).
    """

    def __init__(self, source: Bundle | AdaptedPolicy, clip: bool = False, name: str | None = None):
        if isinstance(source, Bundle):
            bundle, parameters = source, source.policy.get_parameters()
        elif isinstance(source, AdaptedPolicy):
            bundle, parameters = source.bundle, source.parameters
        else:
            raise TypeError(
                "as_tf_agents_policy takes a bundle (load_bundle(...)) or an adapted policy "
                f"(Bundle.adapt(...)), got {type(source).__name__}"
            )
        dist = bundle.task_distribution
        super().__init__(
            ts.time_step_spec(dist.observation_spec), dist.action_spec, clip=clip, name=name
        )
        self._activation = bundle.meta["policy"]["config"]["activation"]
        self._categorical = bundle.policy.distribution_type == "categorical"
        self._weights = [
            tf.Variable(np.asarray(p, np.float32), trainable=False, name=n.replace("/", "__"))
            for p, n in zip(parameters, bundle.policy.parameter_names, strict=True)
        ]

    def _variables(self):
        return self._weights

    def _distribution(self, time_step, policy_state):
        observation = tf.cast(time_step.observation, tf.float32)
        if self._categorical:
            logits = mlp_forward(self._weights, observation, self._activation)
            dist = tfp.distributions.Categorical(logits=logits, dtype=self.action_spec.dtype)
        else:
            mean, log_std = gaussian_mlp_forward(self._weights, observation, self._activation)
            dist = tfp.distributions.MultivariateNormalDiag(mean, tf.exp(log_std))
        return policy_step.PolicyStep(dist, policy_state, ())


def as_tf_agents_policy(source: Bundle | AdaptedPolicy, clip: bool = False) -> MetaRLPolicy:
    """``source`` as a TF-Agents ``TFPolicy`` usable in TF-Agents drivers (:class:`MetaRLPolicy`);
    ``tf_agents.policies.GreedyPolicy`` of it takes the mean (most likely) action."""
    return MetaRLPolicy(source, clip=clip)


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def episodes_from_trajectories(
    trajectory, keep_incomplete: bool = False
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The episodes in a TF-Agents ``Trajectory`` batch, as :meth:`Bundle.adapt
    <metarl_tf.bundle.Bundle.adapt>`, ``/adapt`` and the client take them.

    An item of a trajectory is the transition out of step ``t``: ``observation`` ``o_t``,
    ``action`` ``a_t``, ``reward`` ``r_t`` and the step types of ``t`` and ``t + 1``. An episode is
    the run of items from a ``FIRST`` step to the item whose ``next_step_type`` is ``LAST``;
    boundary items (``step_type`` ``LAST``, the auto-reset from a last step to the next first
    one) belong to no episode.

    Args:
        trajectory: a ``Trajectory`` with fields ``[B, T, ...]`` (rows are separate environment
            streams, in time order: ``TFUniformReplayBuffer.gather_all()``) or ``[T, ...]``;
            tensors or arrays.
        keep_incomplete: also return episodes cut off by the batch (no ``LAST`` yet at the end
            of a row). By default they are dropped, as are the steps before the first ``FIRST``
            of a row: a partial episode would bias the adaptation toward its first steps.

    Returns:
        ``[(observations [T_e, obs_dim], actions [T_e, act_dim], rewards [T_e]), ...]`` float32,
        row by row in time order; a discrete action (a scalar index) becomes ``[T_e, 1]``.
    """
    step_type = _numpy(trajectory.step_type)
    next_step_type = _numpy(trajectory.next_step_type)
    observation = _numpy(trajectory.observation).astype(np.float32)
    action = _numpy(trajectory.action)
    reward = _numpy(trajectory.reward).astype(np.float32)
    if step_type.ndim == 1:  # one stream [T]: add the batch axis
        step_type, next_step_type, observation, action, reward = (
            x[None] for x in (step_type, next_step_type, observation, action, reward)
        )
    if step_type.ndim != 2 or observation.ndim != 3 or reward.shape != step_type.shape:
        raise ValueError(
            f"expected a Trajectory of [B, T] (or [T]) steps with observations [B, T, obs_dim], "
            f"got step_type {list(step_type.shape)}, observation {list(observation.shape)}, "
            f"reward {list(reward.shape)}"
        )
    if action.ndim == 2:  # discrete scalar actions [B, T] -> float-encoded indices [B, T, 1]
        action = action[..., None]
    action = action.astype(np.float32)
    first, last = ts.StepType.FIRST, ts.StepType.LAST
    episodes = []
    for row in range(step_type.shape[0]):
        start = None  # index of the current episode's first item
        for t in range(step_type.shape[1]):
            if step_type[row, t] == first:
                start = t
            elif step_type[row, t] == last:  # boundary item
                start = None
                continue
            if start is not None and next_step_type[row, t] == last:
                end = t + 1
                episodes.append(
                    (observation[row, start:end], action[row, start:end], reward[row, start:end])
                )
                start = None
        if start is not None and keep_incomplete:
            episodes.append((observation[row, start:], action[row, start:], reward[row, start:]))
    return episodes
