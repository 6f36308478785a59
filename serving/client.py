"""Client of the adaptation service. Imports only the standard library, httpx and numpy (no
TensorFlow), so it runs in any application; the file can also be copied on its own.

    from serving.client import AdaptationClient

    with AdaptationClient("http://127.0.0.1:3000") as c:
        actions = c.act("meta", observations)                    # meta-initialization
        result = c.adapt(episodes, return_weights=True)          # few-step adaptation
        actions = c.act(result.policy_id, observations, deterministic=True)
        actions = c.act(result.weights, observations)            # inline weights: any replica
        c.export(result, "adapted-policy")   # a TensorFlow SavedModel: tf.saved_model.load(...)

Episodes are ``{"observations": [T, obs_dim], "actions": [T, act_dim], "rewards": [T]}`` mappings
or ``(observations, actions, rewards)`` tuples of arrays; record the *raw* (unclipped) actions
(:meth:`AdaptationClient.act_full`), as the trainer does. For a discrete-action bundle, actions
are ``[T]`` integers, as ``act`` returns them.

A service started with ``METARL_API_TOKEN`` needs the token: ``AdaptationClient(url, token=...)``
(:func:`token_from_env` reads it the way the service does).

Every 4xx/5xx answer raises :class:`ServiceError` carrying the server's reason (``error``), the
request ``field`` it concerns and what was ``expected``.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import pathlib
import shutil
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

META = "meta"


class ServiceError(Exception):
    """The service refused a request or could not be reached.

    Attributes:
        status_code: the HTTP status (``None`` when there was no answer).
        error: the server's reason.
        field: the request field concerned (e.g. ``episodes[2].actions``), if any.
        expected: what the server expected there, if given.
        body: the whole JSON error body (or the raw text).
    """

    def __init__(
        self,
        status_code: int | None,
        error: str,
        field: str | None = None,
        expected: str | None = None,
        body: Any = None,
    ):
        self.status_code, self.error, self.field, self.expected, self.body = (
            status_code,
            error,
            field,
            expected,
            body,
        )
        where = f" [field {field}]" if field else ""
        hint = f"; expected {expected}" if expected else ""
        status = f"HTTP {status_code}: " if status_code is not None else ""
        super().__init__(f"{status}{error}{where}{hint}")


class ServiceUnavailable(ServiceError):
    """No usable answer: connection refused, timeout, or 503 (warming up / overloaded)."""


@dataclass(frozen=True)
class AdaptResult:
    """An adapted policy (``POST /adapt``).

    Attributes:
        policy_id: handle for :meth:`AdaptationClient.act` and for ``parent``.
        parent: the policy it was adapted from.
        steps: inner steps taken.
        inner_losses: ``[steps]`` inner loss before each step.
        num_episodes, num_transitions: size of the submitted data.
        ttl_s: the id is dropped after this long unused.
        weights: ``{name: float32 array}`` when requested (``return_weights=True``).
        query_actions: ``[N, act_dim]`` mean actions for ``query_observations``, if given.
    """

    policy_id: str
    parent: str
    steps: int
    inner_losses: list[float]
    num_episodes: int
    num_transitions: int
    ttl_s: float
    weights: dict[str, np.ndarray] | None = None
    query_actions: np.ndarray | None = None


@dataclass(frozen=True)
class ActResult:
    """Actions (``POST /act``).

    Attributes:
        actions: ``[N, act_dim]`` float32 clipped to the action bounds (send these to the
            environment); a discrete-action bundle: ``[N]`` int64 actions.
        raw_actions: ``[N, act_dim]`` before clipping (record these for ``/adapt``); discrete:
            the same integers.
        policy_id: the policy used (``None`` for inline weights).
        deterministic: mean actions (``True``) or samples.
    """

    actions: np.ndarray
    raw_actions: np.ndarray
    policy_id: str | None
    deterministic: bool


def token_from_env() -> str | None:
    """The API token from ``METARL_API_TOKEN`` or the file named by ``METARL_API_TOKEN_FILE``
    (stripped), or ``None``."""
    token = os.environ.get("METARL_API_TOKEN") or None  # empty: unset
    path = os.environ.get("METARL_API_TOKEN_FILE", "").strip()
    if token is None and path:
        token = pathlib.Path(path).read_text()
    return token.strip() or None if token is not None else None


def _actions(values: list) -> np.ndarray:
    """``[N, act_dim]`` float32 (continuous) or ``[N]`` int64 (discrete) actions."""
    array = np.asarray(values)
    return array.astype(np.float32) if array.dtype.kind == "f" else array.astype(np.int64)


def _as_list(x: Any) -> Any:
    return np.asarray(x).tolist()


def pack_array(x: Any) -> dict[str, Any]:
    """``x`` as the service's PackedArray: ``{"data": base64 of little-endian float32 bytes,
    "shape": [...], "dtype": "float32"}`` (a quarter of the JSON-list size, parsed in
    microseconds)."""
    array = np.ascontiguousarray(x, dtype="<f4")
    return {
        "data": base64.b64encode(array.tobytes()).decode("ascii"),
        "shape": list(array.shape),
        "dtype": "float32",
    }


def _episode_json(episode: Any, index: int, packed: bool = False) -> dict[str, Any]:
    if isinstance(episode, Mapping):
        obs, act, rew = episode["observations"], episode["actions"], episode["rewards"]
    else:
        try:
            obs, act, rew = episode
        except (TypeError, ValueError):
            raise TypeError(
                f"episodes[{index}] must be a mapping with observations/actions/rewards or a "
                f"(observations, actions, rewards) tuple, got {type(episode).__name__}"
            ) from None
    encode = pack_array if packed else _as_list
    return {"observations": encode(obs), "actions": encode(act), "rewards": encode(rew)}


def _service_error(response: httpx.Response) -> ServiceError:
    """The :class:`ServiceError` (:class:`ServiceUnavailable` for a 503) of a 4xx/5xx answer."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
        body = body[0]  # BentoML wraps some framework errors in a list
    if isinstance(body, dict):
        error = str(body.get("error") or body.get("detail") or body)
        field, expected = body.get("field"), body.get("expected")
    else:
        error, field, expected = str(body)[:500] or response.reason_phrase, None, None
    cls = ServiceUnavailable if response.status_code == 503 else ServiceError
    return cls(response.status_code, error, field, expected, body)


def extract_saved_model(
    archive: bytes, path: str | os.PathLike, max_bytes: int = 1 << 30
) -> pathlib.Path:
    """Unpacks a SavedModel ``.tar.gz`` (``POST /export``) into ``path``, a new or empty
    directory, and returns it.

    Only regular files and directories with relative names inside ``path`` are accepted (no
    absolute names, ``..``, links or devices), at most ``max_bytes`` in all; the archive is
    unpacked beside ``path`` and renamed into place, so a refused archive leaves nothing behind.

    Raises:
        FileExistsError: ``path`` exists and is not an empty directory.
        ValueError: the archive is not a SavedModel archive or holds a refused member.
    """
    path = pathlib.Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory")
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            _extract_checked(tar, path, max_bytes)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"the export is not a readable .tar.gz archive: {err}") from None
    return path


def _extract_checked(tar: tarfile.TarFile, path: pathlib.Path, max_bytes: int) -> None:
    members, total = tar.getmembers(), 0
    for m in members:
        parts = pathlib.PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
            raise ValueError(
                f"refused archive member {m.name!r}: only regular files and directories with "
                "relative names inside the target are extracted"
            )
        total += m.size
    if total > max_bytes:
        raise ValueError(f"the archive unpacks to {total} bytes, more than {max_bytes}")
    if "saved_model.pb" not in {m.name for m in members}:
        raise ValueError("the archive holds no saved_model.pb: not a SavedModel export")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tar.extractall(tmp, members=members, filter="data")  # "data": the same checks again
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class AdaptationClient:
    """Typed calls to the adaptation service.

    Args:
        url: the service, e.g. ``http://127.0.0.1:3000``.
        timeout: seconds per request (connect, read, write each).
        transport: an ``httpx`` transport (tests, custom retries).
        packed: send episode arrays to ``/adapt`` as base64 float32 (PackedArray) rather than
            nested JSON lists: same values (float32 either way on the server), a body about a
            quarter of the size and a faster request.
        token: the service's bearer token (``METARL_API_TOKEN``), sent as
            ``Authorization: Bearer <token>``; ``None`` for a service without one.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:3000",
        timeout: float = 30.0,
        transport=None,
        packed: bool = True,
        token: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.packed = packed
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, transport=transport, headers=headers
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdaptationClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: Any = None, timeout: float | None = None):
        kwargs: dict[str, Any] = {}
        if payload is not None:
            kwargs["content"] = json.dumps(payload).encode()
            kwargs["headers"] = {"content-type": "application/json"}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as err:
            raise ServiceUnavailable(None, f"{method} {self.url}{path} timed out ({err})") from err
        except httpx.HTTPError as err:
            raise ServiceUnavailable(None, f"{method} {self.url}{path} failed: {err}") from err
        return response

    def _json(self, method: str, path: str, payload: Any = None, timeout: float | None = None):
        response = self._request(method, path, payload, timeout)
        if response.is_success:
            return response.json()
        raise _service_error(response)

    # -- health --------------------------------------------------------------------------------

    def livez(self) -> bool:
        """The server process answers."""
        try:
            return self._request("GET", "/livez").status_code == 200
        except ServiceUnavailable:
            return False

    def readyz(self) -> bool:
        """The service has loaded its bundle and compiled its functions."""
        try:
            return self._request("GET", "/readyz").status_code == 200
        except ServiceUnavailable:
            return False

    def wait_until_ready(self, timeout: float = 180.0, interval: float = 0.25) -> None:
        """Polls ``/readyz``; raises :class:`ServiceUnavailable` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.readyz():
            if time.monotonic() > deadline:
                raise ServiceUnavailable(None, f"{self.url} not ready after {timeout:g} s")
            time.sleep(interval)

    # -- endpoints -----------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """Bundle, task distribution, specs, adaptation defaults, limits (``POST /metadata``)."""
        return self._json("POST", "/metadata", {})

    def adapt(
        self,
        episodes: Sequence[Any],
        steps: int | None = None,
        parent: str = META,
        query_observations: Any = None,
        return_weights: bool = False,
        timeout: float | None = None,
    ) -> AdaptResult:
        """Adapts ``parent`` (default the meta-initialization) to the task of ``episodes``.

        Args:
            episodes: episodes of ONE task (see the module docstring for the forms accepted).
            steps: inner steps (default: the bundle's).
            parent: ``"meta"`` or a policy id from an earlier :meth:`adapt`.
            query_observations: ``[N, obs_dim]``: also return the adapted mean actions.
            return_weights: also return the adapted weights.
        """
        payload: dict[str, Any] = {
            "episodes": [_episode_json(e, i, self.packed) for i, e in enumerate(episodes)],
            "parent": parent,
            "return_weights": bool(return_weights),
        }
        if steps is not None:
            payload["steps"] = int(steps)
        if query_observations is not None:
            payload["query_observations"] = _as_list(query_observations)
        body = self._json("POST", "/adapt", payload, timeout)
        weights = body.get("weights")
        query = body.get("query_actions")
        return AdaptResult(
            policy_id=body["policy_id"],
            parent=body["parent"],
            steps=body["steps"],
            inner_losses=body["inner_losses"],
            num_episodes=body["num_episodes"],
            num_transitions=body["num_transitions"],
            ttl_s=body["ttl_s"],
            weights=(
                {k: np.asarray(v, np.float32) for k, v in weights.items()} if weights else None
            ),
            query_actions=_actions(query) if query is not None else None,
        )

    def act_full(
        self,
        policy: str | Mapping[str, Any] | AdaptResult,
        observations: Any,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> ActResult:
        """Actions and raw (unclipped) actions of ``policy`` for ``observations [N, obs_dim]``.

        Args:
            policy: ``"meta"``, a policy id, an :class:`AdaptResult`, or inline weights
                ``{name: array}`` (as :attr:`AdaptResult.weights`; works on any replica).
            deterministic: mean actions instead of samples.
            seed: seed of the action noise (reproducible samples).
        """
        obs = np.asarray(observations, np.float32)
        payload: dict[str, Any] = {
            "observations": obs.reshape(1, -1).tolist() if obs.ndim == 1 else obs.tolist(),
            "deterministic": bool(deterministic),
        }
        if isinstance(policy, AdaptResult):
            policy = policy.policy_id
        if isinstance(policy, str):
            payload["policy_id"] = policy
        else:
            payload["weights"] = {k: _as_list(v) for k, v in policy.items()}
        if seed is not None:
            payload["seed"] = int(seed)
        body = self._json("POST", "/act", payload)
        actions, raw = _actions(body["actions"]), _actions(body["raw_actions"])
        if obs.ndim == 1:
            actions, raw = actions[0], raw[0]
        return ActResult(actions, raw, body["policy_id"], body["deterministic"])

    def export(
        self,
        policy: str | AdaptResult,
        path: str | os.PathLike,
        timeout: float | None = None,
    ) -> pathlib.Path:
        """Downloads ``policy`` as a TensorFlow SavedModel (``POST /export``) and unpacks it into
        ``path`` (a new or empty directory; :func:`extract_saved_model`). Plain TensorFlow runs
        it: ``tf.saved_model.load(path).mean_action(observations)`` (docs/serving.md).

        Args:
            policy: ``"meta"``, a policy id, or an :class:`AdaptResult`.
        """
        policy_id = policy.policy_id if isinstance(policy, AdaptResult) else policy
        response = self._request("POST", "/export", {"policy_id": policy_id}, timeout)
        if not response.is_success:
            raise _service_error(response)
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("application/gzip"):
            raise ServiceError(
                response.status_code, f"/export answered {content_type!r}, not application/gzip"
            )
        return extract_saved_model(response.content, path)

    def act(
        self,
        policy: str | Mapping[str, Any] | AdaptResult,
        observations: Any,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> np.ndarray:
        """Actions within the action bounds: ``[N, act_dim]``, or ``[act_dim]`` for a single
        observation ``[obs_dim]``. See :meth:`act_full`."""
        return self.act_full(policy, observations, deterministic, seed).actions
