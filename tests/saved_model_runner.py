"""Runs exported SavedModels with plain TensorFlow, as a user without metarl-tf would: started by
tests/test_export.py in a fresh process (no PYTHONPATH, cwd outside the repository).

    python saved_model_runner.py CONFIG.json

CONFIG: ``{"observations": npz path (array "observations"), "seed": int, "out": npz path,
"models": {name: {"path": SavedModel dir, "noise": npz path (array "noise")}}}``. Writes, per
model, ``<name>/<output>/<key>`` arrays of its functions and the documented seeded noise, and
``<out>.json`` with its attributes and the names of the modules of this repository it imported
(none may be).
"""

import json
import sys

import numpy as np
import tensorflow as tf


def main(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    obs = np.load(config["observations"])["observations"]
    seed = int(config["seed"])
    arrays, facts = {}, {}
    for name, model in config["models"].items():
        m = tf.saved_model.load(model["path"])
        noise = np.load(model["noise"])["noise"]
        outputs = {
            "mean": m.mean_action(obs),
            "serving_default": m.signatures["serving_default"](observation=tf.constant(obs)),
            "seeded": m.action(obs, seed=seed),
            "seeded_again": m.action(obs, seed=seed),
            "seeded_signature": m.signatures["action_seeded"](
                observation=tf.constant(obs), seed=tf.constant(seed, tf.int64)
            ),
            "fresh": m.action(obs),
            "fresh_again": m.signatures["action"](observation=tf.constant(obs)),
            "from_noise": m.action_from_noise(obs, noise),
        }
        for output, result in outputs.items():
            for key, value in result.items():
                arrays[f"{name}/{output}/{key}"] = value.numpy()
        # the documented noise of action_seeded, drawn here with plain TensorFlow
        act_shape = [len(obs), *m.action_spec.shape.numpy().tolist()]
        if m.action_spec.dtype.numpy().decode().startswith("int"):
            documented = tf.random.stateless_uniform(
                [len(obs)], [seed, 0], dtype=tf.float64, alg="philox"
            )
        else:
            documented = tf.random.stateless_normal(act_shape, [seed, 0], alg="philox")
        arrays[f"{name}/documented_noise"] = documented.numpy()
        arrays[f"{name}/parameters"] = np.array(len(m.parameters))
        for i, p in enumerate(m.parameters):
            arrays[f"{name}/parameter_{i}"] = p.numpy()
        provenance = {
            k: getattr(m.provenance, k).numpy()
            for k in ("kind", "policy_id", "parent", "steps", "depth", "num_episodes",
                      "num_transitions")
        }  # fmt: skip
        facts[name] = {
            "signatures": sorted(m.signatures),
            "bundle_name": m.bundle_name.numpy().decode(),
            "bundle_sha256": m.bundle_sha256.numpy().decode(),
            "provenance": {
                k: v.decode() if isinstance(v, bytes) else int(v) for k, v in provenance.items()
            },
            "action_spec": {
                "shape": m.action_spec.shape.numpy().tolist(),
                "dtype": m.action_spec.dtype.numpy().decode(),
                "minimum": m.action_spec.minimum.numpy().tolist(),
                "maximum": m.action_spec.maximum.numpy().tolist(),
            },
            "observation_spec_shape": m.observation_spec.shape.numpy().tolist(),
            "metadata": json.loads(m.metadata_json.numpy().decode()),
            "asset": json.loads(tf.io.read_file(m.metadata_file.asset_path).numpy().decode()),
        }
    facts["imported"] = sorted(
        k for k in sys.modules if k.split(".")[0] in ("metarl_tf", "serving", "tf_agents")
    )
    np.savez(config["out"], **arrays)
    with open(config["out"] + ".json", "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1])
