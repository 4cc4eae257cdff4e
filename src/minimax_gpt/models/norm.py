"""RMSNorm that is safe in fp16/bf16: statistics in float32 (or float64 for float64 input), result in the input
dtype.

For float32 / float64 training on CPU the module runs `_RMSNormFunction`: the forward is F.rms_norm's arithmetic op
for op (bit-identical, tests/models/test_norm.py), the backward is written by hand. Autograd through F.rms_norm's CPU
composite (pow, mean, add, rsqrt, mul, mul) replays each op's derivative, about fifteen passes over the activations;
the closed form below takes seven (issue 21: 1.2-1.5x on the norm's forward + backward, ~3% of the dense step).
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the mean and the division in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype:
            if (x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and (x.requires_grad or self.weight.requires_grad)):
                return _RMSNormFunction.apply(x, self.weight, self.eps)
            # the same arithmetic in one fused kernel (bit-identical on CPU, tests/models/test_norm.py); inductor
            # fuses it under torch.compile, and without gradients there is no backward to save
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _RMSNormFunction(torch.autograd.Function):
    """y = xhat * w with xhat = x * r, r = rsqrt(mean(x^2) + eps) over the last dim (C), x and w of one float dtype.

    Backward, with gw = g * w:  dx = r * (gw - xhat * mean(gw * xhat)),  dw = sum over rows of g * xhat.
    Saves xhat and r (the size of x, plus one value per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1), as F.rms_norm computes it
        xhat = x * rstd  # (..., C)
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gw = grad * weight  # (..., C)
            m = (gw * xhat).mean(-1, keepdim=True)  # (..., 1)
            dx = torch.addcmul(gw * rstd, xhat, m * rstd, value=-1)
        if ctx.needs_input_grad[1]:
            dw = (grad * xhat).reshape(-1, xhat.shape[-1]).sum(0)  # (C,)
        return dx, dw, None
