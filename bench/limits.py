"""The service's body limits under abuse: a 50 MB body sent with chunked transfer encoding (no
``Content-Length`` to refuse it by) must get a 413 without the worker reading it into memory,
and a body that stops arriving must get a 408 after ``METARL_READ_TIMEOUT_S``.

    python bench/limits.py [--url http://127.0.0.1:3000 --token T]
        [--json bench/results/limits.json]

Without ``--url`` it starts the service on the shipped bundle with the default limits (32 MiB,
10 s). Reports the status, the bytes the client got to send before the answer, the answer's
time, and the server's resident memory (its process tree, when local) before, at the peak
(sampled every 20 ms) and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from load import server_rss  # noqa: E402

from serving.client import token_from_env  # noqa: E402
from serving.launch import ServiceProcess  # noqa: E402
from serving.probe import chunks, send_body  # noqa: E402

MB = 2**20


class PeakRss:
    """Samples the server's resident memory in a thread; ``peak`` is the largest seen."""

    def __init__(self, url: str, interval: float = 0.02):
        self.url, self.interval, self.peak = url, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss(self.url) or 0)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(url: str, token: str | None, size_mb: int) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    out = {}
    before = server_rss(url)
    with PeakRss(url) as peak:
        answer = send_body(url, "/act", chunks(size_mb * MB), chunked=True, headers=headers)
    time.sleep(1.0)
    after = server_rss(url)
    out["chunked_body"] = {
        "body_mb": size_mb,
        "status": answer.status,
        "error": answer.json().get("error") if answer.status else None,
        "sent_mb_before_answer": round(answer.sent / MB, 1),
        "seconds": round(answer.seconds, 3),
        "server_rss_mb": {
            "before": before and round(before / MB, 1),
            "peak": peak.peak and round(peak.peak / MB, 1),
            "after": after and round(after / MB, 1),
        },
        "rss_growth_mb": (round((max(peak.peak, after or 0) - before) / MB, 1) if before else None),
    }
    part = b'{"observations": [[0.1, '
    for chunked in (True, False):
        answer = send_body(
            url, "/act", [part], chunked=chunked, content_length=len(part) + 100,
            headers=headers, stall_s=120,
        )  # fmt: skip
        out["stalled_body_chunked" if chunked else "stalled_body_content_length"] = {
            "status": answer.status,
            "seconds": round(answer.seconds, 2),
            "error": answer.json().get("error") if answer.status else None,
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (default: start one on the shipped bundle)")
    p.add_argument("--token", default=token_from_env(), help="default: METARL_API_TOKEN(_FILE)")
    p.add_argument("--size-mb", type=int, default=50, help="size of the chunked body")
    p.add_argument("--json", help="write the results here, e.g. bench/results/limits.json")
    args = p.parse_args(argv)
    if args.url:
        result = measure(args.url, args.token, args.size_mb)
        settings = None
    else:
        with ServiceProcess(bundle=REPO_ROOT / "saved_models" / "nav2d-maml") as service:
            result = measure(service.url, args.token, args.size_mb)
            settings = "defaults (METARL_MAX_BODY_BYTES 32 MiB, METARL_READ_TIMEOUT_S 10)"
    result = {"service": args.url or settings, **result}
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ok = (
        result["chunked_body"]["status"] == 413
        and result["stalled_body_chunked"]["status"] == 408
        and result["stalled_body_content_length"]["status"] == 408
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
