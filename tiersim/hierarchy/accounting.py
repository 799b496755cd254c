"""Memory accounting: the bytes a TieredCache holds, by role, counted from the storage it really allocated.

The HBM savings tiersim reports are only as true as this count, so it counts storages (a view
counts its whole buffer, once), not the shapes the tiers claim.
"""

from __future__ import annotations

ROLES = ("hbm", "compressed", "staging", "bookkeeping", "ddr", "ddr_allocated")


def held_bytes(layers, access) -> dict[str, int]:
    """Bytes held now by role (see :meth:`tiersim.hierarchy.cache.TieredCache.stats`), plus ``device_resident``."""
    held = dict.fromkeys(ROLES, 0)
    seen: set[int] = set()

    def add(role: str, *tensors) -> None:
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            held[role] += storage.nbytes()

    for layer in layers:
        if not layer.is_initialized:
            continue
        add("hbm", layer.hbm_k, layer.hbm_v)
        if layer.comp is not None:
            add("compressed", *layer.comp.tensors())
        add("compressed", layer.residual_k, layer.residual_v)
        add("bookkeeping", *layer.columns.values(), layer.recent, layer.comp_slot, layer.first_real)
        for index in (layer.comp_index, layer.residual_index):
            if index is not None:
                add("bookkeeping", *index.tensors())
        for chunk in layer.ddr:
            held["ddr"] += chunk.live_nbytes
            add("ddr_allocated", chunk.keys, chunk.values)
            add("bookkeeping", *chunk.index.tensors())
    for buffers in getattr(access, "staging", ()):
        if buffers is not None:
            add("staging", *buffers)
    held["device_resident"] = held["hbm"] + held["compressed"] + held["staging"] + held["bookkeeping"]
    return held
