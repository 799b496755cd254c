"""Memory accounting: the bytes a TieredCache holds, by role, counted from the storage it really allocated.

The HBM savings tiersim reports are only as true as this count, so it is not a list of the tensors
someone remembered to add: it walks everything the cache owns (its layers, their chunks and indices,
the strategy's buffers and predictor state) and counts each storage reached once, whole (a view,
even a zero-width one, keeps its entire parent buffer alive). The attribute a tensor hangs from
names its role; a tensor under a name the table does not know is bookkeeping, never uncounted.
"""

from __future__ import annotations

import dataclasses

import torch

from tiersim.hierarchy.ddr import DDRChunk

ROLES = ("hbm", "compressed", "staging", "predictor", "bookkeeping", "ddr", "ddr_allocated")
DEVICE_ROLES = ("hbm", "compressed", "staging", "predictor", "bookkeeping")

#: Attribute name -> role for what hangs below it. ``None``: a transient of the current step, counted
#: in ``peak_bytes['layer_buffer']`` instead (the view a re-tier reuses, selective's assembly buffer).
_ROLE_OF = {
    "hbm_k": "hbm", "hbm_v": "hbm", "keys": "hbm", "values": "hbm",  # a layer's keys/values alias its HBM tier
    "comp": "compressed", "residual_k": "compressed", "residual_v": "compressed",
    "staging": "staging", "staged": "staging",
    "bounds": "predictor",
    "last_full": None, "buffers": None,
}
#: Inside a DDR chunk, its keys and values are host memory; everything else of it lives on the device.
_CHUNK_ROLE_OF = {"keys": "ddr_allocated", "values": "ddr_allocated", "bounds": "predictor"}
#: Owned objects the walk does not enter: settings, the policy's rule, the user's recorder, worker threads.
_SKIP = frozenset({"config", "policy", "recorder", "_host", "_device", "stream", "ready", "prefetch_event"})


def _children(obj):
    """(name, value) of an owned object's attributes, or of a container's items (name None)."""
    if isinstance(obj, dict):
        return [(None, v) for v in obj.values()]
    if isinstance(obj, (list, tuple, set)):
        return [(None, v) for v in obj]
    if dataclasses.is_dataclass(obj) and not hasattr(obj, "__dict__"):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("tiersim."):
        return list(vars(obj).items())
    return []


def owned_tensors(cache):
    """Every (role, tensor) reachable from the cache's layers and its strategy; role None: a transient."""
    found: list = []
    seen: set[int] = set()

    def walk(obj, role, table) -> None:
        if isinstance(obj, torch.Tensor):
            found.append((role, obj))
            return
        if obj is None or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool)):
            return
        seen.add(id(obj))
        is_chunk = isinstance(obj, DDRChunk)
        for name, value in _children(obj):
            if name in _SKIP:
                continue
            if is_chunk:
                walk(value, _CHUNK_ROLE_OF.get(name, "bookkeeping"), _CHUNK_ROLE_OF)
            elif name is not None and name in table:
                walk(value, table[name], {})  # the role is settled: names below it do not change it
            else:
                walk(value, role, table)

    for layer in cache.layers:
        if layer.is_initialized:
            walk(layer, "bookkeeping", _ROLE_OF)
    walk(cache.access, "bookkeeping", _ROLE_OF)
    return found


def held_bytes(cache) -> dict[str, int]:
    """Bytes held now by role (see :meth:`tiersim.hierarchy.cache.TieredCache.stats`), plus ``device_resident``."""
    held = dict.fromkeys(ROLES, 0)
    seen: set[int] = set()
    for role, tensor in owned_tensors(cache):
        if role is None:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        held[role] += storage.nbytes()
    for layer in cache.layers:
        held["ddr"] += sum(chunk.live_nbytes for chunk in layer.ddr)
    held["device_resident"] = sum(held[role] for role in DEVICE_ROLES)
    return held
