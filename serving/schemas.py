"""Request and response models of the HTTP API (they also produce the OpenAPI document).

Types are checked here, strictly (numbers, lists, objects; a string or a boolean is never turned
into a number or a boolean; unknown fields are refused); shapes, lengths, finiteness and limits
are checked by :mod:`serving.validation` against the loaded bundle.
"""

from __future__ import annotations

from typing import Any, Literal

import bentoml
from pydantic import BaseModel, ConfigDict, Field


class PackedArray(BaseModel):
    """An array as base64 bytes: the compact alternative to nested JSON number lists.

    ``{"data": base64(array.astype("<f4").tobytes()), "shape": [T, d], "dtype": "float32"}``
    (C order, little-endian). The Python client sends episodes this way by default: the body is
    about a quarter of the size and the server skips parsing thousands of JSON numbers.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    data: str = Field(description="Base64 (RFC 4648) of the array's little-endian bytes, C order.")
    shape: list[int] = Field(description="The array's shape, e.g. [T, obs_dim] or [T].")
    dtype: Literal["float32", "float64"] = Field(
        default="float32", description="Element type of the bytes."
    )


class Episode(BaseModel):
    """One episode of the new task, as collected by the policy being adapted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    observations: list[list[float]] | PackedArray = Field(
        description="[T, obs_dim]: the observation at every step t (before the action); nested "
        "lists or a PackedArray."
    )
    actions: list[list[float]] | list[int] | PackedArray = Field(
        description="[T, act_dim]: the action the policy sampled at step t, before clipping "
        "(/act's raw_actions), as the trainer records them; nested lists or a PackedArray. "
        "A discrete-action bundle: [T] integer actions (/act's actions)."
    )
    rewards: list[float] | PackedArray = Field(
        description="[T]: the reward of the transition out of step t; a list or a PackedArray."
    )


class AdaptRequest(bentoml.IODescriptor):
    """``POST /adapt``: a few inner gradient steps on one task's episodes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    episodes: list[Episode] = Field(
        description="Episodes of ONE task (1 to max_episodes; T may differ between episodes, "
        "1 <= T <= max_episode_length; see /metadata for the limits)."
    )
    steps: int | None = Field(
        default=None,
        description="Inner gradient steps on these episodes (1 to max_steps); default: the "
        "bundle's adaptation steps.",
    )
    parent: str = Field(
        default="meta",
        min_length=1,
        description="Adapt from this policy: 'meta' (the meta-initialization) or a policy_id "
        "from an earlier /adapt (e.g. a second step on fresh episodes from the adapted policy).",
    )
    query_observations: list[list[float]] | None = Field(
        default=None,
        description="[N, obs_dim]: also return the adapted policy's mean actions for these.",
    )
    return_weights: bool = Field(
        default=False,
        description="Also return the adapted weights as named arrays (usable inline in /act on "
        "any replica, or locally via metarl_tf.client_weights.policy_from_weights).",
    )


class AdaptResponse(BaseModel):
    """The adapted policy."""

    policy_id: str = Field(description="Handle for /act and for parent in a later /adapt.")
    parent: str
    steps: int
    inner_losses: list[float] = Field(description="[steps]: the inner loss before each step.")
    num_episodes: int
    num_transitions: int
    ttl_s: float = Field(description="The id is dropped after this many seconds without use.")
    weights: dict[str, list[Any]] | None = Field(
        default=None, description="Adapted weights {parameter name: nested list}, on request."
    )
    query_actions: list[list[float]] | list[int] | None = Field(
        default=None,
        description="[N, act_dim] mean actions for query_observations, clipped (discrete: [N] "
        "most likely actions).",
    )


class ActRequest(bentoml.IODescriptor):
    """``POST /act``: actions of a policy for a batch of observations."""

    model_config = ConfigDict(extra="forbid", strict=True)

    observations: list[list[float]] = Field(description="[N, obs_dim] (1 to max_observations).")
    policy_id: str | None = Field(
        default=None,
        min_length=1,
        description="'meta', or an id from /adapt. Default 'meta' when no weights are given.",
    )
    weights: dict[str, list[Any]] | None = Field(
        default=None,
        description="Inline weights {parameter name: nested list} (as /adapt returns them), "
        "instead of policy_id.",
    )
    deterministic: bool = Field(default=False, description="Mean action instead of a sample.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="Seed of the action noise (numpy default_rng); omit for fresh noise.",
    )


class ActResponse(BaseModel):
    """Actions, clipped to the action bounds, and the raw (unclipped) ones."""

    actions: list[list[float]] | list[int] = Field(
        description="[N, act_dim] within the action spec's bounds; a discrete-action bundle: "
        "[N] integer actions."
    )
    raw_actions: list[list[float]] | list[int] = Field(
        description="[N, act_dim] before clipping: record these as episode actions for /adapt "
        "(discrete: [N], the same integers as actions)."
    )
    policy_id: str | None = Field(
        description="The policy used: 'meta' or an id; null when inline weights were given."
    )
    deterministic: bool


class ExportRequest(bentoml.IODescriptor):
    """``POST /export``: a policy as a TensorFlow SavedModel, answered as a ``.tar.gz``
    (``application/gzip``) whose members are the SavedModel's files (docs/serving.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    policy_id: str = Field(
        min_length=1,
        description="'meta' (the meta-initialization) or a live policy_id returned by /adapt.",
    )


# -- the OpenAPI document ------------------------------------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "title": "ServiceError",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What is wrong, and what to do."},
        "field": {"type": "string", "description": "The request field concerned."},
        "expected": {"type": "string", "description": "What the field should hold."},
        "detail": {"type": "array", "items": {}, "description": "pydantic's problems, if any."},
    },
}
_ERROR_STATUSES = {
    "400": "Malformed request: a wrong type, shape, value or a non-finite number",
    "404": "Unknown or expired policy id",
    "408": "The request body stopped arriving (METARL_READ_TIMEOUT_S)",
    "413": "Body, episodes, steps or observations over a limit",
    "422": "Well-formed but not adaptable (steps from 'meta' for a log-std-shift bundle; NaN)",
    "503": "Not ready, too many queued adaptations, or the policy store unreachable; see "
    "Retry-After",
}
_MODELS = {"/act": (ActRequest, ActResponse), "/adapt": (AdaptRequest, AdaptResponse)}


def _nullable_fields(model: type[BaseModel]) -> set[str]:
    return {
        name
        for name, f in model.model_fields.items()
        if type(None) in getattr(f.annotation, "__args__", ())
    }


def _mark_nullable(schema: dict[str, Any], names: set[str]) -> None:
    for name, prop in (schema.get("properties") or {}).items():
        if name in names:
            prop["nullable"] = True


def patch_openapi(spec: dict[str, Any], api_paths: tuple[str, ...], token: bool) -> dict[str, Any]:
    """BentoML's OpenAPI document made to say what the service does: optional fields that can
    be ``null`` are ``nullable`` (BentoML drops ``None`` from the types), every error status an
    API route answers is declared with this service's error body, and, with a token, the bearer
    scheme is required by the API routes."""
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {})["ServiceError"] = ERROR_SCHEMA
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ServiceError"}}}
    if token:
        components.setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "METARL_API_TOKEN of the service",
        }
    for path, operations in spec.get("paths", {}).items():
        if path not in api_paths:
            continue
        request_model, response_model = _MODELS.get(path, (None, None))
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            responses = operation.setdefault("responses", {})
            for status, description in _ERROR_STATUSES.items():
                responses[status] = {"description": description, "content": error}
            if token:
                operation["security"] = [{"bearerAuth": []}]
                responses["401"] = {
                    "description": "Missing or invalid bearer token",
                    "content": error,
                }
            if response_model is not None:
                ok = responses.get("200", {}).get("content", {}).get("application/json", {})
                _mark_nullable(ok.get("schema", {}), _nullable_fields(response_model))
            if request_model is not None:
                body = operation.get("requestBody", {}).get("content", {})
                schema = body.get("application/json", {}).get("schema", {})
                _mark_nullable(schema, _nullable_fields(request_model))
    for name, schema in components["schemas"].items():
        for model in (ActRequest, ActResponse, AdaptRequest, AdaptResponse):
            if name in (model.__name__, f"{model.__name__}IODescriptor"):
                _mark_nullable(schema, _nullable_fields(model))
    return spec
