"""Stops a real training run at random moments and checks that ``--resume`` ends where the
uninterrupted run does, bit for bit (parameters, metrics rows without timings, the bundle's
summary). Each trial starts ``python -m metarl_tf train`` in a subprocess, sends SIGTERM or
SIGKILL after a random delay (uniform over the run's iterations, after the first one), checks the
exit status (143 for SIGTERM, killed for SIGKILL), then resumes the run to the end.

    python bench/stop_resume.py [--trials 3] [--iterations 10] [--seed 0]
        [--json bench/results/stop_resume.json]

Trains ``--preset nav2d --meta-batch-size 4 --episodes-per-task 5 --checkpoint-every 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, not whichever copy is installed

TRAIN = ["--preset", "nav2d", "--meta-batch-size", "4", "--episodes-per-task", "5",
         "--checkpoint-every", "1", "--no-progress"]  # fmt: skip


def _train(run: Path, out: Path, iterations: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "metarl_tf", "train", *TRAIN, "--iterations", str(iterations),
         "--run-dir", str(run), "--out", str(out), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def _state(run: Path, out: Path) -> dict:
    import numpy as np

    from metarl_tf.bundle import load_bundle

    bundle = load_bundle(out)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return {
        "params": [np.asarray(p) for p in bundle.policy.get_parameters()],
        "rows": [
            {k: v for k, v in r.items() if not k.startswith("time/") and k != "charts/peak_rss_mb"}
            for r in rows
        ],
        "training": {
            k: bundle.meta["training"].get(k)
            for k in ("iterations", "final_pre_adaptation_return", "final_post_adaptation_return")
        },
    }


def _equal(a: dict, b: dict) -> bool:
    import numpy as np

    same_params = len(a["params"]) == len(b["params"]) and all(
        x.shape == y.shape and np.array_equal(x, y)
        for x, y in zip(a["params"], b["params"], strict=True)
    )
    return same_params and a["rows"] == b["rows"] and a["training"] == b["training"]


def _first_iteration_seconds(proc: subprocess.Popen) -> float:
    """Blocks until the run printed its first iteration line; returns when that was."""
    for line in proc.stdout:
        if line.startswith("it "):
            return time.monotonic()
    raise RuntimeError(f"the run ended before its first iteration:\n{proc.stderr.read()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    from metarl_tf.checkpoint import read_checkpoint

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="stop-resume-"))

    t0 = time.monotonic()
    ref = _train(tmp / "ref-run", tmp / "ref", args.iterations)
    first = _first_iteration_seconds(ref)
    ref.communicate()
    per_iteration = (time.monotonic() - first) / max(args.iterations - 1, 1)
    assert ref.returncode == 0, ref.stderr
    reference = _state(tmp / "ref-run", tmp / "ref")
    print(f"uninterrupted: {args.iterations} iterations, {per_iteration:.2f} s per iteration after "
          f"the first ({time.monotonic() - t0:.0f} s in all)")  # fmt: skip

    trials = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for trial in range(args.trials):
            run, out = tmp / f"{sig.name}-{trial}-run", tmp / f"{sig.name}-{trial}"
            # a moment within the iterations after the first (which includes compilation)
            delay = rng.uniform(0.0, per_iteration * (args.iterations - 2))
            proc = _train(run, out, args.iterations)
            _first_iteration_seconds(proc)
            time.sleep(delay)
            proc.send_signal(sig)
            _, err = proc.communicate()
            expected = 128 + sig if sig == signal.SIGTERM else -sig
            checkpoint = read_checkpoint(run / "checkpoint")[1]["iteration"]
            resumed = _train(run, out, args.iterations, "--resume")
            _, resume_err = resumed.communicate()
            equal = resumed.returncode == 0 and _equal(_state(run, out), reference)
            record = {
                "signal": sig.name,
                "delay_s_after_first_iteration": round(delay, 3),
                "exit_status": proc.returncode,
                "expected_exit_status": expected,
                "checkpoint_iteration_at_stop": checkpoint,
                "resume_exit_status": resumed.returncode,
                "resumed_equals_uninterrupted": equal,
            }
            trials.append(record)
            print(json.dumps(record))
            if not equal or proc.returncode != expected:
                print(err[-2000:], resume_err[-2000:], file=sys.stderr)

    passed = {name: 0 for name in ("SIGTERM", "SIGKILL")}
    for t in trials:
        ok = t["resumed_equals_uninterrupted"] and t["exit_status"] == t["expected_exit_status"]
        passed[t["signal"]] += int(ok)
    summary = {name: f"{n}/{args.trials}" for name, n in passed.items()}
    print(f"resumed == uninterrupted: {summary}")
    if args.json:
        result = {
            "command": "python bench/stop_resume.py " + " ".join(sys.argv[1:]),
            "train_options": TRAIN,
            "iterations": args.iterations,
            "seconds_per_iteration": round(per_iteration, 3),
            "summary": summary,
            "trials": trials,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(v.startswith(f"{args.trials}/") for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
