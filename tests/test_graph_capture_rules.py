"""torch's CUDA-graph rules, held on a CPU for the region the graph executor captures.

The graph executor's CUDA paths have never run on a GPU, and the GPU run is one scarce shot, so what can be
checked without one is checked here, against the rules of ``torch.cuda.graph`` / ``CUDAGraph`` (torch 2.11):

* inside a capture nothing may make the host wait for the device (``.item()``, ``bool(tensor)``, ``nonzero``,
  boolean indexing, ``torch.equal``, ...): in the default ``global`` capture mode each is an error that
  invalidates the capture, and the point would fall back to the eager step (``executor: cuda-eager``);
* no random numbers (a graph replays one draw of a generator torch was not told about), no pinned host
  allocation (``cudaHostAlloc`` is not capturable), no tensor made from host data (a pageable H2D copy);
* a side stream used inside the capture forks from the capture stream before its first op and is joined back
  before the capture ends (an unjoined stream fails ``capture_end``; a side stream that never forked runs its
  copies once, at capture time, and the replays copy nothing);
* the step is warmed up eagerly off the capture stream before it is captured, with the device synchronised.

The first two are checked op by op (a ``TorchDispatchMode`` over the eager static step, which runs the same
Python as the capture); the last two with a stand-in for ``torch.cuda`` that logs streams, events and the
capture. Each test fails on the bug it names (checked by planting it: see the test's docstring).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

CONTEXT = 96

#: ops that read a device value on the host (a synchronisation: not capturable)
SYNCING = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_numpy", "masked_select", "equal",
           "allclose", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
           "bincount", "histc", "histogram", "_assert_async", "tolist"}
#: ops that draw random numbers
RANDOM = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "normal", "normal_",
          "uniform_", "bernoulli", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_", "random_",
          "multinomial", "native_dropout", "poisson", "_standard_gamma"}
#: ops that pin host memory or turn host data into a tensor (pageable H2D under capture)
HOST = {"_pin_memory", "pin_memory", "lift_fresh", "lift_fresh_copy", "lift"}


class CaptureRules(TorchDispatchMode):
    """Records every op dispatched inside it that a CUDA graph capture cannot hold (``broken``)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops += 1
        if name in SYNCING:
            self.broken.append(f"{func}: a host sync")
        elif name in RANDOM or (name == "dropout" and args[1] and args[2]):
            self.broken.append(f"{func}: random numbers")
        elif name in HOST or kwargs.get("pin_memory"):
            self.broken.append(f"{func}: host memory")
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self.broken.append(f"{func}: a boolean index (nonzero, a host sync)")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
            self.broken.append(f"{func}: repeat_interleave without output_size (a host sync)")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    from tiersim.validator.shapes import build_model, get_shape

    torch.manual_seed(0)
    return build_model(get_shape("tiny"), "cpu", dtype=torch.float32)


def _buffers(model, hbm: float, strategy: str = "prefetch", split=None, batch: int = 2, **extra):
    from tiersim.hierarchy.config import TierConfig
    from tiersim.validator.graph_run import load_synthetic, point_config
    from tiersim.validator.graph_tiers import TierBuffers

    cfg = model.config
    if split is None:
        opts = {"strategy": strategy, **extra} if strategy != "prefetch" else {}
        config = point_config(hbm, 0.0, 8, cfg.head_dim, **opts)
    else:
        ddr, comp, evict = split
        config = TierConfig(hbm=hbm, ddr=ddr, compressed=comp, evict=evict, quant_group=16, retier_every=8)
    buffers = TierBuffers(config, cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, CONTEXT, 24,
                          "cpu", model.dtype)
    with torch.inference_mode():
        load_synthetic(buffers, model, torch.Generator().manual_seed(0))
    return buffers


class _Cutter:
    """What SegmentedCapture is to a HostStep while it records: the cuts, and nothing run on the host."""

    def __init__(self) -> None:
        self.cuts: list = []

    def cut(self, layer_idx) -> None:
        self.cuts.append(layer_idx)


CASES = [("prefetch", 1.0, None, {}), ("prefetch", 0.5, None, {}), ("prefetch", 0.25, None, {}),
         ("prefetch", 0.5, (0.2, 0.2, 0.1), {}),  # a compressed and an evicted share: dequantized in the graph
         ("host-attention", 0.5, None, {}), ("hybrid", 0.5, None, {"fetch_share": 0.5})]


@pytest.mark.parametrize("copies", [True, False])
@pytest.mark.parametrize("strategy, hbm, split, extra", CASES)
def test_the_captured_step_syncs_nothing_draws_nothing_and_pins_nothing(model, strategy, hbm, split, extra, copies,
                                                                        monkeypatch):
    """What ``CapturedStep`` / ``SegmentedCapture`` record (``step.forward()`` after the eager warm-up, with the
    segmented capture's cuts for the host strategies) dispatches no host sync, no random draw, no pinned
    allocation and no tensor from host data; the host mirrors do not move (the capture runs nothing), and a host
    strategy's host part does not run inside the capture. Fails on a planted ``int(buf.n_seen_t)`` in
    ``GraphStep.update``, a ``bool(tensor)`` in ``GraphStep.forward`` or a random draw in
    ``HostStep._attend_static`` (checked)."""
    from tiersim.validator import graph_host

    buffers = _buffers(model, hbm, strategy, split, **extra)
    step = graph_host.make_step(model, buffers, copies=copies)
    with torch.inference_mode():
        step.run()  # the warm-up: lazily made state (the host part's static buffers) exists before the capture
        seen = buffers.n_seen
        if isinstance(step, graph_host.HostStep) and step.offloaded:
            step.capture = _Cutter()
            monkeypatch.setattr(graph_host.HostStep, "host_part",
                                lambda *_a: pytest.fail("the host part ran inside the capture"))
        rules = CaptureRules()
        with rules:
            step.forward()
    assert rules.ops > 50  # the whole step went through the mode, not an early return
    assert rules.broken == [], rules.broken
    assert buffers.n_seen == seen  # host mirrors move only after a replay (``advanced``)
    if isinstance(step, graph_host.HostStep) and step.offloaded:
        layers = model.config.num_hidden_layers
        assert step.capture.cuts == [p for i in range(layers) for p in (i, None)]


def test_the_rules_catch_what_they_name():
    """The checker itself: each kind of op a capture cannot hold is reported, and plain math is not."""
    x = torch.arange(6.0).reshape(2, 3)
    cases = [(lambda: x.sum().item(), "host sync"), (lambda: bool(x.any()), "host sync"),
             (lambda: x[x > 2], "host sync"), (lambda: torch.randn(3), "random"),
             (lambda: torch.zeros(3, pin_memory=torch.cuda.is_available()) if torch.cuda.is_available()
              else torch.tensor([1.0, 2.0]), "host memory"),
             (lambda: torch.equal(x, x), "host sync")]
    for fn, words in cases:
        rules = CaptureRules()
        with rules:
            fn()
        assert rules.broken and words in rules.broken[0], (words, rules.broken)
    rules = CaptureRules()
    with rules:
        torch.softmax(x @ x.T, dim=-1).index_select(1, torch.zeros(1, dtype=torch.long))
    assert rules.broken == []


# -- streams, events and the capture, logged by a stand-in for torch.cuda ---------------------------------------
class _FakeCuda:
    """Streams that name themselves, events that remember where they were recorded, and a ``torch.cuda.graph``
    that switches to its own capture stream: every stream op, event and capture boundary goes into ``log``."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        fake = self
        self.current = None

        class Stream:
            made = 0

            def __init__(self, device=None, name=None):
                self.name = name or f"s{Stream.made}"
                Stream.made += 1

            def wait_stream(self, other):
                fake.log.append(("wait_stream", self.name, other.name))

            def wait_event(self, event):
                fake.log.append(("wait_event", self.name, event.name))

            def __repr__(self):
                return self.name

        class Event:
            made = 0

            def __init__(self, enable_timing=False):
                self.name = f"e{Event.made}"
                Event.made += 1

            def record(self, stream=None):
                fake.log.append(("record", (stream or fake.current).name, self.name))

            def synchronize(self):
                fake.log.append(("event_sync", self.name))

        class CUDAGraph:
            def replay(self):
                fake.log.append(("replay",))

        self.Stream, self.Event, self.CUDAGraph = Stream, Event, CUDAGraph
        self.default = Stream(name="default")
        self.capture_stream = Stream(name="capture")
        self.current = self.default

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def graph(self, g, pool=None, stream=None, capture_error_mode="global"):
        self.log.append(("begin", "capture"))
        with self.stream(stream or self.capture_stream):
            yield
        self.log.append(("end", "capture"))

    def install(self, monkeypatch) -> None:
        for name, value in {"Stream": self.Stream, "Event": self.Event, "CUDAGraph": self.CUDAGraph,
                            "stream": self.stream, "graph": self.graph, "graph_pool_handle": lambda: (7, 1),
                            "current_device": lambda: 0,
                            "set_stream": lambda s: self.log.append(("set_stream", s.name)),
                            "current_stream": lambda device=None: self.current,
                            "synchronize": lambda device=None: self.log.append(("synchronize",))}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def check_joined(log: list, capture: str = "capture") -> None:
    """Within ``begin``..``end``: each side stream forks from the capture stream (``wait_stream``) before it records
    anything, and every event recorded on a side stream is waited for by the capture stream before the end."""
    inside = log[log.index(("begin", capture)) + 1: log.index(("end", capture))]
    forked: set[str] = set()
    pending: dict[str, str] = {}  # event -> the side stream it was recorded on
    for entry in inside:
        if entry[0] == "wait_stream" and entry[2] == capture:
            forked.add(entry[1])
        elif entry[0] == "record" and entry[1] != capture:
            assert entry[1] in forked, f"{entry[1]} records {entry[2]} inside the capture without forking from it"
            pending[entry[2]] = entry[1]
        elif entry[0] == "wait_event" and entry[1] == capture:
            pending.pop(entry[2], None)
        elif entry[0] in ("synchronize", "event_sync"):
            raise AssertionError(f"{entry} inside the capture: a host sync")
    assert not pending, f"side-stream work not joined back before the capture ends: {pending}"


@pytest.mark.parametrize("hbm, copies", [(0.5, True), (0.25, True), (0.5, False), (1.0, True)])
def test_captured_step_warms_up_off_the_capture_stream_and_joins_its_side_stream(model, monkeypatch, hbm, copies):
    """``CapturedStep``: the warm-up runs eagerly on a stream that is neither the default nor the capture stream,
    followed by a device synchronise, before the capture begins; inside the capture the prefetch side stream forks
    from the capture stream before each layer's copy and every layer's copy event is waited for by the capture
    stream before the capture ends; one event per layer (the copy-free step and HBM 1.0: no side-stream work).
    Fails on a dropped ``self.side.wait_stream(...)`` in ``GraphStep._prefetch`` or a dropped ``_wait`` in
    ``GraphStep.update`` (checked)."""
    from tiersim.validator.graph import CapturedStep, GraphStep

    buffers = _buffers(model, hbm)
    fake = _FakeCuda()
    step = GraphStep(model, buffers, copies=copies)
    fake.install(monkeypatch)
    layers = model.config.num_hidden_layers
    step.cuda, step.side, step.events = True, fake.Stream(name="side"), [fake.Event() for _ in range(layers)]
    with torch.inference_mode():
        captured = CapturedStep(step, warmup=2)
    log = fake.log
    begin = log.index(("begin", "capture"))
    before = log[:begin]
    assert ("synchronize",) in before and before[-1] == ("synchronize",)  # the warm-up is done before the capture
    warm = [e for e in before if e[0] == "wait_stream" and e[2] == "default"]
    assert warm and warm[0][1] not in ("default", "capture", "side")  # warmed up on its own side stream
    check_joined(log)
    inside = log[begin + 1: log.index(("end", "capture"))]
    recorded = [e[2] for e in inside if e[0] == "record"]
    if copies and hbm < 1.0:
        assert sorted(recorded) == sorted(ev.name for ev in step.events)  # every layer's copy, once
    else:
        assert recorded == [] and not [e for e in inside if e[1] == "side"]
    assert buffers.n_seen == CONTEXT + 2  # the two warm-up steps; the capture moved nothing
    fake.log.clear()
    captured.replay()
    assert fake.log == [("replay",)] and buffers.n_seen == CONTEXT + 3


def test_the_join_check_catches_an_unjoined_or_unforked_side_stream():
    """The checker itself, on hand-written logs: a copy event never waited for, a side stream that did not fork, a
    host sync inside the capture; and a well-formed fork/join passes."""
    good = [("begin", "capture"), ("wait_stream", "side", "capture"), ("record", "side", "e0"),
            ("wait_event", "capture", "e0"), ("end", "capture")]
    check_joined(good)
    for bad, words in ((good[:3] + good[4:], "not joined"), ([good[0]] + good[2:], "without forking"),
                       (good[:4] + [("synchronize",)] + good[4:], "host sync")):
        with pytest.raises(AssertionError, match=words):
            check_joined(bad)


class _FailingCapture(_FakeCuda):
    """A capture whose end fails, as ``capture_end`` does after an invalidated capture (a sync inside it), and an
    allocator whose bookkeeping the recovery calls are logged; ``underway``: whether torch left the pool underway."""

    def __init__(self, underway: bool) -> None:
        super().__init__()
        self.underway = underway

    @contextlib.contextmanager
    def graph(self, g, pool=None, stream=None, capture_error_mode="global"):
        self.log.append(("begin", "capture", pool))
        self.current = self.capture_stream  # torch.cuda.graph's exit skips restoring it when capture_end raises
        yield
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def install(self, monkeypatch) -> None:
        super().install(monkeypatch)

        def end(index, pool):
            self.log.append(("end_allocate", index, pool))
            if not self.underway:
                raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda i, p: self.log.append(("release", i, p)),
                            raising=False)


@pytest.mark.parametrize("underway", [True, False])
def test_a_failed_capture_leaves_no_allocation_underway_and_the_stream_restored(model, monkeypatch, underway):
    """torch's ``capture_end`` leaves the allocator allocating to a failed graph's pool (it stops that only after a
    successful ``cudaStreamEndCapture``), and the next ``torch.cuda.empty_cache()`` (each point's ``free``) then
    fails an internal assert: one failed capture would end the grid. ``CapturedStep`` names its pool, and on a
    failure ends that allocation and releases the pool once (only if torch had left it underway), makes the stream
    current again that ``torch.cuda.graph`` left switched, and raises (the point is then timed eagerly)."""
    from tiersim.validator.graph import CapturedStep, GraphStep

    fake = _FailingCapture(underway)
    step = GraphStep(model, _buffers(model, 0.5))
    fake.install(monkeypatch)
    step.cuda, step.side = True, fake.Stream(name="side")
    step.events = [fake.Event() for _ in range(model.config.num_hidden_layers)]
    with torch.inference_mode(), pytest.raises(RuntimeError, match="during capture"):
        CapturedStep(step, warmup=1)
    after = fake.log[fake.log.index(("begin", "capture", (7, 1))) + 1:]
    tail = [e for e in after if e[0] in ("end_allocate", "release", "set_stream")]
    assert tail == [("end_allocate", 0, (7, 1))] + ([("release", 0, (7, 1))] if underway else []) + \
        [("set_stream", "default")]
