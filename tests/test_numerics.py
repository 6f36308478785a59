"""The float-comparison helpers (tests/numerics.py) pass and fail where they should, and no test
compares floats another way."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from numerics import (
    assert_close,
    assert_exact,
    assert_fd_close,
    assert_not_close,
    assert_within,
    eps_of,
)

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
TESTS = Path(__file__).resolve().parent


def test_eps_is_the_coarser_dtype():
    f32, f64 = np.ones(2, np.float32), np.ones(2, np.float64)
    assert eps_of(f64) == EPS64
    assert eps_of(f32, f64) == eps_of(f64, f32) == EPS32
    assert eps_of(np.ones(2, np.int64)) == EPS32  # integers: float32 computations here
    assert eps_of([f32, np.ones(3, np.float64)]) == EPS32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_close_follows_ulps_times_eps_times_scale(dtype):
    eps = float(np.finfo(dtype).eps)
    desired = np.array([1.0, -2.0, 0.5], dtype)
    # scale is the largest magnitude, 2: 8 ulps of it is 16 eps, for every element
    inside = desired + np.array([0, 0, 15 * eps], dtype)
    outside = desired + np.array([0, 0, 20 * eps], dtype)
    assert_close(inside, desired, ulps=8)
    with pytest.raises(AssertionError, match="not close to 8 ulps of scale 2"):
        assert_close(outside, desired, ulps=8)
    # the small element is not judged by its own magnitude but by the array's scale
    with pytest.raises(AssertionError):
        assert_close(outside, desired, ulps=8, scale=1.0)
    assert_close(outside, desired, ulps=8, scale=4.0)


def test_close_a_one_ulp_difference_passes_and_exact_fails():
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    y = np.nextafter(x, np.float32(np.inf))
    assert_close(y, x, ulps=1)
    assert_exact(x, x.copy())
    with pytest.raises(AssertionError, match="not exactly equal"):
        assert_exact(y, x)


def test_close_uses_the_coarser_dtype_or_the_one_given():
    desired = np.array([1.0, 3.0])
    actual32 = (desired + 1e-7).astype(np.float32)
    assert_close(actual32, desired, ulps=4)  # float32 against float64: float32's eps
    with pytest.raises(AssertionError):
        assert_close(desired + 1e-7, desired, ulps=4)  # both float64
    assert_close(desired + 1e-7, desired, ulps=4, dtype=np.float32)  # a float32 route
    assert_close(1.0 + 1e-7, 1.0, ulps=4, dtype=np.float32)  # Python floats


def test_close_nans_must_match_and_infinities_must_be_equal():
    a = np.array([1.0, np.nan, np.inf, -np.inf], np.float32)
    assert_close(a, a.copy())
    with pytest.raises(AssertionError, match="NaNs at different places"):
        assert_close(a, np.array([1.0, 2.0, np.inf, -np.inf], np.float32))
    with pytest.raises(AssertionError, match="NaNs at different places"):
        assert_close(np.array([np.nan, 1.0]), np.array([1.0, np.nan]))
    with pytest.raises(AssertionError):
        assert_close(a, np.array([1.0, np.nan, -np.inf, -np.inf], np.float32))
    with pytest.raises(AssertionError):
        assert_close(a, np.array([1.0, np.nan, 3e38, -np.inf], np.float32))
    # the scale comes from the finite elements
    assert_close(np.array([np.inf, 1.0]), np.array([np.inf, 1.0 + 1e-15]), ulps=8)


def test_shapes_must_match_except_for_a_scalar():
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_exact(np.zeros(2), np.zeros(3))
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close([np.zeros(2), np.zeros(3)], [np.zeros(2), np.zeros(4)])
    assert_close(np.full(3, 0.25, np.float32), 0.25, ulps=1)
    assert_exact(np.zeros((2, 2)), 0.0)
    with pytest.raises(AssertionError):
        assert_exact(np.array([0.0, 1e-30]), 0.0)


def test_lists_of_differently_shaped_arrays_compare_as_one():
    tf = pytest.importorskip("tensorflow")
    got = [tf.constant([[1.0, 2.0]]), tf.constant([4.0])]
    assert_close(got, [np.array([[1.0, 2.0]]), np.array([4.0 + 1e-6])], ulps=8)  # scale 4
    with pytest.raises(AssertionError):
        assert_close(got, [np.array([[1.0, 2.0]]), np.array([4.001])], ulps=8)
    assert_exact([np.arange(3), np.ones((2, 2))], [np.arange(3), np.ones((2, 2))])


def test_zero_against_zero_and_empty_arrays():
    assert_close(np.zeros(3, np.float32), np.zeros(3), ulps=1)
    assert_close(np.zeros(0), np.zeros(0))
    # comparing with an exact zero needs the scale of what cancelled
    with pytest.raises(AssertionError):
        assert_close(np.float32(1e-9), 0.0, ulps=64)
    assert_close(np.float32(1e-9), 0.0, ulps=64, scale=1.0)


def test_exact_for_integers_and_booleans_and_nan():
    assert_exact(np.array([1, 2, 3]), [1, 2, 3])
    assert_exact(np.array([True, False]), [True, False])
    assert_exact(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]))
    assert_exact(np.array([-0.0]), np.array([0.0]))  # equal values, whatever the sign bit
    with pytest.raises(AssertionError):
        assert_exact(np.array([1, 2, 3]), [1, 2, 4])
    with pytest.raises(AssertionError):
        assert_exact(np.array(["a"]), np.array(["b"]))


def test_not_close_needs_a_difference_beyond_rounding():
    x = np.linspace(0, 1, 5, dtype=np.float32)
    assert_not_close(x, x + 0.01)
    with pytest.raises(AssertionError, match="expected a difference"):
        assert_not_close(x, x.copy())
    with pytest.raises(AssertionError, match="expected a difference"):
        assert_not_close(x, np.nextafter(x, np.float32(2)))
    assert_not_close([x, np.ones(2)], [x, np.array([1.0, 1.5])])  # one part differs


def test_fd_bound_covers_truncation_and_rounding_and_no_more():
    x = np.linspace(-1.0, 1.0, 9)
    for h, dtype in ((1e-6, np.float64), (1e-3, np.float64), (1e-2, np.float32)):
        xs = x.astype(dtype)
        fd = (np.sin(xs + dtype(h)) - np.sin(xs - dtype(h))) / dtype(2 * h)
        assert_fd_close(np.cos(x).astype(dtype), fd, h=h)
        # a derivative wrong by 1% is caught at each of these steps
        with pytest.raises(AssertionError, match="finite differences"):
            assert_fd_close(1.01 * np.cos(x).astype(dtype), fd, h=h)


def test_within_needs_a_reason_and_holds_its_bound():
    with pytest.raises(ValueError, match="reason"):
        assert_within(1.0, 1.0, atol=0.1, why="")
    assert_within(np.array([0.5, 0.52]), 0.5, atol=0.03, why="sampling noise")
    with pytest.raises(AssertionError, match=r"not within 0.01 \(sampling noise\)"):
        assert_within(np.array([0.5, 0.52]), 0.5, atol=0.01, why="sampling noise")
    with pytest.raises(AssertionError):
        assert_within(np.nan, 0.5, atol=1.0, why="sampling noise")


def test_failure_names_the_worst_element():
    with pytest.raises(AssertionError, match=r"1 of 3 elements .* worst at \(1,\)"):
        assert_close(np.array([1.0, 2.5, 3.0]), np.array([1.0, 2.0, 3.0]))


def test_report_records_the_budget_used(tmp_path, monkeypatch):
    report = tmp_path / "report.jsonl"
    monkeypatch.setenv("NUMERICS_REPORT", str(report))
    assert_close(np.float32(1.0) + EPS32, np.float32(1.0), ulps=8)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["site"].startswith("test_numerics.py:")
    assert rows[0]["ulps"] == 8 and 0.9 < rows[0]["used"] < 1.1


# --- the guard: float comparisons go through tests/numerics.py ---------------------------------

FORBIDDEN = {
    "allclose",  # np.allclose, tf.experimental.numpy.allclose
    "isclose",  # np.isclose, math.isclose
    "approx",  # pytest.approx
    "assert_allclose",
    "assert_almost_equal",
    "assert_approx_equal",
    "assert_array_almost_equal",
    "assert_array_almost_equal_nulp",
    "assert_array_max_ulp",
    "assert_array_equal",  # assert_exact says the same and handles NaNs and lists alike
    "assert_near",  # tf.debugging.assert_near
    "assertAlmostEqual",
    "assertAllClose",
}


def forbidden_comparisons(source: str, filename: str) -> list[str]:
    """``file:line name`` for every use (call, reference or import) of a comparison that
    bypasses tests/numerics.py."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.alias):
            name = node.name.rsplit(".", 1)[-1]
        else:
            continue
        if name in FORBIDDEN:
            found.append((node.lineno, f"{filename}:{node.lineno} {name}"))
    return [text for _, text in sorted(found)]


def test_the_guard_catches_each_form():
    source = "\n".join(
        [
            "import numpy as np, pytest, tensorflow as tf",
            "from numpy.testing import assert_allclose",
            "np.testing.assert_allclose(a, b)",
            "assert x == pytest.approx(y)",
            "assert np.allclose(a, b)",
            "assert not np.isclose(a, b).any()",
            "tf.debugging.assert_near(a, b)",
            "np.testing.assert_array_almost_equal(a, b)",
            "np.testing.assert_almost_equal(a, b)",
            "np.testing.assert_array_equal(a, b)",
            "ok = map(np.allclose, xs, ys)",
            "assert_close(a, b, ulps=8)  # np.allclose in a comment is fine",
        ]
    )
    found = forbidden_comparisons(source, "x.py")
    assert [f.split()[0] for f in found] == [f"x.py:{i}" for i in range(2, 12)]


def test_no_test_compares_floats_outside_the_helpers():
    found = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name != "numerics.py":
            found += forbidden_comparisons(path.read_text(), path.name)
    assert not found, "use tests/numerics.py (assert_close, assert_exact, ...):\n" + "\n".join(
        found
    )
