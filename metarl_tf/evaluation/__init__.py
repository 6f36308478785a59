"""Meta-testing, by concern:

- :mod:`~metarl_tf.evaluation.protocol` — adaptation curves on fresh tasks (the MAML paper's
  protocol);
- :mod:`~metarl_tf.evaluation.statistics` — confidence intervals, seeds pooled, trailing means;
- :mod:`~metarl_tf.evaluation.baselines` — the random, pretrained and oracle initializations;
- :mod:`~metarl_tf.evaluation.report` — the ``evaluate`` command's result and tables;
- :mod:`~metarl_tf.evaluation.plots` — its figures and training curves;
- :mod:`~metarl_tf.evaluation.metaworld` — Meta-World ML1 success rates.
"""
