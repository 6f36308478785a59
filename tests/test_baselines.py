"""``evaluate --baselines random,pretrained,oracle --seeds ...``: the seed aggregate against a hand
computation, the random baseline's initialization, the step-size grid, the actionable error for a
missing baseline bundle, and the JSON the command writes."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from numerics import assert_close, assert_exact, assert_within

from metarl_tf.bundle import load_bundle
from metarl_tf.cli import main
from metarl_tf.config import get_preset
from metarl_tf.envs import Navigation2D
from metarl_tf.evaluation.baselines import (
    RANDOM_INIT_SALT,
    STEP_SIZE_GRID,
    load_baseline_bundle,
    make_adapter,
    parse_baselines,
    random_parameters,
)
from metarl_tf.evaluation.protocol import EVAL_SEED_SALT, method_curve
from metarl_tf.evaluation.report import format_paired
from metarl_tf.evaluation.statistics import aggregate_seeds, t_confidence_interval95


def test_seed_aggregate_equals_a_hand_computation():
    seed_a = np.array([[-10.0, -12.0, -8.0], [-5.0, -7.0, -6.0]])  # [steps + 1, tasks]
    seed_b = np.array([[-11.0, -9.0, -13.0], [-4.0, -6.0, -2.0]])
    got = aggregate_seeds([seed_a, seed_b])
    for k in range(2):
        values = [*seed_a[k], *seed_b[k]]
        mean = sum(values) / 6
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
        assert_close(got["mean_return"][k], mean, ulps=8, dtype=np.float32)
        assert_close(got["ci95"][k], 1.96 * sd / math.sqrt(6), ulps=8, dtype=np.float32)
        m_a, m_b = sum(seed_a[k]) / 3, sum(seed_b[k]) / 3
        sd_means = math.sqrt(((m_a - (m_a + m_b) / 2) ** 2 + (m_b - (m_a + m_b) / 2) ** 2) / 1)
        assert_close(
            got["ci95_across_seeds"][k], 12.706 * sd_means / math.sqrt(2), ulps=8, dtype=np.float32
        )
    assert "ci95_across_seeds" not in aggregate_seeds([seed_a])


def test_t_interval_uses_student_t_for_few_values():
    assert_close(
        t_confidence_interval95(np.array([1.0, 2.0, 3.0])),
        4.303 / math.sqrt(3),
        ulps=8,
        dtype=np.float32,
    )
    many = np.arange(100.0)
    assert_close(
        t_confidence_interval95(many), 1.96 * np.std(many, ddof=1) / 10, ulps=8, dtype=np.float32
    )
    assert math.isnan(t_confidence_interval95(np.array([1.0])))


def test_random_parameters_are_seeded_glorot_uniform(make_policy):
    policy = make_policy(hidden=(16, 8), log_std=-1.2)
    a, b = random_parameters(policy, 3), random_parameters(policy, 3)
    c = random_parameters(policy, 4)
    for x, y in zip(a, b, strict=True):
        assert_exact(x, y)
    assert not np.array_equal(a[0], c[0])
    for value, name, shape in zip(a, policy.parameter_names, policy.parameter_shapes, strict=True):
        assert value.shape == shape and value.dtype == np.float32
        if name.endswith("/kernel"):
            limit = math.sqrt(6 / (shape[0] + shape[1]))
            assert np.abs(value).max() <= limit
            assert np.abs(value).max() > 0.8 * limit  # spread over the whole range
            why = "the variance of U(-l, l) from a few dozen draws"
            assert_within(np.var(value), limit**2 / 3, atol=0.35 * limit**2 / 3, why=why)
        elif name == "log_std":
            assert_close(value, -1.2, ulps=1)
        else:
            assert_exact(value, 0.0)


def test_parse_baselines():
    assert parse_baselines("random, oracle,random") == ["random", "oracle"]
    assert parse_baselines("") == [] and parse_baselines(None) == []
    with pytest.raises(ValueError, match="choose from random, pretrained, oracle"):
        parse_baselines("random,ppo")


def fake_bundle(path):
    return SimpleNamespace(path=path / "nav2d-maml", task_distribution=Navigation2D(horizon=5))


def test_missing_pretrained_bundle_says_which_command_trains_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_baseline_bundle("pretrained", fake_bundle(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "nav2d-pretrained") in msg and "--pretrained PATH" in msg
    assert "python -m metarl_tf train --algo pretrain --preset nav2d-pretrain" in msg
    with pytest.raises(FileNotFoundError, match="--preset nav2d-oracle"):
        load_baseline_bundle("oracle", fake_bundle(tmp_path), tmp_path / "elsewhere")


# -- the command, on untrained tiny bundles (the numbers do not matter, the bookkeeping does) --


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    """``nav2d-maml``, ``nav2d-pretrained`` and ``nav2d-oracle`` side by side (tiny preset, horizon
    5, exported untrained: the evaluation bookkeeping is under test, not the training)."""
    from metarl_tf.training.pretrain import PretrainTrainer
    from metarl_tf.training.trainer import MetaTrainer

    root = tmp_path_factory.mktemp("bundles")
    tiny = get_preset("tiny")
    MetaTrainer(tiny).export_bundle(root / "nav2d-maml")
    PretrainTrainer(tiny.replace(seed=1)).export_bundle(root / "nav2d-pretrained")
    PretrainTrainer(tiny.replace(seed=2, task_distribution="nav2d-oracle")).export_bundle(
        root / "nav2d-oracle"
    )
    return root


def test_baseline_bundle_of_other_tasks_is_refused(tiny_bundles):
    bundle = load_bundle(tiny_bundles / "nav2d-maml")
    with pytest.raises(ValueError, match="expected 'nav2d-oracle'"):
        load_baseline_bundle("oracle", bundle, tiny_bundles / "nav2d-pretrained")


def test_baseline_grid_tries_gae_lambda_1_beside_the_bundles_own(tmp_path):
    """A bundle meta-trained with GAE lambda 0.9: the random baseline's grid runs with 0.9 and 1,
    keeps the pair with the best validation return and adapts with that lambda; a bundle with
    lambda 1 runs the grid once."""
    from metarl_tf.evaluation.baselines import build_methods
    from metarl_tf.training.trainer import MetaTrainer

    tiny = get_preset("tiny")
    MetaTrainer(tiny.replace(gae_lambda=0.9)).export_bundle(tmp_path / "smooth")
    (random,) = build_methods(
        load_bundle(tmp_path / "smooth"), ["random"], grid=(0.0, 0.1, 1.0), validation_tasks=2,
        episodes=2, steps=1,
    )[1:]  # fmt: skip
    sel = random.selection
    by_lambda = sel["validation_return_by_gae_lambda"]
    assert set(by_lambda) == {"0.9", "1.0"}
    best = max(by_lambda, key=lambda lam: max(by_lambda[lam]))
    assert sel["gae_lambda"] == float(best) == random.adapter.gae_lambda
    assert random.step_size == (0.0, 0.1, 1.0)[int(np.argmax(by_lambda[best]))]
    assert by_lambda["0.9"] != by_lambda["1.0"]  # the lambda reached the inner loss

    MetaTrainer(tiny).export_bundle(tmp_path / "plain")
    (random,) = build_methods(
        load_bundle(tmp_path / "plain"), ["random"], grid=(0.0, 0.1), validation_tasks=2,
        episodes=2, steps=1,
    )[1:]  # fmt: skip
    assert list(random.selection["validation_return_by_gae_lambda"]) == ["1.0"]


def test_baseline_bundle_settings_compare_as_the_family_reads_them(tmp_path):
    """A MuJoCo bundle written when the family took ``num_workers`` (which it now ignores) is a
    baseline of the same tasks; a different horizon is not."""
    pytest.importorskip("mujoco")
    from metarl_tf.training.pretrain import PretrainTrainer
    from metarl_tf.training.trainer import MetaTrainer

    tiny = get_preset("tiny").replace(task_distribution="halfcheetah-vel", horizon=5)
    MetaTrainer(tiny).export_bundle(tmp_path / "halfcheetah-vel-maml")
    PretrainTrainer(tiny.replace(seed=1)).export_bundle(tmp_path / "halfcheetah-vel-pretrained")
    meta_path = tmp_path / "halfcheetah-vel-pretrained" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["task_distribution"]["config"]["num_workers"] = 2
    meta_path.write_text(json.dumps(meta))
    bundle = load_bundle(tmp_path / "halfcheetah-vel-maml")
    other = load_baseline_bundle("pretrained", bundle)
    assert other.meta["task_distribution"]["config"] == {"horizon": 5, "num_workers": 2}
    meta["task_distribution"]["config"]["horizon"] = 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expected 'halfcheetah-vel' {'horizon': 5}"):
        load_baseline_bundle("pretrained", bundle)


@pytest.mark.slow
def test_evaluate_with_baselines_and_seeds_writes_the_documented_json(tiny_bundles, tmp_path):
    out = tmp_path / "e.json"
    steps, tasks, episodes = 1, 3, 2
    code = main(
        ["evaluate", str(tiny_bundles / "nav2d-maml"), "--tasks", str(tasks), "--episodes",
         str(episodes), "--steps", str(steps), "--seeds", "0,1", "--baselines",
         "random,pretrained,oracle", "--json", str(out), "--plot", str(tmp_path / "p")]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert {"bundle", "tasks", "episodes", "seed", "seeds", "methods", "per_seed"} <= set(result)
    assert result["seeds"] == [0, 1] and result["seed"] == 0
    assert list(result["methods"]) == ["maml", "random", "pretrained", "oracle"]
    for name, m in result["methods"].items():
        assert len(m["mean_return"]) == len(m["ci95"]) == len(m["ci95_across_seeds"]) == steps + 1
        # the aggregate is the hand computation over the per-seed, per-task returns
        pooled = np.concatenate([result["per_seed"][s][name]["per_task"] for s in "01"], axis=1)
        assert pooled.shape == (steps + 1, 2 * tasks)
        assert_close(m["mean_return"], pooled.mean(axis=1), ulps=8, dtype=np.float32)
        assert_close(
            m["ci95"],
            1.96 * pooled.std(axis=1, ddof=1) / math.sqrt(2 * tasks),
            ulps=8,
            dtype=np.float32,
        )
        if name != "maml":
            sel = m["step_size_selection"]
            assert sel["grid"] == list(STEP_SIZE_GRID)
            assert m["step_size"] == sel["grid"][int(np.argmax(sel["validation_return"]))]
            maml = np.concatenate([result["per_seed"][s]["maml"]["per_task"] for s in "01"], 1)
            assert_close(result["paired_differences"][f"maml - {name}"]["mean"], (maml - pooled).mean(axis=1), ulps=16, dtype=np.float32)  # fmt: skip
    assert result["methods"]["pretrained"]["source"] == str(tiny_bundles / "nav2d-pretrained")
    assert result["methods"]["oracle"]["source"] == str(tiny_bundles / "nav2d-oracle")
    assert (tmp_path / "p_curve.png").stat().st_size > 0
    assert (tmp_path / "p_trajectories.png").stat().st_size > 0
    assert (tmp_path / "p_trajectories_methods.png").stat().st_size > 0
    assert "maml - oracle" in format_paired(result)

    # maml per seed = the plain single-seed evaluation; the random baseline = a fresh seeded
    # initialization evaluated on the same tasks (so reproducible)
    bundle = load_bundle(tiny_bundles / "nav2d-maml")
    for s in (0, 1):
        test_tasks = bundle.task_distribution.sample_tasks(tasks, seed=EVAL_SEED_SALT + s)
        maml = method_curve(
            bundle.task_distribution, bundle.policy, bundle.policy.parameters,
            bundle.make_adapter(), test_tasks, episodes, steps, s,
        )  # fmt: skip
        # the same seeded evaluation replayed
        assert_exact(result["per_seed"][str(s)]["maml"]["per_task"], maml["per_task"])
        alpha = result["methods"]["random"]["step_size"]
        rand = method_curve(
            bundle.task_distribution, bundle.policy,
            random_parameters(bundle.policy, RANDOM_INIT_SALT + s),
            make_adapter(bundle.policy, bundle, alpha), test_tasks, episodes, steps, s,
        )  # fmt: skip
        assert_close(
            result["per_seed"][str(s)]["random"]["per_task"],
            rand["per_task"],
            ulps=16,
            dtype=np.float32,
        )


@pytest.mark.slow
def test_evaluate_reports_a_missing_baseline_bundle(tiny_bundles, tmp_path, capsys):
    code = main(
        ["evaluate", str(tiny_bundles / "nav2d-maml"), "--tasks", "2", "--episodes", "1",
         "--baselines", "pretrained", "--pretrained", str(tmp_path / "none")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "train --algo pretrain" in err
    assert main(["evaluate", str(tiny_bundles / "nav2d-maml"), "--baselines", "ppo"]) == 2
    assert "unknown baseline" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_bundles / "nav2d-maml"), "--seeds", "0,x"]) == 2
    assert "--seeds takes comma-separated integers" in capsys.readouterr().err
