"""The meta-training loop: sample → adapt (→ sample → adapt, k inner steps on fresh episodes) →
sample → compiled outer step, with logging, checkpoints, resume, and a bundle at the end (or on
Ctrl-C)."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from metarl_tf.advantages import compute_advantages
from metarl_tf.atomic_files import write_text_atomic
from metarl_tf.bundle import load_bundle, save_bundle
from metarl_tf.checkpoint import BEST_PREFIX, checkpoint_exists, read_checkpoint, write_checkpoint
from metarl_tf.config import TrainConfig
from metarl_tf.curvature import analytic_curvature_for
from metarl_tf.envs import make_task_distribution
from metarl_tf.episodes import EpisodeBatch
from metarl_tf.maml import Adapter, step_size_blocks
from metarl_tf.outer import MetaBatch, make_meta_step
from metarl_tf.policy import LOG_STD, make_policy
from metarl_tf.rollout import Sampler, make_backend

# XLA (jit_compile) helps Eigen's kernels but runs slower than TensorFlow's oneDNN kernels for this
# step (bench/train_speed.py: 3.1 s vs 1.7 s per nav2d iteration); METARL_JIT=1 opts in.
_JIT = os.environ.get("METARL_JIT", "0") == "1"
# Iterations of metrics a checkpoint keeps: the window of ``--select best``'s moving average and of
# the bundle's "last 10 iterations" summary.
BEST_WINDOW = 10
# Fields a run may change when it continues: on --resume of its checkpoint ...
RUN_FIELDS = ("iterations", "checkpoint_every", "backend", "ray_address", "num_env_workers")
# ... and from a bundle (train --init-from): sampling and outer-step settings, the number of
# inner steps trained for and the objective over them (e.g. continue a 1-step meta-init with a
# 2-step objective) and GAE's lambda (the advantage estimator; the bundle records the new one, and
# the learned step sizes re-adapt to it), not the task distribution, the policy or the inner
# step rule.
CONTINUATION_FIELDS = RUN_FIELDS + (
    "init_log_std", "meta_batch_size", "episodes_per_task", "outer", "max_kl", "cg_iterations",
    "cg_damping", "ls_max_steps", "ls_backtrack_ratio", "outer_learning_rate", "ppo_epochs",
    "ppo_clip", "seed", "inner_steps", "every_step_objective", "step_weights", "lvc",
    "meta_sgd_per_step", "gae_lambda",
)  # fmt: skip
CHECKPOINT_SHIFT = "log_std_shift"


def read_metrics_rows(
    path: str | Path, up_to: int | None = None, drop_torn_tail: bool = False
) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl`` (none if the file is absent), only those of iterations
    ``<= up_to`` when given (a run may have logged past the checkpoint or bundle it continues).
    ``drop_torn_tail``: ignore a last line that is not complete JSON (a write cut short by a
    kill or a full disk) instead of raising."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if drop_torn_tail and number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
    return rows if up_to is None else [r for r in rows if r["iteration"] <= up_to]


def write_metrics_rows(path: str | Path, rows: list[dict]) -> None:
    """Replaces ``path`` with ``rows`` atomically (a crash leaves the old or the new file)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class BestSnapshot:
    """The parameters at the iteration with the best moving average of the selection metric
    (``train --select best``).

    Attributes:
        iteration: the iteration they are from.
        value: the moving average of the last :data:`BEST_WINDOW` iterations' selection metric.
        elapsed: training seconds up to that iteration.
        window: the metrics rows of those iterations (the bundle's summary).
        arrays: the trainer's :meth:`MetaTrainer.state_arrays` without optimizer state.
    """

    iteration: int
    value: float
    elapsed: float
    window: list[dict[str, float]]
    arrays: dict[str, np.ndarray]

    def record(self) -> dict[str, Any]:
        """What the bundle's ``training.selection`` records (with ``select``)."""
        return {"iteration": self.iteration, "post_return_ma10": self.value}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _to_tensors(batch: EpisodeBatch) -> EpisodeBatch:
    return EpisodeBatch(*[tf.convert_to_tensor(x, tf.float32) for x in batch])


class MetaTrainer:
    """Meta-trains a policy with MAML / Meta-SGD.

    Args:
        config: the training configuration.
        run_dir: where checkpoints, ``metrics.jsonl`` and TensorBoard events go.
    """

    selection_metric = "returns/post_adaptation"  # what --select best maximizes
    joint = False  # the outer step through the adaptation (True: the pretrained baseline's)

    def __init__(self, config: TrainConfig, run_dir: str | Path | None = None):
        self.config = c = config
        self.run_dir = Path(run_dir) if run_dir else None
        self.dist = make_task_distribution(c.task_distribution, horizon=c.horizon, **c.task_kwargs)
        keras.utils.set_random_seed(c.seed)
        # Gaussian for continuous action specs, categorical for discrete ones
        self.policy = make_policy(
            self.dist.observation_spec,
            self.dist.action_spec,
            c.hidden_sizes,
            c.activation,
            c.init_log_std,
        )
        if c.meta_sgd:
            blocks = c.inner_steps if c.meta_sgd_per_step else 1
            self.step_sizes: Any = [
                tf.Variable(tf.fill(shape, c.inner_step_size), name=f"alpha/step{b}/{name}")
                for b in range(blocks)
                for shape, name in zip(
                    self.policy.parameter_shapes, self.policy.parameter_names, strict=True
                )
            ]
        else:
            self.step_sizes = float(c.inner_step_size)
        self.log_std_shift = None
        if c.log_std_shift:
            if getattr(self.policy, "distribution_type", None) != "gaussian":
                raise ValueError("log_std_shift needs a Gaussian policy (continuous actions)")
            shape = self.policy.parameter_shapes[LOG_STD]
            self.log_std_shift = tf.Variable(tf.zeros(shape), name="log_std_shift")
        backend = make_backend(c.backend, c.ray_address, c.num_env_workers)
        self.sampler = Sampler(self.dist, self.policy, c.episodes_per_task, backend)
        self.adapter = Adapter(
            self.policy, self.step_sizes, c.gamma, c.gae_lambda, c.baseline, self.log_std_shift
        )
        # Second-order TRPO needs the inner loss's forward/backward passes at every inner step's
        # point for its Hessian products; the sampling adaptation computes them once for both.
        self._hessian_cls = (
            analytic_curvature_for(self.policy)[0]
            if c.outer == "trpo" and not c.first_order
            else None
        )
        self.optimizer = (
            keras.optimizers.Adam(c.outer_learning_rate) if c.outer in ("adam", "ppo") else None
        )
        if self.optimizer is not None:
            self.optimizer.build(self._meta_variables)
        self.outer_step = make_meta_step(
            c, self.policy, self.step_sizes, self.optimizer, self.log_std_shift, joint=self.joint
        )
        self._meta_step = tf.function(self._meta_step_fn, jit_compile=_JIT)
        self._outer_advantages = tf.function(
            lambda e: compute_advantages(e, c.gamma, c.gae_lambda, c.baseline)
        )
        self.iteration = 0
        self.elapsed = 0.0  # training wall-clock seconds, carried across resumes
        self.history: list[dict[str, float]] = []
        self.selection: dict[str, Any] = {"select": "last"}
        self.best: BestSnapshot | None = None  # updated by track_best
        self.lineage: list[dict[str, Any]] = []  # bundles this run continued (init_from_bundle)
        self.recipe: dict[str, Any] | None = None  # the recipe and leg this run is (fit's recipe)

    @property
    def _meta_variables(self) -> list:
        return (
            list(self.policy.parameters)
            + (list(self.step_sizes) if self.config.meta_sgd else [])
            + ([self.log_std_shift] if self.log_std_shift is not None else [])
        )

    def _meta_step_fn(self, batch: MetaBatch):
        """The outer update (:func:`metarl_tf.outer.make_meta_step`), compiled as ``_meta_step``."""
        return self.outer_step(batch)

    def _seeds(self, iteration: int) -> tuple[int, int, int]:
        s = np.random.SeedSequence([self.config.seed, iteration]).generate_state(3)
        return int(s[0]), int(s[1]), int(s[2])

    def _inner_seeds(self, iteration: int, first: int) -> list[int]:
        """One sampling seed per inner batch; the first is ``_seeds``'s (as with one inner step)."""
        return [first] + [
            int(np.random.SeedSequence([self.config.seed, iteration, j]).generate_state(1)[0])
            for j in range(1, self.config.inner_steps)
        ]

    def sample_meta_batch(self, tasks, inner_seeds, outer_seed) -> tuple[MetaBatch, dict]:
        """Collects what one meta-step consumes: for ``j = 1..k`` the inner batch ``D^j`` with the
        policy adapted ``j − 1`` times and one inner step on it (the compiled :class:`Adapter`),
        then the outer batch ``D'`` with the policy adapted ``k`` times.

        Returns:
            ``(MetaBatch with k-tuples of inner batches and advantages, info)``; ``info`` holds the
            numpy batches (``inner_np``, ``outer_np``) and the seconds spent sampling / adapting.
        """
        params = self.policy.parameters
        inner_np, inner, inner_adv, curvature = [], [], [], []
        sampling_s = adapt_s = 0.0
        for step, seed in enumerate(inner_seeds):
            t0 = time.perf_counter()
            batch_np = self.sampler.sample(params, tasks, seed)
            batch = _to_tensors(batch_np)
            t1 = time.perf_counter()
            if self._hessian_cls is not None:  # the meta-step reuses the inner step's passes
                params, _, adv, carried = self.adapter.with_curvature(
                    params, batch, self._hessian_cls, first_step=step
                )
                curvature.append(carried)
            else:
                params, _, adv = self.adapter(params, batch, 1, first_step=step)
            adapt_s += time.perf_counter() - t1
            sampling_s += t1 - t0
            inner_np.append(batch_np)
            inner.append(batch)
            inner_adv.append(adv)
        t0 = time.perf_counter()
        outer_np = self.sampler.sample(params, tasks, outer_seed)
        outer = _to_tensors(outer_np)
        outer_adv = self._outer_advantages(outer)
        sampling_s += time.perf_counter() - t0
        batch = MetaBatch(
            tuple(inner), tuple(inner_adv), outer, outer_adv, tuple(curvature) or None
        )
        info = {
            "inner_np": inner_np,
            "outer_np": outer_np,
            "sampling_s": sampling_s,
            "adapt_s": adapt_s,
        }
        return batch, info

    def train_iteration(self) -> dict[str, float]:
        """One meta-iteration; returns its metrics (also appended to ``history``)."""
        c = self.config
        task_seed, inner_seed, outer_seed = self._seeds(self.iteration)
        inner_seeds = self._inner_seeds(self.iteration, inner_seed)
        retries = self.sampler.retries
        t0 = time.perf_counter()
        tasks = self.dist.sample_tasks(c.meta_batch_size, task_seed)
        batch, info = self.sample_meta_batch(tasks, inner_seeds, outer_seed)
        t3 = time.perf_counter()
        stats = self._meta_step(batch)
        stats = {k: float(v) for k, v in stats.items()}
        t4 = time.perf_counter()
        self.iteration += 1
        self.elapsed += t4 - t0
        inner_np, outer_np = info["inner_np"], info["outer_np"]
        pre = float(np.mean(inner_np[0].episode_returns))
        post = float(np.mean(outer_np.episode_returns))
        metrics = {
            "iteration": self.iteration,
            "returns/pre_adaptation": pre,
            **{
                f"returns/after_{j}_inner_steps": float(np.mean(b.episode_returns))
                for j, b in enumerate(inner_np[1:], start=1)
            },
            "returns/post_adaptation": post,
            **{f"losses/{k}": v for k, v in stats.items()},
            "time/sampling_s": (t3 - t0) - info["adapt_s"],
            "time/adapt_s": info["adapt_s"],
            "time/meta_step_s": t4 - t3,
            "time/iteration_s": t4 - t0,
            "time/elapsed_s": self.elapsed,
            "charts/env_steps": float(sum(b.num_steps for b in [*inner_np, outer_np])),
            "charts/sampling_retries": float(self.sampler.retries - retries),
            "charts/peak_rss_mb": peak_rss_mb(),
        }
        if c.meta_sgd:
            metrics["charts/mean_step_size"] = float(
                np.mean(np.concatenate([s.numpy().ravel() for s in self.step_sizes]))
            )
        self.history.append(metrics)
        return metrics

    # -- checkpoints ------------------------------------------------------------------------
    def state_arrays(self, optimizer: bool = True) -> dict[str, np.ndarray]:
        """Parameters, Meta-SGD step sizes, log σ shift and (``optimizer``) the optimizer's
        variables, by checkpoint key."""
        arrays = {f"param_{i}": p.numpy() for i, p in enumerate(self.policy.parameters)}
        if self.config.meta_sgd:
            arrays.update({f"alpha_{i}": s.numpy() for i, s in enumerate(self.step_sizes)})
        if self.log_std_shift is not None:
            arrays[CHECKPOINT_SHIFT] = self.log_std_shift.numpy()
        if optimizer and self.optimizer is not None:
            arrays.update(
                {f"opt_{i}": np.asarray(v.numpy()) for i, v in enumerate(self.optimizer.variables)}
            )
        return arrays

    def load_state_arrays(self, arrays: dict[str, np.ndarray], where: str = "checkpoint") -> None:
        """Assigns what :meth:`state_arrays` returned (optimizer variables when present)."""
        try:
            self.policy.set_parameters(
                [arrays[f"param_{i}"] for i in range(len(self.policy.parameters))]
            )
            if self.config.meta_sgd:
                for i, s in enumerate(self.step_sizes):
                    s.assign(arrays[f"alpha_{i}"])
            if self.log_std_shift is not None:
                self.log_std_shift.assign(arrays[CHECKPOINT_SHIFT])
            if self.optimizer is not None and "opt_0" in arrays:
                for i, v in enumerate(self.optimizer.variables):
                    v.assign(arrays[f"opt_{i}"])
        except (KeyError, ValueError) as err:  # a missing key, or a shape that does not fit
            raise ValueError(
                f"{where}: does not fit this configuration's variables ({err})"
            ) from None

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Writes the state (:meth:`state_arrays`), the counters, the last :data:`BEST_WINDOW`
        iterations' metrics and the best snapshot to ``directory/checkpoint.npz`` in one atomic
        write (:mod:`metarl_tf.checkpoint`). Returns ``directory``."""
        arrays = self.state_arrays()
        best = None
        if self.best is not None:
            arrays.update({BEST_PREFIX + k: v for k, v in self.best.arrays.items()})
            best = {
                "iteration": self.best.iteration,
                "value": self.best.value,
                "elapsed": self.best.elapsed,
                "window": self.best.window,
            }
        manifest = {
            "iteration": self.iteration,
            "elapsed": self.elapsed,
            "config": self.config.to_dict(),
            "lineage": self.lineage,
            "history": [m for m in self.history if m["iteration"] <= self.iteration][-BEST_WINDOW:],
            "best": best,
        }
        write_checkpoint(directory, arrays, manifest)
        return Path(directory)

    def restore_checkpoint(self, directory: str | Path) -> bool:
        """Restores a checkpoint written by :meth:`save_checkpoint` (or the older two-file
        format); ``False`` if there is none. Raises :class:`~metarl_tf.checkpoint.CheckpointError`
        (a ``ValueError``) naming a truncated or corrupt file, ``ValueError`` for a checkpoint of
        another configuration."""
        directory = Path(directory)
        if not checkpoint_exists(directory):
            return False
        arrays, manifest = read_checkpoint(directory)
        self._check_same_config(
            TrainConfig.from_dict(manifest["config"]), f"checkpoint in {directory}"
        )
        own = {k: v for k, v in arrays.items() if not k.startswith(BEST_PREFIX)}
        self.load_state_arrays(own, f"checkpoint in {directory}")
        self.iteration, self.elapsed = int(manifest["iteration"]), float(manifest["elapsed"])
        self.lineage = manifest.get("lineage", [])
        self.history = list(manifest.get("history", []))
        best = manifest.get("best")
        self.best = None
        if best is not None:
            self.best = BestSnapshot(
                iteration=int(best["iteration"]),
                value=float(best["value"]),
                elapsed=float(best["elapsed"]),
                window=list(best["window"]),
                arrays={
                    k[len(BEST_PREFIX) :]: v for k, v in arrays.items() if k.startswith(BEST_PREFIX)
                },
            )
        return True

    def track_best(self) -> bool:
        """Keeps a :class:`BestSnapshot` of the current state when the moving average of the
        last :data:`BEST_WINDOW` iterations' :attr:`selection_metric` beats the best so far
        (in memory; :meth:`save_checkpoint` writes it). Returns whether it did."""
        recent = self.history[-BEST_WINDOW:]
        if len(recent) < BEST_WINDOW or recent[-1]["iteration"] != self.iteration:
            return False
        value = float(sum(m[self.selection_metric] for m in recent) / len(recent))
        if self.best is not None and self.best.value >= value:
            return False
        self.best = BestSnapshot(
            self.iteration, value, self.elapsed, list(recent), self.state_arrays(optimizer=False)
        )
        return True

    def select_best(self) -> dict[str, Any]:
        """Loads the best snapshot's parameters (the bundle is then written from them) and
        returns the ``selection`` record; raises ``ValueError`` if there is none yet."""
        if self.best is None:
            raise ValueError(f"no best snapshot yet: it needs {BEST_WINDOW} iterations of metrics")
        trained = self.iteration
        self.load_state_arrays(self.best.arrays, "best snapshot")
        self.iteration, self.elapsed = self.best.iteration, self.best.elapsed
        self.history = list(self.best.window)
        self.selection = {"select": "best", "trained_iterations": trained, **self.best.record()}
        return self.selection

    def _check_same_config(self, saved: TrainConfig, what: str, may_differ=RUN_FIELDS) -> None:
        """Refuses to continue ``what`` under another configuration; the fields in
        ``may_differ`` may change."""
        keep = {name: getattr(self.config, name) for name in may_differ}
        saved_d, now_d = saved.replace(**keep).to_dict(), self.config.to_dict()
        diff = {k: (v, now_d[k]) for k, v in saved_d.items() if v != now_d[k]}
        if diff:
            raise ValueError(
                f"{what} was written with another configuration (saved vs now: {diff}); "
                "use a fresh --run-dir or the same preset/options"
            )

    def init_from_bundle(self, path: str | Path) -> list[dict]:
        """Continues training from a bundle of the same task distribution, policy and inner step:
        the bundle's parameters (and Meta-SGD step sizes), iteration count and wall-clock. The
        sampling and outer-step settings (:data:`CONTINUATION_FIELDS`, e.g. a larger meta-batch)
        may differ; the change is recorded in the exported bundle's ``training.continued_from``.
        Returns the bundle's ``metrics.jsonl`` rows up to that iteration (empty if it has none).
        Adam/PPO moment estimates are not in a bundle; they restart from zero."""
        bundle = load_bundle(path)
        training = bundle.meta.get("training") or {}
        if "config" not in training:
            raise ValueError(f"bundle {path} has no training configuration to continue from")
        saved = TrainConfig.from_dict(training["config"])
        self._check_same_config(saved, f"bundle {path}", CONTINUATION_FIELDS)
        now_d = self.config.to_dict()
        self.lineage.append(
            {
                "bundle": bundle.name,
                "iterations": int(training.get("iterations", 0)),
                "changed": {k: v for k, v in saved.to_dict().items() if v != now_d[k]},
                "earlier": training.get("continued_from", []),
            }
        )
        self.policy.set_parameters(bundle.policy.get_parameters())
        if self.config.meta_sgd:
            values = list(bundle.step_sizes)
            n = len(self.policy.parameters)
            have, want = step_size_blocks(values, n), step_size_blocks(self.step_sizes, n)
            if have > want:
                raise ValueError(
                    f"bundle {path} has {have} per-step blocks of step sizes; continue it with "
                    f"--meta-sgd-per-step and --inner-steps >= {have}"
                )
            if have == 1 and want > 1:  # per-step blocks from shared step sizes
                shift = bundle.log_std_shift
                # Steps after the first adapt on episodes collected with σ·exp(shift), whose
                # network gradients are ~exp(−shift) times larger: start their network step
                # sizes that much smaller (log σ's gradient, r²/σ² − 1, does not scale).
                scale = 1.0 if shift is None else float(np.exp(np.mean(shift)))
                values = values + [
                    v * (scale if i < n - 1 else 1.0)
                    for _ in range(want - 1)
                    for i, v in enumerate(values[:n])
                ]
            elif have < want:  # learned blocks kept; later steps reuse the last one, as before
                values = values + values[-n:] * (want - have)
            for s, value in zip(self.step_sizes, values, strict=True):
                s.assign(value)
        if self.log_std_shift is not None:
            self.log_std_shift.assign(bundle.log_std_shift)
        self.iteration = int(training.get("iterations", 0))
        self.elapsed = float(training.get("wall_clock_seconds", 0.0))
        return read_metrics_rows(Path(path) / "metrics.jsonl", up_to=self.iteration)

    # -- bundle ------------------------------------------------------------------------------
    def step_size_values(self) -> float | list[np.ndarray]:
        if self.config.meta_sgd:
            return [s.numpy() for s in self.step_sizes]
        return float(self.step_sizes)

    def export_bundle(self, path: str | Path, extra_files: dict[str, Path] | None = None) -> Path:
        """Writes the meta-initialization bundle with a training summary."""
        recent = [m for m in self.history if m["iteration"] <= self.iteration][-10:]
        c = self.config
        summary = {
            "algo": c.algo,
            "config": c.to_dict(),
            "iterations": self.iteration,
            "selection": self.selection,
            **({"continued_from": self.lineage} if self.lineage else {}),
            **({"recipe": self.recipe} if self.recipe else {}),
            "wall_clock_seconds": round(self.elapsed, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        if recent:
            summary["final_pre_adaptation_return"] = float(
                np.mean([m["returns/pre_adaptation"] for m in recent])
            )
            summary["final_post_adaptation_return"] = float(
                np.mean([m["returns/post_adaptation"] for m in recent])
            )
        adaptation = {
            "steps": c.inner_steps,
            "gamma": c.gamma,
            "gae_lambda": c.gae_lambda,
            "baseline": c.baseline,
            "first_order": c.first_order,
            "meta_sgd": c.meta_sgd,
        }
        if self.log_std_shift is not None:
            adaptation["log_std_shift"] = self.log_std_shift.numpy().tolist()
        return save_bundle(
            path, self.policy, self.step_size_values(), self.dist,
            adaptation=adaptation, training=summary, extra_files=extra_files,
        )  # fmt: skip
