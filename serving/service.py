"""The adaptation service: BentoML 1.4, ``bentoml serve serving.service:AdaptationService``.

Endpoints (all ``POST``, JSON): ``/adapt``, ``/act``, ``/metadata``, and ``/export`` (a policy as a
TensorFlow SavedModel in a ``.tar.gz``); BentoML adds ``/livez``,
``/readyz``, ``/metrics`` and the OpenAPI document (``/docs.json``). The HTTP contract is in
DESIGN.md ("The HTTP contract") and docs/serving.md.

Each worker loads the bundle (``METARL_BUNDLE``) once, then compiles the adaptation function for
every padded request size in a background thread; ``/readyz`` answers 503 until that is done, so a
load balancer sends no request to a cold worker. ``/adapt`` also answers 503 (JSON) until then;
``/act`` and ``/metadata`` need no compilation and answer at once.

Errors: every refused request gets a 4xx (or 503) JSON body ``{"error", "field", "expected"}``
(:mod:`serving.errors`). :class:`serving.guard.RequestGuard`, in front of the routes, checks the
bearer token, reads bodies within ``METARL_MAX_BODY_BYTES`` and ``METARL_READ_TIMEOUT_S``, bounds
queued adaptations and reshapes pydantic's type errors into that form.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
from bentoml.validators import ContentType
from starlette.responses import Response

from metarl_tf.bundle_schema import BundleError
from serving.errors import error_response
from serving.guard import RequestGuard
from serving.schemas import (
    ActRequest,
    ActResponse,
    AdaptRequest,
    AdaptResponse,
    ExportRequest,
    patch_openapi,
)
from serving.settings import ServiceSettings, SettingsError
from serving.startup import check_bundle_at_startup, install_stop_handler, stop_server
from serving.validation import RequestError, check_episodes, check_observations, check_steps

logger = logging.getLogger("metarl_tf.serving")

SETTINGS = ServiceSettings.from_env()
# Checked at import, in `bentoml serve`'s own process before any worker starts: a bundle the
# service cannot serve ends the server with one line and exit status 1 (serving/startup.py),
# rather than workers that BentoML would restart forever.
try:
    check_bundle_at_startup(SETTINGS.bundle)
except SettingsError as _err:
    raise SystemExit(f"error: {_err}") from None
install_stop_handler()
# /noop (the latency benchmark's floor) exists only with METARL_BENCH_NOOP=1.
BENCH_NOOP = os.environ.get("METARL_BENCH_NOOP") == "1"
API_PATHS = ("/adapt", "/act", "/metadata", "/export") + (("/noop",) if BENCH_NOOP else ())
# Above this many observations, /act computes in a worker thread instead of on the event loop.
THREAD_ACT_ROWS = 256


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
            stop_server(f"error: METARL_BUNDLE={str(self.settings.bundle)!r}: {err}")
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
                engine.action_range,
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
                policy_id = "meta" if policy_id is None else policy_id
                if engine.shared_store and policy_id != "meta":  # a network call: off the loop
                    params = await anyio.to_thread.run_sync(engine.lookup, policy_id)
                else:
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
        info = await anyio.to_thread.run_sync(self.engine.metadata)  # the store may be remote
        info["warmup"]["error"] = self.warmup_error
        info["version"] = _package_version()
        info["worker_pid"] = os.getpid()
        return info

    if BENCH_NOOP:

        @bentoml.api(route="/noop")
        async def noop(self) -> dict[str, Any]:
            """Does nothing: the latency floor of a BentoML endpoint (bench/serve_latency.py)."""
            return {}


def _package_version() -> str:
    import metarl_tf

    return metarl_tf.__version__


AdaptationService.add_asgi_middleware(
    RequestGuard,
    api_paths=API_PATHS,
    max_body_bytes=SETTINGS.max_body_bytes,
    read_timeout_s=SETTINGS.read_timeout_s,
    max_pending=SETTINGS.max_pending,
    token=SETTINGS.api_token,
    openapi_patch=functools.partial(
        patch_openapi, api_paths=API_PATHS, token=SETTINGS.api_token is not None
    ),
)
