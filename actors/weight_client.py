"""The client's side of the broadcast weight transport (replay/weight_broadcast.py), shared by rollout actors and
the evaluator: open a channel to the learner named in the announcement once, then per sync ask the learner to send
while the engine receives, and return the announcement of the version that actually arrived (its probe is what the
caller verifies). A failed transfer drops the channel; the next sync opens a new one."""

from __future__ import annotations

from typing import Any

from actors.engines.base import Engine
from replay.records import WeightVersion, decode_weight_version
from replay.weight_broadcast import ChannelInfo, learner_of

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BroadcastClient:
    def __init__(self, client_id: str, namespace: str) -> None:
        self.client_id, self.namespace = client_id, namespace
        self._joined: str | None = None
        """The learner actor whose channel the engine has joined."""

    def receive(self, uri: str, engine: Engine) -> WeightVersion:
        import ray

        name = learner_of(uri)
        learner: Any = ray.get_actor(name, namespace=self.namespace)
        try:
            if self._joined != name:
                info = ray.get(learner.open_weight_channel.remote(self.client_id, 1 + engine.weight_receivers))
                local = ChannelInfo.from_json(info).host in LOOPBACK
                engine.join_weight_channel(info, "127.0.0.1" if local else ray.util.get_node_ip_address())
                self._joined = name
            sent = learner.send_weights.remote(self.client_id)
            engine.receive_weights()
            return decode_weight_version(ray.get(sent))
        except Exception:
            self._joined = None
            raise
