"""The policies' inference in numpy, without TensorFlow: the parameter layout, the MLP forward
pass and the sampling of actions from observations and pre-drawn noise.

:mod:`metarl_tf.policy` builds its Keras models on this layout and re-exports these functions;
this module stays importable where TensorFlow is not wanted: a Ray actor running whole rollouts
(:mod:`metarl_tf.envs.ray_backend`) unpickles a :class:`NumpyActor` and imports only numpy.

The parameter layout: for each hidden layer its kernel and bias, then the output kernel and bias,
then, for the Gaussian, the state-independent ``log_std`` (index :data:`LOG_STD`):
``[k_0, b_0, ..., k_out, b_out, log_std]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LOG_STD = -1  # index of a Gaussian policy's log_std in its parameter list

# (x, out=) -> act(x), in place when out is x: the sampler calls these every step
NUMPY_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda x, out: np.maximum(x, 0.0, out=out)}


def split_parameters(params, has_log_std: bool = True):
    """``(kernels, biases, log_std)`` of a parameter list in the layout above (``log_std`` is
    ``None`` without one); works on any per-parameter list (weights, tangents, gradients)."""
    params = list(params)
    layers, log_std = (params[:LOG_STD], params[LOG_STD]) if has_log_std else (params, None)
    return layers[0::2], layers[1::2], log_std


def numpy_mlp(layers, observations, activation: str = "tanh") -> np.ndarray:
    """:func:`metarl_tf.policy.mlp_forward` in numpy (``[N, obs_dim]``, or
    ``[tasks, N, obs_dim]`` with per-task weights); float32."""
    act = NUMPY_ACTIVATIONS[activation]
    batched = np.ndim(layers[0]) == 3
    x = np.asarray(observations, np.float32)
    kernels, biases, _ = split_parameters(layers, has_log_std=False)
    for i, (kernel, bias) in enumerate(zip(kernels, biases, strict=True)):
        x = np.matmul(x, kernel)  # a new array: the in-place ops below write to it
        x += bias[:, None, :] if batched else bias
        if i < len(kernels) - 1:
            act(x, out=x)
    return x


def numpy_forward(params, observations, activation: str = "tanh"):
    """:func:`metarl_tf.policy.gaussian_mlp_forward` in numpy, for inference where a TensorFlow
    call's fixed overhead (~1 ms) would dominate: the sampler's per-step action and the
    service's ``/act``.

    Args:
        params: numpy arrays, unbatched ``[*shape]`` or per task ``[tasks, *shape]``.
        observations: ``[N, obs_dim]`` unbatched, or ``[tasks, N, obs_dim]`` batched.

    Returns:
        ``(mean, log_std)`` broadcast to ``[..., act_dim]``, float32.
    """
    layers, log_std = params[:LOG_STD], params[LOG_STD]
    batched = np.ndim(layers[0]) == 3
    x = numpy_mlp(layers, observations, activation)
    log_std = np.asarray(log_std)[:, None, :] if batched else log_std
    return x, np.broadcast_to(log_std, x.shape)


def numpy_categorical_sample(logits, uniform) -> np.ndarray:
    """Inverse-CDF sampling: ``logits [..., k]``, ``uniform [...]`` in ``[0, 1)`` -> int64 ``[...]``."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    cdf /= cdf[..., -1:]
    index = np.sum(cdf <= np.asarray(uniform)[..., None], axis=-1)
    return np.minimum(index, z.shape[-1] - 1)


@dataclass(frozen=True)
class NumpyActor:
    """A policy's action rule in numpy (``policy.numpy_actor()``): small and picklable, so a
    sampling worker in another process computes the same actions as this one.

    Attributes:
        distribution: ``"gaussian"`` (raw actions ``mean + σ·noise``) or ``"categorical"``
            (action indices by inverse CDF, float-encoded ``[..., 1]``).
        activation: the MLP's hidden activation.
    """

    distribution: str
    activation: str

    def __post_init__(self):
        if self.distribution not in ("gaussian", "categorical"):
            raise ValueError(f"unknown distribution {self.distribution!r}")
        if self.activation not in NUMPY_ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")

    @property
    def discrete(self) -> bool:
        """Its actions are float-encoded indices (the env takes integers)."""
        return self.distribution == "categorical"

    def act(self, params, observations, noise, deterministic: bool = False) -> np.ndarray:
        """Actions ``[..., act_dim]`` float32 from observations and the policy's noise (the mean,
        or the most likely action, when ``deterministic``)."""
        if self.distribution == "gaussian":
            mean, log_std = numpy_forward(params, observations, self.activation)
            if deterministic:
                return mean
            return mean + np.exp(log_std) * noise
        logits = numpy_mlp(params, observations, self.activation)
        if deterministic:
            index = np.argmax(logits, axis=-1)
        else:
            index = numpy_categorical_sample(logits, noise)
        return index[..., None].astype(np.float32)

    def stepper(
        self, params, noise: np.ndarray, episodes_per_task: int, deterministic: bool = False
    ) -> Callable[[int, np.ndarray], np.ndarray]:
        """``(t, observations [tasks * episodes, obs_dim]) -> actions [tasks * episodes, act_dim]``
        for a task-major batch: per-task weights ``params`` (``[tasks, *shape]``) and the noise
        of every step ``noise [horizon, tasks, episodes, ...]``."""
        tasks = noise.shape[1]

        def step(t: int, observations: np.ndarray) -> np.ndarray:
            obs = observations.reshape(tasks, episodes_per_task, -1)
            actions = self.act(params, obs, noise[t], deterministic)
            return actions.reshape(tasks * episodes_per_task, -1)

        return step
