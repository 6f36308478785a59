"""How the tests compare floating-point results: one place, tolerances that follow from the dtype.

Two computations of the same quantity that take different routes (a compiled graph and eager
code, a Keras layer and a numpy loop, oneDNN's AVX-512 kernels and its AVX2 kernels) round
differently. How far apart they may land is a property of the dtype and of the magnitude of what
is compared, not a constant that happened to pass on one CPU. So:

- ``assert_close(actual, desired, ulps=..., scale=...)``: every element agrees within
  ``ulps · eps(dtype) · scale``, where ``eps`` is the machine epsilon of the *coarser* dtype of
  the two arrays (or of ``dtype=``, the precision the route computed in, when the values arrive
  as float64 or Python floats) and ``scale`` is by default the largest magnitude in either array
  (what a cancellation's rounding error is proportional to). ``ulps`` is the rounding budget of
  the route between the two results: a few for one reduction, more for long chains (say why at
  the call).
- ``assert_exact(actual, desired)``: bitwise equality (NaNs equal) where the two results come
  from the same operations on the same inputs (a reload, a replay with the same seed), and for
  integer and boolean arrays.
- ``assert_not_close(actual, desired, ulps=...)``: the opposite of ``assert_close``: some element
  differs by more than rounding (a parameter that must have moved, two seeds that must differ).
- ``assert_fd_close(analytic, numeric, h=..., scale=...)``: a derivative against central finite
  differences, whose own error is truncation ``O(h²)`` plus rounding ``eps·|f|/h``.
- ``assert_within(actual, desired, atol, why=...)``: statistical or modelling tolerances (a Monte
  Carlo mean, a return "within noise"), which have nothing to do with rounding; ``why`` says
  where the number comes from.

Every helper takes arrays, tensors, scalars, or lists/tuples of them (a gradient per parameter),
which are compared element by element as one flat array; shapes must match (a scalar on either
side broadcasts). Setting ``NUMERICS_REPORT=path`` appends, for every ``assert_close``, the call
site and the error it saw in ulps of its scale: run the suite under the kernels of interest
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``TF_ENABLE_ONEDNN_OPTS=0``) to see how much of a budget is used.

``tests/test_numerics.py`` checks these helpers and that no test compares floats another way.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

__all__ = [
    "assert_close",
    "assert_exact",
    "assert_fd_close",
    "assert_not_close",
    "assert_within",
    "eps_of",
]


def _as_array(x) -> np.ndarray:
    if isinstance(x, (list, tuple)) and any(
        hasattr(e, "numpy") or isinstance(e, (np.ndarray, list, tuple)) for e in x
    ):
        parts = [_as_array(e) for e in x]
        if len({p.shape for p in parts}) > 1 or any(p.dtype == object for p in parts):
            return _Ragged(parts)
        x = parts
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)


class _Ragged(list):
    """A list of arrays of different shapes (a gradient per parameter), compared as one."""

    @property
    def shape(self):
        return tuple(p.shape for p in self)


def _pair(actual, desired) -> tuple[np.ndarray, np.ndarray]:
    """The two sides as arrays of one shape: same shapes, or a scalar on either side."""
    a, d = _as_array(actual), _as_array(desired)
    if isinstance(a, _Ragged) or isinstance(d, _Ragged):
        if not (isinstance(a, _Ragged) and isinstance(d, _Ragged)) or a.shape != d.shape:
            raise AssertionError(f"shapes differ: actual {a.shape}, desired {d.shape}")
        dtype_a = np.result_type(*a)
        dtype_d = np.result_type(*d)
        a = np.concatenate([p.ravel() for p in a]).astype(dtype_a)
        d = np.concatenate([p.ravel() for p in d]).astype(dtype_d)
    if a.shape != d.shape:
        if a.ndim and d.ndim:
            raise AssertionError(f"shapes differ: actual {a.shape}, desired {d.shape}")
        a, d = np.broadcast_arrays(a, d)
    return a, d


def eps_of(*arrays) -> float:
    """Machine epsilon of the coarsest floating dtype among ``arrays`` (float32 for non-floats,
    which come from float32 computations in this project)."""
    return max(_eps(x) for x in arrays) or float(np.finfo(np.float32).eps)


def _eps(x) -> float:
    """The largest machine epsilon among the floating parts of ``x`` (0 when none is)."""
    if isinstance(x, (list, tuple)) and x and not np.isscalar(x[0]):
        return max(_eps(e) for e in x)
    dtype = _as_array(x).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 0.0


def _report(actual, desired, tol, err_msg, what):
    with np.errstate(invalid="ignore"):
        diff = np.abs(actual.astype(np.float64) - desired.astype(np.float64))
    idx = np.unravel_index(np.argmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
    bad = int(np.sum(~(diff <= tol)))
    raise AssertionError(
        f"{what}: {bad} of {diff.size} elements differ by more than {tol:.3g}; "
        f"worst at {tuple(int(i) for i in idx)}: actual {actual[idx]!r}, desired {desired[idx]!r}, "
        f"|diff| {diff[idx]:.3g}" + (f"\n{err_msg}" if err_msg else "")
    )


def _tolerance(a64, d64, ulps, scale, eps):
    if scale is None:
        finite = np.concatenate([np.abs(a64[np.isfinite(a64)]), np.abs(d64[np.isfinite(d64)])])
        scale = float(finite.max()) if finite.size else 0.0
    scale = max(float(scale), float(np.finfo(np.float32).tiny))
    return ulps * eps * scale, scale


def _close_mask(a64, d64, tol):
    """Elementwise: within ``tol``, or the same infinity, or NaN on both sides."""
    with np.errstate(invalid="ignore"):
        return (
            (np.isnan(a64) & np.isnan(d64))
            | (np.isinf(a64) & (a64 == d64))
            | (np.abs(a64 - d64) <= tol)
        )


def _record(ulps, used):
    """``NUMERICS_REPORT``: one JSON line per ``assert_close`` (call site, budget, ulps seen)."""
    path = os.environ.get("NUMERICS_REPORT")
    if not path:
        return
    frame = sys._getframe(2)
    site = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
    with open(path, "a") as f:
        f.write(json.dumps({"site": site, "ulps": ulps, "used": used}) + "\n")


def assert_close(
    actual, desired, *, ulps: float = 64, scale: float | None = None, dtype=None, err_msg=""
):
    """Every element within ``ulps · eps · scale`` (see the module docstring).

    ``scale`` defaults to the largest finite magnitude in either array (at least the smallest
    normal float32, so that two zero arrays compare). ``dtype`` overrides the precision ``eps``
    is taken from. NaNs must sit at the same places, infinities must be equal.
    """
    a, d = _pair(actual, desired)
    if a.size == 0:
        return
    a64, d64 = a.astype(np.float64), d.astype(np.float64)
    nan_a, nan_d = np.isnan(a64), np.isnan(d64)
    if np.any(nan_a != nan_d):
        raise AssertionError(f"NaNs at different places: actual {a!r}, desired {d!r}\n{err_msg}")
    eps = float(np.finfo(dtype).eps) if dtype is not None else eps_of(actual, desired)
    tol, scale = _tolerance(a64, d64, ulps, scale, eps)
    ok = _close_mask(a64, d64, tol)
    if os.environ.get("NUMERICS_REPORT"):
        with np.errstate(invalid="ignore"):
            diff = np.where(ok & ~np.isfinite(a64), 0.0, np.abs(a64 - d64))
        _record(ulps, float(np.max(diff)) / (eps * scale))
    if not np.all(ok):
        _report(a, d, tol, err_msg, f"not close to {ulps} ulps of scale {scale:.3g}")


def assert_not_close(
    actual, desired, *, ulps: float = 64, scale: float | None = None, dtype=None, err_msg=""
):
    """Some element differs by more than ``assert_close`` would allow with the same arguments:
    the two results are different, not the same value rounded differently."""
    a, d = _pair(actual, desired)
    a64, d64 = a.astype(np.float64), d.astype(np.float64)
    eps = float(np.finfo(dtype).eps) if dtype is not None else eps_of(actual, desired)
    tol, scale = _tolerance(a64, d64, ulps, scale, eps)
    if a.size == 0 or np.all(_close_mask(a64, d64, tol)):
        raise AssertionError(
            f"expected a difference beyond {ulps} ulps of scale {scale:.3g}, but every element "
            f"is within {tol:.3g}: actual {a!r}, desired {d!r}"
            + (f"\n{err_msg}" if err_msg else "")
        )


def assert_exact(actual, desired, *, err_msg=""):
    """Bitwise equal values (NaN equals NaN), same shape (a scalar ``desired`` is every
    element's value); dtypes may differ only when the values are exactly representable in both
    (e.g. integers stored as float)."""
    a, d = _pair(actual, desired)
    if a.dtype.kind in "fc" or d.dtype.kind in "fc":
        with np.errstate(invalid="ignore"):
            ok = (a == d) | (np.isnan(a.astype(np.complex128)) & np.isnan(d.astype(np.complex128)))
    else:
        ok = a == d
    if not np.all(ok):
        if a.dtype.kind in "fiub" and d.dtype.kind in "fiub":
            _report(a, d, 0.0, err_msg, "not exactly equal")
        raise AssertionError(f"not equal: actual {a!r}, desired {d!r}\n{err_msg}")


def assert_fd_close(analytic, numeric, *, h: float, scale: float | None = None, curvature=1.0):
    """A derivative against central differences ``(f(x+h) − f(x−h)) / 2h``.

    Their error is ``h²/6 · |f'''|`` (truncation; ``curvature`` bounds ``|f'''|`` relative to
    ``scale``) plus ``eps · |f| / h`` (rounding of ``f``, whose magnitude ``scale`` stands for;
    by default the largest magnitude compared). A factor 10 covers the constants dropped in both.
    """
    a, n = _pair(analytic, numeric)
    eps = eps_of(analytic, numeric)
    if scale is None:
        scale = float(max(np.max(np.abs(a), initial=0.0), np.max(np.abs(n), initial=0.0), 1e-12))
    tol = 10.0 * (h * h / 6.0 * curvature * scale + eps * scale / h)
    if not np.all(np.abs(a.astype(np.float64) - n.astype(np.float64)) <= tol):
        _report(a, n, tol, "", f"finite differences (h={h:g}) disagree")


def assert_within(actual, desired, *, atol: float, why: str, err_msg=""):
    """``|actual − desired| ≤ atol`` elementwise, for tolerances that are not about rounding
    (sampling noise, a model's fit); ``why`` names where ``atol`` comes from."""
    if not why:
        raise ValueError("assert_within needs a reason for its tolerance")
    a, d = _pair(actual, desired)
    if not np.all(np.abs(a.astype(np.float64) - d.astype(np.float64)) <= atol):
        _report(a, d, atol, err_msg, f"not within {atol:g} ({why})")
