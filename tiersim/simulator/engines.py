"""Engine presets: the per-step host and engine cost a real serving engine or harness adds to the device time.

A decode step's device time is the GPU's; the engine around it adds host work the GPU may wait for (scheduling,
sampling, input preparation, output processing: ``fixed + per_sequence x batch`` per step) and, for an eager
harness that launches every operator from Python, a host floor (the step lasts at least ``floor_per_layer x
layers``: it is launch-bound). An engine whose decode attention does not split the KV also carries the read rate of
one thread block per GPU (``GPU.attn_block_bw``: batch 1 with few KV heads cannot fill HBM), and one whose kernel
reads each KV head once per query head of its GQA group the share of those re-reads that reach HBM beyond L2, per
GPU (``GPU.attn_kv_reread_share``: large batches of GQA models). One line per engine,
each with the GPU/CPU it was measured on and its source, in ``tiersim/data/public-engine-overheads.json``;
``--engine-overhead NAME`` picks one and the output names it.
stdlib only (the validator's machine imports presets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

from tiersim.errors import TiersimError
from tiersim.simulator.presets import GPU

DATA = "public-engine-overheads.json"


@dataclass(frozen=True)
class EngineOverhead:
    """One engine's per-step line: seconds the GPU waits (fixed, per sequence) and the host floor per layer."""

    name: str
    fixed_s: float
    per_sequence_s: float
    floor_per_layer_s: float
    role: str  # "fit" (from a measurement), "assumption", or "definition" (none)
    measured_on: str
    source: str
    #: (GPU preset, bytes/s) of one decode-attention thread block, for a kernel that does not split the KV; a GPU
    #: not listed gets no limit (it was not fitted there).
    attn_block_bw: tuple[tuple[str, float], ...] = ()
    #: (GPU preset, share) of a GQA group's repeated KV reads that reach HBM (``GPU.attn_kv_reread_share``), for a
    #: kernel that reads each KV head once per query head; a GPU not listed gets none (it was not fitted there).
    kv_reread_share: tuple[tuple[str, float], ...] = ()

    @staticmethod
    def _on(per_gpu: tuple[tuple[str, float], ...], gpu: GPU) -> float:
        """The figure fitted on ``gpu``, else on the preset whose constants it reads (``GPU.physics_of``), else 0."""
        values = dict(per_gpu)
        return values.get(gpu.name, values.get(gpu.physics_of, 0.0))

    def block_bw(self, gpu: GPU) -> float:
        """The per-block rate fitted on ``gpu``, else on the preset whose constants it reads (``GPU.physics_of``)."""
        return self._on(self.attn_block_bw, gpu)

    def reread_share(self, gpu: GPU) -> float:
        """The GQA re-read share fitted on ``gpu``, else on the preset whose constants it reads, else 0."""
        return self._on(self.kv_reread_share, gpu)

    def host_s(self, batch: int) -> float:
        return self.fixed_s + self.per_sequence_s * batch

    def floor_s(self, num_layers: int) -> float:
        return self.floor_per_layer_s * num_layers

    def describe(self, gpu: GPU | None = None) -> str:
        """The line in words, for the output: 'vllm (1.17 ms + 0.100 ms/seq per step; measured on ...)'; with
        ``gpu``, the per-block attention rate as applied there (none where it was not fitted), else every GPU's."""
        if self.role == "definition":
            return f"{self.name} (device time only)"
        parts = []
        if self.fixed_s or self.per_sequence_s:
            parts.append(f"{self.fixed_s * 1e3:.2f} ms + {self.per_sequence_s * 1e3:.3f} ms/seq per step")
        if self.floor_per_layer_s:
            parts.append(f"host floor {self.floor_per_layer_s * 1e3:.3f} ms/layer")
        if self.attn_block_bw and gpu is not None:
            rate = self.block_bw(gpu)
            parts.append(f"decode attention {rate / 1e9:.1f} GB/s per block" if rate else
                         f"no per-block attention limit on {gpu.name} (fitted on "
                         f"{', '.join(g for g, _ in self.attn_block_bw)} only)")
        elif self.attn_block_bw:
            parts.append("decode attention " + ", ".join(f"{bw / 1e9:.1f} GB/s per block on {g}"
                                                         for g, bw in self.attn_block_bw))
        if self.kv_reread_share and gpu is not None:
            share = self.reread_share(gpu)
            parts.append(f"GQA KV re-read share {share:.2f} beyond L2" if share else
                         f"no GQA re-reads on {gpu.name} (fitted on {', '.join(g for g, _ in self.kv_reread_share)} only)")
        elif self.kv_reread_share:
            parts.append("GQA KV re-read share " + ", ".join(f"{v:.2f} on {g}" for g, v in self.kv_reread_share)
                         + " beyond L2")
        line = "; ".join(parts) or "no host cost"
        where = "assumed, not measured" if self.role == "assumption" else self.measured_on.split(" (")[0].split(",")[0]
        return f"{self.name} ({line}; {where})"


def load() -> dict:
    """The data file as stored: the presets, the engine TPOT measurements and the CPU profiles (``fidelity`` reads
    the last two), a fresh copy each call, so a caller may doctor it."""
    return json.loads(resources.files("tiersim").joinpath("data", DATA).read_text())


@cache
def presets() -> dict[str, EngineOverhead]:
    """Every engine preset of the data file, by name."""
    doc = load()
    out = {}
    for name, e in doc["engines"].items():
        if e["role"] not in ("fit", "assumption", "definition"):
            raise ValueError(f"{DATA}: engine {name} has role {e['role']!r}")
        blocks = tuple((g, float(v) * 1e9) for g, v in sorted(e.get("attention_block_gbps", {}).items()))
        reread = tuple((g, float(v)) for g, v in sorted(e.get("attention_kv_reread_share", {}).items()))
        if any(not 0.0 <= v <= 1.0 for _, v in reread):
            raise ValueError(f"{DATA}: engine {name} has a GQA re-read share outside [0, 1]")
        out[name] = EngineOverhead(name, e["fixed_ms"] * 1e-3, e["per_sequence_ms"] * 1e-3,
                                   e["floor_per_layer_ms"] * 1e-3, e["role"], e["measured_on"], e["source"], blocks,
                                   reread)
    return out


def names() -> tuple[str, ...]:
    return tuple(presets())


def get(name: str) -> EngineOverhead:
    if name not in presets():
        raise TiersimError(f"--engine-overhead must be one of {', '.join(names())}, got {name!r}")
    return presets()[name]


def apply(gpu: GPU, name: str, num_layers: int) -> GPU:
    """``gpu`` charging engine ``name``'s per-step line for a model of ``num_layers`` layers, and its decode kernel's
    per-block rate and GQA re-read share where they were fitted for ``gpu`` (0 elsewhere: the GPU preset's kernel)."""
    e = get(name)
    return replace(gpu, step_overhead=e.fixed_s, step_overhead_per_sequence=e.per_sequence_s,
                   step_host_floor=e.floor_s(num_layers), attn_block_bw=e.block_bw(gpu),
                   attn_kv_reread_share=e.reread_share(gpu), engine=e.describe(gpu))
