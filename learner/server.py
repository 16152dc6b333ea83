"""The learner as a Ray actor: `LearnerServer` wraps a `Learner` (learner/loop.py) and answers with plain data.

The launcher resolves what the learner needs from other sections once (the model directory, the training prompts'
token ids for PACED-RL, where weights are published) and passes it in; the learner never reads the task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from configs.schema import LearnerSpec, RunConfig


class LearnerServer:
    def __init__(
        self,
        spec_json: str,
        model_dir: str,
        replay_server: Any,
        weights_root: str,
        prompts: Mapping[str, Sequence[int]] | None = None,
        resume: str | None = None,
    ) -> None:
        import torch

        from learner.loop import Learner
        from replay.store import connect_store

        spec = LearnerSpec.model_validate_json(spec_json)
        if spec.weight_broadcast_host == "node":  # other nodes reach this learner's weight channels here
            spec = spec.model_copy(update={"weight_broadcast_host": ray.util.get_node_ip_address()})
        # Ray sets OMP_NUM_THREADS from the actor's CPUs, rounded down; give torch what the config reserves.
        torch.set_num_threads(spec.torch_threads)
        store = connect_store(spec.replay, run_name=spec.replay_namespace, server=replay_server)
        self.learner = Learner(spec, Path(model_dir), store, weights_root=Path(weights_root), prompts=prompts)
        if resume:
            self.learner.load_checkpoint(Path(resume))
            if self.learner.version:  # the old weight files are gone: publish the restored weights again
                self.learner.publish(bump=False)

    def step_count(self) -> int:
        return self.learner.step_count

    def save_checkpoint(self, directory: str) -> None:
        self.learner.save_checkpoint(Path(directory))

    def step(self, wait_timeout_s: float) -> dict[str, Any] | None:
        result = self.learner.step(wait_timeout_s=wait_timeout_s)
        return asdict(result) if result is not None else None

    def publish(self) -> int:
        self.learner.publish()
        return self.learner.version

    def save_pretrained(self, directory: str) -> str:
        self.learner.save_pretrained(Path(directory))
        return directory

    # The broadcast weight transport's two calls run in their own concurrency group (WEIGHT_CALLS threads), so a
    # client is served while step() trains; the sender's lock keeps a publish and a transfer apart.
    @ray.method(concurrency_group="weights")
    def open_weight_channel(self, client: str, world_size: int) -> str:
        """A new channel for `client` (a rollout actor or the evaluator): ChannelInfo JSON to join it with."""
        return self._sender().open(client, world_size)

    @ray.method(concurrency_group="weights")
    def send_weights(self, client: str) -> bytes:
        """Broadcast the newest published version to `client`, which is receiving now; returns its announcement."""
        return self._sender().send(client)

    def _sender(self) -> Any:
        if self.learner.sender is None:
            raise RuntimeError(
                "this run's learner serves no weight channels (cluster.weight_transport is not "
                "broadcast) or has published nothing yet"
            )
        return self.learner.sender


WEIGHT_CALLS = 16
"""Concurrent weight transfers a learner serves (one thread each; a client holds one only while it receives)."""


def start_learner(
    cfg: RunConfig,
    model_dir: Path,
    replay_server: Any,
    weights_root: Path,
    *,
    prompts: Mapping[str, Sequence[int]] | None = None,
    resume: Path | None = None,
) -> Any:
    """A LearnerServer placed with `cluster.learner_resources`."""
    res = cfg.cluster.learner_resources
    actor_cls = ray.remote(concurrency_groups={"weights": WEIGHT_CALLS})(LearnerServer).options(
        num_cpus=res.num_cpus,
        num_gpus=res.num_gpus,
        resources=res.custom or None,
        name=cfg.learner_actor_name,  # clients of the broadcast transport look it up by name
        namespace=cfg.cluster.namespace,
    )
    return actor_cls.remote(
        cfg.learner_spec().to_worker_json(),
        str(model_dir),
        replay_server,
        str(weights_root),
        {pid: list(ids) for pid, ids in (prompts or {}).items()} or None,
        str(resume) if resume else None,
    )
