"""Request and response models of the HTTP API (they also produce the OpenAPI document).

Types are checked here (numbers, lists, objects; unknown fields are refused); shapes, lengths,
finiteness and limits are checked by :mod:`serving.validation` against the loaded bundle.
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

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="Base64 (RFC 4648) of the array's little-endian bytes, C order.")
    shape: list[int] = Field(description="The array's shape, e.g. [T, obs_dim] or [T].")
    dtype: Literal["float32", "float64"] = Field(
        default="float32", description="Element type of the bytes."
    )


class Episode(BaseModel):
    """One episode of the new task, as collected by the policy being adapted."""

    model_config = ConfigDict(extra="forbid")

    observations: list[list[float]] | PackedArray = Field(
        description="[T, obs_dim]: the observation at every step t (before the action); nested "
        "lists or a PackedArray."
    )
    actions: list[list[float]] | PackedArray = Field(
        description="[T, act_dim]: the action the policy sampled at step t, before clipping "
        "(/act's raw_actions), as the trainer records them; nested lists or a PackedArray."
    )
    rewards: list[float] | PackedArray = Field(
        description="[T]: the reward of the transition out of step t; a list or a PackedArray."
    )


class AdaptRequest(bentoml.IODescriptor):
    """``POST /adapt``: a few inner gradient steps on one task's episodes."""

    model_config = ConfigDict(extra="forbid")

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
    query_actions: list[list[float]] | None = Field(
        default=None, description="[N, act_dim] mean actions for query_observations, clipped."
    )


class ActRequest(bentoml.IODescriptor):
    """``POST /act``: actions of a policy for a batch of observations."""

    model_config = ConfigDict(extra="forbid")

    observations: list[list[float]] = Field(description="[N, obs_dim] (1 to max_observations).")
    policy_id: str | None = Field(
        default=None,
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

    actions: list[list[float]] = Field(description="[N, act_dim] within the action spec's bounds.")
    raw_actions: list[list[float]] = Field(
        description="[N, act_dim] before clipping: record these as episode actions for /adapt."
    )
    policy_id: str | None
    deterministic: bool


class ExportRequest(bentoml.IODescriptor):
    """``POST /export``: a policy as a TensorFlow SavedModel, answered as a ``.tar.gz``
    (``application/gzip``) whose members are the SavedModel's files (docs/export.md)."""

    model_config = ConfigDict(extra="forbid")

    policy_id: str = Field(
        min_length=1,
        description="'meta' (the meta-initialization) or a live policy_id returned by /adapt.",
    )
