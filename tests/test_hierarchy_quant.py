"""The compressed tier keeps the error bound KIVI-style quantization promises."""

import pytest
import torch

from tiersim.hierarchy.quant import QuantizedKV, error_bound, quantize_kv


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 31, 32, 70])
def test_round_trip_within_half_a_step(bits, n):
    gen = torch.Generator().manual_seed(bits * 100 + n)
    keys = torch.randn(2, 3, n, 64, generator=gen) * 3 + torch.linspace(-5, 5, 64)  # channel outliers
    values = torch.randn(2, 3, n, 64, generator=gen)
    q = quantize_kv(keys, values, bits=bits, group=32)
    k_hat, v_hat = q.dequantize()
    tol = 1e-5
    assert ((k_hat - keys).abs() <= error_bound(keys, bits, 32, "channel") * (1 + tol) + tol).all()
    assert ((v_hat - values).abs() <= error_bound(values, bits, 32, "token") * (1 + tol) + tol).all()
    # The bound is tight enough to mean something: 4-bit error is ~16x the 8-bit one.
    step = error_bound(values, bits, 32, "token").mean()
    assert step < (0.02 if bits == 8 else 0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_low_precision_round_trip_keeps_the_bound(dtype, bits):
    # The codes * scales math runs in float32; the result is rounded to the dtype once, so the error
    # is at most half a step plus half an ulp of the result.
    gen = torch.Generator().manual_seed(bits)
    keys = (torch.randn(2, 3, 70, 64, generator=gen) * 3 + torch.linspace(-5, 5, 64)).to(dtype)
    values = (torch.randn(2, 3, 70, 64, generator=gen) * 2 + 1).to(dtype)
    q = quantize_kv(keys, values, bits=bits, group=32)
    k_hat, v_hat = q.dequantize()
    assert k_hat.dtype == v_hat.dtype == dtype
    half_ulp = torch.finfo(dtype).eps / 2
    for x, x_hat, per in ((keys, k_hat, "channel"), (values, v_hat, "token")):
        x, x_hat = x.float(), x_hat.float()
        bound = error_bound(x, bits, 32, per) * (1 + 1e-6) + x_hat.abs() * half_ulp + 1e-6
        assert ((x_hat - x).abs() <= bound).all(), f"{per}: worst {((x_hat - x).abs() / bound).max():.2f}x the bound"


def test_dropped_tokens_free_their_key_scale_groups():
    # Re-tiering every step adds one small group per arrival; tokens that leave must take their
    # group's scales with them, or the tier outgrows the tokens it holds.
    gen = torch.Generator().manual_seed(1)
    tier = None
    for step in range(60):
        fresh = quantize_kv(torch.randn(2, 2, 3, 32, generator=gen), torch.randn(2, 2, 3, 32, generator=gen), bits=4)
        tier = QuantizedKV.concat(tier, fresh)
        keep = tier.num_tokens - 3 if step >= 5 else tier.num_tokens  # from step 5 on, 3 leave per step
        scores = torch.rand(2, tier.num_tokens, generator=gen)
        index = torch.sort(torch.topk(scores, keep, dim=1).indices, dim=1).values
        before = tier.dequantize()
        tier = tier.select(index)
        after = tier.dequantize()
        rows = torch.arange(2)[:, None]
        for a, b in zip(before, after):
            assert torch.equal(a[rows, :, index].permute(0, 2, 1, 3), b)  # the survivors are untouched
    assert tier.num_tokens == 15
    assert tier.key_scale.shape[2] <= tier.num_tokens  # every group left holds a token
    used = [len(set(row.tolist())) for row in tier.key_group]
    assert tier.key_scale.shape[2] == max(used)


def test_int4_packs_two_codes_per_byte():
    keys = torch.randn(1, 2, 64, 64)
    q8 = quantize_kv(keys, keys.clone(), bits=8)
    q4 = quantize_kv(keys, keys.clone(), bits=4)
    assert q4.key_codes.shape[-1] * 2 == q8.key_codes.shape[-1]
    assert q4.nbytes() < q8.nbytes() < 2 * keys.numel() * keys.element_size()


def test_constant_groups_are_exact():
    keys = torch.full((1, 1, 40, 64), 0.75)
    k_hat, v_hat = quantize_kv(keys, keys.clone(), bits=4).dequantize()
    assert torch.equal(k_hat, keys) and torch.equal(v_hat, keys)


def test_select_and_concat_keep_values_without_requantizing():
    gen = torch.Generator().manual_seed(0)
    a = quantize_kv(torch.randn(2, 2, 40, 32, generator=gen), torch.randn(2, 2, 40, 32, generator=gen), bits=4)
    b = quantize_kv(torch.randn(2, 2, 10, 32, generator=gen), torch.randn(2, 2, 10, 32, generator=gen), bits=4)
    ka, va = a.dequantize()
    kb, vb = b.dequantize()
    both = QuantizedKV.concat(a, b)
    index = torch.tensor([[0, 39, 45], [3, 41, 49]])
    kk, vv = both.select(index).dequantize()
    assert torch.equal(kk[0, :, 1], ka[0, :, 39]) and torch.equal(kk[0, :, 2], kb[0, :, 5])
    assert torch.equal(vv[1, :, 0], va[1, :, 3]) and torch.equal(vv[1, :, 2], vb[1, :, 9])


def test_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        quantize_kv(torch.zeros(1, 1, 4, 32), torch.zeros(1, 1, 4, 32), bits=2)
