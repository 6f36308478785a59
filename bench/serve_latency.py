"""Latency of the adaptation service over real HTTP on loopback.

Starts the service (with its no-op endpoint enabled, ``METARL_BENCH_NOOP=1``) on a free port and
measures, with keep-alive connections from this process:

- ``/adapt`` with 20 Nav2D episodes x 100 steps, one inner step, concurrency 1: p50, p99, with
  the episodes as JSON number lists and as packed base64 float32 arrays (the Python client's
  default), alternating;
- ``/act`` with one observation: p50, p99 and requests/s at concurrency 1 and 16;
- the same for ``/noop``, a BentoML endpoint that does nothing: the floor of the framework.

Targets (issue 3): ``/adapt`` p50 <= 15 ms; ``/act`` p50 <= 2x the no-op p50; zero errors.

    python bench/serve_latency.py [--bundle saved_models/nav2d-maml]
        [--json bench/results/bench_serve_latency.json]

Client and server share this machine's cores; numbers measured while other heavy processes run
are not comparable (the script prints the load average it saw).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from metarl_tf.envs import Navigation2D  # noqa: E402
from serving.client import pack_array  # noqa: E402
from serving.launch import ServiceProcess  # noqa: E402

SHIPPED_BUNDLE = REPO_ROOT / "saved_models" / "nav2d-maml"


def nav2d_episodes(n: int, seed: int) -> list[dict]:
    """``n`` Nav2D episodes of one task with Gaussian actions (100 steps unless the goal is hit)."""
    dist = Navigation2D()
    rng = np.random.default_rng(seed)
    env = dist.make_batched_env(dist.sample_tasks(1, seed), n)
    obs = env.reset()
    o, a, r, alive = [], [], [], []
    active = np.ones(n, bool)
    for _ in range(dist.horizon):
        act = rng.normal(0, 0.5, size=(n, 2)).astype(np.float32)
        step = env.step(act)
        o.append(obs)
        a.append(act)
        r.append(step.reward)
        alive.append(active.copy())
        active &= ~step.done
        obs = step.observation
    o, a, r, alive = (np.stack(x, 1) for x in (o, a, r, alive))
    return [
        {
            "observations": o[i][alive[i]].tolist(),
            "actions": a[i][alive[i]].tolist(),
            "rewards": r[i][alive[i]].tolist(),
        }
        for i in range(n)
    ]


class Caller:
    """POSTs one fixed JSON body over a keep-alive connection; counts errors."""

    def __init__(self, url: str, path: str, body: bytes):
        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        self.path, self.body = path, body
        self.headers = {"content-type": "application/json"}
        self.errors: list[str] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        try:
            self.conn.request("POST", self.path, body=self.body, headers=self.headers)
            response = self.conn.getresponse()
            payload = response.read()
            if response.status != 200:
                self.errors.append(f"{self.path}: HTTP {response.status} {payload[:200]!r}")
        except (OSError, http.client.HTTPException) as err:
            self.errors.append(f"{self.path}: {type(err).__name__}: {err}")
            self.conn.close()
        return time.perf_counter() - start


ADAPT_ROUNDS = 4  # alternations of the two /adapt encodings


def measure(url: str, path: str, body: bytes, requests: int, concurrency: int, warmup: int = 20):
    """Latencies (s) of ``requests`` calls spread over ``concurrency`` threads, the wall time and
    the error messages."""
    callers = [Caller(url, path, body) for _ in range(concurrency)]
    for caller in callers:
        for _ in range(max(1, warmup // concurrency)):
            caller()
        caller.errors.clear()
    per_thread = requests // concurrency
    latencies: list[list[float]] = [[] for _ in callers]
    barrier = threading.Barrier(concurrency + 1)

    def work(i: int) -> None:
        barrier.wait()
        latencies[i].extend(callers[i]() for _ in range(per_thread))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for caller in callers:
        caller.conn.close()
    lat = np.array([x for xs in latencies for x in xs])
    return lat, wall, [e for c in callers for e in c.errors]


def summary(lat: np.ndarray, wall: float) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "rps": float(len(lat) / wall),
    }


def stand_in_bundle(directory: Path) -> Path:
    """An untrained Nav2D bundle with the default architecture (latency does not depend on the
    weights' values), for when the shipped bundle is absent."""
    from metarl_tf.bundle import save_bundle
    from metarl_tf.policy import GaussianMLPPolicy

    return save_bundle(
        directory / "nav2d-stand-in",
        GaussianMLPPolicy(2, 2),
        0.1,
        Navigation2D(),
        adaptation=dict(steps=1, gamma=0.99, gae_lambda=1.0, baseline="linear"),
    )


def run(url: str, args) -> dict:
    adapt_body = json.dumps({"episodes": nav2d_episodes(20, seed=1), "steps": 1}).encode()
    transitions = sum(len(e["rewards"]) for e in json.loads(adapt_body)["episodes"])
    act_body = json.dumps({"policy_id": "meta", "observations": [[0.1, -0.2]]}).encode()
    results: dict = {}
    errors: list[str] = []

    # The same episodes as PackedArrays (base64 float32), the Python client's default encoding.
    packed_episodes = [
        {k: pack_array(np.asarray(v, np.float32)) for k, v in e.items()}
        for e in json.loads(adapt_body)["episodes"]
    ]
    packed_body = json.dumps({"episodes": packed_episodes, "steps": 1}).encode()
    # The two encodings alternate in rounds, so a change in background load hits both alike.
    adapt_runs: dict[str, list] = {"adapt": [], "adapt_packed": []}
    rounds = ADAPT_ROUNDS
    for _ in range(rounds):
        for name, body in (("adapt", adapt_body), ("adapt_packed", packed_body)):
            lat, wall, errs = measure(
                url, "/adapt", body, args.adapt_requests // rounds, 1, warmup=10
            )
            adapt_runs[name].append((lat, wall))
            errors += errs
    for name, parts in adapt_runs.items():
        lat = np.concatenate([p[0] for p in parts])
        results[name] = summary(lat, sum(p[1] for p in parts))
    # /act and /noop alternate in rounds, so a change in background load hits both alike.
    endpoints = (("act", "/act", act_body), ("noop", "/noop", b"{}"))
    for c in (1, 16):
        runs: dict[str, list] = {name: [] for name, _, _ in endpoints}
        for _ in range(args.rounds):
            for name, path, body in endpoints:
                n = args.act_requests // args.rounds
                lat, wall, errs = measure(url, path, body, n, c, warmup=2 * c)
                runs[name].append((lat, wall))
                errors += errs
        for name, parts in runs.items():
            lat = np.concatenate([p[0] for p in parts])
            results[f"{name}_c{c}"] = summary(lat, sum(p[1] for p in parts))
    out = {
        "adapt_p50_ms": results["adapt"]["p50_ms"],
        "adapt_p99_ms": results["adapt"]["p99_ms"],
        "adapt_packed_p50_ms": results["adapt_packed"]["p50_ms"],
        "adapt_packed_p99_ms": results["adapt_packed"]["p99_ms"],
        "act_p50_ms": results["act_c1"]["p50_ms"],
        "act_p99_ms": results["act_c1"]["p99_ms"],
        "act_rps_c1": results["act_c1"]["rps"],
        "act_rps_c16": results["act_c16"]["rps"],
        "noop_p50_ms": results["noop_c1"]["p50_ms"],
        "errors": len(errors),
        "details": {
            **results,
            "adapt_episodes": 20,
            "adapt_transitions": transitions,
            "adapt_body_bytes": len(adapt_body),
            "adapt_packed_body_bytes": len(packed_body),
            "adapt_requests": args.adapt_requests,
            "act_requests": args.act_requests,
            "rounds": args.rounds,
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "first_errors": errors[:5],
        },
    }
    out["targets"] = {
        "adapt_p50_le_15ms": out["adapt_p50_ms"] <= 15.0,
        "adapt_packed_p50_le_15ms": out["adapt_packed_p50_ms"] <= 15.0,
        "act_p50_le_2x_noop": out["act_p50_ms"] <= 2 * out["noop_p50_ms"],
        "zero_errors": out["errors"] == 0,
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle to serve (default: saved_models/nav2d-maml)")
    p.add_argument("--adapt-requests", type=int, default=200)
    p.add_argument("--act-requests", type=int, default=3200, help="per endpoint and concurrency")
    p.add_argument("--rounds", type=int, default=8, help="alternations of /act and /noop")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.act_requests < 16 * args.rounds:
        p.error(f"--act-requests must be at least 16 x --rounds ({16 * max(args.rounds, 1)}): "
                "every round gives each of the 16 concurrent callers at least one request")  # fmt: skip
    if args.adapt_requests < ADAPT_ROUNDS:
        p.error(f"--adapt-requests must be at least {ADAPT_ROUNDS} (one per round and encoding)")

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else SHIPPED_BUNDLE
        if not (bundle / "meta.json").is_file():
            if args.bundle:
                print(f"error: no bundle at {bundle}", file=sys.stderr)
                return 2
            bundle = stand_in_bundle(Path(tmp))
            print(
                f"{SHIPPED_BUNDLE} absent: using an untrained stand-in with the same architecture"
            )
        print(f"bundle {bundle}; load average {load[0]:.2f} on {os.cpu_count()} cores")
        with ServiceProcess(bundle=bundle, env={"METARL_BENCH_NOOP": "1"}) as service:
            out = run(service.url, args)
    out["details"]["bundle"] = str(bundle)

    d = out["details"]
    print(
        f"/adapt  20 episodes, {d['adapt_transitions']} steps, c=1: "
        f"p50 {out['adapt_p50_ms']:.2f} ms  p99 {out['adapt_p99_ms']:.2f} ms  "
        f"(JSON lists, {d['adapt_body_bytes'] // 1000} KB)"
    )
    print(
        f"/adapt  same, packed arrays      : p50 {out['adapt_packed_p50_ms']:.2f} ms  "
        f"p99 {out['adapt_packed_p99_ms']:.2f} ms  "
        f"(base64 float32, {d['adapt_packed_body_bytes'] // 1000} KB)"
    )
    for name in ("act", "noop"):
        for c in (1, 16):
            s = d[f"{name}_c{c}"]
            print(
                f"/{name:<5} 1 observation, c={c:<2}: p50 {s['p50_ms']:.2f} ms  "
                f"p99 {s['p99_ms']:.2f} ms  {s['rps']:.0f} req/s"
            )
    print(f"errors: {out['errors']}  targets: {out['targets']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
