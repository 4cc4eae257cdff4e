import torch

from minimax_gpt.norm import RMSNorm


def test_rmsnorm_formula_and_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=1e-12)  # float64 stays float64


def test_rmsnorm_is_fp16_safe():
    norm = RMSNorm(64)
    x = torch.full((2, 64), 1000.0, dtype=torch.float16)  # x^2 = 1e6 overflows fp16 (max 65504)
    y = norm(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), torch.ones(2, 64), rtol=1e-3, atol=1e-3)
    yb = norm(torch.randn(2, 64).to(torch.bfloat16) * 1e4)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()
