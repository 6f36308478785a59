"""metarl_tf.specs: specs to JSON and back, the discrete/continuous test, action-spec checks."""

import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_exact
from tf_agents.specs import tensor_spec as tfa_spec

from metarl_tf.specs import (
    action_spec_problem,
    bounded_spec,
    is_discrete_spec,
    num_actions,
    spec_from_json,
    spec_to_json,
    tensor_spec,
)


def test_specs_are_tensorflow_and_tf_agents_specs():
    box = bounded_spec((2,), np.float32, -0.1, 0.1, name="action")
    assert isinstance(box, tfa_spec.BoundedTensorSpec) and tfa_spec.is_bounded(box)
    assert box == tfa_spec.BoundedTensorSpec((2,), tf.float32, -0.1, 0.1, name="action")
    obs = tensor_spec((3,), np.float32, "observation")
    assert isinstance(obs, tf.TensorSpec) and not tfa_spec.is_bounded(obs)


@pytest.mark.parametrize(
    "spec, as_json",
    [
        (tensor_spec((3,), np.float32), {"shape": [3], "dtype": "float32"}),
        (
            bounded_spec((2,), np.float32, [-1.0, -2.0], 1.0),
            {"shape": [2], "dtype": "float32", "minimum": [-1.0, -2.0], "maximum": [1.0, 1.0]},
        ),
        (
            bounded_spec((), np.int32, 0, 4),
            {"shape": [], "dtype": "int32", "minimum": 0, "maximum": 4},
        ),
    ],
)
def test_json_round_trip(spec, as_json):
    assert spec_to_json(spec) == as_json
    back = spec_from_json(as_json)
    assert type(back) is type(spec) and back.shape == spec.shape and back.dtype == spec.dtype
    if hasattr(spec, "minimum"):
        assert_exact(back.minimum, np.broadcast_to(spec.minimum, spec.shape))
        assert_exact(back.maximum, np.broadcast_to(spec.maximum, spec.shape))
    assert spec_to_json(back) == as_json


def test_discrete_or_continuous():
    discrete = bounded_spec((), np.int32, 0, 2)
    assert is_discrete_spec(discrete) and num_actions(discrete) == 3
    assert action_spec_problem(discrete) is None
    continuous = bounded_spec((2,), np.float32, -1.0, 1.0)
    assert not is_discrete_spec(continuous) and action_spec_problem(continuous) is None
    with pytest.raises(ValueError, match="not a discrete spec"):
        num_actions(continuous)
    assert "minimum=0" in action_spec_problem(bounded_spec((), np.int32, 1, 3))
    assert "scalar" in action_spec_problem(bounded_spec((2,), np.int64, 0, 3), "action_spec")
    assert "rank 1" in action_spec_problem(bounded_spec((2, 2), np.float32, -1.0, 1.0))
