"""The broadcast weight transport's two ends over a real gloo channel (NCCL takes the same path on GPUs): what a
receiver gets equals what was published (cast to the engine dtype, tied weights once), version by version and to
several clients; the channel listens on loopback only; a client that never receives costs one transfer's timeout,
not the learner."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from replay.weight_broadcast import WeightReceiver, WeightSender, broadcast_uri, is_broadcast_uri, learner_of

CPU = torch.device("cpu")


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(10, 4, generator=gen)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: the same tensor
        "layer.weight": torch.randn(4, 4, generator=gen),
        "layer.bias": torch.randn(3, generator=gen),
        "position_ids": torch.arange(6),
    }


def _receive(sender: WeightSender, receiver: WeightReceiver, client: str) -> tuple[int, dict[str, Any], bytes]:
    sent: dict[str, bytes] = {}
    thread = threading.Thread(target=lambda: sent.update(a=sender.send(client)))
    thread.start()
    version, tensors = receiver.receive()
    got = {k: v.clone() for k, v in tensors}
    thread.join(timeout=30)
    return version, got, sent["a"]


def test_what_arrives_is_what_was_published_cast_and_tied_once() -> None:
    sender = WeightSender(host="127.0.0.1", device=CPU, dtype=torch.bfloat16, timeout_s=30)
    sender.publish(_state(0), 1, b"v1")
    receivers = {c: WeightReceiver(sender.open(c, 2), 1, own_host="127.0.0.1", device=CPU) for c in ("a", "b")}
    for version, seed in ((1, 0), (2, 1)):
        if version == 2:
            sender.publish(_state(1), 2, b"v2")
        for client, receiver in receivers.items():
            got_version, got, announcement = _receive(sender, receiver, client)
            assert (got_version, announcement) == (version, f"v{version}".encode())
            want = _state(seed)
            assert set(got) == set(want) - {"lm_head.weight"}  # the tied head travels once, as the embedding
            for name, tensor in got.items():
                expected = want[name].to(torch.bfloat16) if want[name].is_floating_point() else want[name]
                assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name


def test_the_channel_listens_on_loopback_only() -> None:
    sender = WeightSender(host="127.0.0.1", device=CPU, dtype=torch.float32, timeout_s=30)
    sender.publish(_state(0), 1, b"v1")
    port = json.loads(sender.open("a", 2))["port"]
    assert _listening_addresses(port) == ["127.0.0.1"]


def _listening_addresses(port: int) -> list[str]:
    """The local addresses that listen on `port`, read from the kernel's socket tables."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if len(address) == 8:  # IPv4, little-endian hex
                    found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                else:
                    found.append(f"ipv6:{address}")
    return found


def test_a_client_that_never_receives_fails_its_transfer_and_its_channel_only() -> None:
    sender = WeightSender(host="127.0.0.1", device=CPU, dtype=torch.float32, timeout_s=3)
    sender.publish(_state(0), 1, b"v1")
    good = WeightReceiver(sender.open("good", 2), 1, own_host="127.0.0.1", device=CPU)
    silent = WeightReceiver(sender.open("silent", 2), 1, own_host="127.0.0.1", device=CPU)  # never receives
    start = time.monotonic()
    with pytest.raises(RuntimeError):  # gloo's timeout
        sender.send("silent")
    assert 2.5 < time.monotonic() - start < 30  # the channel's timeout, not forever
    del silent
    WeightReceiver(sender.open("gone", 2), 1, own_host="127.0.0.1", device=CPU)  # joins, and its process is gone
    with pytest.raises(RuntimeError):
        sender.send("gone")
    with pytest.raises(KeyError, match="no weight channel"):
        sender.send("gone")  # dropped: that client opens a new one at its next sync
    sender.publish(_state(1), 2, b"v2")  # the learner is not held up
    assert _receive(sender, good, "good")[0] == 2


def test_nothing_to_send_before_the_first_publish() -> None:
    sender = WeightSender(host="127.0.0.1", device=CPU, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="no weights published yet"):
        sender.open("a", 2)


def test_announcement_paths_name_the_learner() -> None:
    uri = broadcast_uri("run-1-learner", 7)
    assert is_broadcast_uri(uri) and learner_of(uri) == "run-1-learner"
    assert not is_broadcast_uri("/dev/shm/paceflow/run/slot0")
