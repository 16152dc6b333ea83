"""How actors and the learner pace each other through the replay.

Synchronous mode (`learner.sync`): they take turns, one batch per weight version, so every batch comes from the
newest weights and no rollout is wasted.

    actor:   wait_for_turn  -> generate with version v -> add its groups
    learner: wait_for_batch -> sample the batch (it is no longer fresh) -> step -> announce version v + 1

Asynchronous mode: actors generate freely, but only while fewer than `rollout.max_ahead_batches` learner batches
of undrawn groups wait in the replay (`wait_for_room`), so the learner trains on what they produce before it goes
stale instead of the actors burning compute, and on a shared machine the learner's cores, on groups that age out.

All are polls of the store's counters (`stats().fresh`, `policy_version()`), here and nowhere else, so the
handshake works the same over every backend (in-process, Ray-hosted, Redis).
"""

from __future__ import annotations

import threading
import time

from replay.store import ReplayStore

POLL_S = 0.02


def wait_for_turn(
    store: ReplayStore, *, after_version: int, batch_groups: int, stop: threading.Event, timeout_s: float | None = None
) -> bool:
    """An actor may generate once the learner has announced a version newer than the one the actor last generated
    with (`after_version`; -1 for none yet) and the batch being assembled still lacks groups (fewer than
    `batch_groups` fresh ones: with several actors each adds its share; an actor restarted mid-batch adds no
    surplus). False when `stop` is set or the timeout passes first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not stop.is_set():
        if store.policy_version() > after_version and store.stats().fresh < batch_groups:
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return False


def wait_for_room(store: ReplayStore, *, max_fresh: int, stop: threading.Event) -> float:
    """Asynchronous mode's rate limit: an actor may generate once the replay holds fewer than `max_fresh` groups
    that no batch has drawn yet. Returns the seconds waited (when `stop` is set, at once)."""
    start = time.monotonic()
    while not stop.is_set() and store.stats().fresh >= max_fresh:
        time.sleep(POLL_S)
    return time.monotonic() - start


def wait_for_batch(store: ReplayStore, *, num_groups: int, deadline: float) -> bool:
    """The learner may sample once the actors have delivered this version's `num_groups` fresh groups; False when
    the `time.monotonic()` deadline passes first."""
    while store.stats().fresh < num_groups:
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True
