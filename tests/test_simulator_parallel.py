"""Tensor parallel (tiersim.simulator.parallel): the shard, the all-reduce line and its public data."""

from __future__ import annotations

import numpy as np
import pytest

from tiersim.errors import TiersimError
from tiersim.simulator import parallel, physics
from tiersim.simulator.presets import get_gpu, get_model

H100 = get_gpu("h100-sxm")
A100 = get_gpu("a100-80g")
QWQ = get_model("qwq-32b")
QWEN7 = get_model("r1-distill-qwen-7b")


def test_tp1_is_the_identity_and_costs_no_all_reduce():
    assert parallel.shard(QWQ, 1) is QWQ
    assert parallel.allreduce_s(H100, 1, 1e6) == 0.0
    assert parallel.layer_allreduce_s(QWQ, H100, 1, 4096) == 0.0


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_a_shard_holds_one_tp_th_of_the_weights_and_kv(tp):
    s = parallel.shard(QWQ, tp)
    assert s.layer_weight_bytes == pytest.approx(QWQ.layer_weight_bytes / tp)
    assert s.kv_bytes_per_token == QWQ.kv_bytes_per_token / tp
    assert s.lm_head_bytes == pytest.approx(QWQ.lm_head_bytes / tp, rel=1e-4)
    assert s.weight_bytes == pytest.approx(QWQ.weight_bytes / tp, rel=1e-3)
    assert s.hidden_size == QWQ.hidden_size and s.num_layers == QWQ.num_layers
    assert s.mlp_width == QWQ.mlp_width // tp and s.head_dim == QWQ.head_dim
    # A rank streams 1/tp of the weights; the per-kernel costs and small ops do not shrink.
    rank, whole = physics.layer_s(s, H100, 8, 0), physics.layer_s(QWQ, H100, 8, 0)
    assert whole / tp < rank < whole
    saved = (physics.gemm_s(QWQ, H100, 8) - physics.gemm_s(s, H100, 8)  # the GEMMs of 1/tp of the weights
             + H100.layer_overhead_per_width * (QWQ.mlp_width - s.mlp_width))  # the activation is split too
    # ... which at 8 rows is weight streaming: 1/tp of the bytes, the same per-kernel costs
    streamed = (physics.weight_stream_s(H100, QWQ.layer_weight_bytes * (1 - 1 / tp), 8)
                - physics.GEMMS_PER_LAYER * H100.gemm_kernel_s)
    assert float(physics.gemm_s(QWQ, H100, 8) - physics.gemm_s(s, H100, 8)) == pytest.approx(streamed, rel=5e-3)
    assert whole - rank == pytest.approx(saved, rel=1e-6)


def test_tp_must_divide_the_heads_in_one_line():
    with pytest.raises(TiersimError, match="KV heads .4."):
        parallel.shard(QWEN7, 8)  # 4 KV heads
    with pytest.raises(TiersimError, match="one of 1, 2, 4, 8"):
        parallel.shard(QWQ, 3)
    with pytest.raises(TiersimError, match="no NVLink"):
        parallel.allreduce_s(get_gpu("gh200"), 2, 1e6)


@pytest.mark.parametrize("gpu", [H100, A100], ids=["h100", "a100"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_the_all_reduce_line_reproduces_the_public_profile(gpu, tp):
    """The stored NCCL points from 1 MiB up: median within 15% of the fitted floor-and-line, every one from
    4 MiB up (prefill-sized activations) within 30%. Below 1 MiB the profile itself scatters between
    ~7 and ~60 us (two modes), so the floor only has to sit inside what was measured there."""
    link = parallel.load_allreduce()["links"][parallel.NVLINK_OF[gpu.name]][str(tp)]
    errors = {p["bytes"]: abs(parallel.allreduce_s(gpu, tp, p["bytes"]) / (p["ms"] * 1e-3) - 1) for p in link["points"]}
    assert len(errors) >= 12 and np.median([e for b, e in errors.items() if b >= 2**20]) < 0.15
    assert max(e for b, e in errors.items() if b >= 4 * 2**20) < 0.30
    small = [p["ms"] * 1e-3 for p in link["points"] if p["bytes"] < 2**20]
    assert min(small) <= parallel.allreduce_s(gpu, tp, 4096) <= max(small)
    assert parallel.allreduce_s(gpu, tp, 64 * 2**20) > 5 * parallel.allreduce_s(gpu, tp, 4096)


def test_each_rank_keeps_its_link_and_shares_the_host():
    assert parallel.host_bw_per_rank(H100) == pytest.approx(H100.host_sockets * H100.host_socket_bw
                                                            * H100.host_bw_efficiency / H100.gpus_per_host)


def test_a_graphed_engine_can_lower_the_small_message_floor():
    eager = parallel.allreduce_s(H100, 2, 64 * 1024)
    graphed = parallel.allreduce_s(H100, 2, 64 * 1024, floor_s=6e-6)
    assert graphed < eager and graphed == pytest.approx(6e-6 + 64 * 1024 / parallel.link_line(H100, 2)[2], rel=1e-9)
    big = 64 * 2**20  # bandwidth-bound: the floor does not matter
    assert parallel.allreduce_s(H100, 2, big, floor_s=6e-6) == pytest.approx(parallel.allreduce_s(H100, 2, big), rel=0.1)


def test_tp_prefill_is_the_shard_plus_the_all_reduces():
    from tiersim.simulator import prefill

    assert parallel.tp_prefill_s(QWQ, H100, 1, 4096) == pytest.approx(float(prefill.prefill_s(QWQ, H100, 4096)))
    t = {tp: parallel.tp_prefill_s(QWQ, H100, tp, 4096) for tp in (1, 2, 4, 8)}
    assert t[1] > t[2] > t[4] > t[8] > t[1] / 8  # compute splits, all-reduces do not
    comm = QWQ.num_layers * parallel.layer_allreduce_s(QWQ, H100, 4, 4096)
    assert t[4] == pytest.approx(float(prefill.prefill_s(parallel.shard(QWQ, 4), H100, 4096)) + comm)


def test_tp_prefill_of_a_batch_all_reduces_every_row():
    """A batch of prompts on TP GPUs: the rank's batch prefill plus all-reduces of every row of the batch."""
    from tiersim.simulator import prefill

    t = parallel.tp_prefill_s(QWQ, H100, 4, 1024, sequences=8)
    comm = QWQ.num_layers * parallel.layer_allreduce_s(QWQ, H100, 4, 8 * 1024)
    assert t == pytest.approx(float(prefill.prefill_s(parallel.shard(QWQ, 4), H100, 1024, sequences=8)) + comm)
    assert parallel.tp_prefill_s(QWQ, H100, 4, 1024, sequences=1) == parallel.tp_prefill_s(QWQ, H100, 4, 1024)
