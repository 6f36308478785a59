"""A bounded in-memory store of adapted policies: least-recently-used eviction plus a time to live.

Ids are random; the store remembers recently dropped ids (a bounded list) so a lookup can say
*why* an id is gone (expired, evicted) instead of only "unknown".
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
                "size": len(self._items),
                "max_size": self.max_size,
                "ttl_s": self.ttl_s,
                "evictions": self.evictions,
                "expirations": self.expirations,
            }
