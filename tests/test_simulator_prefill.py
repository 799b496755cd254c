"""Prefill and mixed-step physics (tiersim.simulator.prefill): each regime behaves as docs/simulator.md
("Prefill") says, and the mixed step meets the decode physics exactly where the two describe the same work."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tiersim.simulator import physics, prefill
from tiersim.simulator.presets import get_gpu, get_model

H100 = get_gpu("h100-sxm")
A100 = get_gpu("a100-80g")
QWEN7 = get_model("r1-distill-qwen-7b")
QWQ = get_model("qwq-32b")


@pytest.mark.parametrize("gpu", [H100, A100], ids=["h100", "a100"])
@pytest.mark.parametrize("model", [QWEN7, QWQ], ids=["7b", "32b"])
def test_gemms_are_compute_bound_and_linear_at_many_tokens(gpu, model):
    """Doubling a long prompt's tokens doubles its GEMM time (full tiles, FLOPs / peak), unlike decode."""
    t2k, t4k, t8k = (float(prefill.gemm_s(model, gpu, n)) for n in (2048, 4096, 8192))
    assert t4k / t2k == pytest.approx(2.0, rel=0.02) and t8k / t4k == pytest.approx(2.0, rel=0.01)
    flops = physics.layer_flops_per_token(model) * 8192
    assert t8k == pytest.approx(flops / (gpu.peak_flops * gpu.prefill_gemm_efficiency), rel=0.01)
    # The decode formula would have charged one weight read: many times less.
    assert t8k > 10 * float(physics.weight_stream_s(gpu, model.layer_weight_bytes, 8192))


def test_tile_quantization_from_one_tile_and_the_weight_floor():
    """From one tile up a GEMM computes whole tiles (129 rows cost two 128-row tiles); below one tile the rows
    count as they are. A short chunk costs at least one weight read, and up to 16 tokens no more."""
    gpu = replace(H100, prefill_gemm_efficiency=0.02)  # make compute bind at every size, to see the tiles
    t = {n: float(physics.gemm_compute_s(QWEN7, gpu, n)) for n in (1, 64, 128, 129, 256, 257)}
    fixed = physics.GEMMS_PER_LAYER * gpu.gemm_kernel_s
    assert (t[64] - fixed) == pytest.approx(64 * (t[1] - fixed))
    assert t[129] == t[256] and (t[129] - fixed) == pytest.approx(2 * (t[128] - fixed)) and t[257] > t[256]
    assert float(prefill.gemm_s(QWEN7, gpu, 129)) > float(prefill.gemm_s(QWEN7, gpu, 128)) * 1.9
    for n in (1, 4, 16):
        floor = float(physics.weight_stream_s(H100, QWEN7.layer_weight_bytes, n))
        assert floor <= float(prefill.gemm_s(QWEN7, H100, n)) <= floor * 1.003


def test_prefill_attention_is_quadratic_in_the_prompt_and_causal():
    # after the one kernel call's fixed cost (decode attention's per-call floor, 18 us on an H100)
    big = [float(prefill.prefill_attention_s(QWEN7, H100, n)) - H100.attn_kernel_s for n in (8192, 16384, 32768)]
    # 4x per doubling, less the little the kernel's efficiency still gains with the keys (within 3%).
    assert big[1] / big[0] == pytest.approx(4.0, rel=0.03) and big[2] / big[1] == pytest.approx(4.0, rel=0.015)
    eff = prefill.attention_efficiency(H100, np.array([512, 2048, 16384]))
    assert np.all(np.diff(eff) > 0) and eff[-1] < H100.prefill_attn_efficiency
    pairs = float(prefill.attention_pairs(32768))
    assert pairs == pytest.approx(32768 ** 2 / 2, rel=1e-3)  # causal: half the square
    # A chunk after a cached context attends to all of it and its own triangle.
    assert float(prefill.attention_pairs(512, 4096)) == 512 * 4096 + 512 * 513 / 2
    assert float(prefill.prefill_attention_s(QWEN7, H100, 0, 4096)) == 0.0


def test_a_one_token_prefill_is_about_one_decode_layer():
    """Continuity with the decode physics: one token after c cached ones costs a decode step's layer."""
    for c in (0, 512, 4096):
        kv = (c + 1) * QWEN7.kv_bytes_per_token_layer
        decode = float(physics.layer_s(QWEN7, H100, 1, kv))
        assert float(prefill.prefill_layer_s(QWEN7, H100, 1, c)) == pytest.approx(decode, rel=0.03)


def test_a_mixed_step_without_prefill_is_the_decode_layer_exactly():
    batch = np.array([1, 8, 64, 256])
    kv = batch * 2048 * QWEN7.kv_bytes_per_token_layer
    decode = physics.layer_s(QWEN7, H100, batch, kv, 1e6, batch * 2048)
    mixed = prefill.mixed_layer_s(QWEN7, H100, batch, kv, 0, 0, extra_bytes=1e6, attended=batch * 2048)
    assert np.array_equal(mixed, decode)
    assert prefill.mixed_layer_s(QWEN7, H100, 16, kv[1], 0) == float(physics.layer_s(QWEN7, H100, 16, kv[1]))


def test_a_mixed_step_adds_the_chunk_and_shares_the_weight_read():
    d, kv = 32, 32 * 4096 * QWEN7.kv_bytes_per_token_layer
    decode = float(physics.layer_s(QWEN7, H100, d, kv))
    chunk = float(prefill.prefill_layer_s(QWEN7, H100, 512, 1024))
    mixed = float(prefill.mixed_layer_s(QWEN7, H100, d, kv, 512, 1024))
    assert max(decode, chunk) < mixed < decode + chunk  # one weight read serves both
    assert np.all(np.diff(prefill.mixed_layer_s(QWEN7, H100, d, kv, np.array([1, 256, 1024, 4096]), 0)) > 0)


def test_an_unsplit_attention_kernel_slows_the_decode_rows_of_a_mixed_step_as_of_a_decode_step():
    """--engine-overhead trtllm's per-block read rate (GPU.attn_block_bw) caps the decode attention of a mixed step's
    decode rows exactly as it caps a pure decode step's (it used to be dropped as soon as a prefill chunk joined)."""
    from tiersim.simulator import engines

    trt = engines.apply(H100, "trtllm", QWEN7.num_layers)
    assert trt.attn_block_bw > 0
    for d in (1, 4):
        kv = d * 8192 * QWEN7.kv_bytes_per_token_layer
        slower = float(physics.layer_s(QWEN7, trt, d, kv)) - float(physics.layer_s(QWEN7, H100, d, kv))
        assert slower > 0
        mixed = float(prefill.mixed_layer_s(QWEN7, trt, d, kv, 256, 0)) - float(
            prefill.mixed_layer_s(QWEN7, H100, d, kv, 256, 0))
        assert mixed == pytest.approx(slower, rel=1e-9)



def test_the_decode_rows_attention_flops_bound_a_mixed_step_as_a_decode_step():
    """Where the decode rows' attention FLOPs (``attended`` tokens) outlast their KV read, a mixed step's decode rows
    are bound by them exactly as a decode step's are: the chunk does not change what they compute (found in review:
    ``attended`` was dropped as soon as a prefill chunk joined, as the block rate once was)."""
    slow = replace(H100, peak_flops=H100.peak_flops / 1000)  # attention FLOPs now bind over the read
    d, kv = 8, 8 * 4096 * QWEN7.kv_bytes_per_token_layer
    attended = d * 4096
    bound = float(physics.layer_s(QWEN7, slow, d, kv, attended=attended)) - float(physics.layer_s(QWEN7, slow, d, kv))
    assert bound > 0
    mixed = float(prefill.mixed_layer_s(QWEN7, slow, d, kv, 256, 0, attended=attended)) - float(
        prefill.mixed_layer_s(QWEN7, slow, d, kv, 256, 0))
    assert mixed == pytest.approx(bound, rel=1e-9)


def test_whole_prefill_and_step_add_the_layers_the_head_and_the_host():
    layer = float(prefill.prefill_layer_s(QWEN7, H100, 2048))
    whole = float(prefill.prefill_s(QWEN7, H100, 2048))
    assert QWEN7.num_layers * layer < whole < QWEN7.num_layers * layer * 1.05
    # The step form with no prefill is the analytic decode step held in HBM.
    kv = 8 * 1024 * QWEN7.kv_bytes_per_token_layer
    step = prefill.mixed_step_s(QWEN7, H100, 8, kv, 0)
    assert step == pytest.approx(QWEN7.num_layers * float(physics.layer_s(QWEN7, H100, 8, kv))
                                 + physics.lm_head_s(QWEN7, H100, 8))
    # Chunked prefill of a prompt alone costs at least the one-shot prefill (more steps, same work).
    assert prefill.chunked_prefill_s(QWEN7, H100, 4096, 4096) == pytest.approx(float(prefill.prefill_s(QWEN7, H100, 4096)))
    assert prefill.chunked_prefill_s(QWEN7, H100, 4096, 512) > float(prefill.prefill_s(QWEN7, H100, 4096))


def test_one_sequence_is_the_single_prompt_bit_for_bit():
    """``sequences=1`` is the single chunk's formula exactly: layers x layer + gather + LM head + host."""
    for n, ctx in ((1, 0), (700, 0), (2048, 0), (512, 3000)):
        single = (QWEN7.num_layers * float(prefill.prefill_layer_s(QWEN7, H100, n, ctx))
                  + physics.gather_s(QWEN7, H100, max(n - 1, 0)) + physics.lm_head_s(QWEN7, H100, 1)
                  + physics.host_overhead_s(H100, 1))
        assert float(prefill.prefill_s(QWEN7, H100, n, ctx, sequences=1)) == single
    with pytest.raises(ValueError):
        prefill.prefill_s(QWEN7, H100, 128, sequences=0)


@pytest.mark.parametrize("gpu", [H100, A100], ids=["h100", "a100"])
def test_a_batch_of_prompts_shares_the_weights_and_keeps_attention_per_prompt(gpu):
    """16 prompts of 1K tokens in one forward: the GEMMs' FLOPs add (compute-bound: ~16 x one prompt's, less the
    weight read and per-kernel costs paid once), attention stays per prompt (far less than one 16K-token prompt's
    quadratic attention), and the time grows with both the prompts and their length."""
    one = float(prefill.prefill_s(QWQ, gpu, 1024))
    batch = float(prefill.prefill_s(QWQ, gpu, 1024, sequences=16))
    assert 12 * one < batch < 16 * one
    assert batch < float(prefill.prefill_s(QWQ, gpu, 16 * 1024))  # one long prompt attends over all 16K keys
    gemm = QWQ.num_layers * float(prefill.gemm_s(QWQ, gpu, 16 * 1024))
    attn = QWQ.num_layers * 16 * float(prefill.prefill_attention_s(QWQ, gpu, 1024))
    assert gemm + attn < batch < (gemm + attn) * 1.15  # small ops, gather, 16 LM-head rows and the host on top
    times = [float(prefill.prefill_s(QWQ, gpu, t, sequences=s)) for s in (1, 2, 4, 8) for t in (256, 1024)]
    assert all(b > a for a, b in zip(times[::2], times[1::2]))  # longer prompts, same batch
    assert all(b > a for a, b in zip(times[::2], times[2::2]))  # more prompts, same length


@pytest.mark.parametrize("gpu", [H100, A100], ids=["h100", "a100"])
def test_a_batched_prefill_pays_one_attention_floor_per_layer(gpu):
    """n equal prompts prefilled in one forward run one attention kernel per layer (packed, variable length): a
    dearer kernel floor adds ``layers x delta`` to the batch whatever n is; the prompts' attention work still adds."""
    dearer = replace(gpu, attn_kernel_s=gpu.attn_kernel_s + 50e-6)
    for n in (1, 4, 64):
        added = float(prefill.prefill_s(QWEN7, dearer, 128, sequences=n)) - float(prefill.prefill_s(QWEN7, gpu, 128,
                                                                                                     sequences=n))
        assert added == pytest.approx(QWEN7.num_layers * 50e-6, rel=1e-9)
    one = float(prefill.prefill_attention_s(QWEN7, gpu, 1024))
    eight = float(prefill.prefill_attention_s(QWEN7, gpu, 1024, sequences=8))
    assert eight == pytest.approx(gpu.attn_kernel_s + 8 * (one - gpu.attn_kernel_s), rel=1e-12)
    assert float(prefill.prefill_attention_s(QWEN7, gpu, 0, sequences=8)) == 0.0
