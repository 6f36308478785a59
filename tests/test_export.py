"""SavedModel export (metarl_tf/export.py, ``POST /export``, ``export-savedmodel``): the exported
models run in a fresh process with plain TensorFlow (no metarl_tf imported) and act as the
service's ``/act`` (continuous bundle, over HTTP) and the sampler's action rule (discrete bundle,
in-process; tests/test_serving_discrete.py serves discrete bundles over HTTP).

Tolerance of the action comparisons: ``ULPS`` ulps of the largest raw (unclipped) action. The
SavedModel runs the policy's TensorFlow forward pass, ``/act`` and the sampler its numpy twin:
both float32, with the matmul sums in different orders, so they agree to the float32 rounding
accumulated through the layers, not bit for bit. Clipping keeps that error in the actions it
leaves alone but not their scale, so clipped actions are compared at the raw actions' scale.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_close, assert_exact, assert_not_close

from metarl_tf.bundle import load_bundle
from metarl_tf.episodes import load_episodes, save_episodes
from metarl_tf.rollout import Sampler
from serving.client import AdaptationClient, ServiceError, extract_saved_model
from serving.launch import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
NAV_BUNDLE = REPO_ROOT / "saved_models" / "nav2d-maml"
BANDIT_BUNDLE = REPO_ROOT / "saved_models" / "bandit-k5-maml"
RUNNER = Path(__file__).with_name("saved_model_runner.py")
ULPS = 32  # float32 rounding through the layers, summed in other orders (module docstring)
LIMITS = {
    "METARL_MAX_EPISODES": "8",
    "METARL_MAX_OBSERVATIONS": "512",
    "METARL_WARMUP_STEPS": "1",
}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "service.log"
    with ServiceProcess(bundle=NAV_BUNDLE, env=LIMITS, log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(service):
    with AdaptationClient(service.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def nav():
    return load_bundle(NAV_BUNDLE)


def sampled_episodes(bundle, n: int, seed: int, params=None):
    """``n`` episodes of one new task collected by the bundle's policy (the trainer's sampler),
    as ``(obs, raw actions, rewards)`` triples cut to their lengths."""
    dist = bundle.task_distribution
    task = dist.sample_tasks(1, seed=10_000 + seed)
    params = bundle.policy.get_parameters() if params is None else params
    batch = Sampler(dist, bundle.policy, n).sample(params, task, seed)
    lengths = batch.mask[0].sum(axis=1).astype(int)
    return [
        (batch.observations[0, e, :t], batch.actions[0, e, :t], batch.rewards[0, e, :t])
        for e, t in enumerate(lengths)
    ]


def run_plain_tensorflow(tmp_path: Path, models: dict, observations, noise: dict, seed: int):
    """Runs tests/saved_model_runner.py in a fresh process: no PYTHONPATH, cwd outside the
    repository. Returns ``(arrays, facts)``."""
    work = tmp_path / "plain"
    work.mkdir()
    np.savez(work / "obs.npz", observations=np.asarray(observations, np.float32))
    config = {"observations": str(work / "obs.npz"), "seed": seed, "out": str(work / "out.npz")}
    config["models"] = {}
    for name, path in models.items():
        np.savez(work / f"noise-{name}.npz", noise=noise[name])
        config["models"][name] = {"path": str(path), "noise": str(work / f"noise-{name}.npz")}
    (work / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    out = subprocess.run(
        [sys.executable, str(RUNNER), str(work / "config.json")],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    facts = json.loads((work / "out.npz.json").read_text())
    assert facts["imported"] == [], facts["imported"]  # plain TensorFlow only
    with np.load(work / "out.npz") as data:
        return {k: data[k] for k in data.files}, facts


# -- continuous: over HTTP, against /act ---------------------------------------------------------


@pytest.mark.slow
def test_exported_policies_act_as_the_service_in_plain_tensorflow(client, nav, tmp_path):
    """``/export`` of "meta" and of an adapted id: in a process without metarl_tf, the mean
    actions equal ``/act`` deterministic, ``action_from_noise`` with ``/act``'s documented NumPy
    noise equals ``/act`` with that seed, and ``action_seeded`` draws the documented Philox
    noise (so it differs from ``/act``'s sample for the same seed)."""
    episodes = sampled_episodes(nav, 4, seed=1)
    adapted = client.adapt(episodes, steps=1, return_weights=True)
    local = nav.adapt(episodes, steps=1)  # the same adaptation in-process
    for name, value in adapted.weights.items():
        i = nav.policy.parameter_names.index(name)
        assert_close(value, local.parameters[i], ulps=16)
    paths = {
        "meta": client.export("meta", tmp_path / "meta"),
        "adapted": client.export(adapted, tmp_path / "adapted"),
    }
    assert (paths["adapted"] / "saved_model.pb").is_file()
    rng = np.random.default_rng(0)
    obs = rng.uniform(-0.6, 0.6, size=(256, 2)).astype(np.float32)
    seed = 7
    # /act's seeded noise, as serving/engine.py documents it: the policy's own sampler
    numpy_noise = nav.policy.sample_noise(np.random.default_rng(seed), (256,))
    arrays, facts = run_plain_tensorflow(
        tmp_path, paths, obs, {"meta": numpy_noise, "adapted": numpy_noise}, seed
    )
    log_std = {"meta": nav.policy.get_parameters()[-1], "adapted": adapted.weights["log_std"]}
    for name, policy in (("meta", "meta"), ("adapted", adapted.policy_id)):
        det = client.act_full(policy, obs, deterministic=True)
        mean, mean_raw = arrays[f"{name}/mean/actions"], arrays[f"{name}/mean/raw_actions"]
        assert_close(mean, det.actions, ulps=ULPS, scale=np.abs(mean_raw).max())
        assert_close(mean_raw, det.raw_actions, ulps=ULPS)
        assert np.any(np.abs(det.raw_actions) < 0.1)  # some actions inside the bounds too
        assert_exact(arrays[f"{name}/serving_default/actions"], mean)
        sampled = client.act_full(policy, obs, seed=seed)
        assert_close(arrays[f"{name}/from_noise/raw_actions"], sampled.raw_actions, ulps=ULPS)
        scale = np.abs(sampled.raw_actions).max()
        assert_close(arrays[f"{name}/from_noise/actions"], sampled.actions, ulps=ULPS, scale=scale)
        # action_seeded: mean + σ z with the documented Philox z, reproducible, clipped
        raw = arrays[f"{name}/seeded/raw_actions"]
        z = arrays[f"{name}/documented_noise"]
        assert_close(raw, mean_raw + np.exp(log_std[name]) * z, ulps=ULPS)
        assert_exact(arrays[f"{name}/seeded_again/raw_actions"], raw)
        assert_exact(arrays[f"{name}/seeded_signature/raw_actions"], raw)
        assert_exact(arrays[f"{name}/seeded/actions"], np.clip(raw, -0.1, 0.1))
        assert_not_close(raw, sampled.raw_actions)  # another generator (docs/serving.md)
        fresh, fresh_again = arrays[f"{name}/fresh/raw_actions"], arrays[f"{name}/fresh_again/raw_actions"]  # fmt: skip
        assert fresh.shape == raw.shape
        assert_not_close(fresh, fresh_again)
    # the model's own record of what it is
    checksum = nav.checksum
    for name in ("meta", "adapted"):
        f = facts[name]
        assert f["bundle_name"] == "nav2d-maml" and f["bundle_sha256"] == checksum
        assert_close(f["action_spec"]["minimum"], [-0.1, -0.1], ulps=1, dtype=np.float32)
        assert_close(f["action_spec"]["maximum"], [0.1, 0.1], ulps=1, dtype=np.float32)
        assert f["action_spec"]["shape"] == [2] and f["observation_spec_shape"] == [2]
        assert f["metadata"] == f["asset"]
        assert f["metadata"]["observation_spec"] == nav.meta["observation_spec"]
        assert f["metadata"]["bundle"]["files"] == nav.meta["files"]
        assert set(f["signatures"]) == {
            "serving_default", "mean_action", "action", "action_seeded", "action_from_noise"
        }  # fmt: skip
    assert facts["meta"]["provenance"] == {
        "kind": "meta-initialization", "policy_id": "meta", "parent": "", "steps": 0,
        "depth": 0, "num_episodes": 0, "num_transitions": 0,
    }  # fmt: skip
    assert facts["adapted"]["provenance"] == {
        "kind": "adapted", "policy_id": adapted.policy_id, "parent": "meta", "steps": 1,
        "depth": 1, "num_episodes": 4, "num_transitions": adapted.num_transitions,
    }  # fmt: skip
    inner = facts["adapted"]["metadata"]["provenance"]["inner_losses"]
    assert_close(inner, adapted.inner_losses, ulps=8, dtype=np.float32)


@pytest.mark.slow
def test_adapt_chain_in_process_equals_the_service_and_exports(client, nav, tmp_path):
    """``Bundle.adapt(..., parent=...)`` continues a chain as ``/adapt`` with ``parent`` does
    (this bundle's per-step step sizes and log σ shift), and the export records the depth."""
    first, second = sampled_episodes(nav, 3, seed=2), sampled_episodes(nav, 3, seed=3)
    a1 = client.adapt(first, steps=1)
    a2 = client.adapt(second, steps=2, parent=a1.policy_id, return_weights=True)
    local = nav.adapt(second, steps=2, parent=nav.adapt(first, steps=1))
    assert (local.parent, local.steps, local.depth) == ("in-process", 2, 3)
    for name, value in a2.weights.items():
        i = nav.policy.parameter_names.index(name)
        # three inner steps, each on the previous one's rounding: service against in-process
        assert_close(value, local.parameters[i], ulps=512)
    with pytest.raises(ValueError, match="steps=1"):  # the log σ shift: one step per batch
        nav.adapt(first, steps=2)
    path = client.export(a2.policy_id, tmp_path / "chain")
    meta = json.loads((path / "assets" / "metarl_policy.json").read_text())
    assert meta["provenance"]["parent"] == a1.policy_id
    assert (meta["provenance"]["steps"], meta["provenance"]["depth"]) == (2, 3)


@pytest.mark.slow
def test_export_route_errors_and_headers(service, client, tmp_path):
    import httpx

    with httpx.Client(base_url=service.url, timeout=120) as http:
        ok = http.post("/export", json={"policy_id": "meta"})
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/gzip"
        assert int(ok.headers["content-length"]) == len(ok.content) > 10_000
        with tarfile.open(fileobj=io.BytesIO(ok.content), mode="r:gz") as tar:
            names = set(tar.getnames())
        assert {"saved_model.pb", "variables/variables.index", "assets/metarl_policy.json"} <= names
        for body, status, field in [
            ({"policy_id": "pol-unknown"}, 404, "policy_id"),
            ({"policy_id": ""}, 400, "policy_id"),
            ({}, 400, "policy_id"),
            ({"policy_id": "meta", "extra": 1}, 400, "extra"),
            ({"policy_id": 3}, 400, "policy_id"),
        ]:
            r = http.post("/export", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["field"] == field and r.json()["error"]
        r = http.post("/export", content=b"not json", headers={"content-type": "text/plain"})
        assert r.status_code == 400 and r.json()["field"] == "body"
        spec = http.get("/docs.json").json()
        assert "/export" in spec["paths"]
    with pytest.raises(ServiceError) as err:
        client.export("pol-unknown", tmp_path / "x")
    assert err.value.status_code == 404 and err.value.field == "policy_id"
    assert not (tmp_path / "x").exists()


# -- discrete: in-process, against the sampler's action rule ------------------------------------


@pytest.mark.slow
def test_exported_discrete_policy_acts_as_the_sampler_in_plain_tensorflow(tmp_path):
    import metarl_tf
    from metarl_tf.policy import numpy_categorical_sample, numpy_mlp

    export_saved_model = metarl_tf.export_saved_model  # the package-level name

    bundle = load_bundle(BANDIT_BUNDLE)
    adapted = bundle.adapt(sampled_episodes(bundle, 6, seed=4), steps=1)
    paths = {
        "meta": export_saved_model(bundle, tmp_path / "meta"),
        "adapted": export_saved_model(adapted, tmp_path / "adapted"),
    }
    rng = np.random.default_rng(1)
    obs_dim = bundle.policy.obs_dim
    obs = rng.uniform(0.0, 1.0, size=(512, obs_dim)).astype(np.float32)
    u = bundle.policy.sample_noise(rng, (512,))  # the sampler's uniform numbers
    arrays, facts = run_plain_tensorflow(tmp_path, paths, obs, {"meta": u, "adapted": u}, seed=5)
    for name, params in (("meta", bundle.policy.get_parameters()), ("adapted", adapted.parameters)):
        logits = numpy_mlp(params, obs, bundle.policy.activation).astype(np.float64)
        top2 = np.sort(logits, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-4  # no near-tie that float rounding could flip
        expected = bundle.policy.numpy_act(params, obs, None, deterministic=True)[:, 0]
        mean = arrays[f"{name}/mean/actions"]
        assert mean.dtype == np.int32 and mean.shape == (512,) and clear.mean() > 0.9
        assert_exact(mean[clear], expected[clear])
        assert_exact(arrays[f"{name}/mean/raw_actions"][:, 0], mean)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)

        def away_from_cdf(noise, cdf=cdf):  # float rounding cannot move u across a CDF step
            return np.min(np.abs(cdf - noise[:, None]), axis=1) > 1e-5

        keep = away_from_cdf(u)
        expected = numpy_categorical_sample(logits, u)
        assert_exact(arrays[f"{name}/from_noise/actions"][keep], expected[keep])
        z = arrays[f"{name}/documented_noise"]  # action_seeded's Philox uniforms
        keep = away_from_cdf(z)
        seeded = arrays[f"{name}/seeded/actions"]
        assert_exact(seeded[keep], numpy_categorical_sample(logits, z)[keep])
        assert_exact(arrays[f"{name}/seeded_again/actions"], seeded)
        if name == "meta":  # (its probabilities are spread; the adapted one may be greedy)
            assert len(np.unique(seeded)) > 1 and not np.array_equal(seeded, mean)
        assert facts[name]["action_spec"] == {
            "shape": [], "dtype": "int32", "minimum": 0, "maximum": 4
        }  # fmt: skip
    assert facts["adapted"]["provenance"]["num_episodes"] == 6
    n_params = int(arrays["adapted/parameters"])
    for i in range(n_params):
        assert_exact(arrays[f"adapted/parameter_{i}"], adapted.parameters[i])


# -- CLI and the episodes file -------------------------------------------------------------------


def test_episodes_file_round_trip(tmp_path, nav):
    episodes = sampled_episodes(nav, 3, seed=5)
    episodes[1] = tuple(x[:7] for x in episodes[1])  # lengths differ
    save_episodes(tmp_path / "e.npz", episodes)
    loaded = load_episodes(tmp_path / "e.npz")
    assert [len(r) for _, _, r in loaded] == [len(r) for _, _, r in episodes]
    for got, expected in zip(loaded, episodes, strict=True):
        for g, e in zip(got, expected, strict=True):
            assert_exact(g, e)
    o, a, r = np.zeros((2, 4, 2)), np.zeros((2, 4, 2)), np.zeros((2, 4))
    np.savez(tmp_path / "full.npz", observations=o, actions=a, rewards=r)  # no lengths: all T
    assert [len(x) for _, _, x in load_episodes(tmp_path / "full.npz")] == [4, 4]
    np.savez(tmp_path / "bad.npz", observations=o, rewards=r)
    with pytest.raises(ValueError, match=r"missing array\(s\) \['actions'\]"):
        load_episodes(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", observations=o, actions=a[:, :3], rewards=r)
    with pytest.raises(ValueError, match="do not fit"):
        load_episodes(tmp_path / "bad2.npz")


def test_cli_export_savedmodel_meta_and_adapted(tmp_path, nav, capsys):
    import tensorflow as tf

    from metarl_tf.cli import main

    episodes = sampled_episodes(nav, 3, seed=6)
    save_episodes(tmp_path / "episodes.npz", episodes)
    out = tmp_path / "adapted"
    args = ["export-savedmodel", str(NAV_BUNDLE), str(out)]
    assert main([*args, "--adapt-on", str(tmp_path / "episodes.npz"), "--steps", "1"]) == 0
    assert "adapted by 1 inner step(s) on 3 episodes" in capsys.readouterr().out
    m = tf.saved_model.load(str(out))
    expected = nav.adapt(episodes, steps=1).parameters
    for got, want in zip(m.parameters, expected, strict=True):
        assert_exact(got.numpy(), want)
    assert m.provenance.kind.numpy() == b"adapted" and int(m.provenance.num_episodes) == 3
    assert main(args) == 2  # exists
    assert "not an empty directory" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert tf.saved_model.load(str(out)).provenance.kind.numpy() == b"meta-initialization"
    assert main([*args, "--overwrite", "--steps", "2"]) == 2
    assert "--steps needs --adapt-on" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", observations=np.zeros((1, 3, 2)))
    assert main([*args, "--overwrite", "--adapt-on", str(tmp_path / "bad.npz")]) == 2
    assert "missing array(s)" in capsys.readouterr().err


# -- the client's unpacking ----------------------------------------------------------------------


def _archive(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for info, data in members:
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.mark.parametrize(
    "members, message",
    [
        ([_file("saved_model.pb"), _file("../escaped")], "refused archive member '../escaped'"),
        ([_file("saved_model.pb"), _file("/tmp/absolute")], "refused archive member '/tmp/abs"),
        ([_file("saved_model.pb"), _file("a/../../up")], "refused archive member 'a/../../up'"),
        ([_file("saved_model.pb"), _link("variables", "/etc")], "refused archive member 'var"),
        ([_file("saved_model.pb"), _link("h", "/etc/passwd", tarfile.LNKTYPE)], "member 'h'"),
        ([_file("model.pb")], "no saved_model.pb"),
    ],
)
def test_client_refuses_unsafe_archives(tmp_path, members, message):
    target = tmp_path / "inner" / "model"
    with pytest.raises(ValueError, match=message):
        extract_saved_model(_archive(members), target)
    assert not target.exists() and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "inner").exists() or not any((tmp_path / "inner").iterdir())


def test_client_unpacks_into_a_new_or_empty_directory_only(tmp_path):
    archive = _archive([_file("saved_model.pb", b"pb"), _file("variables/variables.index")])
    assert (extract_saved_model(archive, tmp_path / "new") / "saved_model.pb").read_bytes() == b"pb"
    (tmp_path / "empty").mkdir()
    assert (extract_saved_model(archive, tmp_path / "empty") / "variables").is_dir()
    with pytest.raises(FileExistsError):
        extract_saved_model(archive, tmp_path / "new")
    with pytest.raises(ValueError, match="not a readable .tar.gz"):
        extract_saved_model(b"not an archive", tmp_path / "other")


# -- layering ------------------------------------------------------------------------------------


def test_export_module_imports_no_tf_agents_gymnasium_or_envs():
    """The service imports metarl_tf.export: it stays free of tf-agents, gymnasium and envs."""
    tree = ast.parse((REPO_ROOT / "metarl_tf" / "export.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    banned = [m for m in imported if m.split(".")[0] in ("tf_agents", "gymnasium")]
    banned += [m for m in imported if m.startswith("metarl_tf.envs")]
    assert not banned, banned


# -- the example ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_tf_agents_roundtrip_example_runs_against_the_service(service, tmp_path):
    cmd = [
        sys.executable, "examples/tf_agents_roundtrip.py", "--url", service.url,
        "--episodes", "8", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json"),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert (Path(result["saved_model"]) / "saved_model.pb").is_file()
    assert result["episodes"] >= 8
    provenance = result["provenance"]
    assert provenance["policy_id"] == result["policy_id"] and provenance["parent"] == "meta"
    assert provenance["num_episodes"] == result["episodes"]
    assert np.isfinite([result["mean_return_before"], result["mean_return_after"]]).all()
