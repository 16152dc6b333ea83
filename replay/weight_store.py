"""Published weights through Ray's object store: the transport for clusters without a shared filesystem.

On one machine the learner writes each version to shared memory and actors read the directory (learner/weights.py).
Across nodes that directory is not there, so with `cluster.weight_transport: object_store` (the default when the
run joins a cluster) the learner serialises the policy once as safetensors bytes, puts them into Ray's object
store and registers the reference with the run's `WeightStore` actor; the announcement's path is then
`ray-object://<store name>/<version>`. An actor on any node fetches the bytes (Ray moves them between nodes),
writes them to a directory of its own and loads that like any other version; the probe check is unchanged.

Only bytes cross: safetensors is a plain tensor format (a JSON header and raw buffers), never pickle.
"""

from __future__ import annotations

import os
import shutil
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


def fetch(uri: str, namespace: str, local_root: Path, keep: int = 2) -> Path:
    """Actor side: the version's bytes from the object store, written to a directory under `local_root` (this
    process's own); returns that directory. Older local versions beyond `keep` are removed."""
    import ray

    store_name, _, version_text = uri.removeprefix(SCHEME).rpartition("/")
    version = int(version_text)
    handle = ray.get_actor(store_name, namespace=namespace)
    refs = ray.get(handle.get.remote(version))
    if refs is None:
        raise FileNotFoundError(f"{uri}: version {version} is no longer in the weight store (a newer one replaced it)")
    data = ray.get(refs[0])
    final = local_root / f"v{version}"
    tmp = local_root / f".v{version}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.safetensors").write_bytes(data)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in local_root.glob("v*"):
        if old.name[1:].isdigit() and int(old.name[1:]) <= version - keep:
            shutil.rmtree(old, ignore_errors=True)
    return final
