"""Runs inside each vLLM worker process (vLLM's `worker_extension_cls`): the receiving end of the broadcast weight
transport (replay/weight_broadcast.py). The worker joins its client's channel as rank 1 + its own rank and, on
each sync, receives the flat buffer and hands the tensors to vLLM's own in-place `reload_weights`, which loads
checkpoint-format weights (and shards them under tensor parallelism) exactly as it would from a directory.

Only strings and ints cross `collective_rpc` here: the tensors arrive over the channel, never through the RPC.
"""

from __future__ import annotations

from typing import Any


class WeightChannelExtension:
    """Mixed into vLLM's Worker class by vLLM itself; `self` is the worker."""

    device: Any
    rank: int

    def paceflow_join_weight_channel(self, info_json: str, own_host: str) -> None:
        from replay.weight_broadcast import WeightReceiver

        self.paceflow_receiver = WeightReceiver(info_json, 1 + self.rank, own_host=own_host, device=self.device)

    def paceflow_receive_weights(self) -> int:
        receiver = getattr(self, "paceflow_receiver", None)
        if receiver is None:
            raise RuntimeError("no weight channel joined in this vLLM worker")
        version, tensors = receiver.receive()
        self.reload_weights(weights_iterator=tensors)  # type: ignore[attr-defined]  # vLLM's Worker method
        return version
