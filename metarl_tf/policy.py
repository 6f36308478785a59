"""Keras 3 policies and their functional (given-weights) form.

The Keras model owns only the meta-parameters θ. Everything the algorithm does runs through the
pure function :func:`gaussian_mlp_forward`, which takes the weights as a list of tensors, either
one set ``[*shape]`` or one set per task ``[tasks, *shape]`` (a batched matmul, so all tasks'
adapted policies run in one computation instead of a loop of Keras calls).

Parameter order (``GaussianMLPPolicy.parameter_names``): for each hidden layer its kernel and bias,
then the output kernel and bias, then the state-independent ``log_std``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

ACTIVATIONS = {"tanh": tf.tanh, "relu": tf.nn.relu}


@keras.saving.register_keras_serializable(package="metarl_tf")
class GaussianMLPPolicy(keras.Model):
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
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.activation = activation
        self.init_log_std = float(init_log_std)
        self.hidden = [
            keras.layers.Dense(h, activation=activation, name=f"hidden_{i}")
            for i, h in enumerate(self.hidden_sizes)
        ]
        self.mean_head = keras.layers.Dense(self.act_dim, name="mean")
        self.log_std = self.add_weight(
            shape=(self.act_dim,),
            initializer=keras.initializers.Constant(self.init_log_std),
            name="log_std",
        )
        self.build((None, self.obs_dim))

    def build(self, input_shape):
        shape = input_shape
        for layer in self.hidden:
            layer.build(shape)
            shape = (None, layer.units)
        self.mean_head.build(shape)
        self.built = True

    def call(self, observations):
        x = observations
        for layer in self.hidden:
            x = layer(x)
        mean = self.mean_head(x)
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

    @property
    def parameters(self) -> list[keras.Variable]:
        """The meta-parameters θ in the canonical order (see module docstring)."""
        params = []
        for layer in [*self.hidden, self.mean_head]:
            params += [layer.kernel, layer.bias]
        return [*params, self.log_std]

    @property
    def parameter_names(self) -> list[str]:
        names = []
        for layer in [*self.hidden, self.mean_head]:
            names += [f"{layer.name}/kernel", f"{layer.name}/bias"]
        return [*names, "log_std"]

    @property
    def parameter_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.parameters]

    def get_parameters(self) -> list[np.ndarray]:
        return [np.array(p.numpy()) for p in self.parameters]

    def set_parameters(self, values: Sequence[np.ndarray]) -> None:
        check_parameter_shapes(values, self.parameter_shapes, self.parameter_names)
        for var, value in zip(self.parameters, values, strict=True):
            var.assign(np.asarray(value, np.float32))

    def forward(self, params, observations):
        """``(mean, log_std)`` of the policy with weights ``params`` (see :func:`gaussian_mlp_forward`)."""
        return gaussian_mlp_forward(params, observations, self.activation)


def check_parameter_shapes(values, shapes, names) -> None:
    """Raises ``ValueError`` naming the first parameter whose shape differs."""
    if len(values) != len(shapes):
        raise ValueError(f"expected {len(shapes)} parameter arrays ({names}), got {len(values)}")
    for value, shape, name in zip(values, shapes, names, strict=True):
        if tuple(np.shape(value)) != tuple(shape):
            raise ValueError(
                f"parameter {name!r}: expected shape {list(shape)}, got {list(np.shape(value))}"
            )


def gaussian_mlp_forward(params, observations, activation: str = "tanh"):
    """Functional forward pass of :class:`GaussianMLPPolicy`.

    Args:
        params: list ``[k_0, b_0, ..., k_out, b_out, log_std]``; either unbatched (``k_i``
            ``[in, out]``) or with a leading task axis (``k_i`` ``[tasks, in, out]``).
        observations: ``[..., obs_dim]`` unbatched, or ``[tasks, ..., obs_dim]`` batched.

    Returns:
        ``(mean, log_std)``, both ``[..., act_dim]`` (``log_std`` broadcast to ``mean``).
    """
    act = ACTIVATIONS[activation]
    *layers, log_std = params
    batched = len(layers[0].shape) == 3
    obs = tf.convert_to_tensor(observations)
    lead = tf.shape(obs)[:-1]
    if batched:  # [tasks, ..., obs_dim] -> [tasks, N, obs_dim] for a batched matmul
        x = tf.reshape(obs, [tf.shape(obs)[0], -1, obs.shape[-1]])
    else:
        x = tf.reshape(obs, [-1, obs.shape[-1]])
    n_layers = len(layers) // 2
    for i in range(n_layers):
        kernel, bias = layers[2 * i], layers[2 * i + 1]
        x = tf.matmul(x, kernel) + (bias[:, None, :] if batched else bias)
        if i < n_layers - 1:
            x = act(x)
    mean = tf.reshape(x, tf.concat([lead, tf.shape(x)[-1:]], 0))
    if batched:
        extra = len(mean.shape) - 2  # axes between task and action
        log_std = tf.reshape(log_std, [-1] + [1] * extra + [log_std.shape[-1]])
    return mean, tf.broadcast_to(log_std, tf.shape(mean))


NUMPY_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0)}


def numpy_forward(params, observations, activation: str = "tanh"):
    """:func:`gaussian_mlp_forward` in numpy, for inference where a TensorFlow call's fixed
    overhead (~1 ms) would dominate: the sampler's per-step action and the service's ``/act``.

    Args:
        params: numpy arrays, unbatched ``[*shape]`` or per task ``[tasks, *shape]``.
        observations: ``[N, obs_dim]`` unbatched, or ``[tasks, N, obs_dim]`` batched.

    Returns:
        ``(mean, log_std)`` broadcast to ``[..., act_dim]``, float32.
    """
    act = NUMPY_ACTIVATIONS[activation]
    *layers, log_std = params
    batched = np.ndim(layers[0]) == 3
    x = np.asarray(observations, np.float32)
    n_layers = len(layers) // 2
    for i in range(n_layers):
        bias = layers[2 * i + 1]
        x = np.matmul(x, layers[2 * i]) + (bias[:, None, :] if batched else bias)
        if i < n_layers - 1:
            x = act(x)
    log_std = np.asarray(log_std)[:, None, :] if batched else log_std
    return x, np.broadcast_to(log_std, x.shape)


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
