"""metarl-tf: gradient-based meta-reinforcement learning (MAML, Meta-SGD) in TensorFlow/Keras 3."""

import os

# Read by TensorFlow once, when it loads, so set here, before any module of the package imports
# it. (TF_USE_LEGACY_KERAS, which tf-agents needs, is set only by the modules that import
# tf-agents: metarl_tf.agents, metarl_tf.envs.tf_agents_env, metarl_tf.scratch.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The TensorFlow 2.21 wheel does not turn on its oneDNN kernels by default here; with them the
# batched matmuls that dominate the meta-step run ~2.4x faster (bench/train_speed.py: 2.3 s ->
# 1.7 s per nav2d iteration on the 2-core CI machine). Results differ only in float rounding.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from metarl_tf.version import __version__  # noqa: E402

__all__ = ["__version__", "export_saved_model"]


def __getattr__(name: str):
    """``metarl_tf.export_saved_model`` (:mod:`metarl_tf.export`), imported on first use, so
    that importing the package imports no TensorFlow."""
    if name == "export_saved_model":
        from metarl_tf.export import export_saved_model

        return export_saved_model
    raise AttributeError(f"module 'metarl_tf' has no attribute {name!r}")
