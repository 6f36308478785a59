"""Stores of adapted policies.

:class:`PolicyStore` (the default) keeps them in the worker's memory: least-recently-used
eviction plus a time to live. Ids are random; it remembers recently dropped ids (a bounded list)
so a lookup can say *why* an id is gone (expired, evicted) instead of only "unknown".

:class:`RedisPolicyStore` (``METARL_STORE_URL=redis://host:port/db``) keeps them in Redis, shared
by every worker and replica that serves the same bundle and kept across restarts. A policy is one
Redis string under ``metarl:<bundle checksum>:policy:<id>`` (a different bundle never sees
another's policies), written with :func:`encode_policy` (raw little-endian float32 arrays after a
JSON header: no pickle), with a Redis expiry of the time to live, renewed on every use. Bound
Redis's memory with ``maxmemory`` and ``maxmemory-policy allkeys-lru`` (docs/serving.md).
"""

from __future__ import annotations

import json
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class StoreUnavailable(RuntimeError):
    """The store cannot answer now (Redis unreachable, loading, out of memory); the request may
    be retried (the service answers 503 with ``Retry-After``)."""


class PolicyNotFound(KeyError):
    """A policy id is not in the store; ``reason`` says whether it expired, was evicted, or
    was never issued by this worker."""

    def __init__(self, policy_id: str, reason: str):
        super().__init__(policy_id)
        self.policy_id = policy_id
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass
class StoredPolicy:
    """An adapted policy.

    Attributes:
        policy_id: its id.
        parameters: weights in the bundle's canonical order, unbatched ``[*shape]`` float32.
        parent: the id it was adapted from (``"meta"`` for the meta-initialization).
        steps: inner steps taken from ``parent``.
        created: ``time.monotonic()`` at creation.
        last_used: ``time.monotonic()`` of the last lookup.
        extra: anything the engine wants to keep next to the weights (e.g. a numpy forward).
    """

    policy_id: str
    parameters: list
    parent: str
    steps: int
    created: float
    last_used: float
    extra: dict[str, Any] = field(default_factory=dict)


class PolicyStore:
    """Thread-safe LRU store with a time to live (TTL counts from the last use).

    Args:
        max_size: most policies kept; adding one more drops the least recently used.
        ttl_s: a policy not used for this many seconds is dropped.
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, max_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_size, self.ttl_s, self._clock = int(max_size), float(ttl_s), clock
        self._items: OrderedDict[str, StoredPolicy] = OrderedDict()
        self._dropped: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone
        self._lock = threading.Lock()
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def add(self, parameters: list, parent: str, steps: int, **extra: Any) -> StoredPolicy:
        """Stores a new policy under a fresh id and returns it."""
        now = self._clock()
        policy = StoredPolicy(
            f"pol-{secrets.token_hex(12)}", parameters, parent, steps, now, now, extra
        )
        with self._lock:
            self._expire()
            self._items[policy.policy_id] = policy
            while len(self._items) > self.max_size:
                old, _ = self._items.popitem(last=False)
                self.evictions += 1
                self._remember(
                    old,
                    f"policy {old!r} was evicted: the store keeps at most {self.max_size} policies "
                    "and drops the least recently used; adapt again, or keep the weights "
                    "(return_weights=true) and pass them inline",
                )
        return policy

    def get(self, policy_id: str) -> StoredPolicy:
        """The policy with this id (and marks it used); raises :class:`PolicyNotFound`."""
        with self._lock:
            self._expire()
            policy = self._items.get(policy_id)
            if policy is None:
                reason = self._dropped.get(policy_id) or (
                    f"unknown policy id {policy_id!r}: this worker never issued it. Ids live in "
                    "the memory of the worker that adapted them and do not survive a restart; "
                    "with several workers or replicas, pass the adapted weights inline "
                    "(return_weights) instead of the id"
                )
                raise PolicyNotFound(policy_id, reason)
            policy.last_used = self._clock()
            self._items.move_to_end(policy_id)
            return policy

    def _expire(self) -> None:
        now = self._clock()
        # Least recently used first: stop at the first policy still alive.
        while self._items:
            pid, policy = next(iter(self._items.items()))
            if now - policy.last_used < self.ttl_s:
                break
            del self._items[pid]
            self.expirations += 1
            self._remember(
                pid,
                f"policy {pid!r} expired: unused for more than {self.ttl_s:g} s "
                "(METARL_STORE_TTL_S); adapt again, or pass the weights inline",
            )

    def _remember(self, policy_id: str, reason: str) -> None:
        self._dropped[policy_id] = reason
        while len(self._dropped) > 4 * self.max_size:
            self._dropped.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire()
            return {
                "backend": "memory",
                "size": len(self._items),
                "max_size": self.max_size,
                "ttl_s": self.ttl_s,
                "evictions": self.evictions,
                "expirations": self.expirations,
            }


# -- the shared store: Redis ----------------------------------------------------------------------

_MAGIC = b"MRLP1"
_LITTLE_F32 = np.dtype("<f4")


def encode_policy(parameters: list, header: dict[str, Any]) -> bytes:
    """``parameters`` (float32 arrays) and a JSON-serializable ``header`` as bytes:
    ``b"MRLP1"``, the header's length (uint32, little-endian), the header (UTF-8 JSON, with the
    arrays' shapes added under ``"shapes"``), then each array's little-endian float32 bytes in
    C order."""
    arrays = [np.asarray(p, dtype=_LITTLE_F32) for p in parameters]  # tobytes(): C order
    head = json.dumps({**header, "shapes": [list(a.shape) for a in arrays]}).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(head)), head, *(a.tobytes() for a in arrays)])


def decode_policy(blob: bytes) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The inverse of :func:`encode_policy`: ``(float32 arrays, header)``; ``ValueError`` when
    ``blob`` is not such a record."""
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 4:
        raise ValueError("not a stored policy record (no MRLP1 header)")
    (size,) = struct.unpack_from("<I", blob, len(_MAGIC))
    start = len(_MAGIC) + 4
    header = json.loads(blob[start : start + size])
    offset, arrays = start + size, []
    for shape in header.pop("shapes"):
        count = int(np.prod(shape, dtype=np.int64))
        end = offset + count * _LITTLE_F32.itemsize
        if end > len(blob):
            raise ValueError("stored policy record is truncated")
        array = np.frombuffer(blob[offset:end], _LITTLE_F32).reshape(shape)
        arrays.append(array.astype(np.float32))  # native, writable
        offset = end
    if offset != len(blob):
        raise ValueError("stored policy record has trailing bytes")
    return arrays, header


class RedisPolicyStore:
    """Adapted policies in Redis, namespaced by the bundle's checksum.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket).
        namespace: the bundle's checksum (:attr:`metarl_tf.bundle.Bundle.checksum`).
        ttl_s: a policy not used for this long expires (Redis key expiry, renewed on use).
        timeout_s: socket timeout of every Redis call; past it the call is
            :class:`StoreUnavailable`.
        client: a ``redis.Redis`` to use instead of connecting to ``url`` (tests).
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_s: float,
        timeout_s: float = 2.0,
        client: Any = None,
    ):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from serving.settings import redact_url

        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.url = redact_url(url)
        self.namespace, self.ttl_s = namespace, float(ttl_s)
        self._ttl_ms = max(1, round(self.ttl_s * 1000))
        self._errors = redis.exceptions.RedisError
        # One quick retry, no backoff: a request waits at most ~2 timeouts, then gets a 503 and
        # retries itself; the connection pool reconnects on the next call once Redis is back.
        self._redis = client or redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self.unavailable = 0  # calls that failed because Redis could not answer

    def key(self, policy_id: str) -> str:
        return f"metarl:{self.namespace}:policy:{policy_id}"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except self._errors as err:
            self.unavailable += 1
            raise StoreUnavailable(
                f"the policy store (Redis at {self.url}) could not {what}: "
                f"{type(err).__name__}: {err}"
            ) from None

    def add(self, parameters: list, parent: str, steps: int, **extra: Any) -> StoredPolicy:
        """Stores a new policy under a fresh id (expiring after ``ttl_s`` unused)."""
        now_wall, now = time.time(), time.monotonic()
        policy_id = f"pol-{secrets.token_hex(12)}"
        header = {
            "bundle": self.namespace,
            "parent": parent,
            "steps": int(steps),
            "created": now_wall,
            "extra": extra,
        }
        blob = encode_policy(parameters, header)
        self._call("store the policy", self._redis.set, self.key(policy_id), blob, px=self._ttl_ms)
        return StoredPolicy(policy_id, list(parameters), parent, steps, now, now, dict(extra))

    def get(self, policy_id: str) -> StoredPolicy:
        """The policy with this id, its expiry renewed; raises :class:`PolicyNotFound` or
        :class:`StoreUnavailable`."""
        blob = self._call(
            "read the policy", self._redis.getex, self.key(policy_id), px=self._ttl_ms
        )
        if blob is None:
            raise PolicyNotFound(
                policy_id,
                f"unknown policy id {policy_id!r}: not in the shared store (Redis at "
                f"{self.url}) for this bundle; it expired after {self.ttl_s:g} s unused "
                "(METARL_STORE_TTL_S), was evicted by Redis (maxmemory), or was never issued. "
                "Adapt again, or keep the weights (return_weights=true) and pass them inline",
            )
        try:
            parameters, header = decode_policy(blob)
        except (ValueError, KeyError, TypeError) as err:
            raise PolicyNotFound(
                policy_id, f"policy {policy_id!r} is unreadable in the store ({err}); adapt again"
            ) from None
        if header.get("bundle") != self.namespace:  # the key already says so; belt and braces
            raise PolicyNotFound(policy_id, f"policy {policy_id!r} belongs to another bundle")
        now = time.monotonic()
        return StoredPolicy(
            policy_id,
            parameters,
            header["parent"],
            int(header["steps"]),
            now - max(0.0, time.time() - float(header["created"])),
            now,
            dict(header.get("extra") or {}),
        )

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except self._errors:
            return False

    def __len__(self) -> int:
        count = 0
        for _ in self._redis.scan_iter(match=self.key("*"), count=1000):
            count += 1
        return count

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "url": self.url,
            "namespace": self.namespace,
            "ttl_s": self.ttl_s,
            "reachable": self.ping(),
            "unavailable_errors": self.unavailable,
        }
