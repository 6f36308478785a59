"""metarl-tf: gradient-based meta-reinforcement learning (MAML, Meta-SGD) in TensorFlow/Keras 3."""

import os

# tf-agents (used for specs and as a reference for value functions) still imports the legacy
# `tf.keras` (tf-keras). TensorFlow reads this variable once, on first import, so it must be set
# before anything imports TensorFlow. Our own models are Keras 3 (`import keras`) and are not
# affected by it. setdefault: a user who sets it explicitly keeps their choice.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
