"""Published weights over a collective broadcast: the learner's process sends, each engine's processes receive.

This is the GPU-cluster transport (cluster.weight_transport: broadcast), the way OpenRLHF and verl move weights:
no file, no serialisation, one collective per sync straight into the engine's memory. The backend is NCCL when the
learner's weights live on a GPU and gloo otherwise, over the same code: CI exercises it with gloo on CPU, where
an NCCL call would silently do nothing, and every sync is still checked by the announcement's probe.

The pull model of the other transports is kept: the learner never waits for actors. `WeightSender` holds a snapshot
of the newest published version (one flat buffer, cast to the engine dtype, tied weights once); a client (a
rollout actor or the evaluator) that sees a newer announcement asks the learner to send, and the learner's serving
thread broadcasts the snapshot to that client's own process group (learner = rank 0, the engine's workers =
ranks 1..n; one group per client, so clients join and leave without touching each other). What crosses is a
fixed-size int64 header (version, layout checksum, bytes) and then raw bytes in a layout (names, dtypes, shapes,
offsets) that the client received as JSON when it opened its channel: nothing is ever unpickled.

A group is made without torch.distributed's global state (a TCPStore per channel, a gloo or NCCL ProcessGroup on
it), so a learner that already runs DeepSpeed's own group, and a vLLM worker that runs vLLM's, are untouched.
Every collective has a timeout: a client that disappears fails its sync, never the learner. The store and gloo
listen on the configured host only: loopback on one machine, the node's own address on a cluster.
"""

from __future__ import annotations

import json
import socket
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

SCHEME = "broadcast://"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}


def is_broadcast_uri(path: str) -> bool:
    return path.startswith(SCHEME)


def broadcast_uri(learner_actor: str, version: int) -> str:
    """The announcement path of a version served by the named learner actor."""
    return f"{SCHEME}{learner_actor}/{version}"


def learner_of(uri: str) -> str:
    """The learner actor's name in a broadcast announcement path."""
    return uri.removeprefix(SCHEME).rpartition("/")[0]


@dataclass(frozen=True)
class ChannelInfo:
    """What a client needs to join its channel: the rendezvous, the group's shape and the weights' layout."""

    host: str
    port: int
    world_size: int
    backend: str
    timeout_s: float
    layout: list[dict[str, Any]]
    """[{name, dtype, shape, offset}] in the flat buffer's order."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> ChannelInfo:
        return ChannelInfo(**json.loads(text))

    @property
    def nbytes(self) -> int:
        last = self.layout[-1]
        return int(last["offset"]) + _numel(last["shape"]) * _DTYPES[last["dtype"]].itemsize

    @property
    def checksum(self) -> int:
        return zlib.crc32(json.dumps(self.layout).encode())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def process_group(info: ChannelInfo, rank: int, *, own_host: str, device: torch.device) -> Any:
    """Rank `rank` of the channel's group: rank 0 hosts the rendezvous store. Nothing global is touched."""
    from torch.distributed import PrefixStore, TCPStore

    timeout = timedelta(seconds=info.timeout_s)
    store = TCPStore(info.host, info.port, info.world_size, is_master=False, timeout=timeout)
    return _group_on(PrefixStore("paceflow-weights", store), rank, info, own_host=own_host, device=device)


def _group_on(store: Any, rank: int, info: ChannelInfo, *, own_host: str, device: torch.device) -> Any:
    timeout = timedelta(seconds=info.timeout_s)
    if info.backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # the constructor that takes devices
        options._timeout = timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=own_host)]  # the address this rank listens on
        return ProcessGroupGloo(store, rank, info.world_size, options)
    from torch.distributed import ProcessGroupNCCL

    options_nccl = ProcessGroupNCCL.Options()
    options_nccl._timeout = timeout
    torch.cuda.set_device(device)
    return ProcessGroupNCCL(store, rank, info.world_size, options_nccl)


def _broadcast(group: Any, tensor: Tensor) -> None:
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


@dataclass
class _Channel:
    store: Any
    info: ChannelInfo
    group: Future[Any]


class WeightSender:
    """The learner's side: the newest version's snapshot and one channel per client.

    `publish` (the learner's training thread) and `send` (a serving thread per request) take the same lock, so a
    client never receives a half-copied version and the learner waits at most one transfer to publish."""

    def __init__(self, *, host: str, device: torch.device, dtype: torch.dtype, timeout_s: float = 120.0) -> None:
        self.host, self.device, self.dtype, self.timeout_s = host, device, dtype, timeout_s
        self.backend = backend_for(device)
        self.version = -1
        self.announcement = b""
        self._lock = threading.Lock()
        self._layout: list[dict[str, Any]] = []
        self._flat: Tensor | None = None
        self._views: dict[str, Tensor] = {}
        self._channels: dict[str, _Channel] = {}

    def publish(self, state: dict[str, Tensor], version: int, announcement: bytes) -> None:
        """Copy the policy into the snapshot (cast to the engine dtype on the way) as `version`, with its encoded
        WeightVersion, which every client it is sent to gets back (to check the probe of what it received)."""
        with self._lock, torch.no_grad():
            if self._flat is None:
                self._allocate(state)
            for name, view in self._views.items():
                view.copy_(state[name])
            self.version, self.announcement = version, announcement

    def open(self, client: str, world_size: int) -> str:
        """A new channel for `client` (replacing its old one), world_size = 1 + the client's receiving processes.
        Returns the ChannelInfo as JSON; the learner's rank joins on a background thread while the client joins."""
        from torch.distributed import PrefixStore, TCPStore

        if self._flat is None:
            raise RuntimeError("no weights published yet: a client opens its channel after the first announcement")
        self.close(client)
        # The store listens on a socket bound here, to `host` only (TCPStore's own would listen on every
        # interface), on a free port chosen by the bind itself (no probe-then-bind race).
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.bind((self.host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        store = TCPStore(
            self.host, port, world_size, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=self.timeout_s), master_listen_fd=listener.detach(), use_libuv=False,
        )  # fmt: skip
        info = ChannelInfo(self.host, port, world_size, self.backend, self.timeout_s, self._layout)
        group: Future[Any] = Future()

        def join() -> None:
            try:
                prefixed = PrefixStore("paceflow-weights", store)
                group.set_result(_group_on(prefixed, 0, info, own_host=self.host, device=self.device))
            except BaseException as exc:  # handed to whoever sends next
                group.set_exception(exc)

        # Not a daemon: a join whose client never comes blocks inside the C++ rendezvous (GIL released) until the
        # timeout; a daemon thread still there when the interpreter finalises aborts the process on its way out
        # (seen at the end of a test session). Exit waits for it instead, at most timeout_s.
        threading.Thread(target=join, name=f"weights-channel-{client}", daemon=False).start()
        self._channels[client] = _Channel(store, info, group)
        return info.to_json()

    def send(self, client: str) -> bytes:
        """Broadcast the snapshot to `client`'s group (which must be receiving now); returns the announcement of the
        version sent. A failed or timed-out transfer closes the channel: the client opens a new one next time."""
        channel = self._channels.get(client)
        if channel is None:
            raise KeyError(f"{client}: no weight channel open (open one first)")
        try:
            group = channel.group.result(timeout=self.timeout_s)
            with self._lock:
                header = torch.tensor([self.version, channel.info.checksum, channel.info.nbytes], dtype=torch.int64)
                _broadcast(group, header.to(self.device))
                assert self._flat is not None
                _broadcast(group, self._flat)
                return self.announcement
        except BaseException:
            self._channels.pop(client, None)
            raise

    def close(self, client: str) -> None:
        self._channels.pop(client, None)

    def _allocate(self, state: dict[str, Tensor]) -> None:
        entries, total = packed_layout(state, self.dtype)
        self._layout = [
            {"name": name, "dtype": _NAMES[dtype], "shape": list(tensor.shape), "offset": offset}
            for name, tensor, dtype, offset in entries
        ]
        self._flat = torch.empty(total, dtype=torch.uint8, device=self.device)
        self._views = _views(self._flat, self._layout)


def packed_layout(
    state: dict[str, Tensor], dtype: torch.dtype
) -> tuple[list[tuple[str, Tensor, torch.dtype, int]], int]:
    """How a state dict packs into one flat byte buffer: (name, tensor, stored dtype, byte offset) per tensor and the
    total size. Floating tensors are stored as `dtype`; tied weights (embedding = LM head) once, as on disk; widest
    elements first, so every tensor starts at a multiple of its own element size and can be a view of the buffer."""
    seen: set[int] = set()
    unique: list[tuple[str, Tensor]] = []
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique.append((name, tensor))
    stored = {name: dtype if t.is_floating_point() else t.dtype for name, t in unique}
    unique.sort(key=lambda nt: -stored[nt[0]].itemsize)
    entries, offset = [], 0
    for name, tensor in unique:
        entries.append((name, tensor, stored[name], offset))
        offset += tensor.numel() * stored[name].itemsize
    return entries, offset


def _views(flat: Tensor, layout: list[dict[str, Any]]) -> dict[str, Tensor]:
    views = {}
    for entry in layout:
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        start = int(entry["offset"])
        views[entry["name"]] = flat[start : start + _numel(shape) * dtype.itemsize].view(dtype).view(shape)
    return views


class WeightReceiver:
    """An engine process's side: one rank of its client's channel, with a receive buffer allocated once."""

    def __init__(self, info_json: str, rank: int, *, own_host: str, device: torch.device) -> None:
        self.info = ChannelInfo.from_json(info_json)
        self.group = process_group(self.info, rank, own_host=own_host, device=device)
        self.flat = torch.empty(self.info.nbytes, dtype=torch.uint8, device=device)
        self.views = _views(self.flat, self.info.layout)
        self.device = device

    def receive(self) -> tuple[int, Iterator[tuple[str, Tensor]]]:
        """Block until the learner sends; returns the version and the received tensors (views of the buffer,
        valid until the next receive)."""
        header = torch.zeros(3, dtype=torch.int64, device=self.device)
        _broadcast(self.group, header)
        version, checksum, nbytes = (int(x) for x in header.tolist())
        if (checksum, nbytes) != (self.info.checksum, self.info.nbytes):
            # The learner's layout changed under an open channel: it cannot happen within one run (one model), so
            # refuse rather than read bytes into the wrong tensors. The payload still arrives (it is one collective).
            _broadcast(self.group, torch.empty(nbytes, dtype=torch.uint8, device=self.device))
            raise ValueError(
                f"weight layout mismatch: sender {checksum}/{nbytes} bytes, receiver expects "
                f"{self.info.checksum}/{self.info.nbytes}"
            )
        _broadcast(self.group, self.flat)
        return version, iter(self.views.items())
