"""Keras 3 policies and their functional (given-weights) form.

The Keras model owns only the meta-parameters θ. Everything the algorithm does runs through the
pure function :func:`gaussian_mlp_forward`, which takes the weights as a list of tensors, either
one set ``[*shape]`` or one set per task ``[tasks, *shape]`` (a batched matmul, so all tasks'
adapted policies run in one computation instead of a loop of Keras calls).

The parameter layout is defined with the numpy half of the policies, in
:mod:`metarl_tf.numpy_policy` (:func:`split_parameters` reads it): for each hidden layer its kernel
and bias, then the output kernel and bias, then, for the Gaussian, the state-independent
``log_std`` (index :data:`LOG_STD`): ``[k_0, b_0, ..., k_out, b_out, log_std]``. The MLP forward
pass over that layout is written once in TensorFlow (:func:`mlp_forward`) and once in numpy
(:func:`numpy_mlp`, re-exported here with the rest of that module); everything else calls them.

Discrete action spaces get :class:`CategoricalMLPPolicy` (same MLP, a ``logits`` head, no
``log_std``). Both policies expose the same distribution interface (``forward`` → distribution
parameters, ``log_prob``, ``kl``, ``entropy``, ``output_fisher``, and the sampler's numpy
``sample_noise`` / ``numpy_act`` / ``numpy_actor``), so the algorithm never branches on the policy type;
:func:`make_policy` picks the class from the action spec.

Actions in an ``EpisodeBatch`` are always float32 ``[..., act_dim]``: a Gaussian policy's raw
(unclipped) action, or, for a categorical policy (``act_dim == 1``), the index of the chosen action
stored as a float (exact for any index below 2**24).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from metarl_tf.numpy_policy import (  # noqa: F401  (the numpy half, re-exported here)
    LOG_STD,
    NUMPY_ACTIVATIONS,
    NumpyActor,
    numpy_categorical_sample,
    numpy_forward,
    numpy_mlp,
    split_parameters,
)
from metarl_tf.specs import action_spec_problem, is_discrete_spec, num_actions

ACTIVATIONS = {"tanh": tf.tanh, "relu": tf.nn.relu}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


class _MLPBase:
    """The MLP both policies share: hidden ``Dense`` layers, a linear head, the parameter list
    in the layout above (``parameters``, ``parameter_names``, ``parameter_shapes``), numpy copies
    and assignment. Subclasses set ``hidden``, their head layer (:meth:`_head`) and the
    parameters after the layers (:meth:`_extra_parameters`)."""

    def _make_hidden(self, hidden_sizes, activation: str) -> None:
        _check_activation(activation)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.activation = activation
        self.hidden = [
            keras.layers.Dense(h, activation=activation, name=f"hidden_{i}")
            for i, h in enumerate(self.hidden_sizes)
        ]

    def _head(self):
        raise NotImplementedError

    def _extra_parameters(self) -> list:
        return []

    def build(self, input_shape):
        shape = input_shape
        for layer in self.hidden:
            layer.build(shape)
            shape = (None, layer.units)
        self._head().build(shape)
        self.built = True

    def _hidden_features(self, observations):
        x = observations
        for layer in self.hidden:
            x = layer(x)
        return x

    @property
    def parameters(self) -> list[keras.Variable]:
        """The meta-parameters θ in the layout of the module docstring."""
        params = []
        for layer in [*self.hidden, self._head()]:
            params += [layer.kernel, layer.bias]
        return [*params, *self._extra_parameters()]

    @property
    def parameter_names(self) -> list[str]:
        names = []
        for layer in [*self.hidden, self._head()]:
            names += [f"{layer.name}/kernel", f"{layer.name}/bias"]
        return [*names, *(v.name for v in self._extra_parameters())]

    @property
    def parameter_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.parameters]

    def get_parameters(self) -> list[np.ndarray]:
        return [np.array(p.numpy()) for p in self.parameters]

    def set_parameters(self, values: Sequence[np.ndarray]) -> None:
        check_parameter_shapes(values, self.parameter_shapes, self.parameter_names)
        for var, value in zip(self.parameters, values, strict=True):
            var.assign(np.asarray(value, np.float32))


@keras.saving.register_keras_serializable(package="metarl_tf")
class GaussianMLPPolicy(_MLPBase, keras.Model):
    """Diagonal Gaussian policy: ``a ~ N(mlp(s), exp(log_std)^2)`` with a state-independent
    ``log_std`` (as in the MAML paper and rllab).

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden_sizes: widths of the hidden layers.
        activation: ``"tanh"`` or ``"relu"``.
        init_log_std: initial value of ``log_std``.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        init_log_std: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.init_log_std = float(init_log_std)
        self._make_hidden(hidden_sizes, activation)
        self.mean_head = keras.layers.Dense(self.act_dim, name="mean")
        self.log_std = self.add_weight(
            shape=(self.act_dim,),
            initializer=keras.initializers.Constant(self.init_log_std),
            name="log_std",
        )
        self.build((None, self.obs_dim))

    def _head(self):
        return self.mean_head

    def _extra_parameters(self) -> list:
        return [self.log_std]

    def call(self, observations):
        mean = self.mean_head(self._hidden_features(observations))
        return mean, tf.broadcast_to(self.log_std, tf.shape(mean))

    def get_config(self):
        return {
            **super().get_config(),
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "hidden_sizes": list(self.hidden_sizes),
            "activation": self.activation,
            "init_log_std": self.init_log_std,
        }

    def forward(self, params, observations):
        """``(mean, log_std)`` of the policy with weights ``params`` (see :func:`gaussian_mlp_forward`)."""
        return gaussian_mlp_forward(params, observations, self.activation)

    # -- the distribution interface shared with CategoricalMLPPolicy --------------------------
    distribution_type = "gaussian"

    def log_prob(self, dist, actions):
        """``log π(a|s)`` ``[...]`` from ``dist = forward(...)`` and ``actions [..., act_dim]``."""
        mean, log_std = dist
        return gaussian_log_prob(mean, log_std, actions)

    def entropy(self, dist):
        """Entropy of ``dist`` ``[...]``."""
        return gaussian_entropy(dist[1])

    def kl(self, dist_p, dist_q):
        """``KL(p || q)`` ``[...]`` of two outputs of ``forward``."""
        return gaussian_kl(dist_p[0], dist_p[1], dist_q[0], dist_q[1])

    def output_fisher(self, dist, tangent):
        """The Hessian of ``KL(dist || ·)`` at ``dist``, in the distribution parameters
        ``(mean, log_std)``, applied to ``tangent``: ``(t_mean / σ², 2 t_log_std)``."""
        _, log_std = dist
        d_mean, d_log_std = tangent
        return d_mean * tf.exp(-2.0 * log_std), 2.0 * d_log_std

    def sample_noise(self, rng: np.random.Generator, lead_shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal noise ``[*lead_shape, act_dim]`` for :meth:`numpy_act`."""
        return rng.standard_normal((*lead_shape, self.act_dim)).astype(np.float32)

    def numpy_actor(self) -> NumpyActor:
        """The numpy action rule (picklable): raw actions ``mean + σ·noise``, or the mean."""
        return NumpyActor("gaussian", self.activation)

    def numpy_act(self, params, observations, noise, deterministic: bool = False) -> np.ndarray:
        """Raw actions ``mean + σ·noise`` (or the mean) in numpy, ``[..., act_dim]`` float32."""
        return self.numpy_actor().act(params, observations, noise, deterministic)


def check_parameter_shapes(values, shapes, names) -> None:
    """Raises ``ValueError`` naming the first parameter whose shape differs."""
    if len(values) != len(shapes):
        raise ValueError(f"expected {len(shapes)} parameter arrays ({names}), got {len(values)}")
    for value, shape, name in zip(values, shapes, names, strict=True):
        if tuple(np.shape(value)) != tuple(shape):
            raise ValueError(
                f"parameter {name!r}: expected shape {list(shape)}, got {list(np.shape(value))}"
            )


def mlp_forward(layers, observations, activation: str = "tanh"):
    """The MLP ``[k_0, b_0, ..., k_out, b_out]`` (hidden activation, linear output) on
    ``observations [..., obs_dim]`` (``[tasks, ..., obs_dim]`` with per-task ``[tasks, ...]``
    weights: one batched matmul). Returns ``[..., out]``."""
    act = ACTIVATIONS[activation]
    batched = len(layers[0].shape) == 3
    obs = tf.convert_to_tensor(observations)
    lead = tf.shape(obs)[:-1]
    if batched:  # [tasks, ..., obs_dim] -> [tasks, N, obs_dim] for a batched matmul
        x = tf.reshape(obs, [tf.shape(obs)[0], -1, obs.shape[-1]])
    else:
        x = tf.reshape(obs, [-1, obs.shape[-1]])
    kernels, biases, _ = split_parameters(layers, has_log_std=False)
    for i, (kernel, bias) in enumerate(zip(kernels, biases, strict=True)):
        x = tf.matmul(x, kernel) + (bias[:, None, :] if batched else bias)
        if i < len(kernels) - 1:
            x = act(x)
    return tf.reshape(x, tf.concat([lead, tf.shape(x)[-1:]], 0))


def gaussian_mlp_forward(params, observations, activation: str = "tanh"):
    """Functional forward pass of :class:`GaussianMLPPolicy`.

    Args:
        params: list ``[k_0, b_0, ..., k_out, b_out, log_std]``; either unbatched (``k_i``
            ``[in, out]``) or with a leading task axis (``k_i`` ``[tasks, in, out]``).
        observations: ``[..., obs_dim]`` unbatched, or ``[tasks, ..., obs_dim]`` batched.

    Returns:
        ``(mean, log_std)``, both ``[..., act_dim]`` (``log_std`` broadcast to ``mean``).
    """
    layers, log_std = params[:LOG_STD], params[LOG_STD]
    batched = len(layers[0].shape) == 3
    mean = mlp_forward(layers, observations, activation)
    if batched:
        extra = len(mean.shape) - 2  # axes between task and action
        log_std = tf.reshape(log_std, [-1] + [1] * extra + [log_std.shape[-1]])
    return mean, tf.broadcast_to(log_std, tf.shape(mean))


def gaussian_log_prob(mean, log_std, actions):
    """``log N(actions; mean, exp(log_std)^2)`` summed over the last (action) axis."""
    z = (actions - mean) * tf.exp(-log_std)
    return tf.reduce_sum(-0.5 * tf.square(z) - log_std - 0.5 * math.log(2.0 * math.pi), axis=-1)


def gaussian_entropy(log_std):
    """Entropy of a diagonal Gaussian, summed over the last axis."""
    return tf.reduce_sum(log_std + 0.5 * math.log(2.0 * math.pi * math.e), axis=-1)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """``KL(N_p || N_q)`` for diagonal Gaussians, summed over the last axis."""
    var_p, var_q = tf.exp(2.0 * log_std_p), tf.exp(2.0 * log_std_q)
    kl = log_std_q - log_std_p + (var_p + tf.square(mean_p - mean_q)) / (2.0 * var_q) - 0.5
    return tf.reduce_sum(kl, axis=-1)


def tile_parameters(params, tasks: int):
    """One copy of every parameter per task: ``[*shape] -> [tasks, *shape]``."""
    return [tf.tile(tf.expand_dims(p, 0), [tasks] + [1] * len(p.shape)) for p in params]


# -- discrete actions -----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="metarl_tf")
class CategoricalMLPPolicy(_MLPBase, keras.Model):
    """Categorical policy over ``num_actions`` discrete actions: ``π(·|s) = softmax(mlp(s))``.

    Same MLP and parameter API as :class:`GaussianMLPPolicy` (``parameters``,
    ``parameter_names``, ``parameter_shapes``, ``forward``); the output layer is ``logits`` and
    there is no ``log_std``. Actions are stored as float32 ``[..., 1]`` holding the action index
    (``act_dim == 1``; see the module docstring).

    Args:
        obs_dim: observation size.
        num_actions: number of discrete actions ``k`` (actions ``0 .. k-1``).
        hidden_sizes: widths of the hidden layers.
        activation: ``"tanh"`` or ``"relu"``.
    """

    distribution_type = "categorical"

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_activation(activation)
        if int(num_actions) < 2:
            raise ValueError(f"num_actions must be >= 2, got {num_actions}")
        self.obs_dim, self.num_actions = int(obs_dim), int(num_actions)
        self.act_dim = 1  # the width of the (float-encoded index) action column
        self._make_hidden(hidden_sizes, activation)
        self.logits_head = keras.layers.Dense(self.num_actions, name="logits")
        self.build((None, self.obs_dim))

    def _head(self):
        return self.logits_head

    def call(self, observations):
        return self.logits_head(self._hidden_features(observations))

    def get_config(self):
        return {
            **super().get_config(),
            "obs_dim": self.obs_dim,
            "num_actions": self.num_actions,
            "hidden_sizes": list(self.hidden_sizes),
            "activation": self.activation,
        }

    def forward(self, params, observations):
        """``logits [..., num_actions]`` with weights ``params`` (unbatched or per task)."""
        return mlp_forward(params, observations, self.activation)

    def log_prob(self, dist, actions):
        """``log π(a|s)`` ``[...]`` from ``logits`` and float-encoded ``actions [..., 1]``."""
        return categorical_log_prob(dist, actions)

    def entropy(self, dist):
        return categorical_entropy(dist)

    def kl(self, dist_p, dist_q):
        return categorical_kl(dist_p, dist_q)

    def output_fisher(self, dist, tangent):
        """The Hessian of ``KL(dist || ·)`` at ``dist`` in logit space, ``diag(p) − ppᵀ``,
        applied to ``tangent`` ``[..., k]``: ``p ⊙ t − p (pᵀt)``."""
        p = tf.nn.softmax(dist)
        return p * tangent - p * tf.reduce_sum(p * tangent, axis=-1, keepdims=True)

    def sample_noise(self, rng: np.random.Generator, lead_shape: tuple[int, ...]) -> np.ndarray:
        """Uniform ``[0, 1)`` numbers ``[*lead_shape]`` for inverse-CDF sampling in :meth:`numpy_act`."""
        return rng.random(lead_shape)

    def numpy_actor(self) -> NumpyActor:
        """The numpy action rule (picklable): action indices by inverse CDF, or the argmax."""
        return NumpyActor("categorical", self.activation)

    def numpy_act(self, params, observations, noise, deterministic: bool = False) -> np.ndarray:
        """Action indices (float32 ``[..., 1]``): the first ``i`` with ``CDF(i) > noise``, or the
        most likely action when ``deterministic``."""
        return self.numpy_actor().act(params, observations, noise, deterministic)


def categorical_log_prob(logits, actions):
    """``log softmax(logits)[a]`` with ``actions [..., 1]`` the float-encoded index ``a``."""
    index = tf.cast(tf.round(actions[..., 0]), tf.int32)
    one_hot = tf.one_hot(index, logits.shape[-1], dtype=logits.dtype)
    return tf.reduce_sum(one_hot * tf.nn.log_softmax(logits), axis=-1)


def categorical_entropy(logits):
    """``−Σ p log p`` over the last axis."""
    return -tf.reduce_sum(tf.nn.softmax(logits) * tf.nn.log_softmax(logits), axis=-1)


def categorical_kl(logits_p, logits_q):
    """``KL(p || q) = Σ p (log p − log q)`` over the last axis."""
    log_p = tf.nn.log_softmax(logits_p)
    return tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(logits_q)), axis=-1)


def make_policy(
    observation_spec,
    action_spec,
    hidden_sizes: Sequence[int] = (64, 64),
    activation: str = "tanh",
    init_log_std: float = 0.0,
):
    """The policy for an action spec: :class:`CategoricalMLPPolicy` for a scalar integer
    ``BoundedTensorSpec((), int, 0, k-1)``, :class:`GaussianMLPPolicy` for a float vector spec
    (``init_log_std`` applies to the Gaussian only)."""
    if len(observation_spec.shape) != 1:
        raise ValueError(f"observation spec must be rank 1 [obs_dim], got {observation_spec.shape}")
    obs_dim = int(observation_spec.shape[0])
    if problem := action_spec_problem(action_spec):
        raise ValueError(problem)
    if is_discrete_spec(action_spec):
        return CategoricalMLPPolicy(obs_dim, num_actions(action_spec), hidden_sizes, activation)
    return GaussianMLPPolicy(
        obs_dim, int(action_spec.shape[0]), hidden_sizes, activation, init_log_std
    )


def policy_from_config(config: dict):
    """Rebuilds a policy from a bundle's ``meta["policy"]["config"]`` (``num_actions`` marks a
    categorical policy)."""
    config = dict(config)
    if "num_actions" in config:
        return CategoricalMLPPolicy(**config)
    return GaussianMLPPolicy(**config)
