"""The meta-initialization bundle: round trip (actions and step sizes), integrity checks with
actionable ``BundleError`` messages, and a ``policy.keras`` that Keras loads in safe mode."""

import hashlib
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from numerics import assert_close, assert_exact

from metarl_tf.bundle import BundleError, load_bundle, save_bundle
from metarl_tf.envs import Navigation2D
from metarl_tf.maml import Adapter
from metarl_tf.policy import GaussianMLPPolicy
from metarl_tf.rollout import Sampler

ADAPTATION = {"steps": 2, "gamma": 0.95, "gae_lambda": 0.9, "baseline": "linear"}


def meta_sgd_sizes(policy):
    rng = np.random.default_rng(0)
    return [rng.uniform(0.01, 0.5, s).astype(np.float32) for s in policy.parameter_shapes]


@pytest.fixture
def saved(tmp_path, make_policy):
    """``{"scalar": (path, policy, 0.25), "meta-sgd": (path, policy, arrays)}``."""
    dist = Navigation2D(horizon=7)
    out = {}
    for kind in ("scalar", "meta-sgd"):
        policy = make_policy(hidden=(8,), seed=3)
        sizes = 0.25 if kind == "scalar" else meta_sgd_sizes(policy)
        path = save_bundle(
            tmp_path / kind, policy, sizes, dist, adaptation=ADAPTATION, training={"iterations": 7}
        )
        out[kind] = (path, policy, sizes)
    return out


@pytest.mark.parametrize("kind", ["scalar", "meta-sgd"])
def test_round_trip_gives_identical_actions_and_step_sizes(saved, kind):
    path, policy, sizes = saved[kind]
    bundle = load_bundle(path)
    assert isinstance(bundle.policy, GaussianMLPPolicy)
    assert bundle.name == kind
    for a, b in zip(bundle.policy.get_parameters(), policy.get_parameters(), strict=True):
        assert_exact(a, b)
    obs = np.random.default_rng(1).normal(size=(9, 2)).astype(np.float32)
    assert_exact(bundle.policy(obs)[0].numpy(), policy(obs)[0].numpy())
    # deterministic rollouts on the bundle's own task distribution are identical
    dist = bundle.task_distribution
    assert dist.horizon == 7
    tasks = dist.sample_tasks(2, seed=0)
    a = Sampler(dist, bundle.policy, 2).sample(bundle.policy.parameters, tasks, 0, True)
    b = Sampler(dist, policy, 2).sample(policy.parameters, tasks, 0, True)
    assert_exact(a.actions, b.actions)
    if kind == "scalar":
        assert bundle.step_sizes == 0.25 and isinstance(bundle.step_sizes, float)
        assert not bundle.learned_step_sizes
    else:
        assert bundle.learned_step_sizes
        for got, expected in zip(bundle.step_sizes, sizes, strict=True):
            assert got.dtype == np.float32
            assert_exact(got, expected)
    assert bundle.adaptation["steps"] == 2 and bundle.adaptation["gamma"] == 0.95


@pytest.mark.parametrize("kind", ["scalar", "meta-sgd"])
def test_bundle_adapter_equals_an_adapter_with_the_original_settings(
    saved, kind, synthetic_batch, to_tensors
):
    path, policy, sizes = saved[kind]
    bundle = load_bundle(path)
    episodes = to_tensors(synthetic_batch(tasks=1, episodes=3, horizon=6, seed=4))
    ref_sizes = sizes if kind == "scalar" else [tf.constant(s) for s in sizes]
    ref = Adapter(policy, ref_sizes, 0.95, 0.9, "linear")(policy.parameters, episodes, 2)
    got = bundle.make_adapter()(bundle.policy.parameters, episodes, 2)
    for a, b in zip(got[0], ref[0], strict=True):
        assert_close(a.numpy(), b.numpy(), ulps=8)


def test_specs_and_horizon_come_from_meta_json_and_the_distribution_only_when_asked(saved):
    """``load_bundle`` builds no task distribution: the specs and the horizon are read from
    ``meta.json`` and equal the distribution's; ``make_task_distribution`` builds a new one."""
    path, _, _ = saved["scalar"]
    bundle = load_bundle(path)
    assert "task_distribution" not in vars(bundle)  # the cached property was not computed
    dist = Navigation2D(horizon=7)
    assert bundle.horizon == 7
    assert bundle.observation_spec == dist.observation_spec
    assert bundle.action_spec == dist.action_spec
    built = bundle.make_task_distribution()
    assert isinstance(built, Navigation2D) and built is not bundle.make_task_distribution()
    assert built.config() == dist.config() and built.horizon == 7
    assert bundle.task_distribution is bundle.task_distribution  # built once when used


def test_policy_keras_loads_in_safe_mode(saved):
    path, policy, _ = saved["scalar"]
    model = keras.saving.load_model(path / "policy.keras", safe_mode=True)
    assert isinstance(model, GaussianMLPPolicy)
    obs = np.ones((3, 2), np.float32)
    assert_exact(model(obs)[0].numpy(), policy(obs)[0].numpy())


def test_meta_json_describes_the_bundle_and_checksums_every_file(saved):
    path, policy, _ = saved["meta-sgd"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert meta["task_distribution"] == {
        "name": "nav2d",
        "config": {"horizon": 7, "include_goal": False},
        "horizon": 7,  # the bundle's horizon without building the distribution
    }
    assert meta["observation_spec"]["shape"] == [2]
    assert_close(meta["action_spec"]["minimum"], [-0.1, -0.1], ulps=8, dtype=np.float32)
    assert meta["policy"]["parameter_names"] == policy.parameter_names
    assert meta["policy"]["config"]["hidden_sizes"] == [8]
    assert meta["adaptation"]["step_sizes"] == {"file": "step_sizes.npz"}
    assert meta["training"] == {"iterations": 7}
    files = sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    assert sorted(meta["files"]) == files == ["policy.keras", "step_sizes.npz"]
    for name, digest in meta["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest
    with np.load(path / "step_sizes.npz", allow_pickle=False) as data:
        assert sorted(data.files) == sorted(n.replace("/", "__") for n in policy.parameter_names)


def test_extra_files_are_checksummed_and_leave_the_bundle_its_name(tmp_path, make_policy):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 1}\n')
    extra = {"metrics.jsonl": metrics}
    path = save_bundle(
        tmp_path / "my-bundle", make_policy(hidden=(8,)), 0.5, Navigation2D(),
        adaptation=ADAPTATION, extra_files=extra,
    )  # fmt: skip
    meta = json.loads((path / "meta.json").read_text())
    assert meta["name"] == "my-bundle"
    assert meta["files"]["metrics.jsonl"] == hashlib.sha256(metrics.read_bytes()).hexdigest()
    assert load_bundle(path).meta["name"] == "my-bundle"


def test_saving_over_an_existing_bundle_replaces_it(saved, make_policy):
    path, _, _ = saved["meta-sgd"]
    policy = make_policy(hidden=(8,), seed=9)
    save_bundle(path, policy, 0.5, Navigation2D(), adaptation=ADAPTATION)
    bundle = load_bundle(path)
    assert bundle.step_sizes == 0.5
    assert not (path / "step_sizes.npz").exists()
    assert_exact(bundle.policy.get_parameters()[0], policy.get_parameters()[0])
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def flip_byte(file, offset=None):
    data = bytearray(file.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def edit_meta(path, change):
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


TAMPERING = {
    "policy-byte": (
        lambda p: flip_byte(p / "policy.keras"),
        r"checksum mismatch for policy\.keras.*modified or corrupted",
    ),
    "step-sizes-byte": (
        lambda p: flip_byte(p / "step_sizes.npz"),
        r"checksum mismatch for step_sizes\.npz",
    ),
    "policy-deleted": (lambda p: (p / "policy.keras").unlink(), r"policy\.keras is missing"),
    "step-sizes-deleted": (
        lambda p: (p / "step_sizes.npz").unlink(),
        r"step_sizes\.npz is missing",
    ),
    "meta-deleted": (lambda p: (p / "meta.json").unlink(), r"has no meta\.json"),
    "bad-json": (
        lambda p: (p / "meta.json").write_text('{"format_version": 1,'),
        r"meta\.json: not valid JSON",
    ),
    "format-version": (
        lambda p: edit_meta(p, lambda m: m.update(format_version=99)),
        r"format_version 99 is not supported \(expected 1 or 2\)",
    ),
    "missing-key": (
        lambda p: edit_meta(p, lambda m: m.pop("files")),
        r"missing key 'files'",
    ),
    "shapes": (
        lambda p: edit_meta(p, lambda m: m["policy"]["parameter_shapes"][0].__setitem__(1, 9)),
        r"policy shapes differ from meta\.json",
    ),
    "unlisted-step-sizes": (
        lambda p: edit_meta(p, lambda m: m["files"].pop("step_sizes.npz")),
        r"step size file 'step_sizes\.npz' is not checksummed",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_bundles_are_refused_with_a_clear_error(saved, tmp_path, case):
    source, _, _ = saved["meta-sgd"]
    path = tmp_path / "tampered"
    shutil.copytree(source, path)
    load_bundle(path)  # the untouched copy loads
    tamper, message = TAMPERING[case]
    tamper(path)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_missing_bundle_directory_is_refused(tmp_path):
    with pytest.raises(BundleError, match="is not a directory"):
        load_bundle(tmp_path / "nope")
    assert issubclass(BundleError, ValueError)  # the CLI reports ValueErrors without traceback


SHIPPED = sorted(
    p.parent.name
    for p in (Path(__file__).resolve().parents[1] / "saved_models").glob("*/meta.json")
)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_bundle_loads_and_says_how_it_was_trained(name):
    bundle = load_bundle(Path(__file__).resolve().parents[1] / "saved_models" / name)
    training = bundle.meta["training"]
    assert training["iterations"] >= 1 and training["wall_clock_seconds"] > 0
    assert "metrics.jsonl" in bundle.meta["files"]
    rows = (bundle.path / "metrics.jsonl").read_text().splitlines()
    # --select best ships an earlier iteration of a longer run; the metrics cover the whole run
    trained = training.get("selection", {}).get("trained_iterations", training["iterations"])
    assert json.loads(rows[-1])["iteration"] == trained >= training["iterations"]


def test_halfcheetah_vel_baseline_presets_write_where_evaluate_looks():
    from metarl_tf.config import get_preset
    from metarl_tf.training.pretrain import default_bundle_path

    assert str(default_bundle_path(get_preset("halfcheetah-vel-pretrain"))) == (
        "saved_models/halfcheetah-vel-pretrained"
    )
    assert str(default_bundle_path(get_preset("halfcheetah-vel-oracle"))) == (
        "saved_models/halfcheetah-vel-oracle"
    )
