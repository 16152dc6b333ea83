"""Published weights through Ray's object store: the transport for clusters without a shared filesystem.

On one machine the learner writes each version to shared memory and actors read the directory (learner/weights.py).
Across nodes that directory is not there, so with `cluster.weight_transport: object_store` (the default when the
run joins a cluster) the learner serialises the policy once as safetensors bytes, puts them into Ray's object
store and registers the reference with the run's `WeightStore` actor; the announcement's path is then
`ray-object://<store name>/<version>`. An actor on any node fetches the bytes (Ray moves them between nodes) and
loads them through a temporary directory of its own (`load_published`); the probe check is unchanged.

Only bytes cross: safetensors is a plain tensor format (a JSON header and raw buffers), never pickle.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEME = "ray-object://"


class WeightStore:
    """The run's registry of published versions: version -> [ObjectRef of the safetensors bytes]. It keeps the
    newest `keep` versions (older references are dropped, so Ray frees their bytes)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._refs: dict[int, list[Any]] = {}

    def put(self, version: int, ref: list[Any]) -> None:
        """`ref` is a one-element list, so Ray hands over the reference itself instead of resolving it."""
        self._refs[version] = ref
        for old in [v for v in self._refs if v <= version - self.keep]:
            del self._refs[old]

    def get(self, version: int) -> list[Any] | None:
        return self._refs.get(version)


def start_weight_store(name: str, namespace: str, keep: int = 2) -> Any:
    import ray

    return ray.remote(num_cpus=0)(WeightStore).options(name=name, namespace=namespace).remote(keep)


def is_object_uri(path: str) -> bool:
    return path.startswith(SCHEME)


def ship(store_name: str, namespace: str, version: int, state_dict: dict[str, Any]) -> str:
    """Learner side: the state dict as safetensors bytes into the object store; returns the announcement path."""
    import ray
    from safetensors.torch import save

    seen: set[int] = set()
    unique = {}
    for key, tensor in state_dict.items():  # tied weights (embedding = LM head) are stored once, as on disk
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        unique[key] = tensor.contiguous()
    ref = ray.put(save(unique, metadata={"format": "pt"}))
    handle = ray.get_actor(store_name, namespace=namespace)
    ray.get(handle.put.remote(version, [ref]))
    return f"{SCHEME}{store_name}/{version}"


class VersionReplaced(FileNotFoundError):
    """The announced version is gone before (or while) it was loaded: a newer one replaced it."""


VERSION_FILE = "VERSION"
"""In a shared-memory weight slot (learner/weights.py: WeightSlots): the version the slot holds, -1 while written."""


def load_published(path: str, namespace: str, load: Callable[[Path], None], *, version: int) -> None:
    """Hand an announced version to `load` as a directory: a published directory as is (a shared-memory slot is
    checked to hold `version` before and after, so a load that overlapped the slot's reuse is refused), or, for an
    object-store version, its bytes in a temporary directory of this process's own (shared memory when there is
    one), removed as soon as `load` returns: the engine holds the weights then, and nothing accumulates on the
    node. Raises `VersionReplaced` when a newer version took the announced one's place meanwhile."""
    if not is_object_uri(path):
        _check_slot(Path(path), version)
        load(Path(path))
        _check_slot(Path(path), version)
        return
    data = _fetch(path, namespace)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="paceflow-weights-", dir=shm) as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(data)
        load(Path(tmp))


def _fetch(uri: str, namespace: str) -> bytes:
    import ray

    store_name, _, version_text = uri.removeprefix(SCHEME).rpartition("/")
    version = int(version_text)
    refs = ray.get(ray.get_actor(store_name, namespace=namespace).get.remote(version))
    if refs is None:
        raise VersionReplaced(f"{uri}: version {version} is no longer in the weight store (a newer one replaced it)")
    return bytes(ray.get(refs[0]))


def _check_slot(directory: Path, version: int) -> None:
    marker = directory / VERSION_FILE
    if not marker.is_file():  # a directory per version (publish_weights): never overwritten
        return
    held = marker.read_text().strip()
    if held != str(version):
        raise VersionReplaced(f"{directory} holds version {held or '?'}, not {version}: a newer one is replacing it")
