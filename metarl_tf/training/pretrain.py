"""``train --algo pretrain``: one policy trained jointly on all training tasks, without adaptation.

This is the MAML paper's *pretrained* baseline (Finn et al., 2017, Sec. 5.3), and, on an oracle
task distribution (``nav2d-oracle``: the goal in the observation), its *oracle*. Each iteration
samples ``meta_batch_size`` fresh tasks × ``episodes_per_task`` episodes with the current policy
and takes one TRPO step on them: the same sampler, linear baseline (fitted per task), surrogate
``−E[π/π_old · Â]`` averaged per task then over tasks, and KL trust region as meta-training.

The step *is* the meta-step (:func:`metarl_tf.outer.make_meta_step`) with an inner step size of zero
(``θ' = θ − 0·∇L = θ``, first order, so ``∂θ'/∂θ = I``) on a batch whose inner and outer halves are
the same episodes: one code path for both, so the baseline cannot drift from the meta-learner's
objective (``tests/test_pretrain.py`` re-checks the step against an independent computation).

Each iteration also measures (and only measures) how well the jointly trained policy adapts: one
inner step with the preset's scalar ``inner_step_size`` on the batch, then fresh episodes of the
adapted policy; that is ``returns/post_adaptation`` in ``metrics.jsonl``. ``--select best`` uses
``returns/pre_adaptation``, the return this mode trains.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from metarl_tf.config import TrainConfig
from metarl_tf.outer import MetaBatch, make_meta_step
from metarl_tf.training.trainer import MetaTrainer, _to_tensors, peak_rss_mb


def default_bundle_path(config: TrainConfig) -> Path:
    """Where ``train --algo pretrain`` writes its bundle unless told (``--out``), and where
    ``evaluate --baselines`` looks for it: ``saved_models/<dist>-pretrained`` for a plain task
    distribution, ``saved_models/<dist>`` for an oracle one (``saved_models/nav2d-oracle``)."""
    name = config.task_distribution
    return Path("saved_models") / (name if name.endswith("-oracle") else f"{name}-pretrained")


def pretrain_step(policy, episodes, advantages, config: TrainConfig, optimizer=None):
    """One joint update of ``policy.parameters`` on ``episodes`` ``[tasks, episodes, T, ...]``:
    TRPO (``config.outer == "trpo"``, with its ``max_kl``, CG and line-search settings), PPO-clip
    (``"ppo"``, ``ppo_epochs`` Adam epochs) or Adam.

    It is the meta-step with a zero inner step size on a batch whose inner and outer halves are
    ``episodes`` (:func:`metarl_tf.outer.make_meta_step` with ``joint=True``): ``θ' = θ``, so the
    meta-objective is the plain surrogate of ``θ`` and the Gauss-Newton product is the plain
    Fisher product. Meant to run inside ``tf.function``.

    Returns:
        the meta-step's statistics (``loss_before``, ``loss_after``, ``kl``, ... for TRPO).
    """
    step = make_meta_step(config, policy, 0.0, optimizer, joint=True)
    return step(MetaBatch(episodes, advantages, episodes, advantages))


class PretrainTrainer(MetaTrainer):
    """Joint training without adaptation; everything else (logging, checkpoints, ``--resume``,
    the bundle) is :class:`MetaTrainer`'s.

    The bundle it writes is an ordinary one: its scalar step size is ``inner_step_size`` and
    ``meta.json``'s ``training.algo`` is ``"pretrain"``. Meta-SGD is switched off (there are no
    step sizes to learn).
    """

    selection_metric = "returns/pre_adaptation"
    joint = True  # pretrain_step's update: θ' = θ (see the module docstring)

    def __init__(self, config: TrainConfig, run_dir: str | Path | None = None):
        super().__init__(
            config.replace(algo="pretrain", meta_sgd=False, meta_sgd_per_step=False), run_dir
        )

    def train_iteration(self) -> dict[str, float]:
        """One joint update on fresh tasks; returns its metrics (also appended to ``history``)."""
        c = self.config
        task_seed, sample_seed, monitor_seed = self._seeds(self.iteration)
        retries = self.sampler.retries
        t0 = time.perf_counter()
        tasks = self.dist.sample_tasks(c.meta_batch_size, task_seed)
        batch_np = self.sampler.sample(self.policy.parameters, tasks, sample_seed)
        t1 = time.perf_counter()
        # The adapter also returns the advantages (the trainer's settings), used by the update.
        adapted, _, advantages = self.adapter(self.policy.parameters, batch_np, c.inner_steps)
        t2 = time.perf_counter()
        after_np = self.sampler.sample(adapted, tasks, monitor_seed)  # monitoring only
        batch = _to_tensors(batch_np)
        t3 = time.perf_counter()
        stats = self._meta_step(MetaBatch(batch, advantages, batch, advantages))
        stats = {k: float(v) for k, v in stats.items()}
        t4 = time.perf_counter()
        self.iteration += 1
        self.elapsed += t4 - t0
        metrics = {
            "iteration": self.iteration,
            "returns/pre_adaptation": float(np.mean(batch_np.episode_returns)),
            "returns/post_adaptation": float(np.mean(after_np.episode_returns)),
            **{f"losses/{k}": v for k, v in stats.items()},
            "time/sampling_s": (t1 - t0) + (t3 - t2),
            "time/adapt_s": t2 - t1,
            "time/meta_step_s": t4 - t3,
            "time/iteration_s": t4 - t0,
            "time/elapsed_s": self.elapsed,
            "charts/env_steps": float(batch_np.num_steps),
            "charts/monitor_env_steps": float(after_np.num_steps),
            "charts/sampling_retries": float(self.sampler.retries - retries),
            "charts/peak_rss_mb": peak_rss_mb(),
        }
        self.history.append(metrics)
        return metrics
