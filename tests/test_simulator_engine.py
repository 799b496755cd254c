"""The event engine: the processor-shared link, the copy engines, the steps it times, and the closed
form it must agree with. (Scenarios, the capacity grid and the CLI: test_simulator.py.)"""

from dataclasses import replace

import numpy as np
import pytest
import simpy

from tiersim.simulator import analytic
from tiersim.hierarchy.config import TierConfig
from tiersim.simulator.analytic import COPY_CALLS_PER_LAYER, GB, LayerCosts, Offload
from tiersim.simulator.engine import CopyEngine, Link, simulate
from tiersim.simulator.presets import get_gpu, get_model

MODEL = get_model("r1-distill-qwen-7b")
H100 = get_gpu("h100-sxm")
# nvbandwidth-like asymmetric directions: the fair split of the ceiling is not symmetric.
ASYM = replace(H100, h2d_bw=35 * GB, d2h_bw=53 * GB, bidir_bw=83 * GB)


def _run_transfers(gpu, transfers, start_at=0.0):
    """transfers: name -> (direction, bytes, start offset). Returns name -> finish time - start_at."""
    env = simpy.Environment(initial_time=start_at)
    link = Link(env, gpu)
    finished = {}

    def go(name, direction, nbytes, at):
        yield env.timeout(at)
        yield link.transfer(direction, nbytes)
        finished[name] = env.now - start_at

    for name, (direction, nbytes, at) in transfers.items():
        env.process(go(name, direction, nbytes, at))
    env.run()
    return finished, link


def test_a_transfer_moves_at_its_link_rate():
    done, _ = _run_transfers(H100, {"a": ("h2d", 5 * GB, 0.0)})
    assert done["a"] == pytest.approx(5 * GB / H100.h2d_bw, rel=1e-9)


def test_same_direction_transfers_split_the_direction_cap():
    done, _ = _run_transfers(H100, {"a": ("h2d", 1 * GB, 0.0), "b": ("h2d", 1 * GB, 0.0)})
    assert done["a"] == pytest.approx(2 * GB / H100.h2d_bw, rel=1e-9)
    assert done["b"] == pytest.approx(done["a"], rel=1e-9)


def test_both_directions_share_the_ceiling_max_min_fairly():
    done, _ = _run_transfers(H100, {"up": ("h2d", 4 * GB, 0.0), "down": ("d2h", 4 * GB, 0.0)})
    # Neither faster than its own cap, and together not faster than the bidirectional ceiling.
    assert min(done.values()) >= 4 * GB / H100.h2d_bw
    assert max(done.values()) == pytest.approx(8 * GB / H100.bidir_bw, rel=1e-6)
    # Unequal caps, both active: h2d keeps its 35 GB/s (below the fair 41.5), d2h gets the remaining 48 GB/s.
    done, _ = _run_transfers(ASYM, {"up": ("h2d", 3.5 * GB, 0.0), "down": ("d2h", 4.8 * GB, 0.0)})
    assert done["up"] == pytest.approx(0.1, rel=1e-9)
    assert done["down"] == pytest.approx(0.1, rel=1e-9)


def test_rates_are_reshared_when_a_transfer_starts_late_and_when_it_ends():
    # d2h alone at 53 GB/s for 0.05 s, then shares: 48 GB/s while h2d runs at 35 GB/s.
    done, _ = _run_transfers(ASYM, {"down": ("d2h", 10 * GB, 0.0), "up": ("h2d", 0.7 * GB, 0.05)})
    assert done["up"] == pytest.approx(0.05 + 0.7 / 35, rel=1e-9)
    moved = 53 * 0.05 + 48 * (0.7 / 35)
    assert done["down"] == pytest.approx(done["up"] + (10 - moved) / 53, rel=1e-9)
    # A tiny D2H arriving mid-way slows the H2D only while both run; time never stalls.
    done, _ = _run_transfers(H100, {"big": ("h2d", 10 * GB, 0.0), "tiny": ("d2h", 1.0, 0.05)})
    assert done["tiny"] > 0.05
    assert done["big"] == pytest.approx(10 * GB / H100.h2d_bw, rel=1e-6)


def test_time_keeps_advancing_late_in_a_long_run():
    # At t = 1e5 s a 1-byte transfer takes 2e-11 s, near the float resolution of the clock: every
    # transfer must still finish (no zero-length loop) and none before it could.
    transfers = {f"t{i}": ("h2d" if i % 2 else "d2h", float(1 + i), i * 1e-12) for i in range(20)}
    done, link = _run_transfers(H100, transfers, start_at=1e5)
    assert set(done) == set(transfers) and not link.active
    assert link.bytes["h2d"] + link.bytes["d2h"] == sum(n for _, n, _ in transfers.values())


def test_copy_engine_runs_copies_in_order_with_their_latency():
    env = simpy.Environment()
    link = Link(env, H100)
    empty = env.event()
    empty.succeed()
    engine = CopyEngine(env, link, "h2d", 10e-6, empty)
    first, second = engine.copy(1 * GB), engine.copy(0.5 * GB)
    assert engine.copy(0) is empty  # nothing to move: no call, no latency
    times = {}
    first.callbacks.append(lambda _e: times.setdefault("first", env.now))
    second.callbacks.append(lambda _e: times.setdefault("second", env.now))
    env.run()
    one = 10e-6 + 1 * GB / H100.h2d_bw
    assert times["first"] == pytest.approx(one, rel=1e-12)
    assert times["second"] == pytest.approx(one + 10e-6 + 0.5 * GB / H100.h2d_bw, rel=1e-12)


def _costs(compute, h2d_bytes, d2h_bytes, gpu=H100):
    compute, up, down = (np.asarray(x, dtype=float) for x in (compute, h2d_bytes, d2h_bytes))
    lat = COPY_CALLS_PER_LAYER * gpu.copy_latency
    h2d = np.where(up > 0, lat + up / gpu.h2d_bw, 0.0)
    d2h = np.where(down > 0, lat + down / gpu.d2h_bw, 0.0)
    return LayerCosts(compute, h2d, d2h, up, down)


def test_link_bound_steps_take_the_copy_time_and_stall_the_difference():
    # 4 layers, 1 ms compute, 2 ms copies: every layer waits 1 ms for its prefetch.
    copy = (2e-3 - COPY_CALLS_PER_LAYER * H100.copy_latency) * H100.h2d_bw
    costs = _costs([1e-3] * 5, [copy] * 5, [0.0] * 5)
    result = simulate(costs, 4, H100)
    assert result.step_time[1:] == pytest.approx([8e-3] * 4, rel=1e-9)
    assert result.stall[1:] == pytest.approx([4e-3] * 4, rel=1e-9)
    assert result.stall[0] == pytest.approx(3e-3, rel=1e-9)  # layer 0's prefetch is warm-up


def test_compute_bound_steps_hide_the_prefetch():
    copy = (0.5e-3 - COPY_CALLS_PER_LAYER * H100.copy_latency) * H100.h2d_bw
    costs = _costs([1e-3] * 6, [copy] * 6, [1e6] * 6)
    result = simulate(costs, 8, H100)
    assert result.step_time == pytest.approx([8e-3] * 6, rel=1e-9)
    assert not result.stall.any()


def test_demotion_traffic_contends_with_prefetch_under_the_ceiling():
    # Large demotions on D2H slow the prefetch only when the shared ceiling binds.
    up = (2e-3 - COPY_CALLS_PER_LAYER * H100.copy_latency) * H100.h2d_bw
    costs = _costs([1e-3] * 8, [up] * 8, [0.05 * GB] * 8)
    roomy = replace(H100, bidir_bw=H100.h2d_bw + H100.d2h_bw)
    shared = simulate(costs, 4, H100)
    free = simulate(costs, 4, roomy)
    assert shared.stall[1:].sum() > free.stall[1:].sum() * 1.05
    step, stall = analytic.closed_form(costs, 4)
    assert free.step_time[1:].sum() == pytest.approx(step[1:].sum(), rel=1e-6)


@pytest.mark.parametrize(
    "policy,batch,mean_length",
    [
        (Offload(TierConfig(0.9, 0.1, 0.0, 0.0)), 1, 300),  # tiny copies: the per-call latency dominates
        (Offload(TierConfig(0.5, 0.5, 0.0, 0.0)), 64, 4000),  # link-bound
        (Offload(TierConfig(0.75, 0.2, 0.0, 0.05)), 8, 2000),  # near the crossover
        (Offload(TierConfig(0.4, 0.3, 0.2, 0.1, compressed_bits=8)), 24, 6000),  # compressed tier + eviction
        (Offload(TierConfig(0.5, 0.5, 0.0, 0.0), prefetch=0.6), 32, 3000),  # selective prefetch
        (Offload(TierConfig(0.5, 0.5, 0.0, 0.0)), 16, 2000),
        (Offload(TierConfig(0.9, 0.1, 0.0, 0.0)), 2, 2000),
        (Offload(TierConfig(1.0, 0.0, 0.0, 0.0)), 8, 2000),  # nothing offloaded
        (Offload(TierConfig(0.3, 0.5, 0.1, 0.1)), 32, 2000),  # every tier at once
    ],
)
def test_closed_form_agrees_with_the_event_run_without_contention(policy, batch, mean_length):
    gpu = replace(H100, bidir_bw=H100.h2d_bw + H100.d2h_bw)  # no contention: the closed form's premise
    rng = np.random.default_rng(3)
    work = analytic.build_workload(policy, batch, analytic.sample_lengths(batch, mean_length, 0.35, rng), 90, 96,
                                   churn=(0.02, 0.0), seed=3)
    costs = analytic.layer_costs(MODEL, gpu, policy, work)
    result = simulate(costs, MODEL.num_layers, gpu)
    step, stall = analytic.closed_form(costs, MODEL.num_layers)
    assert result.step_time[1:].sum() == pytest.approx(step[1:].sum(), rel=0.01)
    assert result.stall[1:].sum() == pytest.approx(stall[1:].sum(), rel=0.01, abs=1e-9)


def test_no_step_beats_its_compute_or_its_link():
    policy = Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    rng = np.random.default_rng(1)
    work = analytic.build_workload(policy, 32, analytic.sample_lengths(32, 3000, 0.35, rng), 90, 64,
                                   churn=(0.02, 0.0))
    costs = analytic.layer_costs(MODEL, H100, policy, work)
    result = simulate(costs, MODEL.num_layers, H100)
    assert np.all(result.step_time >= result.compute * (1 - 1e-12))
    # The H2D bytes of layers 1..L-1 of a step (layer 0's came in during the previous step) and all
    # of its demotions must fit in the step at the link's rates.
    layers = MODEL.num_layers
    assert np.all(result.step_time[1:] * H100.h2d_bw >= result.h2d_bytes[1:] * (layers - 1) / layers * (1 - 1e-9))
    total = result.step_time.sum()
    assert result.h2d_bytes.sum() / total <= H100.h2d_bw * (1 + 1e-9)
    assert (result.h2d_bytes.sum() + result.d2h_bytes.sum()) / total <= H100.bidir_bw


def test_events_per_layer_step_are_bounded_whatever_the_batch():
    policy = Offload(TierConfig(0.5, 0.5, 0.0, 0.0))
    per_layer_step = []
    for batch in (16, 64, 256, 512, 1024, 4096):
        rng = np.random.default_rng(0)
        work = analytic.build_workload(policy, batch, analytic.sample_lengths(batch, 2000, 0.35, rng), 90, 40,
                                       churn=(0.02, 0.0))
        result = simulate(analytic.layer_costs(MODEL, H100, policy, work), MODEL.num_layers, H100)
        per_layer_step.append(result.events / (40 * MODEL.num_layers))
    # Prefetch (call + link) + demotion (call + link) + compute: at most 8 events per layer-step.
    assert max(per_layer_step) <= 8.1
    # Once some slot re-tiers at every step (batch >> re-tier interval), the count is flat in B.
    assert max(per_layer_step[1:]) - min(per_layer_step[1:]) < 0.01


def test_all_in_hbm_is_one_event_per_step():
    policy = Offload(TierConfig(1.0, 0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    work = analytic.build_workload(policy, 64, analytic.sample_lengths(64, 2000, 0.35, rng), 90, 100)
    costs = analytic.layer_costs(MODEL, H100, policy, work)
    result = simulate(costs, MODEL.num_layers, H100)
    assert result.events < 2 * 100 + 10
    assert result.step_time == pytest.approx(costs.compute * MODEL.num_layers + costs.step_extra, rel=1e-12)
    assert costs.step_extra > 0  # the LM head, once per step
