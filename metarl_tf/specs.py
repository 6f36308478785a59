"""Observation and action specs: the contract between environments, policies, bundles and the
exported model (layer 0: imports nothing of this package).

A spec is a core TensorFlow ``tf.TensorSpec`` (observations) or ``BoundedTensorSpec`` (actions;
the bounds are the clipping range). tf-agents' ``tensor_spec.BoundedTensorSpec`` is this same
class, so specs made here pass wherever tf-agents expects one, without importing tf-agents.
TensorFlow is imported on the first spec built, not when this module is imported (environments,
and the processes that step them, do not need it).

Two kinds of action spec are supported:

- continuous: a float vector ``[act_dim]`` (a Gaussian policy);
- discrete: a scalar integer ``BoundedTensorSpec((), int, minimum=0, maximum=k-1)`` (a
  categorical policy over ``k`` actions).

In ``meta.json`` a spec is ``{"shape": [...], "dtype": "float32"}`` plus ``minimum`` and
``maximum`` (broadcast to the shape) when bounded: :func:`spec_to_json`, :func:`spec_from_json`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def tensor_spec(shape, dtype, name: str | None = None):
    """``tf.TensorSpec(shape, dtype, name)``."""
    import tensorflow as tf

    return tf.TensorSpec(shape, tf.as_dtype(dtype), name=name)


def bounded_spec(shape, dtype, minimum, maximum, name: str | None = None):
    """``BoundedTensorSpec(shape, dtype, minimum, maximum, name)`` (TensorFlow's own class, which
    tf-agents re-exports; TensorFlow does not expose it under ``tf.``)."""
    import tensorflow as tf
    from tensorflow.python.framework.tensor_spec import BoundedTensorSpec

    return BoundedTensorSpec(shape, tf.as_dtype(dtype), minimum, maximum, name=name)


def numpy_dtype(spec) -> np.dtype:
    """The spec's dtype as a numpy dtype (a ``tf.DType`` or a numpy dtype alike)."""
    return np.dtype(getattr(spec.dtype, "as_numpy_dtype", spec.dtype))


def is_discrete_spec(spec) -> bool:
    """An integer-typed action spec: discrete actions ``0 .. maximum``."""
    return bool(np.issubdtype(numpy_dtype(spec), np.integer))


def action_spec_problem(spec, what: str = "action spec") -> str | None:
    """What is wrong with an action spec for this package's policies (see the module docstring),
    or ``None`` if it is a supported continuous or discrete spec; ``what`` names it in the
    message."""
    shape = tuple(spec.shape)
    if is_discrete_spec(spec):
        low = np.asarray(getattr(spec, "minimum", None))
        if shape != () or low.size != 1 or np.any(low != 0) or not hasattr(spec, "maximum"):
            return (
                f"a discrete {what} must be a scalar BoundedTensorSpec((), int, minimum=0, "
                f"maximum=k-1), got shape {shape}, minimum {low.tolist()}"
            )
        return None
    if len(shape) != 1:
        return f"a continuous {what} must be rank 1 [act_dim], got shape {shape}"
    return None


def num_actions(spec) -> int:
    """``k`` of a discrete action spec ``BoundedTensorSpec((), int, 0, k-1)``; ``ValueError``
    saying what is wrong for any other spec."""
    problem = action_spec_problem(spec) if is_discrete_spec(spec) else "not a discrete spec"
    if problem:
        raise ValueError(problem)
    return int(np.asarray(spec.maximum)) + 1


def spec_to_json(spec) -> dict[str, Any]:
    """``{"shape", "dtype"}`` and, for a bounded spec, ``minimum``/``maximum`` broadcast to the
    shape (plain lists)."""
    d: dict[str, Any] = {"shape": list(spec.shape), "dtype": numpy_dtype(spec).name}
    if hasattr(spec, "minimum"):
        d["minimum"] = np.broadcast_to(spec.minimum, spec.shape).tolist()
        d["maximum"] = np.broadcast_to(spec.maximum, spec.shape).tolist()
    return d


def spec_from_json(d: dict[str, Any], name: str | None = None):
    """The spec :func:`spec_to_json` wrote: bounded when ``d`` has ``minimum`` and ``maximum``."""
    shape, dtype = tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"])
    if "minimum" in d:
        low = np.asarray(d["minimum"], dtype)
        high = np.asarray(d["maximum"], dtype)
        return bounded_spec(shape, dtype, low, high, name=name)
    return tensor_spec(shape, dtype, name=name)
