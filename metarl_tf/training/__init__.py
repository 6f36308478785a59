"""Training runs from Python: :func:`fit` (train, resume, write the bundle) and
:func:`export_run` (a bundle from a run directory). The command line's ``train`` and ``export``
call them."""

from metarl_tf.training.run import FitResult, RunError, export_run, fit

__all__ = ["FitResult", "RunError", "export_run", "fit"]
