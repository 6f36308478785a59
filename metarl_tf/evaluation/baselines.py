"""Meta-test baselines beside the meta-learned initialization (the MAML paper's comparisons).

- ``random``: a freshly initialized policy of the bundle's architecture (Glorot-uniform kernels,
  zero biases, the bundle's initial ``log_std``), seeded by the evaluation seed.
- ``pretrained``: one policy trained jointly on all training tasks without adaptation
  (``python -m metarl_tf train --algo pretrain``), found at ``saved_models/<dist>-pretrained`` next
  to the bundle, or named by ``--pretrained``.
- ``oracle``: the same on the oracle variant of the task distribution (the task parameters in the
  observation: ``nav2d-oracle``), at ``saved_models/<dist>-oracle`` or ``--oracle``.

Every baseline runs the meta-learner's inner-step procedure on the same test tasks with the same
noise seeds: k steps, each on fresh episodes of the current policy, with the bundle's loss,
baseline and γ. The bundle's step sizes (Meta-SGD's learned ones) belong to its own
initialization, so each baseline gets a scalar step size, by default the best of
:data:`STEP_SIZE_GRID` on *validation* tasks (sampled with their own seed, never the test tasks),
scored by the mean return after 1..k steps (:func:`choose_step_size`), with the better of the
bundle's GAE λ and those of :data:`BASELINE_GAE_LAMBDAS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarl_tf.evaluation.protocol import method_curve

BASELINES = ("random", "pretrained", "oracle")
STEP_SIZE_GRID = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# A baseline's grid also tries these GAE lambdas besides the evaluated bundle's own: a bundle
# meta-trained for another estimator must not handicap baselines that adapt better with 1.
BASELINE_GAE_LAMBDAS = (1.0,)
VALIDATION_SEED = (
    6_133_001  # validation tasks for the step-size grid, apart from test/training seeds
)
RANDOM_INIT_SALT = 4_241_000  # the random baseline's initialization seed = salt + evaluation seed


@dataclass
class Method:
    """A policy initialization and how it adapts.

    Attributes:
        name: ``maml``, ``random``, ``pretrained`` or ``oracle``.
        task_distribution: where it acts (the oracle's includes the task in the observation).
        policy: gives the functional forward pass and the activation (weights come from ``params``).
        params: the initial weights, one numpy array per parameter.
        adapter: the compiled inner step (:class:`metarl_tf.maml.Adapter`).
        step_size: the scalar inner step size, or ``None`` for the bundle's own (learned) ones.
        source: the bundle path, or how the weights were made.
        selection: how ``step_size`` was chosen (grid, validation returns), when it was.
    """

    name: str
    task_distribution: Any
    policy: Any
    params: list[np.ndarray]
    adapter: Any
    step_size: float | None
    source: str
    selection: dict[str, Any] = field(default_factory=dict)


def parse_baselines(text: str | None) -> list[str]:
    """``"random,pretrained"`` -> ``["random", "pretrained"]``; raises ``ValueError`` on others."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    return list(dict.fromkeys(names))


def random_parameters(policy, seed: int) -> list[np.ndarray]:
    """Fresh weights for ``policy``'s architecture: Keras' ``Dense`` defaults (Glorot-uniform
    kernels ``U(±sqrt(6 / (fan_in + fan_out)))``, zero biases) and the policy's initial
    ``log_std``; the same seed gives the same weights."""
    rng = np.random.default_rng(seed)
    params = []
    for name, shape in zip(policy.parameter_names, policy.parameter_shapes, strict=True):
        if name.endswith("/kernel"):
            limit = math.sqrt(6.0 / (shape[0] + shape[1]))
            params.append(rng.uniform(-limit, limit, size=shape).astype(np.float32))
        elif name == "log_std":
            params.append(np.full(shape, policy.init_log_std, np.float32))
        else:
            params.append(np.zeros(shape, np.float32))
    return params


def _training_preset(dist_name: str) -> str:
    from metarl_tf.config import PRESETS

    matches = [
        name
        for name, c in PRESETS.items()
        if c.task_distribution == dist_name and c.algo == "pretrain"
    ]
    return matches[0] if matches else f"<a preset with task_distribution={dist_name!r}>"


def baseline_bundle_path(kind: str, bundle) -> Path:
    """The conventional place of the ``pretrained`` / ``oracle`` bundle for ``bundle``:
    ``<bundle's folder>/<dist>-pretrained`` and ``<bundle's folder>/<dist>-oracle``."""
    dist = bundle.task_distribution.name
    return bundle.path.parent / (f"{dist}-pretrained" if kind == "pretrained" else f"{dist}-oracle")


def load_baseline_bundle(kind: str, bundle, path: str | Path | None = None):
    """Loads the ``pretrained`` or ``oracle`` bundle for ``bundle`` and checks that it acts on
    the same tasks; a missing one raises ``FileNotFoundError`` naming the command that trains it."""
    from metarl_tf.bundle import load_bundle
    from metarl_tf.envs import TASK_DISTRIBUTIONS

    base = bundle.task_distribution
    dist_name = base.name if kind == "pretrained" else f"{base.name}-oracle"
    if kind == "oracle" and dist_name not in TASK_DISTRIBUTIONS:
        raise ValueError(
            f"the task distribution {base.name!r} has no oracle variant; register one "
            f"({dist_name!r}) in metarl_tf/envs/__init__.py with oracle_variant() "
            "(see metarl_tf/envs/oracle.py)"
        )
    flag = f"--{kind}"
    target = Path(path) if path else baseline_bundle_path(kind, bundle)
    if not (target / "meta.json").is_file():
        where = f"{flag} {target}" if path else f"{target} (the default place; or pass {flag} PATH)"
        raise FileNotFoundError(
            f"the {kind} baseline needs a bundle, and there is none at {where}. Train it with:\n"
            f"  python -m metarl_tf train --algo pretrain --preset {_training_preset(dist_name)} "
            f"--out {target}"
        )
    other = load_bundle(target)
    td = other.meta["task_distribution"]
    # Compared as the distributions normalize their settings: a key a family ignores (MuJoCo's
    # ``num_workers`` of bundles written when it chose worker processes) is no difference.
    if td["name"] != dist_name or other.task_distribution.config() != base.config():
        raise ValueError(
            f"{kind} bundle {str(target)!r} was trained on {td['name']!r} {td.get('config')}, "
            f"expected {dist_name!r} {base.config()} (the evaluated bundle's tasks)"
        )
    if other.meta.get("training", {}).get("algo") != "pretrain":
        print(f"note: {kind} bundle {target} was not trained with --algo pretrain")
    return other


def make_adapter(policy, bundle, step_size, gae_lambda: float | None = None):
    """An :class:`~metarl_tf.maml.Adapter` with ``bundle``'s loss settings (GAE's lambda:
    ``gae_lambda`` when given) and a scalar step size held in a variable (so a grid of step sizes
    reuses one compiled function)."""
    import tensorflow as tf

    from metarl_tf.maml import Adapter

    a = bundle.adaptation
    lam = a["gae_lambda"] if gae_lambda is None else float(gae_lambda)
    size = tf.Variable(float(step_size), dtype=tf.float32, trainable=False)
    return Adapter(policy, size, a["gamma"], lam, a["baseline"])


def choose_step_size(
    method: Method,
    grid: Sequence[float],
    n_tasks: int,
    episodes: int,
    steps: int,
    params: list[np.ndarray] | None = None,
    backend=None,
) -> float:
    """Sets ``method.step_size`` to the grid value with the best mean return after 1..``steps``
    inner steps on ``n_tasks`` validation tasks (seed :data:`VALIDATION_SEED`); records the
    scores in ``method.selection``."""
    tasks = method.task_distribution.sample_tasks(n_tasks, seed=VALIDATION_SEED)
    k = max(1, steps)
    scores = []
    for alpha in grid:
        method.adapter.step_sizes.assign(float(alpha))
        curve = method_curve(
            method.task_distribution, method.policy, params or method.params, method.adapter,
            tasks, episodes, k, VALIDATION_SEED, backend,
        )  # fmt: skip
        score = float(np.mean(curve["mean_return"][1:]))
        scores.append(score if np.isfinite(score) else -np.inf)
    best = float(grid[int(np.argmax(scores))])
    method.adapter.step_sizes.assign(best)
    method.step_size = best
    method.selection = {
        "grid": [float(a) for a in grid],
        "validation_return": scores,
        "chosen": best,
        "criterion": f"mean return after 1..{k} inner steps on {n_tasks} validation tasks",
        "validation_seed": VALIDATION_SEED,
    }
    return best


def _choose_step_size_and_lambda(method, bundle, grid, n_tasks, episodes, steps, init, backend):
    """:func:`choose_step_size` for each GAE lambda (the bundle's and
    :data:`BASELINE_GAE_LAMBDAS`); keeps the best (step size, lambda) on the validation tasks."""
    lambdas = list(
        dict.fromkeys(map(float, (bundle.adaptation["gae_lambda"], *BASELINE_GAE_LAMBDAS)))
    )
    best = None
    by_lambda = {}
    for lam in lambdas:
        method.adapter = make_adapter(method.policy, bundle, grid[0], lam)
        choose_step_size(method, grid, n_tasks, episodes, steps, init, backend)
        score = max(method.selection["validation_return"])
        by_lambda[str(lam)] = method.selection["validation_return"]
        if best is None or score > best[0]:
            best = (score, lam, method.adapter, method.step_size, method.selection)
    _, lam, method.adapter, method.step_size, selection = best
    method.selection = {
        **selection,
        "gae_lambda": lam,
        "validation_return_by_gae_lambda": by_lambda,
        "criterion": selection["criterion"] + f", over GAE lambda in {sorted(lambdas)}",
    }


def build_methods(
    bundle,
    baselines: Sequence[str],
    *,
    pretrained: str | Path | None = None,
    oracle: str | Path | None = None,
    step_size: float | None = None,
    grid: Sequence[float] = STEP_SIZE_GRID,
    validation_tasks: int = 40,
    episodes: int = 20,
    steps: int = 3,
    backend=None,
) -> list[Method]:
    """``maml`` (the bundle as it is) and the requested baselines, with their step sizes fixed
    (``step_size``) or chosen on validation tasks (``step_size=None``: :func:`choose_step_size`).

    Bundles are loaded (and missing ones reported) before any evaluation work starts.
    """
    methods = [
        Method("maml", bundle.task_distribution, bundle.policy, bundle.policy.get_parameters(),
               bundle.make_adapter(), None, str(bundle.path))
    ]  # fmt: skip
    loaded = {
        kind: load_baseline_bundle(kind, bundle, path)
        for kind, path in (("pretrained", pretrained), ("oracle", oracle))
        if kind in baselines
    }
    for name in baselines:
        if name == "random":  # the bundle's architecture; only the weights differ
            params = random_parameters(bundle.policy, RANDOM_INIT_SALT)  # per seed: see evaluate
            source = f"random init (Glorot-uniform, seed {RANDOM_INIT_SALT} + evaluation seed)"
            method = Method(
                name, bundle.task_distribution, bundle.policy, params, None, None, source
            )
        else:
            other = loaded[name]
            method = Method(name, other.task_distribution, other.policy,
                            other.policy.get_parameters(), None, None, str(other.path))  # fmt: skip
        if step_size is None:
            # the random baseline's grid uses an initialization of its own (seed VALIDATION_SEED)
            init = random_parameters(method.policy, VALIDATION_SEED) if name == "random" else None
            _choose_step_size_and_lambda(
                method, bundle, grid, validation_tasks, episodes, steps, init, backend
            )
        else:
            method.adapter = make_adapter(method.policy, bundle, step_size)
            method.step_size = float(step_size)
            method.selection = {
                "chosen": float(step_size),
                "criterion": "given (--baseline-step-size)",
            }
        methods.append(method)
    return methods
