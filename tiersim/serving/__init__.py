"""Request-level serving simulator: arrivals, continuous batching, paged KV and what to do when it runs out.

Modules, one responsibility each: ``workload`` (the requests), ``stepcost`` (one engine iteration priced by
the simulator's one step model), ``memory`` (paged KV blocks and the on-full policies), ``engine`` (the SimPy
processes), ``metrics`` (latencies, goodput, the per-request file) and ``search`` (the highest QPS within
the SLOs). docs/serving.md describes the model and its checks.
"""
