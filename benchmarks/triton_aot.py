"""Compile the Triton lightning kernels for NVIDIA GPUs without one: Triton's front end, its GPU passes, PTX and the
bundled ptxas, for the training shape (bf16 inputs, D = 128, chunk 64) and for fp32 and fp64 inputs. Prints each
kernel's shared memory against the per-block limit of the target and fails if one does not fit or does not compile.

    python -m benchmarks.triton_aot [--arch 80 90] [--num-warps 4] [--num-stages 3]

What a CPU machine can tell about the GPU path (the values are checked by the interpreter tests); not a test: each
compilation takes seconds. Needs triton; no CUDA device, no driver.
"""

from __future__ import annotations

import argparse
import time

# Shared memory one block may use, bytes (CUDA programming guide, "Technical Specifications per Compute Capability").
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
POINTERS = {"q", "k", "v", "o", "do", "slopes", "s0", "h", "dh", "s_final", "ds_final", "ds0", "dq_part", "dk_part",
            "dv"}
IO = {"q", "k", "v", "o", "do"}  # in the input dtype; the rest in the accumulation dtype
CASES = [  # (input dtype, accumulation dtype, D, chunk, tl.dot precision)
    ("bf16", "fp32", 128, 64, "tf32"),
    ("fp32", "fp32", 128, 64, "ieee"),
    ("fp64", "fp64", 64, 16, "ieee"),
]


def _signature(fn, io_dtype: str, acc: str, constexprs: dict) -> dict:
    return {a: "constexpr" if a in constexprs else
            "*" + (io_dtype if a in IO else acc) if a in POINTERS else "i32" for a in fn.arg_names}


def compile_all(arch: int, num_warps: int, num_stages: int) -> list[str]:
    """Compile every kernel of every case for sm_<arch>; returns the failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minimax_gpt.ops.lightning import triton_kernels as kernels

    names = ["lightning_states_kernel", "lightning_out_kernel", "lightning_dstates_kernel",
             "lightning_bwd_dq_kernel", "lightning_bwd_dkv_kernel", "lightning_recurrent_kernel"]
    failures = []
    for io_dtype, acc, D, C, precision in CASES:
        for name in names:
            fn = getattr(kernels, name)
            constexprs = dict(B=1, H=16, D=D, DV=D, BC=C, BD=D, BV=min(64, D), PRECISION=precision, HAS_S0=True,
                              HAS_DS=True)
            constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
            label = f"sm_{arch} {name} {io_dtype} D={D} C={C}"
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn, _signature(fn, io_dtype, acc, constexprs), constexprs),
                                          target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": num_warps, "num_stages": num_stages})
            except Exception as e:  # noqa: BLE001 - every kernel is tried; the failures are listed at the end
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
                print(f"[FAIL] {failures[-1]}", flush=True)
                continue
            shared, limit = compiled.metadata.shared, SMEM_LIMIT.get(arch)
            ok = limit is None or shared <= limit
            if not ok:
                failures.append(f"{label}: {shared} B of shared memory > {limit}")
            print(f"[{'PASS' if ok else 'FAIL'}] {label}: shared {shared / 1024:.0f} KiB (limit "
                  f"{limit / 1024 if limit else '?'} KiB), {time.perf_counter() - t0:.1f} s", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=3)
    args = p.parse_args(argv)
    failures = [f for arch in args.arch for f in compile_all(arch, args.num_warps, args.num_stages)]
    print(f"{len(failures)} failure(s)" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
