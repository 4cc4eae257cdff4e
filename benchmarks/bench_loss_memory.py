"""Peak memory of one training step (forward + backward + AdamW step) of the minimax_200k config at batch 4 x 512,
with the chunked loss (train.loss_chunk_size) against the plain loss. Each variant runs in its own process; CPU peak
is the process's maximum resident set size, CUDA peak is torch.cuda.max_memory_allocated.

    python benchmarks/bench_loss_memory.py            # both variants, prints one JSON line each

Measured on the 2-core CPU machine (torch 2.13, fp32, loaded by other jobs): plain 9.98 GiB, chunked (1024) 7.27 GiB
peak RSS (1.44 GiB before the step; 221M parameters), the same loss 10.9886.
"""

import json
import resource
import subprocess
import sys
import time


def one(chunk: int) -> dict:
    import torch

    from minimax_gpt import EnhancedMiniMaxGPT
    from minimax_gpt.training.run_config import load_run_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run_config("minimax_200k")
    config = run.model_config(vocab_size=200019)
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (4, 512), device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model(x, targets=x, loss_chunk_size=chunk)
    out.loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"loss": "chunked" if chunk else "plain", "loss_chunk_size": chunk, "device": str(device),
            "peak_GiB": round(peak, 2), "before_step_GiB": round(base, 2), "params": model.num_params(),
            "loss_value": round(float(out.loss.detach()), 4), "step_seconds": round(seconds, 1)}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(one(int(sys.argv[1]))))
    else:
        for chunk in (0, 1024):
            subprocess.run([sys.executable, __file__, str(chunk)], check=True)
