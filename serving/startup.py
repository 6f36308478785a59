"""What the service checks before it serves, and how a refused bundle stops the whole server.

BentoML restarts a worker that fails to start, forever. So a bundle the service cannot serve must
stop the server instead:

- :func:`check_bundle_at_startup` runs when ``serving.service`` is imported, in ``bentoml
  serve``'s own process, before any worker starts: :func:`metarl_tf.bundle_schema.validate_bundle`
  (schema, ranges, files confined to the bundle, checksums; no TensorFlow, a fraction of a second)
  and :func:`serving.settings.unsupported_bundle_reason`. The service module turns a refusal into
  one line on stderr and exit status 1.
- What only the task distribution can check (the action bounds it defines) is checked by the
  worker's ``load_bundle``; a worker that refuses the bundle calls :func:`stop_server`, which ends
  the server with exit status 1 through the handler :func:`install_stop_handler` set in the
  server process.

Imports no TensorFlow.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from metarl_tf.bundle_schema import BundleError, validate_bundle
from serving.settings import SettingsError, unsupported_bundle_reason

STOP_SIGNAL = signal.SIGUSR2  # not one of those BentoML's process manager (circus) handles


def check_bundle_at_startup(path: Path) -> dict[str, Any]:
    """The bundle's validated ``meta.json``, or ``SettingsError`` saying why the service cannot
    serve it."""
    if not (path / "meta.json").is_file():
        raise SettingsError(
            f"METARL_BUNDLE={str(path)!r} is not a bundle directory (no meta.json); "
            "train one (python -m metarl_tf train --preset nav2d) or point METARL_BUNDLE at one"
        )
    try:
        meta = validate_bundle(path)
    except (BundleError, OSError) as err:
        raise SettingsError(f"METARL_BUNDLE={str(path)!r}: {err}") from None
    reason = unsupported_bundle_reason(meta)
    if reason:
        raise SettingsError(f"METARL_BUNDLE={str(path)!r}: {reason}")
    return meta


def stop_server(message: str) -> None:
    """From a worker that cannot serve: ``message`` to stderr, :data:`STOP_SIGNAL` to the server
    process (the worker's parent), then this worker ends."""
    print(message, file=sys.stderr, flush=True)
    os.kill(os.getppid(), STOP_SIGNAL)
    os._exit(1)


def _stop_with_failure(signum, frame) -> None:
    # SIGTERM: BentoML's graceful shutdown of every worker; then exit status 1 instead of 0.
    atexit.register(os._exit, 1)
    os.kill(os.getpid(), signal.SIGTERM)


def install_stop_handler() -> None:
    """In the server process: :data:`STOP_SIGNAL` from a worker stops the server with exit
    status 1 (a no-op outside the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(STOP_SIGNAL, _stop_with_failure)
