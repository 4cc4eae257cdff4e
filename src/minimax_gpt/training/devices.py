"""Where and in what precision training and evaluation run: the device, the autocast precision, torch.compile."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but CUDA is not available")
    return device


def compile_for_training(module: nn.Module, config) -> nn.Module:
    """`torch.compile(module)` for the training step; checkpoints keep saving the uncompiled model. Dropless MoE sizes
    its expert buffer from the routing (one `.item()` per layer, minimax_gpt/models/moe.py): dynamo is told to capture it as
    a data-dependent size, so the forward stays one graph (tests/test_model.py checks there is no break)."""
    if config.use_moe and config.moe_capacity_factor is None:
        torch._dynamo.config.capture_scalar_outputs = True
        logger.info("torch.compile: capture_scalar_outputs on (dropless MoE sizes its expert buffer from the routing)")
    return torch.compile(module)


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' (with a gradient scaler) needs CUDA; on CPU use 'bf16' or 'fp32'")
    if name == "bf16" and device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        logger.warning("precision bf16 on a CPU without AVX-512 (%s): bf16 matmuls have no hardware path here and "
                       "run far slower than fp32 (44x for a 2048x256x704 matmul on the 2-core AVX2 machine of "
                       "docs/performance.md); 'fp32' is the fast choice on this CPU",
                       torch.backends.cpu.get_cpu_capability())
    return name


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
