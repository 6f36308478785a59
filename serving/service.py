"""The adaptation service: BentoML 1.4, ``bentoml serve serving.service:AdaptationService``.

Endpoints (all ``POST``, JSON): ``/adapt``, ``/act``, ``/metadata``, and ``/export`` (a policy as a
TensorFlow SavedModel in a ``.tar.gz``); BentoML adds ``/livez``,
``/readyz``, ``/metrics`` and the OpenAPI document (``/docs.json``). The HTTP contract is in
DESIGN.md ("The HTTP contract") and the README.

Each worker loads the bundle (``METARL_BUNDLE``) once, then compiles the adaptation function for
every padded request size in a background thread; ``/readyz`` answers 503 until that is done, so a
load balancer sends no request to a cold worker. ``/adapt`` also answers 503 (JSON) until then;
``/act`` and ``/metadata`` need no compilation and answer at once.

Errors: every refused request gets a 4xx JSON body ``{"error", "field", "expected"}``. Type errors
found by pydantic (inside BentoML) are reshaped to the same form by :class:`RequestGuard`, which
also turns away bodies over ``METARL_MAX_BODY_BYTES`` (413) before they are read.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
from bentoml.validators import ContentType
from starlette.responses import JSONResponse, Response

from metarl_tf.bundle_schema import BundleError, validate_bundle
from serving.schemas import ActRequest, ActResponse, AdaptRequest, AdaptResponse, ExportRequest
from serving.settings import ServiceSettings, SettingsError, unsupported_bundle_reason
from serving.validation import RequestError, check_episodes, check_observations, check_steps

logger = logging.getLogger("metarl_tf.serving")

SETTINGS = ServiceSettings.from_env()


def check_bundle_at_startup(path: Path) -> dict[str, Any]:
    """The bundle's validated ``meta.json`` (:func:`metarl_tf.bundle_schema.validate_bundle`:
    schema, ranges, files confined to the bundle, checksums; no TensorFlow), or ``SettingsError``
    saying why the service cannot serve it."""
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


# Checked at import, in `bentoml serve`'s own process before it starts any worker: a bundle the
# service cannot serve stops the server at once with one line (exit status 1), instead of workers
# that BentoML would restart forever. Each worker then loads it fully (load_bundle).
try:
    check_bundle_at_startup(SETTINGS.bundle)
except SettingsError as _err:
    raise SystemExit(f"error: {_err}") from None
API_PATHS = ("/adapt", "/act", "/metadata", "/export")
# Above this many observations, /act computes in a worker thread instead of on the event loop.
THREAD_ACT_ROWS = 256


# pydantic names the member of a union (an episode array is nested lists or a PackedArray) in an
# error's location; these are not request fields.
_UNION_TAGS = {"list[float]", "list[list[float]]", "PackedArray"}


def _format_loc(loc: Any) -> str:
    """pydantic ``("episodes", 2, "actions", 0)`` -> ``"episodes[2].actions[0]"``."""
    out = ""
    for part in loc or ():
        if part in _UNION_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _relevant(detail: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drops a union member's complaint that the value has the other member's form (a list sent
    where a PackedArray object would go, or an object where lists would), keeping the problems
    within the form the client chose."""
    kept = [
        d
        for d in detail
        if not (
            set(d.get("loc") or ()) & _UNION_TAGS
            and d.get("type") in ("model_type", "list_type", "model_attributes_type")
        )
    ]
    return kept or detail


_EXPECTED = {
    "missing": "a value: this field is required",
    "extra_forbidden": "only the documented fields (see /docs.json)",
    "json_invalid": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
}


def reshape_validation_error(body: dict[str, Any]) -> dict[str, Any]:
    """BentoML's pydantic error body ``{"error", "detail": [{"type", "loc", "msg"}, ...]}`` in
    this service's form ``{"error", "field", "expected", "detail"}`` (first problem first)."""
    detail = _relevant(body.get("detail") or [{}])
    first = detail[0]
    field = _format_loc(first.get("loc"))
    msg = first.get("msg", "invalid value")
    more = f" (and {len(detail) - 1} more problem(s), see detail)" if len(detail) > 1 else ""
    return {
        "error": f"{field}: {msg}{more}",
        "field": field,
        "expected": _EXPECTED.get(first.get("type"), msg.removeprefix("Input should be ")),
        "detail": detail,
    }


class RequestGuard:
    """ASGI middleware on the API routes: reads every body as JSON, refuses bodies over the size
    limit (413) before they are read, and reshapes BentoML's 400 validation bodies into
    ``{"error", "field", "expected"}``. Other responses pass through untouched."""

    def __init__(self, app, max_body_bytes: int, paths: tuple[str, ...] = API_PATHS):
        self.app, self.max_body_bytes, self.paths = app, max_body_bytes, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if headers.get(b"content-type") != b"application/json":
            # The API speaks JSON only: parse the body as JSON whatever it is labelled (curl -d
            # says form-urlencoded), which also keeps BentoML's other decoders out of reach.
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")
            ]
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                too_big = False  # the server itself rejects a malformed Content-Length
            if too_big:
                error = RequestError(
                    f"request body of {int(length)} bytes exceeds the limit of "
                    f"{self.max_body_bytes} (METARL_MAX_BODY_BYTES)",
                    "body",
                    f"at most {self.max_body_bytes} bytes",
                    status=413,
                )
                await error_response(error)(scope, receive, send)
                return

        held: dict[str, Any] = {}

        async def reshaping_send(message):
            if message["type"] == "http.response.start" and message["status"] == 400:
                held["start"], held["body"] = message, []
                return
            if "start" not in held or message["type"] != "http.response.body":
                await send(message)
                return
            held["body"].append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(held["body"])
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict) and "detail" in data and "field" not in data:
                body = json.dumps(reshape_validation_error(data)).encode()
            headers = [
                (k, v) for k, v in held["start"]["headers"] if k.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**held["start"], "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshaping_send)


def _stop_server(message: str) -> None:
    """Ends the whole server from a worker that cannot load the bundle, which BentoML would
    otherwise restart forever: the reason to stderr, :data:`STOP_SIGNAL` to the server process
    (the worker's parent; its handler below stops it with exit status 1), then this worker."""
    print(message, file=sys.stderr, flush=True)
    os.kill(os.getppid(), STOP_SIGNAL)
    os._exit(1)


def _exit_with_failure_at_shutdown(signum, frame) -> None:
    """In the server process: a worker refused the bundle. Stop (SIGTERM: BentoML's graceful
    shutdown of every worker) and exit with status 1 instead of 0."""
    atexit.register(os._exit, 1)
    os.kill(os.getpid(), signal.SIGTERM)


STOP_SIGNAL = signal.SIGUSR2  # not one of those BentoML's process manager (circus) handles
if threading.current_thread() is threading.main_thread():
    signal.signal(STOP_SIGNAL, _exit_with_failure_at_shutdown)


def error_response(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers)


@bentoml.service(
    name="metarl_adaptation",
    workers=SETTINGS.workers,
    threads=1,  # adaptation calls are serialized per worker; /act runs on the event loop
    traffic={"timeout": 60},
)
class AdaptationService:
    """Adapts the bundle's meta-initialization to a new task from submitted episodes."""

    def __init__(self) -> None:
        # Heavy imports here, not at module level: `bentoml build` and the client import less.
        import tensorflow as tf

        from metarl_tf.bundle import load_bundle
        from serving.engine import AdaptationEngine

        self.settings = SETTINGS
        try:  # only possible before TensorFlow runs its first operation in this process
            tf.config.threading.set_intra_op_parallelism_threads(SETTINGS.tf_threads)
            tf.config.threading.set_inter_op_parallelism_threads(SETTINGS.tf_threads)
        except RuntimeError:
            logger.warning("TensorFlow already initialized; METARL_TF_THREADS not applied")
        try:
            bundle = load_bundle(self.settings.bundle)
        except BundleError as err:  # what only the task distribution can check (action bounds)
            _stop_server(f"error: METARL_BUNDLE={str(self.settings.bundle)!r}: {err}")
        self.engine = AdaptationEngine(bundle, self.settings)
        self.warmup_error: str | None = None
        logger.info("loaded bundle %s; warming up %s", bundle.path, self.engine.buckets)
        threading.Thread(target=self._warm_up, name="metarl-warmup", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.engine.warm_up()
            logger.info("warm-up done: %s", self.engine.warmup)
        except Exception as err:  # reported by /metadata; /readyz stays 503
            logger.exception("warm-up failed")
            self.warmup_error = f"{type(err).__name__}: {err}"

    async def __is_ready__(self) -> bool:
        return self.engine.ready

    @bentoml.api(route="/adapt", input_spec=AdaptRequest)
    def adapt(
        self,
        episodes: list,
        steps: int | None = None,
        parent: str = "meta",
        query_observations: list | None = None,
        return_weights: bool = False,
    ) -> AdaptResponse:
        """A few inner gradient steps (the trainer's ``adapt``) on one task's episodes."""
        engine = self.engine
        try:
            if not engine.ready:
                raise RequestError(
                    "the service is still compiling its adaptation function (warm-up)",
                    "service",
                    "a retry once /readyz answers 200",
                    status=503,
                )
            checked = check_episodes(
                episodes,
                engine.obs_dim,
                engine.act_dim,
                self.settings.max_episodes,
                engine.max_episode_length,
            )
            n_steps = check_steps(steps, engine.default_steps, self.settings.max_steps)
            query = None
            if query_observations is not None:
                query = check_observations(
                    query_observations,
                    engine.obs_dim,
                    self.settings.max_observations,
                    field="query_observations",
                )
            outcome = engine.adapt(checked, n_steps, parent)
        except RequestError as err:
            return error_response(err)
        query_actions = None
        if query is not None:
            query_actions = engine.numpy_act(outcome.parameters, query, True, None)[0].tolist()
        return AdaptResponse(
            policy_id=outcome.policy_id,
            parent=outcome.parent,
            steps=outcome.steps,
            inner_losses=outcome.inner_losses,
            num_episodes=outcome.num_episodes,
            num_transitions=outcome.num_transitions,
            ttl_s=self.settings.store_ttl_s,
            weights=engine.weights_json(outcome.parameters) if return_weights else None,
            query_actions=query_actions,
        )

    @bentoml.api(route="/act", input_spec=ActRequest)
    async def act(
        self,
        observations: list,
        policy_id: str | None = None,
        weights: dict | None = None,
        deterministic: bool = False,
        seed: int | None = None,
    ) -> ActResponse:
        """Actions of ``"meta"``, an adapted policy, or inline weights."""
        engine = self.engine
        try:
            if policy_id is not None and weights is not None:
                raise RequestError(
                    "give either policy_id or weights, not both",
                    "weights",
                    "weights only when policy_id is omitted",
                )
            obs = check_observations(observations, engine.obs_dim, self.settings.max_observations)
            if weights is not None:
                params = engine.parameters_from_weights(weights)
            else:
                policy_id = policy_id or "meta"
                params = engine.lookup(policy_id)
        except RequestError as err:
            return error_response(err)
        if len(obs) > THREAD_ACT_ROWS:
            actions, raw = await anyio.to_thread.run_sync(
                engine.numpy_act, params, obs, deterministic, seed
            )
        else:
            actions, raw = engine.numpy_act(params, obs, deterministic, seed)
        return ActResponse(
            actions=actions.tolist(),
            raw_actions=raw.tolist(),
            policy_id=policy_id,
            deterministic=deterministic,
        )

    @bentoml.api(route="/export", input_spec=ExportRequest)
    def export(self, policy_id: str) -> Annotated[Path, ContentType("application/gzip")]:
        """``"meta"`` or an adapted policy as a TensorFlow SavedModel: a ``.tar.gz`` whose
        members are the SavedModel's files (``mkdir m && tar -xzf policy.tar.gz -C m``)."""
        try:
            archive = self.engine.export_archive(policy_id)
        except RequestError as err:
            return error_response(err)
        return Response(
            archive,
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{policy_id}.tar.gz"'},
        )

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict[str, Any]:
        """Bundle, task distribution, specs, adaptation defaults, limits, store and warm-up."""
        info = self.engine.metadata()
        info["warmup"]["error"] = self.warmup_error
        info["version"] = _package_version()
        info["worker_pid"] = os.getpid()
        return info

    if os.environ.get("METARL_BENCH_NOOP") == "1":

        @bentoml.api(route="/noop")
        async def noop(self) -> dict[str, Any]:
            """Does nothing: the latency floor of a BentoML endpoint (bench/serve_latency.py)."""
            return {}


def _package_version() -> str:
    import metarl_tf

    return metarl_tf.__version__


AdaptationService.add_asgi_middleware(RequestGuard, max_body_bytes=SETTINGS.max_body_bytes)
