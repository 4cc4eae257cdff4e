"""GPU check of the lightning attention ops: our Triton kernels, the PyTorch op and fla's chunk_simple_gla.

    python -m benchmarks.gpu_lightning [--seq-lens 2048 8192 32768 65536]

1. Correctness on CUDA, each against the float64 formula (lightning_attn_naive) at B=2, H=4, T=1000 (not a multiple of
   any chunk), D=128, with an initial state: output, final state and the gradients of q, k, v and the initial state,
   as max |error| / max |reference|. fp32 inputs; ours and the PyTorch op must be within 1e-5; fla's kernel (tf32
   matmuls) is reported with a 5e-3 bound. bf16 inputs: our kernels against the PyTorch op (2e-2).
2. Forward+backward time (CUDA events, median of 5 after 3 warm-ups) in bf16 at B=1, H=16, D=128 for each sequence
   length, with tokens/s; fla's chunk_simple_gla is called with g_gamma = -slopes and scale = 1, MiniMax-01's decay.

fla (flash-linear-attention) is an optional peer: without it its lines say SKIP. gpu_check.py calls both parts.
Import-safe: nothing runs at import; without CUDA main() says so and returns 1.
"""

from __future__ import annotations

import argparse
import json
import statistics


def _report(results: dict, name: str, ok: bool | None, **info) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    results.setdefault("checks", {})[name] = {"status": status, **info}
    print(f"[{status}] {name} {json.dumps(info)}", flush=True)


def fla_op():
    """fla's chunk_simple_gla, or None where fla is not installed."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla


def candidates() -> dict:
    """name -> fn(q, k, v, slopes, initial_state) -> (out, final_state), all on (B, H, T, D) tensors."""
    from minimax_gpt.ops.lightning import lightning_attn_chunked
    from minimax_gpt.ops.lightning.triton_ops import lightning_attn_triton

    ops = {"triton (ours)": lambda q, k, v, s, s0: lightning_attn_triton(q, k, v, s, s0, chunk_size=64),
           "pytorch op": lambda q, k, v, s, s0: lightning_attn_chunked(q, k, v, s, s0, chunk_size=256)}
    chunk_simple_gla = fla_op()
    if chunk_simple_gla is not None:
        def fla(q, k, v, slopes, s0):  # fla takes (B, T, H, D)
            out, state = chunk_simple_gla(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          g_gamma=-slopes.float(), scale=1.0, initial_state=s0,
                                          output_final_state=True)
            return out.transpose(1, 2), state
        ops["fla chunk_simple_gla"] = fla
    return ops


def _inputs(B, H, T, D, dtype, with_state=True, seed=0):
    import torch

    from minimax_gpt.ops.lightning import lightning_slopes

    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, device="cuda", dtype=dtype) * 0.3 for _ in range(3))
    s0 = torch.randn(B, H, D, D, generator=g, device="cuda") if with_state else None
    slopes = torch.cat([lightning_slopes(H, 0, 8)[: (H + 1) // 2], lightning_slopes(H, 6, 8)[: H // 2]]).cuda()
    return q, k, v, s0, slopes


def _run(fn, q, k, v, slopes, s0):
    """[out, final_state, dq, dk, dv, d_initial_state] of a fixed random loss of both outputs."""
    import torch

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v) + (() if s0 is None else (s0,))]
    out, state = fn(*leaves[:3], slopes, leaves[3] if s0 is not None else None)
    g = torch.Generator(device="cuda").manual_seed(1)
    loss = ((out.double() * torch.randn(out.shape, generator=g, device="cuda", dtype=torch.float64)).sum()
            + (state.double() * torch.randn(state.shape, generator=g, device="cuda", dtype=torch.float64)).sum())
    return [out.detach(), state.detach(), *torch.autograd.grad(loss, leaves)]


def _rel_errs(actual: list, expected: list) -> list[float]:
    return [float((a.double() - e.double()).abs().max() / e.double().abs().max()) for a, e in zip(actual, expected)]


def check_lightning_kernels(results: dict) -> None:
    import torch

    from minimax_gpt.ops.lightning import lightning_attn_naive

    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v, s0, slopes = _inputs(2, 4, 1000, 128, torch.float32)
    reference = _run(lightning_attn_naive, q, k, v, slopes, s0)
    names = ["out", "state", "dq", "dk", "dv", "ds0"]
    for name, fn in candidates().items():
        bound = 5e-3 if name.startswith("fla") else 1e-5
        try:
            errs = _rel_errs(_run(fn, q, k, v, slopes, s0), reference)
            _report(results, f"lightning fp32 vs formula: {name}", max(errs) < bound, bound=bound,
                    **{n: f"{e:.1e}" for n, e in zip(names, errs)})
        except Exception as e:  # noqa: BLE001 - one failing candidate is reported, the others still run
            _report(results, f"lightning fp32 vs formula: {name}", False, error=repr(e)[:300])
    if fla_op() is None:
        _report(results, "lightning: fla chunk_simple_gla", None, note="fla not installed")
    ops = candidates()
    half = [t.bfloat16() for t in (q, k, v)]
    errs = _rel_errs(_run(ops["triton (ours)"], *half, slopes, s0), _run(ops["pytorch op"], *half, slopes, s0))
    _report(results, "lightning bf16: triton vs pytorch op", max(errs) < 2e-2,
            **{n: f"{e:.1e}" for n, e in zip(names, errs)})


def _time_fwd_bwd(fn, q, k, v, slopes, warmup: int = 3, repeats: int = 5) -> float:
    """Median seconds of one forward+backward (CUDA events)."""
    import torch

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    d_out = torch.randn_like(v)
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out, _ = fn(*leaves, slopes, None)
        out.backward(d_out)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
        for t in leaves:
            t.grad = None
    return statistics.median(times)


def bench_lightning_kernels(results: dict, seq_lens=(2048, 8192, 16384, 32768, 65536)) -> None:
    import torch

    B, H, D = 1, 16, 128
    for T in seq_lens:
        q, k, v, _, slopes = _inputs(B, H, T, D, torch.bfloat16, with_state=False)
        row = {}
        for name, fn in candidates().items():
            try:
                row[name] = _time_fwd_bwd(fn, q, k, v, slopes)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for the PyTorch op at 64k
                row[name] = repr(e)[:200]
        results.setdefault("lightning_fwd_bwd_s", {})[T] = row
        cells = ", ".join(f"{n} {s * 1e3:.1f} ms ({B * T / s / 1e6:.2f} Mtok/s)" if isinstance(s, float)
                          else f"{n} error" for n, s in row.items())
        print(f"lightning fwd+bwd bf16 B={B} H={H} D={D} T={T}: {cells}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_lightning: no CUDA device; nothing run")
        return 1
    results: dict = {"device": torch.cuda.get_device_name()}
    check_lightning_kernels(results)
    bench_lightning_kernels(results, args.seq_lens)
    return 1 if any(c["status"] == "FAIL" for c in results["checks"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
