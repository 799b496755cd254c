"""tiersim: a semantics-aware KV-cache memory hierarchy for reasoning LLMs.

Tokens are ranked by cumulative attention and placed in four tiers (HBM, DDR, compressed,
evicted). The same policy drives trace capture, the simulator and the GPU validator.
"""

__version__ = "0.1.0"
