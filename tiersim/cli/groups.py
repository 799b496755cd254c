"""The option groups several commands share, each declared once (see tiersim.options).

``ModelRun`` and ``CacheShape``: ``capture`` and ``grid``; ``Target``, ``Workload`` and ``ComputeModel``:
``simulate`` and ``capacity``. The cache structure's defaults are TierConfig's, read from its fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tiersim.hierarchy import strategies
from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig
from tiersim.options import defaults, option

_TIER = defaults(TierConfig)
_TARGET_MODEL = "r1-distill-qwen-7b"
#: The simulator's own bounds (tiersim.simulator.capacity MAX_TOKENS / MAX_STEPS), without importing it
#: at start-up; tests/test_bad_inputs_generated.py holds them equal.
MAX_TOKENS = 10_000_000
MAX_STEPS = 1_000_000
#: The simulator's --host-overhead and --engine names (presets.HOST_OVERHEADS, fastpath.ENGINES; tested equal).
HOST_OVERHEADS = ("none", "sync")
ENGINES = ("auto", "fast", "simpy")
#: The engine presets of tiersim/data/public-engine-overheads.json (simulator.engines.names(); tested equal).
ENGINE_OVERHEADS = ("none", "vllm", "vllm-0.6", "vllm-sync", "trtllm", "sglang", "hf-eager")

STRATEGY_HELP = strategies.help_text(strategies.CACHE_STRATEGIES)  # the cache runs these (the registry says)


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """The real model a command runs, and where."""

    model: str = option("smollm2", "'smollm2' (bundled) or a local transformers model directory")
    device: str = option("cpu", "cpu or cuda", choices=("cpu", "cuda"))
    dtype: str = option("float32", "float32 (exact on CPU), bfloat16 or float16",
                        choices=("float32", "bfloat16", "float16"))


@dataclasses.dataclass(frozen=True)
class CacheShape:
    """The hierarchy's structure besides its tier ratios: pinned tokens, re-tiering, quantization, DDR access."""

    sink_tokens: int = option(_TIER["sink_tokens"], "hierarchy: first tokens pinned to HBM", min=0, max=MAX_TOKENS)
    recent_window: int = option(_TIER["recent_window"], "hierarchy: newest tokens pinned to HBM", min=0,
                                max=MAX_TOKENS)
    retier_every: int = option(_TIER["retier_every"], "re-tiering interval in decode steps (hierarchy and SnapKV)",
                               min=1, max=MAX_TOKENS)
    compressed_bits: int = option(_TIER["compressed_bits"], "4 or 8", choices=(4, 8))
    strategy: str = option(_TIER["strategy"], f"how the DDR tier reaches attention: {STRATEGY_HELP}")
    fetch_share: float = option(_TIER["fetch_share"], f"{' / '.join(strategies.SHARE_TAKERS)}: share of the DDR "
                                "tier fetched to the device per step", min=0, max=1)

    def config_options(self) -> dict:
        """The fields as TierConfig keywords (``strategy`` as given: a command with a list splits it first)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Target:
    """The model and GPU presets a simulation prices."""

    model: str = option(_TARGET_MODEL, "model preset (see `tiersim presets`)")
    model_config: Path | None = option(None, "a transformers config.json instead of a preset")
    gpu: str = option("h100-sxm", "GPU preset")

    def __post_init__(self):
        # --model-config replaces the preset: a --model given too would be ignored without a word.
        if self.model_config is not None and self.model != _TARGET_MODEL:
            raise TiersimError(f"--model {self.model} and --model-config {self.model_config} both name the model; "
                               "give one")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the simulated batch decodes: the trace it projects from, the lengths, and how many steps."""

    trace: Path | None = option(None, "trace to project from (default: the bundled SmolLM2 capture)")
    lengths: str | None = option(None, "mean generated tokens (log-normal, staggered batch): a number, "
                                 "gsm8k/math500/amc23/gpqa/aime, or 'trace' (default: math500)")
    context: int | None = option(None, "instead of --lengths: a lockstep batch decoding from this many context "
                                 "tokens", min=1, max=MAX_TOKENS)
    prefetch: str = option("all", "DDR tokens fetched per step: all (exact), or cover99/cover90: an oracle selective "
                           "prefetch of the trace's tokens holding 99%/90% of the DDR tier's attention (not exact)",
                           choices=("all", "cover99", "cover90"))
    steps: int = option(256, "decode steps simulated per config (steady state)", min=1, max=MAX_STEPS)
    seed: int = option(0, "seed of the simulated batch's lengths and arrival order", min=0, max=2**32 - 1)


@dataclasses.dataclass(frozen=True)
class ComputeModel:
    """Where the simulator's compute and link times come from: measured files instead of the roofline."""

    calibration: Path | None = option(None, "calibration JSON from `tiersim validate`")
    profile: Path | None = option(None, "operator profile JSON (python -m tiersim.validator.operators): measured "
                                  "operator times instead of the roofline")
    host_floor: bool = option(True, "with --profile: a step lasts at least the profiled HF eager host time "
                              "(--no-host-floor: a launch-free engine, device time only)", flag="--host-floor/--no-host-floor")
    host_overhead: str = option("none", "per-step host work the GPU waits for: none (an engine that overlaps "
                                        "it), or sync (a Python serving engine that does not: 1.17 ms + 0.1 ms per "
                                        "sequence, vidur's public CPU profile)", choices=HOST_OVERHEADS)
    engine_overhead: str = option("none", "per-step host/engine cost of the serving engine (a cited line per engine, "
                                  "docs/simulator.md): none (device time only), vllm (0.08 ms/step: vLLM v0.11 on an H100), "
                                  "vllm-0.6 (1.04 ms + 0.038 ms/seq: vLLM 0.6 with its output processing overlapped), "
                                  "vllm-sync (1.17 ms + 0.1 ms/seq: a synchronous engine, vLLM before v0.6), trtllm (TensorRT-LLM: no host "
                                  "cost, its unsplit decode attention's per-block rate), sglang (none left: "
                                  "its overlap scheduler, measured on an H100), hf-eager (this "
                                  "project's H100 validator harness: a launch-bound host floor per layer)",
                                  choices=ENGINE_OVERHEADS)
    engine: str = option("auto", "step-time model: auto (the exact per-step recurrence, or SimPy where demotions and "
                                 "prefetches really share the link), fast, or simpy (the event-by-event reference)",
                        choices=ENGINES)

    def __post_init__(self):
        # The floor is the profile's host time: without --profile there is none to drop, and the flag was
        # accepted without a word while the run priced the roofline as before.
        if not self.host_floor and self.profile is None:
            raise TiersimError("--no-host-floor drops the profiled host time: it applies with --profile only; "
                               "add --profile or drop --no-host-floor")
