"""metarl-tf: gradient-based meta-reinforcement learning (MAML, Meta-SGD) in TensorFlow/Keras 3."""

import os

# tf-agents (used for specs and as a reference for value functions) still imports the legacy
# `tf.keras` (tf-keras). TensorFlow reads this variable once, on first import, so it must be set
# before anything imports TensorFlow. Our own models are Keras 3 (`import keras`) and are not
# affected by it. setdefault: a user who sets it explicitly keeps their choice.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The TensorFlow 2.21 wheel does not turn on its oneDNN kernels by default here; with them the
# batched matmuls that dominate the meta-step run ~2.4x faster (bench/train_speed.py: 2.3 s ->
# 1.7 s per nav2d iteration on the 2-core CI machine). Results differ only in float rounding.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``metarl_tf.export_saved_model`` (:mod:`metarl_tf.export`), imported on first use, so
    that importing the package imports no TensorFlow."""
    if name == "export_saved_model":
        from metarl_tf.export import export_saved_model

        return export_saved_model
    raise AttributeError(f"module 'metarl_tf' has no attribute {name!r}")
