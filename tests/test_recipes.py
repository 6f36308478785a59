"""Recipes (``train --recipe``, metarl_tf/training/recipes.py): every shipped recipe is a valid
sequence of legs; a tiny recipe runs end to end, records itself in the bundles, and a recipe
interrupted anywhere resumes to the bundle of an uninterrupted run."""

import json
from pathlib import Path

import pytest

from metarl_tf.bundle import load_bundle
from metarl_tf.cli import main
from metarl_tf.config import RECIPES, Leg, Recipe, TrainConfig, get_preset, get_recipe
from metarl_tf.training import RunError, run_recipe
from metarl_tf.training.recipes import leg_dir
from metarl_tf.training.trainer import MetaTrainer
from tests.numerics import assert_exact

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_recipes_are_valid_sequences_of_legs():
    for recipe in RECIPES.values():
        configs = [leg.config() for leg in recipe.legs]  # raises on an invalid combination
        assert [c.iterations for c in configs] == [leg.iterations for leg in recipe.legs]
        dists = {c.task_distribution for c in configs}
        assert len(dists) == 1, f"{recipe.name}: legs on different task distributions {dists}"
    with pytest.raises(ValueError, match="must increase"):
        Recipe("bad", None, (Leg("a", "tiny", 4), Leg("b", "tiny", 2)))
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")


def test_nav2d_recipe_is_the_documented_legs_and_ends_in_the_shipped_bundles_config():
    """docs/RESULTS.md's legs for saved_models/nav2d-maml, leg by leg."""
    legs = get_recipe("nav2d").legs
    base = get_preset("nav2d-metasgd-lowstd").replace(
        hidden_sizes=(100, 100), activation="relu", log_std_shift=True
    )
    assert legs[0].config() == base.replace(iterations=100) and legs[0].select == "best"
    two = base.replace(meta_sgd_per_step=True, inner_steps=2, every_step_objective=True)
    assert legs[1].config() == two.replace(iterations=400) and legs[1].select == "last"
    assert legs[2].config() == two.replace(iterations=600) and legs[2].select == "last"
    assert legs[3].config() == two.replace(iterations=700, meta_batch_size=40)
    assert legs[4].config() == two.replace(iterations=760, meta_batch_size=80)
    assert legs[5].config() == two.replace(iterations=900, meta_batch_size=80, gae_lambda=0.95)
    assert len(legs) == 6
    meta = json.loads((REPO_ROOT / "saved_models" / "nav2d-maml" / "meta.json").read_text())
    assert TrainConfig.from_dict(meta["training"]["config"]) == legs[5].config()


def _run(tmp_path, name, **kw):
    return run_recipe(
        "tiny", tmp_path / name, tmp_path / f"{name}-out", progress=False, log=None,
        handle_signals=False, tensorboard=False, **kw,
    )  # fmt: skip


def _params(path):
    return [v.numpy() for v in load_bundle(path).policy.trainable_variables]


@pytest.mark.slow
def test_tiny_recipe_end_to_end_and_resumed_after_a_crash_in_every_leg(tmp_path, monkeypatch):
    recipe = get_recipe("tiny")
    whole = _run(tmp_path, "whole")
    assert whole.exit_code == 0 and whole.iteration == recipe.legs[-1].iterations
    meta = json.loads((tmp_path / "whole-out" / "meta.json").read_text())
    assert meta["training"]["recipe"]["name"] == "tiny"
    assert meta["training"]["recipe"]["leg"] == len(recipe.legs) - 1
    assert meta["training"]["config"]["inner_steps"] == 2
    assert meta["training"]["continued_from"], "the last leg continues the first leg's bundle"
    first = json.loads(
        (leg_dir(tmp_path / "whole", recipe, 0) / "bundle" / "meta.json").read_text()
    )
    assert first["training"]["recipe"]["leg"] == 0 and first["training"]["iterations"] == 2
    rows = (tmp_path / "whole-out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2, 3, 4]

    # A crash (as a kill: no bookkeeping) in leg 0's 2nd iteration, then in leg 1's 2nd.
    original = MetaTrainer.train_iteration
    calls = {"n": 0}

    def crash_at(n):
        def train_iteration(self):
            calls["n"] += 1
            if calls["n"] == n:
                raise SystemExit("killed")
            return original(self)

        return train_iteration

    monkeypatch.setattr(MetaTrainer, "train_iteration", crash_at(2))
    with pytest.raises(SystemExit):
        _run(tmp_path, "crashed")
    calls["n"] = 0
    monkeypatch.setattr(MetaTrainer, "train_iteration", crash_at(3))  # 1 left of leg 0, 2 of leg 1
    with pytest.raises(SystemExit):
        _run(tmp_path, "crashed", resume=True)
    monkeypatch.setattr(MetaTrainer, "train_iteration", original)
    with pytest.raises(RunError, match="--resume"):
        _run(tmp_path, "crashed")  # a recipe run with checkpoints needs --resume
    resumed = _run(tmp_path, "crashed", resume=True)
    assert resumed.iteration == whole.iteration
    for got, want in zip(
        _params(tmp_path / "crashed-out"), _params(tmp_path / "whole-out"), strict=True
    ):
        assert_exact(got, want)  # same iterations from the same checkpoints and seeds
    again = _run(tmp_path, "crashed", resume=True)  # a finished recipe only rewrites its bundles
    assert again.iteration == whole.iteration


def test_cli_recipe_refuses_training_flags_and_a_missing_resume(tmp_path, capsys):
    assert main(["train", "--recipe", "tiny", "--preset", "nav2d", "--iterations", "3"]) == 2
    err = capsys.readouterr().err
    assert "--preset" in err and "--iterations" in err and "Traceback" not in err
    code = main(["train", "--recipe", "tiny", "--resume", "--run-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "b")])  # fmt: skip
    assert code == 2
    assert "no leg of recipe 'tiny'" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code = main(["train", "--recipe", "tiny", "--run-dir", str(tmp_path / "r"),
                 "--out", str(tmp_path / "mine")])  # fmt: skip
    assert code == 2 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert not (tmp_path / "r").exists(), "refused before any leg started"


@pytest.mark.parametrize("name", ["halfcheetah-dir", "halfcheetah-vel"])
def test_mujoco_recipes_end_in_the_shipped_bundles_config(name):
    recipe = get_recipe(name)
    meta = json.loads((REPO_ROOT / recipe.bundle / "meta.json").read_text())
    leg = recipe.legs[-1].config()
    # trained leg by leg with --init-from: the requested length, checkpoints and backend vary
    how = ("iterations", "checkpoint_every", "backend", "ray_address", "num_env_workers")
    shipped = TrainConfig.from_dict(meta["training"]["config"])
    assert shipped.replace(**{k: getattr(leg, k) for k in how}) == leg
    assert meta["training"]["iterations"] == leg.iterations


def test_antdir_bundle_is_its_documented_command():
    # docs/RESULTS.md "Ant": train --preset ant-dir --meta-batch-size 20 --episodes-per-task 10
    meta = json.loads((REPO_ROOT / "saved_models/antdir-maml/meta.json").read_text())
    shipped = TrainConfig.from_dict(meta["training"]["config"])
    documented = get_preset("ant-dir").replace(meta_batch_size=20, episodes_per_task=10)
    how = ("iterations", "checkpoint_every", "backend", "ray_address", "num_env_workers")
    assert shipped.replace(**{k: getattr(documented, k) for k in how}) == documented
    assert shipped.task_kwargs == {"action_scale": 0.1}
    assert not meta["training"].get("continued_from")  # one run, no earlier legs
