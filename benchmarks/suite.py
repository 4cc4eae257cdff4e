"""The benchmark suite (issue 7): our model against the implementations a user would pick instead, side by side in one
process, fed the same config and weights.

    python -m benchmarks.suite [--suite default|quick|train|dense|inference|decode|generate|mfu|memory|compile|bf16]
                               [--quick] [--threads 2] [--out benchmarks/results/suite.json]

Peers: transformers' `MiniMaxForCausalLM` built by `interop.hf.to_hf` (identical weights and logits), and for the
dense softmax configuration transformers' `LlamaForCausalLM` with our weights copied in (checked: same logits).
These machines are shared and noisy, so every comparison interleaves the peers' repeats (A B B A ...), reports the
median and the min/max spread of each side, and the ratio of medians; the load average is recorded before and after.

Rows and how each is measured:
  train          training step (forward + backward + AdamW(fused)) tokens/s, small hybrid MoE, ours vs HF MiniMax
  train_dense    the same for the dense softmax pre-norm configuration, ours vs HF Llama
  prefill        forward with an empty cache, last-token logits, tokens/s, ours vs HF MiniMax
  decode         one-token steps at context 256 and 8k of an all-lightning model (ours), HF MiniMax at 256
  generate       256 new tokens after a 512-token prompt, greedy, with the cache, ours vs HF `generate`; and the
                 floor: the decode step's weight matmuls alone (`decode_matmul_floor`), the time no fp32 step can beat
  mfu            model FLOPs of our training step / step time, against fp32 matmul GFLOP/s measured in the same run
  memory         peak RSS of one training step of a 200k-vocabulary model, chunked vs plain loss (one subprocess each)
  compile        training step with `torch.compile(model)` vs eager (+ compile time, graph breaks), with
                 `torch._dynamo.config.capture_scalar_outputs = True` for the dropless MoE (minimax_gpt/models/moe.py)
  bf16           training step under bf16 autocast vs fp32
  nanogpt        the dense training step at nanoGPT's Shakespeare-char CPU recipe (configs/shakespeare_char_cpu.toml:
                 4 layers, n_embd 128, B12 x T64, vocab 65) against a nanoGPT-architecture reference written here
                 (benchmarks/nanogpt_ref.py: LayerNorm with bias, GELU MLP 4x, learned positions, tied embeddings,
                 causal SDPA), each with its own recipe's step: forward, backward, clip at 1.0, AdamW (ours fused as
                 `training.optim.make_optimizer`; nanoGPT's fused only on CUDA, so foreach here, and also timed with
                 the fused kernel); per-round ratios and main-thread CPU time beside the wall time
  decode_floor   one decode step of the hybrid MoE at batch 1 after a 512-token prompt (ours with the cache, eager and
                 as the compiled static step of models/static_decode.py; HF MiniMax with its cache), interleaved with
                 `decode_matmul_floor`'s step; wall and CPU time per step; the generate row also runs
                 `generate(compile_step=True)`, its first (compiling) call timed apart
  nanogpt_compile  the same with `torch.compile` on both models (not in the default suite: compiling takes minutes)

Model FLOPs (the `mfu` row) are counted, not measured: 6 * (active matmul parameters) * tokens, where active means the
parameters a token multiplies (top-k of E experts, the router, the lm_head whether tied or not; not the embedding
lookup or norms), plus attention: a softmax layer's causal scores and weighted sum, 3 * 2 * 2 * B * H * D * T^2 / 2, and
a lightning layer's chunked form, 3 * 2 * B * H * D * T * (2 * chunk + 2 * D) (the intra-chunk products are computed in
full, so they are counted in full; the state products are q S and k^T v).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from minimax_gpt import EnhancedMiniMaxGPT, MiniMaxConfig
from minimax_gpt.models import static_decode
from minimax_gpt.training.hostmem import tune_malloc

ROOT = Path(__file__).resolve().parent.parent

SUITES = {
    "default": ["train", "train_dense", "prefill", "decode", "generate", "mfu", "memory", "compile", "bf16"],
    "train": ["train"],
    "dense": ["train_dense"],
    "inference": ["prefill", "decode", "generate"],
    "prefill": ["prefill"],
    "decode": ["decode"],
    "generate": ["generate"],
    "mfu": ["mfu"],
    "memory": ["memory"],
    "compile": ["compile"],
    "bf16": ["bf16"],
    "nanogpt": ["nanogpt", "nanogpt_compile"],
    "decode_floor": ["decode_floor"],
}


# --- configs -------------------------------------------------------------------------------------------------------
def moe_config(**changes) -> MiniMaxConfig:
    """The small hybrid MoE configuration, post-norm so that transformers' MiniMax can hold it. z-loss off: transformers
    has none, so both sides compute the same loss (cross-entropy + 0.01 * load balance)."""
    base = dict(n_layer=4, layer_types=["lightning", "lightning", "lightning", "softmax"], n_embd=256, n_head=4,
                vocab_size=4096, block_size=1024, use_moe=True, num_experts=4, moe_top_k=2, moe_z_loss_coef=0.0,
                use_post_layernorm=True)
    base.update(changes)
    return MiniMaxConfig(**base)


def dense_config(**changes) -> MiniMaxConfig:
    """The dense softmax configuration: pre-norm, SwiGLU, RoPE, tied embeddings, as Llama."""
    base = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, block_size=1024, use_hybrid_attn=False,
                use_moe=False, use_post_layernorm=False, tie_word_embeddings=True)
    base.update(changes)
    return MiniMaxConfig(**base)


def hf_minimax(model: EnhancedMiniMaxGPT):
    from minimax_gpt.interop.hf import to_hf

    return to_hf(model, output_router_logits=model.config.use_moe)


def hf_llama(model: EnhancedMiniMaxGPT):
    """transformers' LlamaForCausalLM with our dense softmax model's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.use_moe or c.use_post_layernorm or any(t != "softmax" for t in c.layer_types):
        raise ValueError("hf_llama needs a dense, pre-norm, all-softmax config")
    lc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                     head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                     rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings, attention_bias=False,
                     mlp_bias=False, hidden_act="silu", attn_implementation="sdpa")
    hf = LlamaForCausalLM(lc)
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.wte.weight)
        hf.model.norm.weight.copy_(model.ln_f.weight)
        if not c.tie_word_embeddings:
            hf.lm_head.weight.copy_(model.lm_head.weight)
        for ours, theirs in zip(model.blocks, hf.model.layers):
            q, k, v = ours.attn.qkv_proj.weight.split((H * D, Hkv * D, Hkv * D))
            theirs.self_attn.q_proj.weight.copy_(q)
            theirs.self_attn.k_proj.weight.copy_(k)
            theirs.self_attn.v_proj.weight.copy_(v)
            theirs.self_attn.o_proj.weight.copy_(ours.attn.o_proj.weight)
            theirs.input_layernorm.weight.copy_(ours.norm1.weight)
            theirs.post_attention_layernorm.weight.copy_(ours.norm2.weight)
            theirs.mlp.gate_proj.weight.copy_(ours.mlp.w1.weight)
            theirs.mlp.up_proj.weight.copy_(ours.mlp.w3.weight)
            theirs.mlp.down_proj.weight.copy_(ours.mlp.w2.weight)
    return hf


def max_logit_diff(model, hf, ids) -> float:
    with torch.no_grad():
        return float((model(ids).logits - hf(input_ids=ids).logits).abs().max())


# --- timing --------------------------------------------------------------------------------------------------------
def interleaved(fns: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: warm-up calls first, then `repeats` rounds, each calling every function once,
    the order reversed every other round so that neither side always runs right after the other."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def rate(work: float, times: list[float]) -> dict:
    """work per second at the median time, and at the slowest / fastest repeat."""
    return dict(median=work / statistics.median(times), min=work / max(times), max=work / min(times),
                seconds=[round(t, 5) for t in times])


def train_step(model, x, y, forward, autocast_dtype=None):
    """A closure running forward + backward + AdamW(fused) on fixed data; forward(model, x, y) -> loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = forward(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_loss(model, x, y):
    return model(x, targets=y).loss


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y).loss


def batch(config, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, config.vocab_size, (B, T), generator=g),
            torch.randint(0, config.vocab_size, (B, T), generator=g))


# --- rows ----------------------------------------------------------------------------------------------------------
def _train_row(a, row: str, what: str, model, hf, peer_name: str, extra_notes: str = "") -> list[dict]:
    """Our training step against the peer's, same weights and batch, repeats interleaved."""
    x, y = batch(model.config, a.batch, a.seq)
    diff = max_logit_diff(model.eval(), hf.eval(), x[:1])
    t = interleaved({"ours": train_step(model, x, y, ours_loss), "peer": train_step(hf, x, y, hf_loss)},
                    a.warmup, a.repeats)
    tok = a.batch * a.seq
    return [dict(row=row, what=f"training step, {what}, B{a.batch} x T{a.seq}", unit="tokens/s",
                 ours=rate(tok, t["ours"]), peer=rate(tok, t["peer"]), peer_name=peer_name,
                 notes=f"max |logit diff| {diff:.1e}{extra_notes}")]


def row_train(a) -> list[dict]:
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config())
    hf = hf_minimax(model)
    return _train_row(a, "train", "hybrid MoE", model, hf, "HF MiniMax",
                      f"; HF experts={hf.config._experts_implementation}")


def row_train_dense(a) -> list[dict]:
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(dense_config())
    return _train_row(a, "train_dense", "dense softmax", model, hf_llama(model), "HF Llama")


def row_prefill(a) -> list[dict]:
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config()).eval()
    hf = hf_minimax(model).eval()
    B, T = a.prefill
    x, _ = batch(model.config, B, T)

    def ours():
        with torch.no_grad():
            model(x, cache=model.new_cache(B, capacity=T), logits_to_keep=1)

    def peer():
        with torch.no_grad():
            hf(input_ids=x, use_cache=True, logits_to_keep=1)

    t = interleaved({"ours": ours, "peer": peer}, a.warmup, a.repeats)
    return [dict(row="prefill", what=f"prefill, hybrid MoE, B{B} x T{T}", unit="tokens/s",
                 ours=rate(B * T, t["ours"]), peer=rate(B * T, t["peer"]), peer_name="HF MiniMax")]


def _prefill_cache(model, ids, chunk=2048):
    cache = model.new_cache(ids.shape[0], capacity=ids.shape[1] + 4096)
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(ids[:, s:s + chunk], cache=cache, logits_to_keep=1)
    return cache


def row_decode(a) -> list[dict]:
    """Per-token decode of an all-lightning model at two context lengths, steps interleaved between the two caches;
    HF MiniMax at the short context (its lightning cache is a state too)."""
    torch.manual_seed(0)
    config = moe_config(layer_types=["lightning"] * 4, block_size=16384)
    model = EnhancedMiniMaxGPT(config).eval()
    hf = hf_minimax(model).eval()
    short, long = a.contexts
    ids, _ = batch(config, 1, long)
    caches = {short: _prefill_cache(model, ids[:, :short]), long: _prefill_cache(model, ids)}
    tok = ids[:, -1:]
    with torch.no_grad():
        out = hf(input_ids=ids[:, :short], use_cache=True)
    pkv, pos = out.past_key_values, [short]

    def ours(ctx):
        def step():
            with torch.no_grad():
                model(tok, cache=caches[ctx], logits_to_keep=1)
        return step

    def peer():
        with torch.no_grad():
            hf(input_ids=tok, past_key_values=pkv, position_ids=torch.tensor([[pos[0]]]), use_cache=True)
        pos[0] += 1

    t = interleaved({"short": ours(short), "long": ours(long), "peer": peer}, 3, a.decode_steps)
    ratio = statistics.median(t["long"]) / statistics.median(t["short"])
    return [dict(row="decode_short", what=f"decode, all-lightning MoE, context {short}, B1", unit="tokens/s",
                 ours=rate(1, t["short"]), peer=rate(1, t["peer"]), peer_name="HF MiniMax"),
            dict(row="decode_long", what=f"decode, all-lightning MoE, context {long}, B1", unit="tokens/s",
                 ours=rate(1, t["long"]), peer=None,
                 notes=f"time per token at {long} / at {short}: {ratio:.3f} (target <= 1.15)")]


def row_generate(a) -> list[dict]:
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config()).eval()
    hf = hf_minimax(model).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    P, N = a.generate
    prompt, _ = batch(model.config, 1, P)
    outs = {}

    def ours():
        outs["ours"] = model.generate(prompt, N, temperature=0, compile_step=False)

    def compiled():
        outs["compiled"] = model.generate(prompt, N, temperature=0, compile_step=True)

    def peer():
        with torch.no_grad():
            outs["peer"] = hf.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True)

    floor_step = decode_matmul_floor(model)

    def floor():
        for _ in range(N):
            floor_step()

    t0 = time.perf_counter()
    compiled()  # the first call compiles the step
    first_s = time.perf_counter() - t0
    t = interleaved({"ours": ours, "compiled": compiled, "peer": peer, "floor": floor}, 1, a.gen_repeats)
    same = {k: outs[k].shape == outs["peer"].shape and bool((outs[k] == outs["peer"]).all())
            for k in ("ours", "compiled")}
    per_token = {k: statistics.median(v) / N * 1e3 for k, v in t.items()}
    common = dict(unit="tokens/s", peer=rate(N, t["peer"]), peer_name="HF MiniMax generate",
                  floor_ms_per_token=per_token["floor"])
    floor_note = (f"HF {per_token['peer']:.2f}, the step's weight matmuls alone {per_token['floor']:.2f} ms per token "
                  f"(prompt included)")
    return [dict(row="generate", what=f"generate {N} after {P}, greedy, hybrid MoE, B1", ours=rate(N, t["ours"]),
                 **common, notes=f"same tokens: {same['ours']}; ms per token: ours {per_token['ours']:.2f}, "
                                 f"{floor_note}"),
            dict(row="generate_compiled", what=f"generate {N} after {P}, greedy, compiled static step",
                 ours=rate(N, t["compiled"]), **common, first_call_s=first_s,
                 notes=f"same tokens: {same['compiled']}; ms per token: ours {per_token['compiled']:.2f} "
                       f"({per_token['compiled'] / per_token['floor']:.2f}x the floor), {floor_note}; first call "
                       f"(compiling) {first_s:.1f} s")]


def row_decode_floor(a) -> list[dict]:
    """One token per call, ours and HF each continuing its own cache after the same prompt, and the floor's step."""
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config()).eval()
    hf = hf_minimax(model).eval()
    prompt, _ = batch(model.config, 1, 512)
    steps = 4 * a.decode_steps
    cache = model.new_cache(1, capacity=512 + steps + 16)
    with torch.no_grad():
        model(prompt, cache=cache, logits_to_keep=1)
        pkv = hf(input_ids=prompt, use_cache=True).past_key_values
    tok, pos = prompt[:, -1:], [512]
    prefill = model.new_cache(1, capacity=static_decode.static_capacity(512 + steps + 16))
    with torch.no_grad():
        model(prompt, cache=prefill, logits_to_keep=1)
    static, step = static_decode.StaticCache(prefill), static_decode.compiled_step(model)

    def ours():
        with torch.no_grad():
            model(tok, cache=cache, logits_to_keep=1)

    def compiled():
        with torch.no_grad():
            step(model, tok, static)

    def peer():
        with torch.no_grad():
            hf(input_ids=tok, past_key_values=pkv, position_ids=torch.tensor([[pos[0]]]), use_cache=True)
        pos[0] += 1

    fns = {"ours": ours, "compiled": compiled, "peer": peer, "floor": decode_matmul_floor(model)}
    wall, cpu = interleaved_cpu(fns, 3, steps)  # the first warm-up call of `compiled` compiles
    ms = {k: {n: 1e3 * statistics.median(v[n]) for n in v} for k, v in (("wall", wall), ("cpu", cpu))}
    rows = []
    for name, what in (("ours", "decode step, hybrid MoE, B1, after 512 tokens"),
                       ("compiled", "decode step, compiled static step, hybrid MoE, B1, after 512 tokens")):
        vs_floor = per_round(wall["floor"], wall[name]), per_round(cpu["floor"], cpu[name])  # our time / the floor's
        rows.append(dict(row="decode_floor" if name == "ours" else "decode_floor_compiled", what=what,
                         unit="tokens/s", ours=rate(1, wall[name]), peer=rate(1, wall["peer"]), peer_name="HF MiniMax",
                         ms=ms, time_vs_floor_per_round=vs_floor[0], cpu_time_vs_floor_per_round=vs_floor[1],
                         notes=f"ms per step, wall / CPU: ours {ms['wall'][name]:.2f} / {ms['cpu'][name]:.2f}, HF "
                               f"{ms['wall']['peer']:.2f} / {ms['cpu']['peer']:.2f}, matmul floor "
                               f"{ms['wall']['floor']:.2f} / {ms['cpu']['floor']:.2f}; our time / the floor's per "
                               f"round {vs_floor[0]:.2f}x wall, {vs_floor[1]:.2f}x CPU (target <= 1.3x)"))
    return rows


def decode_matmul_floor(model: EnhancedMiniMaxGPT):
    """A function running only the weight matmuls of one decoding step (B1): every projection a token multiplies,
    with k experts per MoE layer drawn at random each step, and the lm_head. Nothing else: no attention, no norms,
    no routing. On a CPU these matrix-vector products read every weight once from memory, so this is the floor that
    eager or compiled code alike cannot go below in fp32."""
    from torch.nn import functional as F

    c = model.config
    x = torch.randn(1, c.n_embd)
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.no_grad():
            for block in model.blocks:
                attn, mlp = block.attn, block.mlp
                for w in (attn.qkv_proj, getattr(attn, "output_gate", None), getattr(attn, "out_proj", None),
                          getattr(attn, "o_proj", None)):
                    if w is not None:
                        F.linear(x[:, : w.in_features], w.weight)
                if c.use_moe:
                    F.linear(x, mlp.gate.weight)
                    for e in torch.randperm(c.num_experts, generator=gen)[: c.moe_top_k].tolist():
                        F.linear(F.linear(x, mlp.w1[e]) * F.linear(x, mlp.w3[e]), mlp.w2[e])
                else:
                    F.linear(F.linear(x, mlp.w1.weight) * F.linear(x, mlp.w3.weight), mlp.w2.weight)
            F.linear(x, model.lm_head.weight)

    return step


def model_flops(config: MiniMaxConfig, B: int, T: int) -> float:
    """Training FLOPs of one step (module docstring)."""
    C, H, D, I = config.n_embd, config.n_head, config.head_dim, config.intermediate_size
    Hkv = config.n_kv_head
    active = config.vocab_size * C  # lm_head
    attn = 0.0
    for t in config.layer_types:
        if t == "softmax":
            active += C * (H + 2 * Hkv) * D + H * D * C
            attn += 3 * 2 * 2 * B * H * D * T * T / 2
        else:
            active += C * 3 * H * D + C * H * D + H * D * C
            chunk = min(config.lightning_chunk_size, T)
            attn += 3 * 2 * B * H * D * T * (2 * chunk + 2 * D)
        if config.use_moe:
            active += config.moe_top_k * 3 * C * I + C * config.num_experts
        else:
            active += 3 * C * I
    return 6 * active * B * T + attn


def matmul_gflops(n: int, m: int, k: int, repeats: int = 10) -> dict:
    a_, b_ = torch.randn(n, k), torch.randn(k, m)
    t = interleaved({"mm": lambda: a_ @ b_}, 3, repeats)["mm"]
    return rate(2 * n * m * k / 1e9, t)


def row_mfu(a) -> list[dict]:
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config())
    x, y = batch(model.config, a.batch, a.seq)
    step = train_step(model, x, y, ours_loss)
    flops = model_flops(model.config, a.batch, a.seq)
    C, I = model.config.n_embd, model.config.intermediate_size
    N = a.batch * a.seq
    peak = {}
    # the training step and the matmuls alternate so that both see the same machine load
    step()
    times = []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        for name, shape in (("1024^3", (1024, 1024, 1024)), ("size-matched", (N, I, C))):
            peak.setdefault(name, []).append(matmul_gflops(*shape, repeats=5)["median"])
    achieved = flops / 1e9 / statistics.median(times)
    rows = []
    for name, gf in peak.items():
        ref = statistics.median(gf)
        rows.append(dict(row=f"mfu_{name}", what=f"training step GFLOP/s vs fp32 matmul {name} "
                         f"({'1024x1024x1024' if name == '1024^3' else f'{N}x{C}x{I}'})", unit="GFLOP/s",
                         ours=dict(median=achieved, min=flops / 1e9 / max(times), max=flops / 1e9 / min(times)),
                         peer=dict(median=ref, min=min(gf), max=max(gf)), peer_name=f"matmul {name}",
                         notes=f"MFU {achieved / ref:.1%} (target >= 60%); {flops / 1e9:.1f} GFLOP per step"))
    return rows


# peak memory: one subprocess per variant, reading its own ru_maxrss. The chunk is 256 positions: a (256, 200064)
# float32 logits block is 205 MB, and the loss makes about three such temporaries at once.
MEMORY_LOSS_CHUNK = 256
def memory_child(kind: str) -> dict:
    torch.manual_seed(0)
    config = MiniMaxConfig(n_layer=2, layer_types=["lightning", "softmax"], n_embd=256, n_head=4, vocab_size=200064,
                           block_size=512, use_moe=False)
    model = EnhancedMiniMaxGPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, y = batch(config, 4, 512)
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    loss = model(x, targets=y, loss_chunk_size=MEMORY_LOSS_CHUNK if kind == "chunked" else 0).loss
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return dict(kind=kind, peak_rss=peak, rss_before_step=rss_before, step_delta=peak - rss_before,
                loss=float(loss), seconds=seconds)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def row_memory(a) -> list[dict]:
    res = {}
    for kind in ("plain", "chunked"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--memory-child", kind,
                              "--threads", str(a.threads)], cwd=ROOT, capture_output=True, text=True, check=True)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    p, c = res["plain"], res["chunked"]
    return [dict(row="memory", what="peak RSS growth of one training step, V=200064, B4 x T512, 2 layers C256",
                 unit="GiB", ours=dict(median=c["step_delta"] / gib), peer=dict(median=p["step_delta"] / gib),
                 peer_name="plain loss", lower_is_better=True,
                 notes=f"chunked ({MEMORY_LOSS_CHUNK} rows) vs plain; absolute peak RSS {c['peak_rss'] / gib:.2f} vs "
                       f"{p['peak_rss'] / gib:.2f} GiB; loss {c['loss']:.4f} vs {p['loss']:.4f}",
                 raw=res)]


def row_compile(a) -> list[dict]:
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config())
    x, y = batch(model.config, a.batch, a.seq)
    what = f"training step, hybrid MoE, B{a.batch} x T{a.seq}, torch.compile vs eager"
    try:
        import torch._dynamo as dynamo

        dynamo.reset()
        # dropless MoE sizes its expert buffer from the routing (one .item() per layer): captured as a data-dependent
        # size instead of a graph break (see minimax_gpt/models/moe.py)
        dynamo.config.capture_scalar_outputs = True
        explain = dynamo.explain(model)(x, targets=y)
        breaks = [str(r.reason).splitlines()[0] for r in explain.break_reasons]
        compiled = torch.compile(model)
        eager_twin = EnhancedMiniMaxGPT(moe_config())
        eager_twin.load_state_dict(model.state_dict())
        c_step = train_step(compiled, x, y, ours_loss)
        t0 = time.perf_counter()
        c_step()
        compile_s = time.perf_counter() - t0
        t = interleaved({"ours": c_step, "peer": train_step(eager_twin, x, y, ours_loss)}, a.warmup, a.repeats)
    except Exception as e:  # a compile failure is a result, not a crash of the suite
        return [dict(row="compile", what=what, unit="tokens/s", ours=None, peer=None,
                     error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                     traceback=traceback.format_exc(limit=5))]
    tok = a.batch * a.seq
    return [dict(row="compile", what=what, unit="tokens/s", ours=rate(tok, t["ours"]), peer=rate(tok, t["peer"]),
                 peer_name="ours eager",
                 notes=f"first step (compile) {compile_s:.0f} s; graphs {explain.graph_count}, "
                       f"graph breaks {explain.graph_break_count}" + (f": {'; '.join(breaks)}" if breaks else ""))]


def row_bf16(a) -> list[dict]:
    torch.manual_seed(0)
    model = EnhancedMiniMaxGPT(moe_config())
    twin = EnhancedMiniMaxGPT(moe_config())
    twin.load_state_dict(model.state_dict())
    x, y = batch(model.config, a.batch, a.seq)
    t = interleaved({"ours": train_step(model, x, y, ours_loss, autocast_dtype=torch.bfloat16),
                     "peer": train_step(twin, x, y, ours_loss)}, a.warmup, a.repeats)
    tok = a.batch * a.seq
    return [dict(row="bf16", what=f"training step, hybrid MoE, B{a.batch} x T{a.seq}, bf16 autocast vs fp32",
                 unit="tokens/s", ours=rate(tok, t["ours"]), peer=rate(tok, t["peer"]), peer_name="ours fp32")]


def nanogpt_pair():
    """(ours, reference) at nanoGPT's Shakespeare-char recipe, each with its recipe's optimizer (module docstring),
    and the batch. Ours is what `minimax-gpt train --config shakespeare_char_cpu` builds for a 65-character vocab."""
    if str(ROOT) not in sys.path:  # run as a script (python benchmarks/suite.py): the repository root is not on it
        sys.path.insert(0, str(ROOT))
    from benchmarks.nanogpt_ref import RECIPE, NanoGPTConfig, NanoGPTReference, recipe_optimizer
    from minimax_gpt.training.optim import make_optimizer
    from minimax_gpt.training.run_config import load_run_config

    run = load_run_config("shakespeare_char_cpu")
    phase = run.phases[0]
    torch.manual_seed(0)
    ours = EnhancedMiniMaxGPT(run.model_config(vocab_size=65))
    ref = NanoGPTReference(NanoGPTConfig(vocab_size=65, block_size=phase.seq_len))
    opt_ours = make_optimizer(ours, run.train, torch.device("cpu"))
    for g in opt_ours.param_groups:
        g["lr"] = phase.lr
    x, y = batch(ours.config, phase.batch_size, phase.seq_len)
    return (ours, opt_ours, run.train.grad_clip), (ref, recipe_optimizer, RECIPE["grad_clip"]), (x, y)


def clipped_step(model, optimizer, grad_clip, x, y, forward):
    """forward + backward + clip_grad_norm_ + optimizer step + zero_grad: a trainer's step on fixed data."""
    model.train()

    def step():
        loss = forward(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved_cpu(fns: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """`interleaved`, also recording each call's CPU time of this thread (`time.thread_time`): with one thread that
    leaves out the time the process waited for a core, which on a loaded machine is most of the noise."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.thread_time()
            fns[n]()
            cpu[n].append(time.thread_time() - c0)
            wall[n].append(time.perf_counter() - t0)
    return wall, cpu


def per_round(ours: list[float], peer: list[float]) -> float:
    """Median over rounds of peer time / our time (> 1: ours faster), each round's two calls back to back."""
    return statistics.median(p / o for o, p in zip(ours, peer))


def _nanogpt_rows(a, compiled: bool) -> list[dict]:
    (ours, opt_ours, clip_ours), (ref, ref_opt, clip_ref), (x, y) = nanogpt_pair()
    ref_twin = type(ref)(ref.config)
    ref_twin.load_state_dict(ref.state_dict())
    compile_s = {}
    if compiled:
        import torch._dynamo as dynamo

        dynamo.reset()
        ours, ref, ref_twin = torch.compile(ours), torch.compile(ref), torch.compile(ref_twin)
    fns = {"ours": clipped_step(ours, opt_ours, clip_ours, x, y, ours_loss),
           "nanogpt": clipped_step(ref, ref_opt(ref), clip_ref, x, y, lambda m, x, y: m(x, y)[1]),
           "nanogpt_fused": clipped_step(ref_twin, ref_opt(ref_twin, fused=True), clip_ref, x, y,
                                         lambda m, x, y: m(x, y)[1])}
    if compiled:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            compile_s[name] = round(time.perf_counter() - t0, 1)
    reps = a.repeats * 4  # a step is ~50 ms: more rounds for the same time
    wall, cpu = interleaved_cpu(fns, a.warmup + 2, reps)
    tok = x.numel()
    mode = "torch.compile on both" if compiled else "eager"
    rows = []
    for peer, label in (("nanogpt", "nanoGPT recipe (foreach AdamW on CPU)"),
                        ("nanogpt_fused", "nanoGPT architecture, fused AdamW as ours")):
        notes = (f"per round {per_round(wall['ours'], wall[peer]):.2f}x; main-thread CPU time per step "
                 f"{1e3 * statistics.median(cpu['ours']):.1f} vs {1e3 * statistics.median(cpu[peer]):.1f} ms "
                 f"(per round {per_round(cpu['ours'], cpu[peer]):.2f}x); {sum(p.numel() for p in ours.parameters()):,}"
                 f" vs {sum(p.numel() for p in ref.parameters()):,} parameters; target >= 1.2x")
        if compile_s:
            notes += f"; first (compiling) step {compile_s['ours']:.0f} s vs {compile_s[peer]:.0f} s"
        rows.append(dict(row=("nanogpt_compile" if compiled else "nanogpt") + ("" if peer == "nanogpt" else "_fused"),
                         what=f"dense training step at nanoGPT's Shakespeare-char recipe, {mode}, "
                              f"B{x.shape[0]} x T{x.shape[1]}", unit="tokens/s",
                         ours=rate(tok, wall["ours"]), peer=rate(tok, wall[peer]), peer_name=label,
                         per_round=per_round(wall["ours"], wall[peer]), per_round_cpu=per_round(cpu["ours"], cpu[peer]),
                         cpu_seconds={"ours": [round(t, 5) for t in cpu["ours"]],
                                      "peer": [round(t, 5) for t in cpu[peer]]},
                         notes=notes))
    return rows


def row_nanogpt(a) -> list[dict]:
    return _nanogpt_rows(a, compiled=False)


def row_nanogpt_compile(a) -> list[dict]:
    return _nanogpt_rows(a, compiled=True)


ROWS = {"train": row_train, "train_dense": row_train_dense, "prefill": row_prefill, "decode": row_decode,
        "generate": row_generate, "mfu": row_mfu, "memory": row_memory, "compile": row_compile, "bf16": row_bf16,
        "nanogpt": row_nanogpt, "nanogpt_compile": row_nanogpt_compile, "decode_floor": row_decode_floor}


# --- report --------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def ratio(r: dict) -> float | None:
    """ours / peer at the medians (for the memory row: chunked / plain, lower is better)."""
    if not r.get("ours") or not r.get("peer"):
        return None
    return r["ours"]["median"] / r["peer"]["median"]


def table(rows: list[dict]) -> str:
    head = ["row", "unit", "ours (median)", "ours min..max", "peer", "peer (median)", "ours/peer", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        o, p = r.get("ours"), r.get("peer")
        rr = ratio(r)
        spread = f"{_fmt(o['min'])}..{_fmt(o['max'])}" if o and "min" in o else "-"
        notes = r.get("notes", "") if "error" not in r else f"ERROR {r['error']}"
        lines.append("| " + " | ".join([
            r["what"], r["unit"], _fmt(o["median"]) if o else "-", spread, r.get("peer_name", "-") if p else "-",
            _fmt(p["median"]) if p else "-", f"{rr:.2f}x" if rr is not None else "-", notes]) + " |")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    import transformers

    return dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                machine=platform.machine(), processor=_cpu_name(), cpu_count=os.cpu_count(), threads=threads,
                loadavg_start=os.getloadavg())


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse(argv=None):
    p = argparse.ArgumentParser(description="MiniMaxGPT benchmark suite (see the module docstring)")
    p.add_argument("--suite", default="default", choices=[*SUITES, "quick"])
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter generation and decode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suite.json"))
    p.add_argument("--tune-malloc", action="store_true",
                   help="hostmem.tune_malloc first, as minimax-gpt train does on CPU (both sides share it)")
    p.add_argument("--memory-child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.suite == "quick":
        a.suite, a.quick = "default", True
    a.batch, a.seq = 8, 256
    a.warmup = 1
    a.repeats = 3 if a.quick else 5
    a.gen_repeats = 2 if a.quick else 3
    a.prefill = (4, 512)
    a.contexts = (256, 8192)
    a.decode_steps = 16 if a.quick else 48
    a.generate = (512, 64) if a.quick else (512, 256)
    return a


def main(argv=None):
    a = parse(argv)
    torch.set_num_threads(a.threads)
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child)))
        return
    env = environment(a.threads)
    env["tune_malloc"] = a.tune_malloc and tune_malloc()
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['processor']}, {a.threads} threads, "
          f"load {env['loadavg_start']}", flush=True)
    rows, t_start = [], time.perf_counter()
    for name in SUITES[a.suite]:
        t0 = time.perf_counter()
        try:
            new = ROWS[name](a)
        except Exception as e:
            new = [dict(row=name, what=name, unit="-", ours=None, peer=None, error=f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc(limit=8))]
        for r in new:
            r["seconds"] = round(time.perf_counter() - t0, 1)
        rows += new
        print(table(new).splitlines()[-1] if len(new) == 1 else "\n".join(table(new).splitlines()[2:]), flush=True)
    env["loadavg_end"] = os.getloadavg()
    env["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"\n{table(rows)}\n\nload average {env['loadavg_start']} -> {env['loadavg_end']}, "
          f"{env['total_seconds']:.0f} s")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, suite=a.suite, quick=a.quick, rows=rows), indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
