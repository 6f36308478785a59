"""Training runs from Python: :func:`fit` (train, resume, write the bundle) and
:func:`export_run` (a bundle from a run directory). The command line's ``train`` and ``export``
call them; :func:`run_recipe` runs a recipe's legs (``train --recipe``)."""

from metarl_tf.training.recipes import run_recipe
from metarl_tf.training.run import FitResult, RunError, export_run, fit

__all__ = ["FitResult", "RunError", "export_run", "fit", "run_recipe"]
