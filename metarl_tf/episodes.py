"""Episodes as arrays: the padded :class:`EpisodeBatch` every algorithm consumes, one task's
variable-length episodes packed into one (:func:`pad_episodes`), and their ``.npz`` file
(:func:`save_episodes`, :func:`load_episodes`). Plain numpy (layer 0): the sampler
(:mod:`metarl_tf.rollout`) produces these batches, the service packs its clients' episodes with
:func:`pad_episodes` without importing anything that builds environments.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class EpisodeBatch(NamedTuple):
    """Episodes of several tasks, padded to a common length ``T``.

    Attributes:
        observations: ``[tasks, episodes, T, obs_dim]`` float32, the observation at step t.
        actions: ``[tasks, episodes, T, act_dim]`` float32, the sampled (unclipped) action; for
            a discrete action space ``act_dim == 1`` and the value is the action index.
        rewards: ``[tasks, episodes, T]`` float32.
        mask: ``[tasks, episodes, T]`` float32, 1 for real steps, 0 for padding.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    mask: np.ndarray

    @property
    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, ``[tasks, episodes]``."""
        return np.sum(np.asarray(self.rewards) * np.asarray(self.mask), axis=-1)

    @property
    def num_steps(self) -> int:
        """Number of real (unpadded) environment steps."""
        return int(np.sum(self.mask))


def pad_episodes(
    episodes, length: int | None = None, num_episodes: int | None = None
) -> EpisodeBatch:
    """Packs variable-length episodes of ONE task into an ``EpisodeBatch`` ``[1, E, T, ...]``.

    Padding (extra time steps, extra all-masked episodes) does not change any loss, baseline or
    advantage here, so callers can pad to fixed sizes and reuse one compiled function.

    Args:
        episodes: sequence of ``(observations [T_e, obs_dim], actions [T_e, act_dim],
            rewards [T_e])``.
        length: pad time to this length (default: the longest episode).
        num_episodes: pad to this many episodes (default: ``len(episodes)``).
    """
    if not episodes:
        raise ValueError("need at least one episode")
    length = length or max(len(r) for _, _, r in episodes)
    num_episodes = num_episodes or len(episodes)
    obs_dim = np.shape(episodes[0][0])[-1]
    act_dim = np.shape(episodes[0][1])[-1]
    obs = np.zeros((1, num_episodes, length, obs_dim), np.float32)
    act = np.zeros((1, num_episodes, length, act_dim), np.float32)
    rew = np.zeros((1, num_episodes, length), np.float32)
    mask = np.zeros((1, num_episodes, length), np.float32)
    for e, (o, a, r) in enumerate(episodes):
        t = len(r)
        if t > length:
            raise ValueError(f"episode {e} has {t} steps, more than the padded length {length}")
        obs[0, e, :t], act[0, e, :t], rew[0, e, :t], mask[0, e, :t] = o, a, r, 1.0
    return EpisodeBatch(obs, act, rew, mask)


def save_episodes(path, episodes) -> None:
    """Writes one task's episodes (as :func:`pad_episodes` takes them) to an ``.npz`` file that
    :func:`load_episodes` reads (``python -m metarl_tf export-savedmodel --adapt-on``).

    The file holds ``observations [E, T, obs_dim]``, ``actions [E, T, act_dim]``,
    ``rewards [E, T]`` (float32, zero-padded to the longest episode ``T``) and ``lengths [E]``
    (int64, each episode's real number of steps).
    """
    batch = pad_episodes(episodes)
    lengths = np.asarray(batch.mask[0].sum(axis=1), np.int64)
    np.savez(
        path,
        observations=batch.observations[0],
        actions=batch.actions[0],
        rewards=batch.rewards[0],
        lengths=lengths,
    )


def load_episodes(path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Reads an episodes ``.npz`` (:func:`save_episodes`; ``allow_pickle=False``).

    ``lengths`` may be omitted: every episode is then ``T`` steps long. Returns
    ``[(observations [T_e, obs_dim], actions [T_e, act_dim], rewards [T_e]), ...]``.

    Raises:
        ValueError: a missing array, or shapes that do not fit together.
    """
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("observations", "actions", "rewards") if k not in data]
        if missing:
            raise ValueError(
                f"{path}: missing array(s) {missing}; an episodes file holds observations "
                "[E, T, obs_dim], actions [E, T, act_dim], rewards [E, T] and optionally lengths [E]"
            )
        obs, act, rew = (
            np.asarray(data[k], np.float32) for k in ("observations", "actions", "rewards")
        )
        lengths = np.asarray(data["lengths"]) if "lengths" in data else None
    if (
        obs.ndim != 3
        or act.ndim != 3
        or rew.ndim != 2
        or not obs.shape[:2] == act.shape[:2] == rew.shape
    ):
        raise ValueError(
            f"{path}: observations {list(obs.shape)}, actions {list(act.shape)}, rewards "
            f"{list(rew.shape)} do not fit [E, T, obs_dim], [E, T, act_dim], [E, T]"
        )
    episodes, horizon = len(rew), rew.shape[1]
    if lengths is None:
        lengths = np.full(episodes, horizon)
    if lengths.shape != (episodes,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"{path}: lengths must be {episodes} integers, got {lengths!r}")
    if episodes == 0 or lengths.min() < 1 or lengths.max() > horizon:
        raise ValueError(f"{path}: need at least one episode and lengths in [1, {horizon}]")
    return [(obs[e, :n], act[e, :n], rew[e, :n]) for e, n in enumerate(lengths.tolist())]
