"""Service configuration, read once from ``METARL_*`` environment variables.

Every value is reported by ``POST /metadata`` so a client can see the limits it must respect.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / "saved_models" / "nav2d-maml"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value}: expected an integer >= {minimum}")
    return value


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if not value > minimum:
        raise SettingsError(f"{name}={value}: expected a number > {minimum}")
    return value


def _env_int_list(name: str) -> tuple[int, ...]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return ()
    try:
        values = tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise SettingsError(
            f"{name}={raw!r}: expected comma-separated integers, e.g. 1,2"
        ) from None
    if any(v < 1 for v in values):
        raise SettingsError(f"{name}={raw!r}: step counts must be >= 1")
    return values


def _env_token() -> str | None:
    """The API token from ``METARL_API_TOKEN`` or the file named by ``METARL_API_TOKEN_FILE``
    (surrounding whitespace stripped); ``None`` when neither is set or both are empty (no
    authentication)."""
    token = os.environ.get("METARL_API_TOKEN") or None  # empty: unset
    path = os.environ.get("METARL_API_TOKEN_FILE", "").strip()
    if token is not None and path:
        raise SettingsError(
            "METARL_API_TOKEN and METARL_API_TOKEN_FILE are both set: set only one of them"
        )
    if path:
        try:
            token = Path(path).read_text()
        except OSError as err:
            raise SettingsError(
                f"METARL_API_TOKEN_FILE={path!r} cannot be read ({err.strerror}): point it at a "
                "readable file holding the token"
            ) from None
    if token is None:
        return None
    token = token.strip()
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        where = "METARL_API_TOKEN_FILE" if path else "METARL_API_TOKEN"
        raise SettingsError(
            f"{where}: expected a token of at least 16 printable characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def _env_store_url() -> str | None:
    raw = os.environ.get("METARL_STORE_URL", "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise SettingsError(
            f"METARL_STORE_URL={redact_url(raw)!r}: expected redis://host:port/db "
            "(or rediss://, unix://), or unset for the in-process store"
        )
    return raw


def redact_url(url: str) -> str:
    """``url`` without its password (what logs and ``/metadata`` show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class ServiceSettings:
    """What the service loads and the limits it enforces.

    Attributes:
        bundle: bundle directory (``METARL_BUNDLE``; default ``saved_models/nav2d-maml``).
        max_episodes: most episodes in one ``/adapt`` request (``METARL_MAX_EPISODES``, 64).
        max_episode_length: most steps in one episode (``METARL_MAX_EPISODE_LENGTH``; default
            the bundle's horizon; larger values are capped to it).
        max_steps: most inner steps in one ``/adapt`` request (``METARL_MAX_STEPS``, 5).
        max_observations: most observations in one ``/act`` request or in
            ``query_observations`` (``METARL_MAX_OBSERVATIONS``, 4096).
        max_body_bytes: requests with a larger ``Content-Length`` get a 413
            (``METARL_MAX_BODY_BYTES``, 32 MiB).
        store_size: most adapted policies kept per worker by the in-process store
            (``METARL_STORE_SIZE``, 1024); the least recently used one is dropped first.
        store_ttl_s: an adapted policy unused for this long is dropped (``METARL_STORE_TTL_S``,
            3600; with Redis, the key's expiry, renewed on every use).
        store_url: ``METARL_STORE_URL=redis://host:port/db`` keeps adapted policies in Redis,
            shared by every worker and replica serving the same bundle and kept across restarts;
            unset: the in-process store (one worker's memory).
        api_token: ``METARL_API_TOKEN`` (or the content of ``METARL_API_TOKEN_FILE``): when
            set, the API routes and ``/metrics`` need ``Authorization: Bearer <token>``. Never
            reported or logged.
        read_timeout_s: a request body that stops arriving for this long gets a 408
            (``METARL_READ_TIMEOUT_S``, 10).
        max_pending: most ``/adapt`` requests queued or running per worker
            (``METARL_MAX_PENDING``, 8); more get a 503 with ``Retry-After``.
        warmup_steps: step counts compiled for every episode bucket before ``/readyz`` turns
            ready (``METARL_WARMUP_STEPS``, comma-separated; default the bundle's default steps).
            Other step counts compile on first use (about half a second, once).
        workers: BentoML worker processes (``METARL_WORKERS``, 1). Without ``store_url``,
            adapted-policy ids live in one worker's memory (docs/serving.md, scaling out).
        tf_threads: TensorFlow intra- and inter-op threads per worker (``METARL_TF_THREADS``, 1).
            One adaptation request is small (a few thousand steps through a small MLP); one
            thread avoids the thread-pool hand-offs that cost more than they save at this size
            and leaves the other cores to the HTTP side and to other workers.
    """

    bundle: Path = DEFAULT_BUNDLE
    max_episodes: int = 64
    max_episode_length: int | None = None
    max_steps: int = 5
    max_observations: int = 4096
    max_body_bytes: int = 32 * 1024 * 1024
    store_size: int = 1024
    store_ttl_s: float = 3600.0
    warmup_steps: tuple[int, ...] = field(default_factory=tuple)
    workers: int = 1
    tf_threads: int = 1
    store_url: str | None = None
    api_token: str | None = field(default=None, repr=False)
    read_timeout_s: float = 10.0
    max_pending: int = 8

    @classmethod
    def from_env(cls) -> ServiceSettings:
        """Reads the ``METARL_*`` variables; raises :class:`SettingsError` naming a bad one."""
        length = os.environ.get("METARL_MAX_EPISODE_LENGTH", "").strip()
        return cls(
            bundle=Path(os.environ.get("METARL_BUNDLE") or DEFAULT_BUNDLE),
            max_episodes=_env_int("METARL_MAX_EPISODES", cls.max_episodes),
            max_episode_length=_env_int("METARL_MAX_EPISODE_LENGTH", 1) if length else None,
            max_steps=_env_int("METARL_MAX_STEPS", cls.max_steps),
            max_observations=_env_int("METARL_MAX_OBSERVATIONS", cls.max_observations),
            max_body_bytes=_env_int("METARL_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024),
            store_size=_env_int("METARL_STORE_SIZE", cls.store_size),
            store_ttl_s=_env_float("METARL_STORE_TTL_S", cls.store_ttl_s),
            warmup_steps=_env_int_list("METARL_WARMUP_STEPS"),
            workers=_env_int("METARL_WORKERS", cls.workers),
            tf_threads=_env_int("METARL_TF_THREADS", cls.tf_threads),
            store_url=_env_store_url(),
            api_token=_env_token(),
            read_timeout_s=_env_float("METARL_READ_TIMEOUT_S", cls.read_timeout_s),
            max_pending=_env_int("METARL_MAX_PENDING", cls.max_pending),
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bundle"] = str(self.bundle)
        d["warmup_steps"] = list(self.warmup_steps)
        d["store_url"] = redact_url(self.store_url) if self.store_url else None
        d["api_token"] = self.api_token is not None  # whether auth is on, never the token
        return d


def unsupported_bundle_reason(meta: dict[str, Any]) -> str | None:
    """Why the service cannot serve a bundle (from its parsed ``meta.json``), or ``None``.

    The service serves a Gaussian policy with a vector action spec (``[N, act_dim]`` float
    actions, clipped to the bounds) and a categorical policy with a scalar integer action spec
    (``[N]`` integer actions, e.g. ``saved_models/bandit-k5-maml``, ``cartpole-maml``). Any other
    bundle is refused at start-up with this reason instead of failing on its first request.
    """
    policy_class = meta.get("policy", {}).get("class")
    action_spec = meta.get("action_spec", {})
    shape = action_spec.get("shape", [None])
    if policy_class == "GaussianMLPPolicy" and len(shape) == 1:
        return None
    if (
        policy_class == "CategoricalMLPPolicy"
        and shape == []
        and "int" in action_spec.get("dtype", "")
    ):
        return None
    return (
        f"the bundle's policy is {policy_class} with action spec {action_spec}; the service "
        "serves GaussianMLPPolicy bundles with a vector action spec and CategoricalMLPPolicy "
        "bundles with a scalar integer one. Adapt others in-process: "
        "metarl_tf.bundle.load_bundle(path).adapt(episodes)"
    )
