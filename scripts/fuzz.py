"""``make fuzz``: schemathesis against a live service, bounded in time.

Starts the service (the shipped bundle, with a bearer token) unless given ``--url``, then runs
``schemathesis run <url>/docs.json`` with ``scripts/schemathesis.toml``: it generates valid and
invalid requests for every route of the OpenAPI document for ``--max-time`` seconds and fails on
any 5xx or any answer that does not match the document (status, content type, body).

    python scripts/fuzz.py [--url http://127.0.0.1:3000 --token T] [--max-time 120]

Exits with schemathesis's status (0: no failure) and prints its summary; writes the counts to
``bench/results/fuzz.json`` (``--json``) and schemathesis's NDJSON event log to ``runs/fuzz/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from serving.client import token_from_env  # noqa: E402
from serving.launch import ServiceProcess  # noqa: E402

CONFIG = REPO_ROOT / "scripts" / "schemathesis.toml"


def schemathesis(url: str, token: str | None, max_time: int, workers: int, seed: int) -> dict:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which(
        "schemathesis"
    )
    if exe is None:
        sys.exit("error: schemathesis not installed: pip install -e '.[dev]'")
    report = REPO_ROOT / "runs" / "fuzz"
    cmd = [
        exe, "--config-file", str(CONFIG), "--no-color", "run", f"{url}/docs.json",
        "--max-time", str(max_time), "--workers", str(workers), "--seed", str(seed),
        "--continue-on-failure", "--report", "ndjson", "--report-dir", str(report),
        "--suppress-health-check", "too_slow,filter_too_much", "--generation-database", "none",
    ]  # fmt: skip
    env = {**os.environ, "METARL_FUZZ_AUTH": f"Bearer {token}" if token else ""}
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    print(out.stdout)
    cases = re.search(r"Test cases:\s*\n\s*(\d+) generated, (.*)", out.stdout)
    counts = {}
    if cases:
        counts["generated"] = int(cases.group(1))
        for number, kind in re.findall(r"(\d+) (passed|failed|skipped|errored)", cases.group(2)):
            counts[kind] = int(number)
    return {"exit_code": out.returncode, "max_time_s": max_time, "seed": seed, **counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (default: start one with a token)")
    p.add_argument("--token", default=token_from_env(), help="default: METARL_API_TOKEN(_FILE)")
    p.add_argument("--max-time", type=int, default=120, help="seconds of generation")
    # One: concurrent schemathesis workers can trip a CPython error in its own code generation
    # ("AST constructor recursion depth mismatch"), a failure of the tool, not of the service.
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(REPO_ROOT / "bench" / "results" / "fuzz.json"))
    args = p.parse_args(argv)
    if args.url:
        result = schemathesis(args.url, args.token, args.max_time, args.workers, args.seed)
    else:
        token = args.token or secrets.token_urlsafe(32)
        env = {"METARL_API_TOKEN": token, "METARL_MAX_EPISODES": "8", "METARL_API_TOKEN_FILE": ""}
        with ServiceProcess(bundle=REPO_ROOT / "saved_models" / "nav2d-maml", env=env) as service:
            result = schemathesis(service.url, token, args.max_time, args.workers, args.seed)
        result["service"] = "saved_models/nav2d-maml, bearer token, METARL_MAX_EPISODES=8"
    print(json.dumps(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
