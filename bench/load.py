"""Load check of a running adaptation service: N clients for S seconds, mixed ``/act`` and
``/adapt``, as independent clients would call it.

Each client (a thread with its own keep-alive connection) loops: with probability ``--adapt``
it posts ``/adapt`` (``--episodes`` random episodes of the bundle's horizon, from ``"meta"`` or,
half the time, one more step from a recent id adapted from ``"meta"``); otherwise it asks ``/act``
for one observation of a recent id some client got (``"meta"`` until there is one). Ids are
drawn from the last ``--recent`` issued (fewer than a worker's store keeps, so none is evicted).
They are shared between clients, so with several workers and no shared store some land on a
worker that does not know them: those 404s are counted as unknown-id answers.

    python bench/load.py --url http://127.0.0.1:3000 --clients 16 --seconds 60
        [--token T] [--json bench/results/load.json]

Prints and writes (``--json``): requests, errors (transport errors and any answer other than
200, an unknown-id 404 or a 503 with ``Retry-After``), unknown-id answers, 503 back-offs (the
client waits ``Retry-After``), p50/p99 per route, and the server's resident memory (the process
tree listening on the port, when it runs on this machine) before and after.

Client and server share this machine's cores: latencies measured while other heavy processes run
are not comparable (the load average is recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serving.client import pack_array, token_from_env  # noqa: E402


def server_rss(url: str) -> int | None:
    """Resident bytes of the process tree listening on ``url``'s port (``None`` if not local)."""
    import psutil

    port = urlsplit(url).port
    try:
        listeners = {
            c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
        }
    except psutil.Error:
        return None
    listeners.discard(None)
    if not listeners:
        return None
    procs: dict[int, psutil.Process] = {}
    for pid in listeners:
        try:
            p = psutil.Process(pid)
            # The arbiter (bentoml serve) and every worker under it.
            while p.parent() is not None and "bentoml" in " ".join(p.parent().cmdline()):
                p = p.parent()
            procs[p.pid] = p
            for child in p.children(recursive=True):
                procs[child.pid] = child
        except psutil.Error:
            continue
    total = 0
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def adapt_bodies(meta: dict, episodes: int, count: int, seed: int) -> list[dict]:
    """``count`` /adapt bodies of random episodes fitting the bundle's specs (packed arrays)."""
    rng = np.random.default_rng(seed)
    obs_dim = meta["observation_spec"]["shape"][0]
    action_spec = meta["action_spec"]
    length = meta["limits"]["max_episode_length"]
    bodies = []
    for _ in range(count):
        eps = []
        for _ in range(min(episodes, meta["limits"]["max_episodes"])):
            if action_spec["shape"]:  # continuous: [T, act_dim] raw samples
                actions = pack_array(rng.normal(0, 0.1, (length, action_spec["shape"][0])))
            else:  # discrete: [T] action indices
                n = int(action_spec["maximum"]) - int(action_spec["minimum"]) + 1
                actions = rng.integers(0, n, length).tolist()
            eps.append(
                {
                    "observations": pack_array(rng.uniform(-0.5, 0.5, (length, obs_dim))),
                    "actions": actions,
                    "rewards": pack_array(rng.uniform(-1, 0, length)),
                }
            )
        bodies.append({"episodes": eps, "steps": 1})
    return bodies


class Load:
    def __init__(self, args, meta: dict):
        self.args = args
        self.bodies = adapt_bodies(meta, args.episodes, 8, args.seed)
        self.obs_dim = meta["observation_spec"]["shape"][0]
        self.ids: list[str] = []  # recent ids, any depth: used by /act
        self.first: list[str] = []  # recent ids adapted from "meta": used as parents
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {"/act": [], "/adapt": []}
        self.counts = {"requests": 0, "errors": 0, "unknown_id": 0, "backoff_503": 0}
        self.examples: list[str] = []

    def client(self, index: int, deadline: float, headers: dict) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        with httpx.Client(base_url=self.args.url, timeout=60, headers=headers) as http:
            while time.monotonic() < deadline:
                with self.lock:
                    known = rng.choice(self.ids) if self.ids else None
                    parent = rng.choice(self.first) if self.first else None
                if rng.random() < self.args.adapt:
                    path = "/adapt"
                    body = dict(rng.choice(self.bodies))
                    if parent and rng.random() < 0.5:
                        body["parent"] = parent
                else:
                    path = "/act"
                    obs = [[rng.uniform(-0.5, 0.5) for _ in range(self.obs_dim)]]
                    body = {"observations": obs, "policy_id": known or "meta"}
                start = time.perf_counter()
                try:
                    r = http.post(path, json=body)
                    status, reply = r.status_code, r
                except httpx.HTTPError as err:
                    status, reply = None, err
                elapsed = time.perf_counter() - start
                self._record(path, status, reply, elapsed)
                if status == 503:
                    time.sleep(float(reply.headers.get("retry-after", "1")))

    def _record(self, path, status, reply, elapsed) -> None:
        with self.lock:
            self.counts["requests"] += 1
            if status == 200:
                self.latency[path].append(elapsed)
                if path == "/adapt":
                    answer = reply.json()
                    self.ids.append(answer["policy_id"])
                    if answer["parent"] == "meta":
                        self.first.append(answer["policy_id"])
                    for ids in (self.ids, self.first):
                        del ids[: max(0, len(ids) - self.args.recent)]
                return
            if status == 404 and "policy" in reply.text:
                self.counts["unknown_id"] += 1
            elif status == 503 and "retry-after" in reply.headers:
                self.counts["backoff_503"] += 1
            else:
                self.counts["errors"] += 1
                if len(self.examples) < 5:
                    text = reply.text[:200] if status is not None else repr(reply)
                    self.examples.append(f"{path} {status}: {text}")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ms = np.asarray(values) * 1e3
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--token", default=token_from_env(), help="default: METARL_API_TOKEN(_FILE)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--adapt", type=float, default=0.2, help="share of /adapt calls")
    p.add_argument("--episodes", type=int, default=10, help="episodes per /adapt")
    p.add_argument("--recent", type=int, default=256, help="ids drawn from the last N issued")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here, e.g. bench/results/load.json")
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    meta = httpx.post(f"{args.url}/metadata", json={}, headers=headers, timeout=30)
    if meta.status_code != 200:
        print(f"error: /metadata answered {meta.status_code}: {meta.text[:300]}", file=sys.stderr)
        return 2
    meta = meta.json()
    load = Load(args, meta)
    rss_before = server_rss(args.url)
    deadline = time.monotonic() + args.seconds
    threads = [
        threading.Thread(target=load.client, args=(i, deadline, headers))
        for i in range(args.clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rss_after = server_rss(args.url)
    result = {
        "url": args.url,
        "bundle": meta["name"],
        "workers": meta["settings"]["workers"],
        "store": meta["store"].get("backend"),
        "clients": args.clients,
        "seconds": round(wall, 1),
        **load.counts,
        "requests_per_s": round(load.counts["requests"] / wall, 1),
        "routes": {path: percentiles(v) for path, v in load.latency.items()},
        "server_rss_mb": {
            "before": None if rss_before is None else round(rss_before / 2**20, 1),
            "after": None if rss_after is None else round(rss_after / 2**20, 1),
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "error_examples": load.examples,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if load.counts["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
