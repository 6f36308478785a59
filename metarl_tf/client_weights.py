"""Policy weights as named arrays (the service's JSON form) and back to a local Keras policy.

The adaptation service returns adapted weights as ``{parameter name: nested list}`` in the
bundle's canonical order (``GaussianMLPPolicy.parameter_names``), e.g.::

    {"hidden_0/kernel": [[...], ...], "hidden_0/bias": [...], ..., "log_std": [...]}

:func:`policy_from_weights` turns that into a :class:`~metarl_tf.policy.GaussianMLPPolicy` whose
forward pass equals the service's. The array helpers import no TensorFlow; only building the Keras
policy does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class WeightsError(ValueError):
    """Named weights do not fit the policy.

    Attributes:
        name: the offending parameter name (``None`` when the problem is the set of names).
        expected: what was expected, in words.
    """

    def __init__(self, message: str, name: str | None, expected: str):
        super().__init__(message)
        self.name, self.expected = name, expected


def weights_to_json(parameters: Sequence[Any], names: Sequence[str]) -> dict[str, list]:
    """``{name: nested list}`` of float32 values (exact: a float32 printed by JSON reads back
    to the same float32)."""
    return {n: np.asarray(p, np.float32).tolist() for n, p in zip(names, parameters, strict=True)}


def parameters_from_weights(
    weights: Mapping[str, Any],
    names: Sequence[str],
    shapes: Sequence[Sequence[int]],
) -> list[np.ndarray]:
    """Named arrays -> float32 arrays in canonical order, checked.

    Raises:
        WeightsError: a name is missing or unknown, an array has the wrong shape, is ragged,
            is not numeric, or holds NaN/inf. The error names the parameter and the expectation.
    """
    if not isinstance(weights, Mapping):
        raise WeightsError(
            f"weights must be an object of named arrays, got {type(weights).__name__}",
            None,
            f"an object with keys {list(names)}",
        )
    unknown = [k for k in weights if k not in names]
    if unknown:
        raise WeightsError(
            f"unknown parameter name(s) {unknown}", unknown[0], f"one of {list(names)}"
        )
    missing = [n for n in names if n not in weights]
    if missing:
        raise WeightsError(f"missing parameter(s) {missing}", missing[0], f"all of {list(names)}")
    arrays = []
    for name, shape in zip(names, shapes, strict=True):
        expected = f"a float array of shape {list(shape)}"
        try:
            a = np.asarray(weights[name], dtype=np.float32)
        except (ValueError, TypeError):
            raise WeightsError(
                f"parameter {name!r} is ragged or not numeric", name, expected
            ) from None
        if tuple(a.shape) != tuple(shape):
            raise WeightsError(
                f"parameter {name!r} has shape {list(a.shape)}, expected {list(shape)}",
                name,
                expected,
            )
        if not np.all(np.isfinite(a)):
            raise WeightsError(f"parameter {name!r} holds NaN or inf", name, "finite numbers")
        arrays.append(a)
    return arrays


def policy_from_weights(weights: Mapping[str, Any], policy_config: Mapping[str, Any]):
    """A local Keras policy (:class:`~metarl_tf.policy.GaussianMLPPolicy`, or
    :class:`~metarl_tf.policy.CategoricalMLPPolicy` for a discrete bundle) holding ``weights``.

    Args:
        weights: ``{name: array}`` as returned by the service (``/adapt`` with
            ``return_weights``), or by :func:`weights_to_json`.
        policy_config: the policy's constructor arguments: ``/metadata``'s ``policy.config``
            or a bundle's ``meta["policy"]["config"]`` (``obs_dim``, ``act_dim``,
            ``hidden_sizes``, ``activation``, ``init_log_std``; ``num_actions`` instead of
            ``act_dim``/``init_log_std`` for a categorical policy).
    """
    from metarl_tf.policy import policy_from_config

    policy = policy_from_config(policy_config)
    policy.set_parameters(
        parameters_from_weights(weights, policy.parameter_names, policy.parameter_shapes)
    )
    return policy
