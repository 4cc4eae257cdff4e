import torch

from minimax_gpt.models.norm import RMSNorm


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


def _explicit(norm, x):
    """The formula written out, as the module computes it for fp16/bf16 inputs."""
    xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return xf * norm.weight


def test_fused_path_equals_the_formula_with_gradients():
    # float32 and float64 inputs (with weights of the same dtype) take torch's fused rms_norm
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):
        torch.manual_seed(0)
        norm = RMSNorm(48, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
        x = torch.randn(4, 7, 48, dtype=dtype, requires_grad=True)
        g = torch.randn(4, 7, 48, dtype=dtype)
        y = norm(x)
        gx, gw = torch.autograd.grad(y, (x, norm.weight), g)
        y_ref = _explicit(norm, x)
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, norm.weight), g)
        assert y.dtype == dtype
        torch.testing.assert_close(y, y_ref, rtol=0, atol=tol)
        torch.testing.assert_close(gx, gx_ref, rtol=0, atol=10 * tol)
        torch.testing.assert_close(gw, gw_ref, rtol=0, atol=100 * tol)
