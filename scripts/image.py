"""Build and check the service's OCI image without a Docker engine (buildah, chroot isolation).

    python scripts/image.py base    # Debian bookworm base from debootstrap -> localhost/debian-min:bookworm
    python scripts/image.py build   # the Dockerfile on that base -> localhost/metarl-adaptation:dev
    python scripts/image.py test    # run the service inside; from the host: /readyz, /adapt + /act
                                    # with and without a token
Each step merges its figures (time, size, the round trip) into bench/results/image.json.

``make image-base``, ``make image`` and ``make image-test`` run these. Where a registry is reachable
and a Docker engine runs, ``docker build -t metarl-adaptation .`` builds the same Dockerfile on
``python:3.11-slim``.

Needs root and Debian's ``buildah``, ``podman`` (only ``podman import``) and ``debootstrap``.
Behind a TLS-intercepting proxy the build gets the CA bundle named by ``SSL_CERT_FILE`` (or
``--ca``) as a read-only bind mount for its ``RUN`` steps (the Dockerfile hands it to pip); no
layer keeps it. ``buildah run`` shares the host's network namespace, so a server bound to
127.0.0.1 inside answers on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

BASE_IMAGE = "localhost/debian-min:bookworm"
IMAGE = "localhost/metarl-adaptation:dev"
ROOTFS = Path("/var/tmp/metarl-debian-rootfs")
MIRROR = "http://deb.debian.org/debian"


def record(path: str | None, key: str, info: dict) -> None:
    """Merges ``{key: info}`` into the JSON file at ``path`` (base, build and test results)."""
    if not path:
        return
    target = Path(path)
    data = json.loads(target.read_text()) if target.is_file() else {}
    data[key] = info
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"error: {', '.join(missing)} not found; install with: apt-get install -y {' '.join(missing)}"
        )


def image_exists(name: str) -> bool:
    out = subprocess.run(["buildah", "images", "--quiet", name], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def image_size(name: str) -> int:
    out = subprocess.run(
        ["podman", "image", "inspect", name, "--format", "{{.Size}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def cmd_base(args) -> dict:
    need("debootstrap", "podman")
    start = time.perf_counter()
    if args.rootfs.exists():
        shutil.rmtree(args.rootfs)
    run(["debootstrap", "--variant=minbase", "bookworm", str(args.rootfs), args.mirror])
    tar = subprocess.Popen(["tar", "-C", str(args.rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["podman", "import", "-", args.base], stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(args.rootfs)
    info = {
        "base": args.base,
        "seconds": round(time.perf_counter() - start, 1),
        "bytes": image_size(args.base),
    }
    print(json.dumps(info))
    record(args.json, "base", info)
    return info


def cmd_build(args) -> dict:
    need("buildah", "podman")
    if args.base != "python:3.11-slim" and not image_exists(args.base):
        sys.exit(f"error: no base image {args.base}; make it first: make image-base")
    cmd = ["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--layers"]
    cmd += ["-t", args.image]
    cmd += ["--build-arg", f"BASE={args.base}", "-f", "Dockerfile"]
    ca = args.ca or os.environ.get("SSL_CERT_FILE")
    if ca:
        cmd += ["-v", f"{Path(ca).resolve()}:/run/build-ca.pem:ro"]
    start = time.perf_counter()
    run([*cmd, "."], cwd=REPO_ROOT)
    info = {
        "image": args.image,
        "base": args.base,
        "build_seconds": round(time.perf_counter() - start, 1),
        "bytes": image_size(args.image),
    }
    print(json.dumps(info))
    record(args.json, "build", info)
    return info


def _serve_in_container(image: str, port: int, env: dict[str, str], mounts: list[str]):
    """``buildah from`` + ``buildah run`` of the image's server on ``127.0.0.1:port``, wrapped in
    a :class:`serving.launch.ServiceProcess` (readiness wait, process-tree stop)."""
    from serving.launch import ServiceProcess

    container = subprocess.run(
        ["buildah", "from", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    cmd = ["buildah", "run", "--isolation", "chroot"]
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]
    for m in mounts:
        cmd += ["-v", m]
    cmd += [container, "--", "bentoml", "serve", "serving.service:AdaptationService"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--working-dir", "/app"]
    service = ServiceProcess(port=port, command=cmd, env=env, ready_timeout=600)
    return container, service


def _round_trip(url: str, token: str | None) -> dict:
    import httpx
    import numpy as np

    from serving.client import AdaptationClient

    rng = np.random.default_rng(0)
    episodes = [
        (rng.uniform(-0.5, 0.5, (100, 2)), rng.normal(0, 0.1, (100, 2)), rng.uniform(-1, 0, 100))
        for _ in range(4)
    ]
    out: dict = {"readyz": httpx.get(f"{url}/readyz", timeout=10).status_code}
    if token:
        r = httpx.post(f"{url}/act", json={"observations": [[0, 0]]}, timeout=10)
        out["act_without_token"] = r.status_code
    start = time.perf_counter()
    with AdaptationClient(url, token=token, timeout=60) as client:
        adapted = client.adapt(episodes)
        action = client.act(adapted, [[0.1, -0.2]], deterministic=True)
        meta = client.metadata()
    out.update(
        round_trip_seconds=round(time.perf_counter() - start, 3),
        policy_id=adapted.policy_id,
        inner_losses=adapted.inner_losses,
        action=np.asarray(action).tolist(),
        bundle=meta["name"],
        api_token=meta["settings"]["api_token"],
    )
    return out


def cmd_test(args) -> dict:
    need("buildah", "podman")
    from serving.launch import free_port

    if not image_exists(args.image):
        sys.exit(f"error: no image {args.image}; build it first: make image")
    results = {"image": args.image, "bytes": image_size(args.image), "runs": []}
    for use_token in (False, True):
        env: dict[str, str] = {}
        mounts: list[str] = []
        token = None
        tmp = Path(tempfile.mkdtemp(prefix="metarl-image-test-"))
        if use_token:
            token = secrets.token_urlsafe(32)
            token_file = tmp / "token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o644)
            mounts.append(f"{token_file}:/run/secrets/metarl_token:ro")
            env["METARL_API_TOKEN_FILE"] = "/run/secrets/metarl_token"
        port = free_port()
        container, service = _serve_in_container(args.image, port, env, mounts)
        start = time.perf_counter()
        try:
            with service:
                ready_s = round(time.perf_counter() - start, 1)
                run_info = {"token": use_token, "ready_seconds": ready_s}
                run_info.update(_round_trip(service.url, token))
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(run_info), flush=True)
        results["runs"].append(run_info)
    ok = all(
        r["readyz"] == 200
        and r["api_token"] == r["token"]
        and r.get("act_without_token", 401) == 401
        for r in results["runs"]
    )
    results["ok"] = ok
    record(args.json, "test", results)
    if not ok:
        sys.exit("error: the image's round trip failed (see above)")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["base", "build", "test"])
    p.add_argument("--base", default=BASE_IMAGE, help="base image (the Dockerfile's BASE)")
    p.add_argument("--image", default=IMAGE, help="image name")
    p.add_argument("--rootfs", type=Path, default=ROOTFS, help="debootstrap directory (base)")
    p.add_argument("--mirror", default=MIRROR, help="Debian mirror (base)")
    p.add_argument("--ca", help="CA bundle for pip in the build (default: $SSL_CERT_FILE)")
    p.add_argument(
        "--json",
        default=str(REPO_ROOT / "bench" / "results" / "image.json"),
        help="merge the results into this JSON file ('' for none)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("error: buildah/debootstrap need root here (run as root)")
    {"base": cmd_base, "build": cmd_build, "test": cmd_test}[args.command](args)


if __name__ == "__main__":
    main()
