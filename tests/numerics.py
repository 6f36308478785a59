"""How the tests compare floating-point results: one place, tolerances that follow from the dtype.

Two computations of the same quantity that take different routes (a compiled graph and eager
code, a Keras layer and a numpy loop, oneDNN's AVX-512 kernels and its AVX2 kernels) round
differently. How far apart they may land is a property of the dtype and of the magnitude of what
is compared, not a constant that happened to pass on one CPU. So:

- ``assert_close(actual, desired, ulps=..., scale=...)``: every element agrees within
  ``ulps · eps(dtype) · scale``, where ``eps`` is the machine epsilon of the *coarser* dtype of
  the two arrays and ``scale`` is by default the largest magnitude in either array (what a
  cancellation's rounding error is proportional to). ``ulps`` is the rounding budget of the route
  between the two results: a few for one reduction, more for long chains (say why at the call).
- ``assert_exact(actual, desired)``: bitwise equality (NaNs equal) where the two results come
  from the same operations on the same inputs (a reload, a replay with the same seed).
- ``assert_fd_close(analytic, numeric, h=..., scale=...)``: a derivative against central finite
  differences, whose own error is truncation ``O(h²)`` plus rounding ``eps·|f|/h``.
- ``assert_within(actual, desired, atol, why=...)``: statistical or modelling tolerances (a Monte
  Carlo mean, a return "within noise"), which have nothing to do with rounding; ``why`` says
  where the number comes from.

``tests/test_numerics.py`` checks these helpers and that no test compares floats another way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["assert_close", "assert_exact", "assert_fd_close", "assert_within", "eps_of"]


def _as_array(x) -> np.ndarray:
    if hasattr(x, "numpy"):
        x = x.numpy()
    return np.asarray(x)


def eps_of(*arrays) -> float:
    """Machine epsilon of the coarsest floating dtype among ``arrays`` (float32 for non-floats,
    which come from float32 computations in this project)."""
    eps = 0.0
    for a in arrays:
        dtype = _as_array(a).dtype
        eps = max(eps, float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else 0.0)
    return eps or float(np.finfo(np.float32).eps)


def _report(actual, desired, tol, err_msg, what):
    diff = np.abs(actual.astype(np.float64) - desired.astype(np.float64))
    idx = np.unravel_index(np.nanargmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
    bad = int(np.sum(~(diff <= tol)))
    raise AssertionError(
        f"{what}: {bad} of {diff.size} elements differ by more than {tol:.3g}; "
        f"worst at {tuple(int(i) for i in idx)}: actual {actual[idx]!r}, desired {desired[idx]!r}, "
        f"|diff| {diff[idx]:.3g}" + (f"\n{err_msg}" if err_msg else "")
    )


def _broadcast(actual, desired):
    a, d = _as_array(actual), _as_array(desired)
    if a.shape != d.shape:
        try:
            a, d = np.broadcast_arrays(a, d)
        except ValueError:
            raise AssertionError(f"shapes differ: actual {a.shape}, desired {d.shape}") from None
    return a, d


def assert_close(actual, desired, *, ulps: float = 64, scale: float | None = None, err_msg=""):
    """Every element within ``ulps · eps · scale`` (see the module docstring).

    ``scale`` defaults to the largest finite magnitude in either array (at least the smallest
    normal number, so that two zero arrays compare). NaNs must sit at the same places.
    """
    a, d = _broadcast(actual, desired)
    if a.size == 0:
        return
    a64, d64 = a.astype(np.float64), d.astype(np.float64)
    nan_a, nan_d = np.isnan(a64), np.isnan(d64)
    if np.any(nan_a != nan_d):
        raise AssertionError(f"NaNs at different places: actual {a!r}, desired {d!r}\n{err_msg}")
    if scale is None:
        finite = np.concatenate([np.abs(a64[np.isfinite(a64)]), np.abs(d64[np.isfinite(d64)])])
        scale = float(finite.max()) if finite.size else 0.0
    scale = max(float(scale), float(np.finfo(np.float32).tiny))
    tol = ulps * eps_of(a, d) * scale
    same_inf = np.isinf(a64) & (a64 == d64)
    ok = same_inf | nan_a | (np.abs(a64 - d64) <= tol)
    if not np.all(ok):
        _report(a, d, tol, err_msg, f"not close to {ulps} ulps of scale {scale:.3g}")


def assert_exact(actual, desired, *, err_msg=""):
    """Bitwise equal values (NaN equals NaN), same shape; dtypes may differ only when the values
    are exactly representable in both (e.g. integers stored as float)."""
    a, d = _as_array(actual), _as_array(desired)
    if a.shape != d.shape:
        raise AssertionError(f"shapes differ: actual {a.shape}, desired {d.shape}\n{err_msg}")
    if a.dtype.kind in "fc" or d.dtype.kind in "fc":
        ok = (a == d) | (np.isnan(a.astype(np.float64)) & np.isnan(d.astype(np.float64)))
    else:
        ok = a == d
    if not np.all(ok):
        if a.dtype.kind in "fciub" and d.dtype.kind in "fciub":
            _report(a, d, 0.0, err_msg, "not exactly equal")
        raise AssertionError(f"not equal: actual {a!r}, desired {d!r}\n{err_msg}")


def assert_fd_close(analytic, numeric, *, h: float, scale: float | None = None, curvature=1.0):
    """A derivative against central differences ``(f(x+h) − f(x−h)) / 2h``.

    Their error is ``h²/6 · |f'''|`` (truncation; ``curvature`` bounds ``|f'''|`` relative to
    ``scale``) plus ``eps · |f| / h`` (rounding of ``f``, whose magnitude ``scale`` stands for;
    by default the largest magnitude compared). A factor 10 covers the constants dropped in both.
    """
    a, n = _broadcast(analytic, numeric)
    eps = eps_of(a, n)
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
    a, d = _broadcast(actual, desired)
    if not np.all(np.abs(a.astype(np.float64) - d.astype(np.float64)) <= atol):
        _report(a, d, atol, err_msg, f"not within {atol:g} ({why})")
