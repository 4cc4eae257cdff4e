"""GPU check, one GPU, under 5 minutes: every fast path against the CPU reference, then throughput.

    python -m benchmarks.gpu_check [--quick] [--out benchmarks/results/gpu_check.json]

1. Correctness (each line prints PASS / FAIL / SKIP with the max error):
   - softmax attention through SDPA (flash / memory-efficient kernel) vs the CPU math path, logits and gradients
   - the lightning layers on CUDA (the Triton kernels, and the PyTorch op forced) vs CPU, via a lightning-only model
   - the lightning ops on CUDA against the float64 formula: our Triton kernels, the PyTorch op and fla's
     chunk_simple_gla when it is installed (gpu_lightning.py), and their forward+backward time at 2k-64k tokens
   - torch._grouped_mm on CUDA bf16 vs a loop of matmuls (the experts' kernel)
   - bf16 autocast vs fp32 (loss within 2e-2)
   - torch.compile vs eager (logits within 1e-4 in fp32)
2. Training tokens/s and MFU of a ~100M-parameter hybrid MoE (8 layers, 7 lightning : 1 softmax per 8, 8 experts
   top-2) at 2k, 8k and 32k context (bf16 autocast, fixed 32k tokens per step; activation checkpointing at 32k), with
   each lightning backend (--backends: the Triton kernels at chunk 64, the PyTorch op at chunk 256).
   MFU = 6 * active_params * tokens/s (+ causal softmax attention 6 * T * C per token per softmax layer) / peak, with
   the peak bf16 dense FLOP/s from --peak-tflops (default 989, H100 / H200 SXM).
3. Decode tokens/s (batch 1 and 16, 256 new tokens after a 1024-token prompt).

Import-safe: nothing runs at import, and without CUDA `main()` says so and returns 1.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from benchmarks.gpu_lightning import bench_lightning_kernels, check_lightning_kernels


def _report(results: dict, name: str, ok: bool | None, **info) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    results.setdefault("checks", {})[name] = {"status": status, **info}
    print(f"[{status}] {name} {json.dumps(info)}", flush=True)


def _tiny_config(**overrides):
    from minimax_gpt.config import MiniMaxConfig

    base = dict(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_embd=64, hybrid_period=2,
                lightning_chunk_size=32, intermediate_size=128, use_moe=True, num_experts=4, moe_top_k=2)
    base.update(overrides)
    return MiniMaxConfig.from_dict(base)


def _forward_backward(model, x, y):
    out = model(x, targets=y)
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float().cpu(), float(out.loss), grads


def _compare_devices(results, name, config, atol=2e-4, T=200):
    import copy

    import torch

    from minimax_gpt.models.model import EnhancedMiniMaxGPT

    torch.manual_seed(0)
    ref = EnhancedMiniMaxGPT(config)
    gpu = copy.deepcopy(ref).cuda()
    ref_cpu = copy.deepcopy(ref)
    x = torch.randint(0, config.vocab_size, (2, T))
    y = torch.randint(0, config.vocab_size, (2, T))
    l_ref, loss_ref, g_ref = _forward_backward(ref_cpu.train(), x, y)
    l_gpu, loss_gpu, g_gpu = _forward_backward(gpu.train(), x.cuda(), y.cuda())
    err = float((l_ref - l_gpu).abs().max())
    gerr = max(float((g_ref[n] - g_gpu[n]).abs().max()) for n in g_ref)
    _report(results, name, err < atol and gerr < atol * 10, logits_err=err, grad_err=gerr, loss_cpu=loss_ref,
            loss_gpu=loss_gpu, T=T)


def check_correctness(results: dict) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # T = 200 is not a multiple of the chunk size (32), as the style guide asks of every fast path
    _compare_devices(results, "softmax attention: SDPA on CUDA vs CPU math",
                     _tiny_config(layer_types=["softmax", "softmax"], use_moe=False))
    _compare_devices(results, "lightning layers (auto: Triton kernels): CUDA vs CPU",
                     _tiny_config(layer_types=["lightning", "lightning"], use_moe=False))
    _compare_devices(results, "lightning layers (PyTorch op): CUDA vs CPU",
                     _tiny_config(layer_types=["lightning", "lightning"], use_moe=False, lightning_backend="torch"))
    _compare_devices(results, "hybrid MoE model: CUDA vs CPU", _tiny_config())
    try:
        import flash_attn  # noqa: F401

        _report(results, "flash_attn package", True, note="importable; SDPA is what the model uses")
    except ImportError:
        _report(results, "flash_attn package", None, note="not installed; SDPA's flash kernel is used")
    try:
        import fla  # noqa: F401

        _report(results, "flash-linear-attention package", True,
                note="importable; compared with our kernels in the lightning checks")
    except ImportError:
        _report(results, "flash-linear-attention package", None, note="not installed")

    # grouped_mm: E groups of rows through one kernel vs a loop of matmuls
    if hasattr(torch, "_grouped_mm"):
        try:
            E, C, I, A = 8, 256, 512, 1000
            x = torch.randn(A, C, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(E, C, I, device="cuda", dtype=torch.bfloat16) / math.sqrt(C)
            counts = torch.randint(50, 200, (E,))
            counts[-1] = A - int(counts[:-1].sum()) if A > int(counts[:-1].sum()) else 0
            offs = torch.cumsum(counts.clamp(min=0), 0).to(torch.int32).cuda()
            got = torch._grouped_mm(x, w, offs=offs).float()
            want, start = torch.zeros_like(got), 0
            for e in range(E):
                end = int(offs[e])
                want[start:end] = (x[start:end].float() @ w[e].float())
                start = end
            err = float((got[:start] - want[:start]).abs().max())
            _report(results, "torch._grouped_mm bf16 vs loop", err < 5e-2, err=err)
        except Exception as e:  # noqa: BLE001 - a kernel that is missing on this GPU is reported, not fatal
            _report(results, "torch._grouped_mm bf16 vs loop", False, error=repr(e)[:200])
    else:
        _report(results, "torch._grouped_mm bf16 vs loop", None, note="torch has no _grouped_mm")

    from minimax_gpt.models.model import EnhancedMiniMaxGPT

    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(_tiny_config()).cuda().eval()
    x = torch.randint(0, 512, (2, 200), device="cuda")
    y = torch.randint(0, 512, (2, 200), device="cuda")
    with torch.no_grad():
        fp32 = float(model(x, targets=y).loss)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = float(model(x, targets=y).loss)
    _report(results, "bf16 autocast vs fp32 loss", abs(fp32 - bf16) < 2e-2, fp32=fp32, bf16=bf16)
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            eager_logits = model(x).logits
            compiled_logits = compiled(x).logits
        err = float((eager_logits - compiled_logits).abs().max())
        _report(results, "torch.compile vs eager logits", err < 1e-4, err=err)
    except Exception as e:  # noqa: BLE001
        _report(results, "torch.compile vs eager logits", False, error=repr(e)[:300])


def bench_config(seq_len: int, backend: str = "auto"):
    from minimax_gpt.config import MiniMaxConfig

    return MiniMaxConfig.from_dict(dict(
        vocab_size=32768, block_size=seq_len, n_layer=8, n_head=12, n_embd=768, hybrid_period=8,
        lightning_chunk_size=256 if backend == "torch" else 64, lightning_backend=backend, intermediate_size=512,
        use_moe=True, num_experts=8, moe_top_k=2, use_checkpoint=seq_len >= 32768))


def _train_steps(model, x, steps: int) -> float:
    """Seconds per optimizer step, after two warm-up steps."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for i in range(steps + 2):
        if i == 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, targets=x, loss_chunk_size=1024).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_training(results: dict, contexts, steps: int, peak_tflops: float, backends=("triton", "torch")) -> None:
    import torch

    from minimax_gpt.models.model import EnhancedMiniMaxGPT
    from minimax_gpt.training.trainer import count_params

    for backend in backends:
        for T in contexts:
            cfg = bench_config(T, backend)
            torch.manual_seed(0)
            model = EnhancedMiniMaxGPT(cfg).cuda().train()
            total, active = count_params(model)
            B = max(1, 32768 // T)
            x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
            torch.cuda.reset_peak_memory_stats()
            try:
                dt = _train_steps(model, x, steps)
            except torch.OutOfMemoryError as e:
                _report(results, f"train {backend} T={T}", False, error=str(e)[:200])
                continue
            tok_s = B * T / dt
            n_softmax = cfg.layer_types.count("softmax")
            flops_per_token = 6 * active + 6 * n_softmax * T * cfg.n_embd  # causal: half of 12 * T * C
            mfu = tok_s * flops_per_token / (peak_tflops * 1e12)
            peak = torch.cuda.max_memory_allocated() / 2**30
            results.setdefault("train", {}).setdefault(backend, {})[T] = {
                "batch": B, "tokens_per_s": tok_s, "mfu": mfu, "params": total, "active_params": active,
                "step_s": dt, "peak_mem_gib": peak}
            print(f"train {backend} T={T}: {tok_s:,.0f} tok/s, MFU {mfu:.1%}, {total / 1e6:.0f}M params "
                  f"({active / 1e6:.0f}M active), peak {peak:.1f} GiB", flush=True)
            del model


def bench_decode(results: dict, new_tokens: int) -> None:
    import torch

    from minimax_gpt.models.model import EnhancedMiniMaxGPT

    cfg = bench_config(2048)
    model = EnhancedMiniMaxGPT(cfg).cuda().eval().to(torch.bfloat16)
    for B in (1, 16):
        prompt = torch.randint(0, cfg.vocab_size, (B, 1024), device="cuda")
        model.generate(prompt[:, :16], max_new_tokens=4, top_k=1)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, top_k=1)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        results.setdefault("decode", {})[B] = {"tokens_per_s": B * new_tokens / dt, "seconds": dt}
        print(f"decode batch {B}: {B * new_tokens / dt:,.0f} tok/s ({dt:.2f} s incl. 1024-token prefill)", flush=True)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2k and 8k only, fewer steps")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    p.add_argument("--backends", nargs="+", default=["triton", "torch"], choices=["triton", "torch"],
                   help="lightning backends to train with")
    p.add_argument("--lightning-seq-lens", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing run")
        return 1
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    start = time.perf_counter()
    check_correctness(results)
    check_lightning_kernels(results)
    bench_lightning_kernels(results, args.lightning_seq_lens[:2] if args.quick else args.lightning_seq_lens)
    contexts = (2048, 8192) if args.quick else (2048, 8192, 32768)
    bench_training(results, contexts, 3 if args.quick else args.steps, args.peak_tflops, args.backends)
    bench_decode(results, 64 if args.quick else 256)
    results["seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    failed = [n for n, c in results["checks"].items() if c["status"] == "FAIL"]
    print(f"done in {results['seconds']:.0f} s; {len(failed)} failed check(s){': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
