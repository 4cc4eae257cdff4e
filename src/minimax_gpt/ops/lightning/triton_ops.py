"""Lightning attention through the Triton kernels (triton_kernels.py), as torch.library custom ops.

    lightning_attn_triton(q, k, v, slopes, initial_state=None, chunk_size=64) -> (out, final_state)
    lightning_attn_triton_recurrent(q, k, v, slopes, initial_state=None)      -> (out, final_state)

Same arguments, results and dtypes as lightning_attn_chunked / lightning_attn_recurrent (naive.py has the formula):
float32 arithmetic and state (float64 for float64 inputs), output in the input dtype, gradients for q, k, v and the
initial state (not the slopes, fixed decay rates). The chunked op is a custom op with a registered backward, so
torch.compile calls the kernels instead of tracing them. Forward: a scan writes the state entering every chunk, then
every chunk's output is computed at once; backward: the same scan again (nothing but the inputs is saved), a reverse
scan of the state gradients, then every chunk's dq, and dk and dv, at once (triton_kernels.py). The recurrent op is
for decoding and has no backward.

On CUDA the kernels are compiled; on CPU they run through Triton's interpreter, which must be switched on with
TRITON_INTERPRET=1 (read when called, so it may be set after this module is imported). Under the interpreter the
outputs and gradients are written in the accumulation dtype and cast by torch (its bf16 stores truncate).

Shape legend: B batch, H heads, T tokens, D q/k head dim, Dv value head dim, NV value blocks.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction  # what triton.jit returns under TRITON_INTERPRET=1

from minimax_gpt.ops.lightning import triton_kernels as kernels
from minimax_gpt.ops.lightning.inputs import TRITON_MAX_HEAD_DIM, check_inputs, check_triton_chunk_size, state_dtype

__all__ = ["lightning_attn_triton", "lightning_attn_triton_recurrent"]


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET is set, read now (through Triton's knobs where it has them, 3.4 and later)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _interpreted(kernel):
    return InterpretedFunction(kernel.fn)


def _kernel(kernel, device: torch.device):
    """The kernel for tensors on `device`: compiled on CUDA, interpreted on CPU (whatever TRITON_INTERPRET said when
    triton_kernels.py was imported)."""
    if device.type == "cuda":
        return kernel
    if not interpreter_on():
        raise RuntimeError(f"the Triton lightning kernels need CUDA tensors, got {device.type}; to run them on CPU "
                           "through Triton's interpreter set TRITON_INTERPRET=1")
    return kernel if isinstance(kernel, InterpretedFunction) else _interpreted(kernel)


def _tiles(D: int, Dv: int) -> tuple[int, int, int]:
    """(BD, BV, NV): the whole q/k head dim in one tile, the value dim in NV tiles of BV <= 64 columns."""
    BD = max(16, triton.next_power_of_2(D))
    BV = min(64, max(16, triton.next_power_of_2(Dv)))
    return BD, BV, triton.cdiv(Dv, BV)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: tf32 tensor cores for half inputs (their values are exact in tf32) and for float32
    ones where torch allows TF32 matmuls (torch.set_float32_matmul_precision), else IEEE. (The interpreter ignores
    it: numpy's matmul.)"""
    if dtype in (torch.bfloat16, torch.float16):
        return "tf32"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]  # (b, h, t) of each (B, H, T, *) tensor


def _out_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Where the kernels store outputs: the input dtype, or the accumulation dtype under the interpreter."""
    return state_dtype(dtype) if device.type != "cuda" else dtype


def _new_out(v: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, T, Dv) output stored as (B, T, H, Dv), so the layer's merge of the heads is a view."""
    B, H, T, Dv = v.shape
    return v.new_empty((B, T, H, Dv), dtype=_out_dtype(v.dtype, v.device)).transpose(1, 2)


def _forward(q, k, v, slopes, initial_state, chunk_size):
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    q, k, v = (_last_contiguous(x) for x in (q, k, v))
    lam = slopes.detach().to(device=q.device, dtype=acc).contiguous()  # (H,)
    s0 = None if initial_state is None else initial_state.detach().to(acc).contiguous()  # (B, H, D, Dv)
    if T == 0:  # nothing to launch; a new tensor, never the caller's
        return v.new_empty(v.shape), q.new_zeros((B, H, D, Dv), dtype=acc) if s0 is None else s0.clone()
    out, s_final = _new_out(v), q.new_empty((B, H, D, Dv), dtype=acc)
    BD, BV, NV = _tiles(D, Dv)
    N = triton.cdiv(T, chunk_size)
    h = q.new_empty((B * H, N, D, Dv), dtype=acc)  # the state entering each chunk
    tiles = dict(H=H, D=D, DV=Dv, BC=chunk_size, BD=BD, BV=BV, PRECISION=_precision(q.dtype))
    _kernel(kernels.lightning_states_kernel, q.device)[(NV, B * H)](
        k, v, lam, s_final if s0 is None else s0, h, s_final, *_strides(k, v), T, HAS_S0=s0 is not None, **tiles)
    _kernel(kernels.lightning_out_kernel, q.device)[(N, NV, B * H)](
        q, k, v, lam, h, out, *_strides(q, k, v, out), T, **tiles)
    return out.to(q.dtype), s_final


def _backward(q, k, v, slopes, initial_state, d_out, d_state, chunk_size):
    """(dq, dk, dv in the input dtype, d_initial_state in the accumulation dtype)."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    q, k, v = (_last_contiguous(x) for x in (q, k, v))
    d_out = v.new_zeros(v.shape) if d_out is None else _last_contiguous(d_out)  # (B, H, T, Dv)
    lam = slopes.detach().to(device=q.device, dtype=acc).contiguous()
    s0 = None if initial_state is None else initial_state.detach().to(acc).contiguous()
    ds = None if d_state is None else d_state.to(acc).contiguous()
    if T == 0:
        d_init = q.new_zeros((B, H, D, Dv), dtype=acc) if ds is None else ds.clone()
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_init
    BD, BV, NV = _tiles(D, Dv)
    N = triton.cdiv(T, chunk_size)
    h, dh = (q.new_empty((B * H, N, D, Dv), dtype=acc) for _ in range(2))  # S entering / G leaving each chunk
    dq_part, dk_part = (q.new_empty((NV, B, H, T, D), dtype=acc) for _ in range(2))  # sums over the value blocks
    dv = v.new_empty((B, H, T, Dv), dtype=acc)
    d_init, s_final = (q.new_empty((B, H, D, Dv), dtype=acc) for _ in range(2))
    tiles = dict(H=H, D=D, DV=Dv, BC=chunk_size, BD=BD, BV=BV, PRECISION=_precision(q.dtype))
    _kernel(kernels.lightning_states_kernel, q.device)[(NV, B * H)](  # the forward's states again (s_final unused)
        k, v, lam, s_final if s0 is None else s0, h, s_final, *_strides(k, v), T, HAS_S0=s0 is not None, **tiles)
    _kernel(kernels.lightning_dstates_kernel, q.device)[(NV, B * H)](
        q, d_out, lam, d_init if ds is None else ds, dh, d_init, *_strides(q, d_out), T, HAS_DS=ds is not None,
        **tiles)
    _kernel(kernels.lightning_bwd_dq_kernel, q.device)[(N, NV, B * H)](
        k, v, d_out, lam, h, dq_part, *_strides(k, v, d_out), T, B=B, **tiles)
    _kernel(kernels.lightning_bwd_dkv_kernel, q.device)[(N, NV, B * H)](
        q, k, v, d_out, lam, dh, dk_part, dv, *_strides(q, k, v, d_out), T, B=B, **tiles)
    return dq_part.sum(0).to(q.dtype), dk_part.sum(0).to(k.dtype), dv.to(v.dtype), d_init


@torch.library.custom_op("minimax_gpt::lightning_triton", mutates_args=())
def _triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
               initial_state: torch.Tensor | None, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, slopes, initial_state, chunk_size)


@_triton_op.register_fake
def _(q, k, v, slopes, initial_state, chunk_size):
    B, H, _, D = q.shape
    return _new_out(v).to(v.dtype), q.new_empty((B, H, D, v.shape[-1]), dtype=state_dtype(q.dtype))


@torch.library.custom_op("minimax_gpt::lightning_triton_backward", mutates_args=())
def _triton_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        initial_state: torch.Tensor | None, d_out: torch.Tensor | None, d_state: torch.Tensor | None,
                        chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q, k, v, slopes, initial_state, d_out, d_state, chunk_size)


@_triton_backward_op.register_fake
def _(q, k, v, slopes, initial_state, d_out, d_state, chunk_size):
    B, H, _, D = q.shape
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((B, H, D, v.shape[-1]), dtype=state_dtype(q.dtype)))


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    q, k, v, slopes, initial_state, chunk_size = inputs
    ctx.save_for_backward(q, k, v, slopes, initial_state)
    ctx.chunk_size = chunk_size


def _triton_backward(ctx, d_out, d_state):
    q, k, v, slopes, initial_state = ctx.saved_tensors
    dq, dk, dv, d_init = _triton_backward_op(q, k, v, slopes, initial_state, d_out, d_state, ctx.chunk_size)
    d_init = None if initial_state is None else d_init.to(initial_state.dtype)
    return dq, dk, dv, None, d_init, None


_triton_op.register_autograd(_triton_backward, setup_context=_setup_context)


@torch.library.custom_op("minimax_gpt::lightning_triton_recurrent", mutates_args=())
def _recurrent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                  initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    acc = state_dtype(q.dtype)
    q, k, v = (_last_contiguous(x) for x in (q, k, v))
    lam = slopes.detach().to(device=q.device, dtype=acc).contiguous()
    s0 = None if initial_state is None else initial_state.to(acc).contiguous()
    out, s_final = _new_out(v), q.new_empty((B, H, D, Dv), dtype=acc)
    BD, BV, NV = _tiles(D, Dv)
    _kernel(kernels.lightning_recurrent_kernel, q.device)[(NV, B * H)](
        q, k, v, lam, s_final if s0 is None else s0, out, s_final, *_strides(q, k, v, out), T,
        H=H, D=D, DV=Dv, BD=BD, BV=BV, HAS_S0=s0 is not None, PRECISION=_precision(q.dtype))
    return out.to(q.dtype), s_final


@_recurrent_op.register_fake
def _(q, k, v, slopes, initial_state):
    B, H, _, D = q.shape
    return _new_out(v).to(v.dtype), q.new_empty((B, H, D, v.shape[-1]), dtype=state_dtype(q.dtype))


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lightning_attn_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                          initial_state: torch.Tensor | None = None,
                          chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked lightning attention through the Triton kernels: same values as ``lightning_attn_chunked``.

    chunk_size is the kernels' tile of tokens (one of inputs.TRITON_CHUNK_SIZES); it does not change the result.
    """
    check_inputs(q, k, v, slopes, initial_state)
    check_triton_chunk_size(chunk_size)
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"q and k head dim must be <= {TRITON_MAX_HEAD_DIM} for the Triton lightning kernels, got "
                         f"{q.shape[-1]}")
    if _grad_wanted(q, k, v, slopes, initial_state) and slopes.requires_grad:
        raise ValueError("lightning_attn_triton gives no gradient for slopes (fixed decay rates); pass slopes without "
                         "requires_grad, or use lightning_attn_chunked(backward='autograd')")
    with torch.autocast(device_type=q.device.type, enabled=False):
        return _triton_op(q, k, v, slopes, initial_state, chunk_size)


def lightning_attn_triton_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                                    initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-by-token recurrence through a Triton kernel, for decoding: same values as
    ``lightning_attn_recurrent``, without a backward (use ``lightning_attn_triton`` where gradients are needed)."""
    check_inputs(q, k, v, slopes, initial_state)
    if _grad_wanted(q, k, v, slopes, initial_state):
        raise ValueError("lightning_attn_triton_recurrent has no backward (it is the decoding step); call it under "
                         "torch.no_grad, or use lightning_attn_triton for gradients")
    return _recurrent_op(q, k, v, slopes, initial_state)
