"""Request checking: every bad input becomes a :class:`RequestError`, answered as a 4xx JSON body
``{"error": ..., "field": ..., "expected": ...}`` (never a 500).

Pydantic (through BentoML) already checked the JSON types (numbers, lists, objects); this module
checks what types cannot express: shapes against the bundle's specs, equal lengths within an
episode, finiteness, and the configured limits. Field paths look like ``episodes[2].actions[5]``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class RequestError(Exception):
    """A request the service refuses, with what to fix.

    Attributes:
        status: the HTTP status (400 bad input, 404 unknown policy, 413 too large, 503 not ready).
        error: what is wrong.
        field: the request field, e.g. ``episodes[2].actions``.
        expected: what the field should hold.
    """

    def __init__(self, error: str, field: str, expected: str, status: int = 400):
        super().__init__(error)
        self.status, self.error, self.field, self.expected = status, error, field, expected

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "field": self.field, "expected": self.expected}


_PACKED_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


def _packed(value: Any) -> tuple[Any, Any, Any] | None:
    """``(data, shape, dtype)`` of a packed array (``schemas.PackedArray`` or its dict), else
    ``None`` (the value is in the nested-list form)."""
    if isinstance(value, dict):
        return (
            (value["data"], value.get("shape"), value.get("dtype", "float32"))
            if ("data" in value)
            else None
        )
    data = getattr(value, "data", None)
    return (
        (data, getattr(value, "shape", None), getattr(value, "dtype", None))
        if (isinstance(data, str))
        else None
    )


def _num_rows(value: Any) -> int | None:
    """Leading dimension of a nested list or a packed array, ``None`` if neither."""
    if isinstance(value, (list, tuple)):
        return len(value)
    packed = _packed(value)
    if packed is not None and isinstance(packed[1], list) and packed[1]:
        rows = packed[1][0]
        return rows if isinstance(rows, int) else None
    return None


def _unpack(packed: tuple[Any, Any, Any], width: int | None, field: str) -> np.ndarray:
    """A packed array as float32, shape ``[n, width]`` (``[n]`` when ``width`` is ``None``)."""
    data, shape, dtype = packed
    want = "[n]" if width is None else f"[n, {width}]"
    expected = f"a PackedArray of shape {want}: base64 of n x {width or 1} little-endian floats"
    if dtype not in _PACKED_DTYPES:
        raise RequestError(
            f"{field}.dtype is {dtype!r}", f"{field}.dtype", "'float32' or 'float64'"
        )
    rank = 1 if width is None else 2
    if (
        not isinstance(shape, list)
        or len(shape) != rank
        or not all(isinstance(n, int) and n >= 0 for n in shape)
        or (width is not None and shape[1] != width)
    ):
        raise RequestError(f"{field}.shape is {shape}, expected {want}", f"{field}.shape", expected)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}.data is not valid base64", f"{field}.data", expected) from None
    itemsize = _PACKED_DTYPES[dtype].itemsize
    if len(raw) != math.prod(shape) * itemsize:
        raise RequestError(
            f"{field}.data holds {len(raw)} bytes; shape {shape} of {dtype} needs "
            f"{math.prod(shape) * itemsize}",
            f"{field}.data",
            expected,
        )
    with np.errstate(over="ignore"):  # float64 beyond float32's range: reported as inf later
        return np.frombuffer(raw, _PACKED_DTYPES[dtype]).astype(np.float32).reshape(shape)


def _matrix(
    rows: Any, width: int, field: str, what: str, max_rows: int | None = None
) -> np.ndarray:
    """``rows`` (a list of equal-length number lists, or a packed array) as a float32
    ``[n, width]`` array."""
    expected = f"a list of {what}, each a list of {width} finite numbers"
    packed = _packed(rows)
    if packed is not None:
        n = _num_rows(rows)
        if max_rows is not None and n is not None and n > max_rows:
            raise RequestError(
                f"{field} has {n} rows, more than the limit of {max_rows}",
                field,
                f"at most {max_rows} rows",
                status=413,
            )
        array = _unpack(packed, width, field)
        if len(array) == 0:
            raise RequestError(f"{field} is empty", field, expected + " (at least one)")
        _check_finite(array, field, expected)
        return array
    if not isinstance(rows, (list, tuple)) or len(rows) == 0:
        raise RequestError(f"{field} is empty", field, expected + " (at least one)")
    if max_rows is not None and len(rows) > max_rows:
        raise RequestError(
            f"{field} has {len(rows)} rows, more than the limit of {max_rows}",
            field,
            f"at most {max_rows} rows",
            status=413,
        )
    array = None
    try:
        if set(map(len, rows)) == {width}:  # rectangular: a flat copy is the fastest conversion
            flat = itertools.chain.from_iterable(rows)
            with np.errstate(over="ignore"):  # overflow to inf is reported by _check_finite
                array = np.fromiter(flat, np.float32, count=len(rows) * width)
            array = array.reshape(-1, width)
    except (ValueError, TypeError):  # a row that is not a list, or a value that is not a number
        array = None
    if array is None:
        for i, row in enumerate(rows):
            if not isinstance(row, (list, tuple)) or len(row) != width:
                got = f"{len(row)} values" if isinstance(row, (list, tuple)) else type(row).__name__
                raise RequestError(
                    f"{field}[{i}] holds {got}, expected a list of {width} numbers",
                    f"{field}[{i}]",
                    expected,
                )
        raise RequestError(f"{field} is not a list of number lists", field, expected)
    _check_finite(array, field, expected)
    return array


def _vector(values: Any, field: str, length: int) -> np.ndarray:
    expected = f"a list of {length} finite numbers (one per observation)"
    packed = _packed(values)
    if packed is not None:
        array = _unpack(packed, None, field)
        if len(array) != length:
            raise RequestError(
                f"{field} has {len(array)} values but the episode has {length} observations",
                field,
                expected,
            )
        _check_finite(array, field, expected)
        return array
    if not isinstance(values, (list, tuple)):
        raise RequestError(f"{field} must be a list of numbers", field, expected)
    if len(values) != length:
        raise RequestError(
            f"{field} has {len(values)} values but the episode has {length} observations",
            field,
            expected,
        )
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError(f"{field} must be a flat list of numbers", field, expected) from None
    if array.ndim != 1:
        raise RequestError(f"{field} must be a flat list of numbers", field, expected)
    _check_finite(array, field, expected)
    return array


def _indices(values: Any, field: str, length: int, low: int, high: int) -> np.ndarray:
    """Discrete actions: ``length`` integers in ``[low, high]`` (a list, or a packed ``[T]``
    array of integral values), as the adapter takes them: the index ``a - low`` as float32
    ``[T, 1]``."""
    expected = f"a list of {length} integer actions in [{low}, {high}] (one per observation)"
    packed = _packed(values)
    if packed is not None:
        array = _unpack(packed, None, field).astype(np.float64)
    elif isinstance(values, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        array = np.asarray(values, np.float64)
    else:
        raise RequestError(f"{field} must be a flat list of integers", field, expected)
    if len(array) != length:
        raise RequestError(
            f"{field} has {len(array)} values but the episode has {length} observations",
            field,
            expected,
        )
    bad = ~(np.isfinite(array) & (array == np.round(array)) & (array >= low) & (array <= high))
    if bad.any():
        i = int(np.argmax(bad))
        raise RequestError(
            f"{field}[{i}] is {array[i]:g}: not an action of this bundle", f"{field}[{i}]", expected
        )
    return (array - low).astype(np.float32)[:, None]


def _check_finite(array: np.ndarray, field: str, expected: str) -> None:
    if np.isfinite(array).all():
        return
    where = tuple(np.argwhere(~np.isfinite(array))[0])
    value = array[where]
    overflow = " (values beyond ±3.4e38 overflow float32)" if np.isinf(value) else ""
    index = "".join(f"[{int(i)}]" for i in where)
    raise RequestError(
        f"{field}{index} is {value}: expected a finite number{overflow}",
        f"{field}{index}",
        expected,
    )


def check_episodes(
    episodes: Sequence[Any],
    obs_dim: int,
    act_dim: int,
    max_episodes: int,
    max_length: int,
    action_range: tuple[int, int] | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The ``episodes`` of an ``/adapt`` request as ``(obs [T, obs_dim], act [T, act_dim],
    rew [T])`` float32 arrays, ``1 <= T <= max_length``.

    Args:
        episodes: items with ``observations``, ``actions``, ``rewards`` attributes (the pydantic
            models) or keys (plain dicts).
        action_range: ``(minimum, maximum)`` of a discrete action spec: actions are then ``[T]``
            integers, returned as the index ``[T, 1]`` (``act_dim`` must be 1); ``None`` for
            continuous ``[T, act_dim]`` actions.
    """
    if not isinstance(episodes, (list, tuple)) or len(episodes) == 0:
        raise RequestError(
            "episodes is empty: adaptation needs at least one episode of the new task",
            "episodes",
            f"a list of 1 to {max_episodes} episodes",
        )
    if len(episodes) > max_episodes:
        raise RequestError(
            f"episodes has {len(episodes)} episodes, more than the limit of {max_episodes} "
            "(METARL_MAX_EPISODES)",
            "episodes",
            f"a list of 1 to {max_episodes} episodes",
            status=413,
        )
    result = []
    for e, episode in enumerate(episodes):
        get = (
            episode.get if isinstance(episode, dict) else lambda k, ep=episode: getattr(ep, k, None)
        )
        field = f"episodes[{e}]"
        obs_rows = get("observations")
        n_obs = _num_rows(obs_rows)
        if n_obs is not None and n_obs > max_length:
            raise RequestError(
                f"{field} has {n_obs} steps, more than the limit of {max_length} "
                "(the bundle's horizon / METARL_MAX_EPISODE_LENGTH)",
                f"{field}.observations",
                f"1 to {max_length} steps",
                status=413,
            )
        obs = _matrix(obs_rows, obs_dim, f"{field}.observations", "observations")
        length = len(obs)
        act_rows = get("actions")
        if action_range is not None:
            act = _indices(act_rows, f"{field}.actions", length, *action_range)
            rew = _vector(get("rewards"), f"{field}.rewards", length)
            result.append((obs, act, rew))
            continue
        n_act = _num_rows(act_rows)
        if n_act is not None and n_act != length:
            raise RequestError(
                f"{field}.actions has {n_act} rows but {field}.observations has {length}",
                f"{field}.actions",
                f"{length} actions (one per observation), each a list of {act_dim} finite numbers",
            )
        act = _matrix(act_rows, act_dim, f"{field}.actions", "actions")
        rew = _vector(get("rewards"), f"{field}.rewards", length)
        result.append((obs, act, rew))
    return result


def check_observations(
    rows: Any, obs_dim: int, max_rows: int, field: str = "observations"
) -> np.ndarray:
    """``[N, obs_dim]`` float32 observations, ``1 <= N <= max_rows``."""
    return _matrix(rows, obs_dim, field, "observations", max_rows=max_rows)


def check_steps(steps: int | None, default: int, max_steps: int) -> int:
    """The number of inner steps: ``default`` when omitted, else in ``[1, max_steps]``."""
    if steps is None:
        return min(default, max_steps)
    if not 1 <= steps <= max_steps:
        raise RequestError(
            f"steps is {steps}, outside [1, {max_steps}] (METARL_MAX_STEPS)",
            "steps",
            f"an integer from 1 to {max_steps}",
        )
    return int(steps)
