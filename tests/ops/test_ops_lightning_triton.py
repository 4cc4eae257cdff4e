"""The Triton lightning kernels on CPU through Triton's interpreter, against the float64 formula (naive.py).

TRITON_INTERPRET=1 is set per test (monkeypatch): the op reads it when called and runs the kernels interpreted on CPU
tensors, whatever the variable said when the kernel module was imported. Skipped only where Triton cannot be imported.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not importable (it is part of the dev install: pip install -e .[dev])")

from minimax_gpt.ops.lightning import (lightning_attn_chunked, lightning_attn_naive,  # noqa: E402
                                       lightning_attn_recurrent, lightning_slopes)
from minimax_gpt.ops.lightning.triton_ops import (lightning_attn_triton,  # noqa: E402
                                                  lightning_attn_triton_recurrent)

F32, F64 = torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(B, H, T, D, Dv, dtype, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g, dtype=F64).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g, dtype=F64).to(dtype)
    s0 = torch.randn(B, H, D, Dv, generator=g, dtype=F64).to(dtype) if with_state else None
    # Slopes of an early layer of 4 (fast decays) next to a late one (almost none), so every decay term matters.
    slopes = torch.cat([lightning_slopes(H, 0, 4)[: (H + 1) // 2], lightning_slopes(H, 3, 4)[: H // 2]])
    return q, k, v, s0, slopes.to(dtype)


def run_with_grads(fn, q, k, v, s0, slopes, **kw):
    """Output, final state and the gradients of a fixed random loss of both w.r.t. q, k, v (and s0)."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v) + (() if s0 is None else (s0,))]
    out, state = fn(*leaves[:3], slopes, leaves[3] if s0 is not None else None, **kw)
    g = torch.Generator().manual_seed(1)
    loss = ((out * torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)).sum()
            + (state * torch.randn(state.shape, generator=g, dtype=F64).to(state.dtype)).sum())
    return [out.detach(), state.detach(), *torch.autograd.grad(loss, leaves)]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def assert_matches(actual: list, expected: list, tol: float) -> None:
    names = ["out", "final_state", "dq", "dk", "dv", "d_initial_state"]
    assert len(actual) == len(expected)
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert max_rel_err(a, e) < tol, (name, max_rel_err(a, e))


# (B, H, T, D, Dv, chunk, with an initial state): T a multiple of the chunk and not, each with and without an initial
# state, several heads, head dims 64 and 128, D != Dv, batch 1 and 2.
CASES = [
    (2, 2, 48, 64, 64, 16, False),
    (2, 2, 48, 64, 64, 16, True),
    (2, 3, 37, 64, 64, 16, True),
    (1, 2, 33, 128, 128, 32, False),
    (2, 1, 64, 128, 128, 64, True),
    (1, 4, 21, 6, 5, 16, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda s: "B{}H{}T{}D{}Dv{}C{}-state{}".format(*s))
def test_triton_chunked_matches_the_formula_fp32(case):
    B, H, T, D, Dv, C, with_state = case
    q, k, v, s0, slopes = make_inputs(B, H, T, D, Dv, F32, with_state)
    expected = run_with_grads(lightning_attn_naive, q, k, v, s0, slopes)
    actual = run_with_grads(lightning_attn_triton, q, k, v, s0, slopes, chunk_size=C)
    assert_matches(actual, expected, 1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 37, 64, 64, 16), (1, 2, 33, 128, 128, 32)],
                         ids=lambda s: "B{}H{}T{}D{}Dv{}C{}".format(*s))
def test_triton_chunked_matches_the_formula_fp64(shape):
    B, H, T, D, Dv, C = shape
    q, k, v, s0, slopes = make_inputs(B, H, T, D, Dv, F64, True)
    expected = run_with_grads(lightning_attn_naive, q, k, v, s0, slopes)
    actual = run_with_grads(lightning_attn_triton, q, k, v, s0, slopes, chunk_size=C)
    assert_matches(actual, expected, 1e-12)


def test_triton_chunked_equals_the_pytorch_op_on_strided_views_and_bf16():
    """The layer passes q, k, v as views of one (B, T, H, 3D) tensor; bf16 inputs give the PyTorch op's bf16 output
    (both compute in float32) and the same float32 state."""
    B, H, T, D = 2, 2, 40, 64
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, H, 3 * D, generator=g)
    q, k, v = qkv.transpose(1, 2).split(D, dim=-1)  # 3 x (B, H, T, D), non-contiguous
    s0, slopes = torch.randn(B, H, D, D, generator=g), lightning_slopes(H, 1, 4)
    expected = run_with_grads(lightning_attn_chunked, q, k, v, s0, slopes, chunk_size=16)
    actual = run_with_grads(lightning_attn_triton, q, k, v, s0, slopes, chunk_size=16)
    assert_matches(actual, expected, 1e-5)
    with torch.no_grad():
        half = [t.bfloat16() for t in (q, k, v)]
        out, state = lightning_attn_triton(*half, slopes, s0, chunk_size=16)
        ref_out, ref_state = lightning_attn_chunked(*half, slopes, s0, chunk_size=16)
    assert out.dtype == torch.bfloat16 and state.dtype == F32
    torch.testing.assert_close(out, ref_out)  # bf16's own tolerance: the float32 results round to bf16
    assert max_rel_err(state, ref_state) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-5), (F64, 1e-12)])
def test_triton_decode_steps_equal_the_chunked_forward(dtype, tol):
    """Prefill 19 tokens with the chunked kernel, then decode one token at a time (and once three at a time) with the
    recurrent kernel: every output and the final state equal one chunked forward over all 25 tokens, and each step
    equals the PyTorch recurrence from the same state."""
    B, H, T, D = 2, 3, 25, 64
    q, k, v, s0, slopes = make_inputs(B, H, T, D, D, dtype, True)
    with torch.no_grad():
        full_out, full_state = lightning_attn_triton(q, k, v, slopes, s0, chunk_size=16)
        out, state = lightning_attn_triton(q[:, :, :19], k[:, :, :19], v[:, :, :19], slopes, s0, chunk_size=16)
        outs = [out]
        for start, end in ((19, 20), (20, 21), (21, 24), (24, 25)):
            step = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], slopes, state)
            out, new_state = lightning_attn_triton_recurrent(*step)
            ref_out, ref_state = lightning_attn_recurrent(*step)
            assert max_rel_err(out, ref_out) < tol and max_rel_err(new_state, ref_state) < tol
            outs.append(out)
            state = new_state
    assert max_rel_err(torch.cat(outs, dim=2), full_out) < tol
    assert max_rel_err(state, full_state) < tol


def test_triton_op_passes_opcheck_and_compiles_as_one_op():
    """A torch.library custom op (schema, fake functions, autograd registration): torch.compile calls it rather than
    tracing into the kernels, and gives the eager values."""
    q, k, v, s0, slopes = make_inputs(1, 2, 21, 16, 16, F32, True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s0)]
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # compiling: below, once
    torch.library.opcheck(torch.ops.minimax_gpt.lightning_triton.default, (*leaves[:3], slopes, leaves[3], 16),
                          test_utils=checks)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.minimax_gpt.lightning_triton_recurrent.default, (q, k, v, slopes, None),
                              test_utils=checks)
    compiled = torch.compile(lightning_attn_triton, backend="aot_eager", fullgraph=True)
    assert_matches(run_with_grads(compiled, q, k, v, s0, slopes, chunk_size=16),
                   run_with_grads(lightning_attn_triton, q, k, v, s0, slopes, chunk_size=16), 1e-7)


def test_triton_ops_refuse_what_they_cannot_do(monkeypatch):
    q, k, v, s0, slopes = make_inputs(1, 2, 5, 16, 16, F32, True)
    with pytest.raises(ValueError, match="chunk_size .* one of"):
        lightning_attn_triton(q, k, v, slopes, s0, chunk_size=24)
    with pytest.raises(ValueError, match="head dim must be <= 128"):
        lightning_attn_triton(*(torch.zeros(1, 2, 5, 256) for _ in range(3)), slopes)
    with pytest.raises(ValueError, match="slopes"):
        lightning_attn_triton(q.requires_grad_(True), k, v, slopes.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="no backward"):
        lightning_attn_triton_recurrent(q, k, v, slopes, s0)
    monkeypatch.delenv("TRITON_INTERPRET")
    with torch.no_grad(), pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        lightning_attn_triton(q, k, v, slopes, s0)


def test_triton_empty_sequence_returns_the_initial_state():
    q, k, v, s0, slopes = make_inputs(2, 2, 0, 16, 16, F32, True)
    out, state, dq, dk, dv, ds0 = run_with_grads(lightning_attn_triton, q, k, v, s0, slopes, chunk_size=16)
    assert out.shape == (2, 2, 0, 16) and dq.shape == q.shape and dv.shape == v.shape
    torch.testing.assert_close(state, s0, rtol=0, atol=0)
    expected = run_with_grads(lightning_attn_naive, q, k, v, s0, slopes)
    torch.testing.assert_close(ds0, expected[5], rtol=0, atol=0)  # the final state's weights, passed straight back


def test_triton_dot_precision_follows_torch_for_float32():
    """On the GPU, float32 inputs use IEEE matmuls unless torch allows TF32 ones; half inputs always use TF32 (their
    values are exact in it). (The interpreter ignores the setting.)"""
    from minimax_gpt.ops.lightning.triton_ops import _precision

    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert [_precision(d) for d in (F32, F64, torch.bfloat16)] == ["ieee", "ieee", "tf32"]
        torch.set_float32_matmul_precision("high")
        assert [_precision(d) for d in (F32, F64, torch.float16)] == ["tf32", "ieee", "tf32"]
    finally:
        torch.set_float32_matmul_precision(previous)
