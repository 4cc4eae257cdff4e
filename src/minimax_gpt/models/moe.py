"""Mixture of Experts: a top-k router over SwiGLU experts, with capacity limiting and vectorised dispatch.

The model calls `MoEFeedForward(config, layer_idx)(x, token_mask) -> (y, stats)` where the block's MLP would be; the
block adds the residual (and its alpha / beta scaling). The auxiliary losses are computed once per forward, from the
`RouterStats` every MoE layer *returns* (nothing is accumulated on the module, so the recomputation of a checkpointed
block cannot count a layer twice): `moe_aux_losses(stats, config)` then `moe_total_aux_loss(losses, config)`.

Routing (MiniMax-01 / Mixtral form). Logits and softmax in float32; the top-k probabilities are renormalised to sum
to 1 and are the combine weights. With `moe_capacity_factor = cf`, each expert takes at most
`cap = ceil(cf * n_tokens * k / E)` assignments, n_tokens counting non-pad tokens only; an expert's overflow is dropped
lowest router probability first (ties: later token first). A dropped assignment contributes nothing, the remaining
weights are not renormalised, and a token whose every assignment is dropped gets y = 0 (the residual carries it).
Padding tokens (token_mask False) are neither routed nor counted, and their y is 0. Capacity applies in training
mode only; in eval mode routing is dropless, so a token's output never depends on the rest of the batch.

Adaptive routing (docs/routing.md has the measurements):
  top-p         `moe_top_p = p` (Huang et al. 2024, arXiv 2403.07652): each token takes its candidates in descending
                order until the probability mass taken reaches p, at most moe_top_k (the cap) of them; the combine
                weights are the taken probabilities renormalised over the taken experts (as top-k's). A slot not
                taken routes to the sentinel expert E, exactly like a padding token's, so the dispatch below is
                unchanged; the capacity is ceil(cf * assignments / E) over the assignments actually made.
  bias          `moe_bias_update_rate = u > 0` (DeepSeek-V3's auxiliary-loss-free balancing, arXiv 2412.19437): the
                candidates are ranked by probs + routing_bias (a persistent (E,) buffer per layer, in checkpoints),
                while the combine weights and the top-p mass use the unbiased probabilities. After each optimizer
                step the trainer calls `model.update_routing_bias(counts)` with the step's selections summed over
                data-parallel ranks: b_e += u * sign(mean count - count_e). The load-balancing loss can then be 0.
  statistics    each RouterStats gives `experts_per_token` and `imbalance` (max / mean expert count).

Dispatch, with no loop over tokens and no host synchronisation per expert: the (token, expert) assignments are sorted
by expert (then by descending probability, which orders the capacity drop), tokens are gathered once, the experts run
as one `bmm` per weight over an (E, capacity, C) buffer, and each token reads its k outputs back and sums them. Both
directions are gathers, in forward and backward (`_GatherRows`), never an `index_add_`. The buffer's capacity is static
under capacity limiting (the cap for a batch without padding) and the largest expert load when dropless (one host sync
per layer; under `torch.compile` set `torch._dynamo.config.capture_scalar_outputs = True` so that this sync becomes a
data-dependent size rather than a graph break; with a capacity factor there is nothing to set).
`dispatch="grouped_mm"` runs `torch._grouped_mm` over the sorted rows instead (no sync at all); it is
verified on CPU (fp32 / bf16) but slower there than bmm. `dispatch="loop"` runs each used expert on its rows with
`F.linear` (one host sync). "auto" (the default) is bmm, except for at most LOOP_MAX_ASSIGNMENTS assignments without
a capacity limit to apply (decoding, tiny batches): there each used expert runs on all the rows and its output is
weighted by each token's combine weight for it (0 where not chosen), which skips the sort and the gathers
(`_forward_few`); with a capacity limit in training, few assignments take the loop. `moe_forward_reference` is the
plain per-expert loop kept for tests.

Losses (unweighted; the coefficients live in the config):
  load_balance  E * sum_e f_e * P_e over the non-pad tokens of all layers (Switch / Mixtral, as transformers'
                `load_balancing_loss_func`): f_e = top-k selections of e / tokens (before capacity drops; sums to k),
                P_e = mean router probability of e. Equals k under uniform routing and grows towards k * E / k' as the
                router collapses onto k' experts.
  router_z      ST-MoE z-loss: mean over non-pad tokens and layers of logsumexp(logits)^2.
  diversity     mean over layers of the mean squared off-diagonal cosine similarity between the experts' flattened
                weights [w1 | w3 | w2]; 0 for orthogonal experts, 1 for identical (or sign-flipped) ones. Computed
                only when moe_diversity_loss_coef > 0 (else reported as 0); `expert_diversity(layer)` measures it
                on demand for logging.

Shapes: B batch, T time, C n_embd, I intermediate_size, E num_experts, k moe_top_k, N = B * T tokens,
A = N * k assignments, S = E * capacity slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimax_gpt.config import MiniMaxConfig
from minimax_gpt.models.experts import Experts, diversity_from_gram, expert_gram, swiglu

DISPATCH_IMPLS = ("auto", "grouped_mm", "bmm", "loop")
LOOP_MAX_ASSIGNMENTS = 64  # "auto" dispatch: up to this many (token, expert) assignments take the few-token path


def _few_in_eager(n_assignments: int) -> bool:
    """Whether "auto" dispatch treats this many assignments as few: the few-token path and the per-expert loop are for
    eager code only, since both loop over the used experts after a host sync (under torch.compile a graph break, and
    an expert index the compiler cannot use), so compiled code takes bmm."""
    return n_assignments <= LOOP_MAX_ASSIGNMENTS and not torch.compiler.is_compiling()


@dataclass
class RouterStats:
    """What one MoE layer reports for one forward. Loss inputs keep their graph; logging fields are detached."""

    expert_counts: torch.Tensor  # (E,) float32: top-k selections per expert over non-pad tokens (before drops)
    prob_sum: torch.Tensor  # (E,) float32: sum of router probabilities over non-pad tokens (differentiable)
    z_sum: torch.Tensor  # () float32: sum of logsumexp(logits)^2 over non-pad tokens (differentiable)
    num_tokens: torch.Tensor  # () float32: non-pad tokens routed
    diversity: torch.Tensor  # () float32: expert similarity (module docstring); 0, not computed, when its coef is 0
    load: torch.Tensor  # (E,) detached: fraction of this layer's top-k selections that went to each expert
    dropped_fraction: torch.Tensor  # () detached: share of assignments dropped by the capacity limit

    @property
    def experts_per_token(self) -> torch.Tensor:
        """() mean experts selected per non-pad token (k under top-k; between 1 and k under top-p)."""
        return (self.expert_counts.sum() / self.num_tokens.clamp(min=1)).detach()

    @property
    def imbalance(self) -> torch.Tensor:
        """() load imbalance, max / mean of the expert counts: 1 when balanced, E when one expert takes every
        selection (0 when no token was routed)."""
        return (self.expert_counts.max() / self.expert_counts.mean().clamp(min=1e-12)).detach()


class _DeferredRouterStats(RouterStats):
    """RouterStats computed on first access of a field: a no-grad forward (decoding) returns these, and a decode step
    never reads them (their ten small ops were 7% of a step). A RouterStats in every other way (isinstance, repr,
    ==, dataclasses.replace, which builds a plain instance of this class from the fields)."""

    @classmethod
    def deferred(cls, compute) -> "_DeferredRouterStats":
        stats = object.__new__(cls)
        stats.__dict__["_compute"] = compute
        return stats

    def __getattr__(self, name: str):  # only called for attributes not set yet: the fields, before the first access
        compute = self.__dict__.pop("_compute", None)
        if compute is None:
            raise AttributeError(name)
        self.__dict__.update(vars(compute()))
        return getattr(self, name)


class MoEFeedForward(nn.Module):
    """Router + E SwiGLU experts (+ optional per-channel layer scale) for one layer.

    Expert weights are stacked: w1, w3 (E, I, C) and w2 (E, C, I); expert e computes
    w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x)). In Hugging Face MiniMax terms gate_up_proj[e] = [w1[e]; w3[e]] and
    down_proj[e] = w2[e]; `gate` is `block_sparse_moe.gate`.
    """

    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = E = config.num_experts
        self.top_k = config.moe_top_k
        if self.top_k > E:
            raise ValueError(f"moe_top_k ({self.top_k}) must be <= num_experts ({E})")
        self.capacity_factor = config.moe_capacity_factor
        self.top_p = config.moe_top_p  # None: top-k; else top-p routing with at most top_k experts per token
        self.bias_update_rate = config.moe_bias_update_rate
        self.jitter_noise = config.moe_jitter_noise
        self.diversity_grad = config.moe_diversity_loss_coef > 0  # compute the diversity loss in forward
        self.orthogonal_init = config.moe_orthogonal_init
        self.layer_scale_init = config.moe_layer_scale_init
        C, I = config.n_embd, config.intermediate_size
        # experts before gate: parameters keep the order they had as mlp.w1/w3/w2 (the gradient-norm sum, and so the
        # default run, stay bit-identical across the rename)
        self.experts = Experts(E, C, I)  # w1, w3 (E, I, C), w2 (E, C, I): read as self.w1, self.w3, self.w2
        self.gate = nn.Linear(C, E, bias=False)
        self.layer_scale = nn.Parameter(torch.empty(C)) if config.moe_layer_scale else None
        # aux-loss-free balancing: added to the probabilities for selection only; a persistent buffer (checkpointed),
        # moved by `update_routing_bias`, never by gradients. Absent when off, so other models' state is unchanged.
        self.register_buffer("routing_bias", torch.empty(E, dtype=torch.float32) if self.bias_update_rate > 0 else None)
        # Expert kernel: "bmm", "grouped_mm" (CPU fp32/bf16, verified by the tests) or "auto" (= bmm, see _impl).
        self.dispatch = "auto"
        # Expert parallelism: a handle installed from outside (parallel.expert.ExpertParallel) that sends the kept
        # rows to the ranks holding their experts and brings the outputs back; None runs every expert here.
        self.expert_parallel = None
        self.init_weights(config.init_std, config.init_std)
        self._register_load_state_dict_pre_hook(_rename_legacy_expert_keys)

    # the experts' weights, wherever expert parallelism placed them (the layer's kernels read them directly)
    w1 = property(lambda self: self.experts.w1)
    w3 = property(lambda self: self.experts.w3)
    w2 = property(lambda self: self.experts.w2)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Initialise this layer (the model's central init calls this with its own std / out_std).

        | parameter     | init                                                                           |
        |---------------|--------------------------------------------------------------------------------|
        | gate.weight   | normal(0, std)                                                                 |
        | w1, w3 [e]    | orthogonal, scaled so the element RMS is std (moe_orthogonal_init); else normal(0, std) |
        | w2 [e]        | orthogonal, element RMS out_std (moe_orthogonal_init); else normal(0, out_std)  |
        | layer_scale   | moe_layer_scale_init (when moe_layer_scale)                                    |
        | routing_bias  | 0 (a buffer, when moe_bias_update_rate > 0)                                    |

        An orthogonal (r, c) matrix has element RMS 1 / sqrt(max(r, c)); scaling by std * sqrt(max(r, c)) keeps the
        activation scale of the normal init, so the flag changes only the structure, not the magnitudes.
        """
        nn.init.normal_(self.gate.weight, mean=0.0, std=std)
        for w, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            if self.orthogonal_init:
                for e in range(w.shape[0]):
                    nn.init.orthogonal_(w[e], gain=s * math.sqrt(max(w.shape[1:])))
            else:
                nn.init.normal_(w, mean=0.0, std=s)
        if self.layer_scale is not None:
            self.layer_scale.fill_(self.layer_scale_init)
        if self.routing_bias is not None:
            self.routing_bias.zero_()

    # ------------------------------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> logits (N, E) fp32, probs (N, E) fp32, top-k weights (N, k) fp32 renormalised, indices (N, k).

        Jitter (training only) multiplies the router's input by U(1 - eps, 1 + eps); x itself is not modified and the
        experts see the clean x. With a routing bias the k experts are those of highest probs + bias, and their
        weights are the unbiased probabilities renormalised. Under top-p a slot not taken has index E (no expert)
        and weight 0; the weights of the taken slots are renormalised over them."""
        xr = x
        if self.training and self.jitter_noise > 0:
            xr = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(xr.float(), self.gate.weight.float())  # (N, E)
        probs = torch.softmax(logits, dim=-1)
        if self.routing_bias is None:
            top_p, top_i = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        else:
            top_i = torch.topk(probs.detach() + self.routing_bias.float(), self.top_k, dim=-1).indices  # (N, k)
            top_p = torch.gather(probs, 1, top_i)  # (N, k) unbiased: the bias never reaches the combine weights
        if self.top_p is not None:
            taken = _top_p_taken(top_p.detach(), self.top_p)  # (N, k) bool, a prefix of each row
            top_p = top_p * taken
            top_i = torch.where(taken, top_i, self.num_experts)
        top_w = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, probs, top_w, top_i

    @torch.no_grad()
    def update_routing_bias(self, expert_counts: torch.Tensor) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): b_e += rate * sign(mean_e' count_e' - count_e), so an
        overloaded expert becomes less likely to be selected and an idle one more. expert_counts (E,): selections
        of this layer over the whole optimizer step, summed over data-parallel ranks (then every rank computes
        the same bias)."""
        if self.routing_bias is None:
            raise ValueError("update_routing_bias needs moe_bias_update_rate > 0 (the routing bias is off)")
        counts = expert_counts.to(self.routing_bias.device, torch.float32)
        if counts.shape != self.routing_bias.shape:
            raise ValueError(f"expert_counts must have shape ({self.num_experts},), got {tuple(counts.shape)}")
        self.routing_bias.add_(torch.sign(counts.mean() - counts), alpha=self.bias_update_rate)

    def capacity(self, n_tokens: torch.Tensor | int, n_assignments: torch.Tensor | None = None
                 ) -> torch.Tensor | int | None:
        """ceil(cf * n_tokens * k / E) assignments per expert; None when dropless. Under top-p the count of
        assignments varies: with n_assignments given, ceil(cf * n_assignments / E) (at most the top-k value)."""
        if self.capacity_factor is None:
            return None
        if self.top_p is not None and n_assignments is not None:
            return torch.ceil(n_assignments.double() * self.capacity_factor / self.num_experts).long()
        if isinstance(n_tokens, torch.Tensor):
            return torch.ceil(n_tokens.double() * self.capacity_factor * self.top_k / self.num_experts).long()
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        B, T, C = _check_inputs(x, token_mask, self.w1.shape[-1])
        E, k = self.num_experts, self.top_k
        N, A = B * T, B * T * k
        xf = x.reshape(N, C)
        logits, probs, top_w, top_i = self.route(xf)  # (N, E), (N, E), (N, k), (N, k)
        compiled_decoding = (token_mask is None and A <= LOOP_MAX_ASSIGNMENTS and not torch.is_grad_enabled()
                             and torch.compiler.is_compiling())  # gathered experts (_gathered), no host sync
        if self.expert_parallel is None and (compiled_decoding or self._few_assignments(A)):  # decoding
            valid = None if token_mask is None else token_mask.reshape(N)
            return self._forward_few(xf, valid, logits, probs, top_w, top_i, B, T)
        valid = torch.ones(N, dtype=torch.bool, device=x.device) if token_mask is None else token_mask.reshape(N)

        # --- sort the A assignments (pads and top-p's untaken slots to the sentinel E) by expert, then by descending probability (drop order) ----------------------
        a_expert = torch.where(valid[:, None], top_i, E).reshape(A)  # pads go to a sentinel expert E
        a_prob = torch.gather(probs, 1, top_i.clamp(max=E - 1)).reshape(A)  # sentinel rows: any value
        order = torch.argsort(a_prob.detach(), descending=True, stable=True)
        order = order[torch.argsort(a_expert[order], stable=True)]  # (A,) grouped by expert, best first
        e_sorted = a_expert[order]
        counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add_(
            0, a_expert, torch.ones_like(a_expert))  # (E+1,) the last entry counts pad and untaken assignments
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(A, device=x.device) - starts[e_sorted]  # position within the expert's group
        n_valid = valid.sum()
        # capacity limits training only: in eval every token reaches its experts, so a token's output does not
        # depend on the rest of the batch and incremental decoding equals a full forward
        cap = self.capacity(n_valid, counts[:E].sum()) if self.training else None
        keep = e_sorted < E
        if cap is not None:
            keep = keep & (rank < cap)

        impl = "remote" if self.expert_parallel is not None else self._impl(x, A)
        diversity = None  # computed by _make_stats, except under expert parallelism (the experts are on other ranks)
        if impl == "remote":  # expert parallelism: every rank sends each kept row to its expert's rank
            xs, maps = self._sorted_rows(xf, order, keep)
            out_rows, diversity = self.expert_parallel.run(self, xs, e_sorted, keep)
        elif impl == "grouped_mm":
            out_rows, maps = self._experts_grouped(xf, order, e_sorted, keep)
        elif impl == "loop":
            out_rows, maps = self._experts_loop(xf, order, keep, counts)
        else:
            out_rows, maps = self._experts_bmm(xf, order, e_sorted, rank, keep, counts, N)
        # out_rows (R, C): row r is the output of assignment maps.assignment[r] (A = empty). Read each assignment's row
        # back (dropped ones read a zero row) and sum its k weighted outputs per token: gathers, no scatter-add.
        out_a = _gather_rows(torch.cat([out_rows, out_rows.new_zeros(1, C)]), maps.row, maps.assignment_ext, 1)
        y = (out_a.view(N, k, C) * top_w.to(out_a.dtype)[..., None]).sum(1)  # (N, C)
        if self.layer_scale is not None:
            y = y * self.layer_scale.to(y.dtype)
        y = y.view(B, T, C)

        kept = torch.zeros(E + 1, dtype=torch.float32, device=x.device).scatter_add_(
            0, e_sorted, keep.float())[:E]
        stats = _make_stats(self, logits, probs, counts[:E].float(), kept, valid, n_valid, diversity)
        return y, stats

    def _few_assignments(self, n_assignments: int) -> bool:
        """Whether "auto" dispatch takes `_forward_few`: a few assignments (decoding, tiny batches) and no capacity
        limit to apply (eval mode, or dropless)."""
        return (self.dispatch == "auto" and _few_in_eager(n_assignments)
                and not (self.training and self.capacity_factor is not None))

    def _forward_few(self, xf, valid, logits, probs, top_w, top_i, B, T):
        """Dispatch for a few tokens without a capacity limit: every expert that some token chose runs on all N rows
        (for N this small a matmul costs what one row costs: reading the expert's weights), and its output is weighted
        by each token's combine weight for it, 0 where the token did not choose it (or is padding). No sort, gather
        or scatter: about fifteen ops plus eight per used expert, one host sync (which experts are used), and only
        the used experts' weights are read. Summed in expert order, as `moe_forward_reference`.
        One real token without gradients (batch-1 decoding) reads its k experts and weights straight from the routing
        instead (`_forward_one`: the same sums, bit-identical, tests/models/test_moe.py); under torch.compile (a
        compiled decoding step: no gradients, no padding) each token's experts are gathered (`_gathered`)."""
        E, C = self.num_experts, xf.shape[1]

        def chosen_counts():
            chosen = top_i[..., None] == torch.arange(E, device=xf.device)  # (N, k, E)
            if valid is not None:
                chosen = chosen & valid[:, None, None]  # pads choose nothing
            return chosen, chosen.sum((0, 1), dtype=torch.float32)  # (E,) selections per expert

        if torch.compiler.is_compiling():
            y, counts = self._gathered(xf, top_w, top_i), None
        elif xf.shape[0] == 1 and valid is None and not torch.is_grad_enabled():
            y, counts = self._forward_one(xf, top_w, top_i), None
        else:
            chosen, counts = chosen_counts()
            combine = (top_w[..., None] * chosen).sum(1)  # (N, E) fp32 combine weight of each expert for each token
            y = None
            for e in torch.nonzero(counts).flatten().tolist():  # host sync: the used experts
                out = self.expert(e, xf)  # (N, C)
                w = combine[:, e, None]  # (N, 1)
                # where, not a product: a row that did not choose e adds an exact 0 even if e overflowed on it (fp16)
                out = torch.where(w > 0, out * w.to(out.dtype), 0.0)
                y = out if y is None else y + out
        if y is None:  # every token is padding
            y = xf.new_zeros(xf.shape)
        if self.layer_scale is not None:
            y = y * self.layer_scale.to(y.dtype)

        def stats() -> RouterStats:
            n_valid = valid.sum() if valid is not None else torch.tensor(xf.shape[0], device=xf.device)
            c = chosen_counts()[1] if counts is None else counts
            return _make_stats(self, logits, probs, c, c, valid, n_valid)

        return y.view(B, T, C), stats() if torch.is_grad_enabled() else _DeferredRouterStats.deferred(stats)

    def _forward_one(self, xf, top_w, top_i):
        """xf (1, C), one real token: the sum over its chosen experts, in expert order, of expert(e, x) * weight, as
        `_forward_few` computes it for that row, without the (N, k, E) masks: one host sync for the token's experts
        and weights. A slot not taken (top-p, index E) or a weight of 0 adds nothing (there: an exact 0)."""
        ids, weights = top_i[0].tolist(), top_w[0].tolist()  # host sync
        y = None
        for e, j in sorted((e, j) for j, e in enumerate(ids) if e < self.num_experts and weights[j] > 0):
            out = self.expert(e, xf) * top_w[:, j, None].to(xf.dtype)  # (1, C)
            y = out if y is None else y + out
        return y

    def _gathered(self, xf, top_w, top_i):
        """xf (N, C), a few tokens without gradients or padding, with no host sync (a compiled decoding step, where
        `_forward_one` would break the graph at its `.tolist()` and bmm would read every expert): each token's k
        experts' weights are gathered, (N, k, I, C), and applied as batched matrix-vector products. The same values as
        the eager paths to rounding (the products and the sum over k are ordered differently); a slot not taken
        (top-p, index E) adds 0."""
        E = self.num_experts
        taken = top_i < E  # (N, k)
        idx = top_i.clamp(max=E - 1)
        dt = xf.dtype
        w1, w3, w2 = (w.to(dt)[idx] for w in (self.w1, self.w3, self.w2))  # (N, k, I, C), (N, k, I, C), (N, k, C, I)
        x = xf[:, None, :, None]  # (N, 1, C, 1)
        h = F.silu((w1 @ x).squeeze(-1)) * (w3 @ x).squeeze(-1)  # (N, k, I)
        out = (w2 @ h[..., None]).squeeze(-1)  # (N, k, C)
        w = torch.where(taken, top_w, 0.0).to(dt)  # (N, k)
        return (out * w[..., None]).sum(1)  # (N, C)

    # ------------------------------------------------------------------------------------------------------------
    def _impl(self, x: torch.Tensor, n_assignments: int) -> str:
        if self.dispatch not in DISPATCH_IMPLS:
            raise ValueError(f"dispatch is {self.dispatch!r}; allowed: {', '.join(DISPATCH_IMPLS)}")
        if self.dispatch != "auto":
            if self.dispatch == "grouped_mm" and not grouped_mm_supported(x.device, x.dtype, *self.w2.shape[1:]):
                raise ValueError(f"dispatch='grouped_mm' is not supported here for {x.device.type} {x.dtype} with "
                                 f"n_embd={self.w2.shape[1]}, intermediate_size={self.w2.shape[2]}")
            return self.dispatch
        # bmm is faster than CPU grouped_mm (a loop of mm, slower backward; benchmarks/bench_moe.py), and grouped_mm
        # on CUDA has not been verified here, so "auto" is bmm, except for a few assignments (decoding): there the
        # bmm over an (E, cap, C) buffer reads every expert's weights for one or two rows, and CPU bmm on such small
        # batches stalls under load (docs/performance.md), so each used expert runs alone (in eager: _few_in_eager).
        return "loop" if _few_in_eager(n_assignments) else "bmm"

    def _swiglu_grouped(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        dt = xs.dtype
        w1, w3, w2 = (w.to(dt).transpose(1, 2) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)  # (A, I)
        return torch._grouped_mm(h, w2, offs=offs)  # (A, C)

    def _experts_grouped(self, xf, order, e_sorted, keep):
        """All A sorted rows through grouped_mm. Kept rows lead each expert's group; dropped and pad rows go last,
        get a zero input (so they add nothing to any gradient) and are appended to the last group, because
        grouped_mm leaves rows past the final offset (and their input gradients) uninitialised."""
        E, A = self.num_experts, order.numel()
        e_key = torch.where(keep, e_sorted, E)
        regroup = torch.argsort(e_key, stable=True)  # (A,) kept rows by expert, then the rest
        rows = torch.where(keep[regroup], regroup, A)  # (A,) sorted-assignment index, A = dropped
        kept_counts = torch.zeros(E, dtype=torch.int32, device=xf.device).scatter_add_(
            0, e_sorted.clamp(max=E - 1), keep.int())
        offs = torch.cumsum(kept_counts, 0, dtype=torch.int32)
        offs[-1] = A
        maps = _RowMaps.build(order, rows, self.top_k)
        xs = _gather_rows(torch.cat([xf, xf.new_zeros(1, xf.shape[1])]), maps.token, maps.row_ext, self.top_k)  # (A, C)
        return self._swiglu_grouped(xs, offs), maps

    def _experts_loop(self, xf, order, keep, counts):
        """The sorted rows expert by expert, each expert with tokens running its SwiGLU through F.linear on its
        contiguous group: for a few tokens only the used experts' weights are read. One host sync (the counts).
        Dropped and pad rows read the zero row, so they add nothing."""
        E = self.num_experts
        xs, maps = self._sorted_rows(xf, order, keep)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # (E+1) groups in sorted order, the last one the pads
            if n == 0:
                continue
            xe = xs[start:start + n]  # (n, C)
            if e < E:
                outs.append(self.expert(e, xe))
            else:
                outs.append(torch.zeros_like(xe))
            start += n
        return torch.cat(outs), maps

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on rows x (n, C) -> (n, C), in x's dtype (one expert at a time: the few-token and loop
        dispatches)."""
        return swiglu(x, self.w1[e], self.w3[e], self.w2[e])

    def _sorted_rows(self, xf, order, keep):
        """One row per sorted assignment, (A, C): the token's input, or zero for a dropped or pad assignment."""
        A, C = order.numel(), xf.shape[1]
        rows = torch.where(keep, torch.arange(A, device=xf.device), A)  # (A,)
        maps = _RowMaps.build(order, rows, self.top_k)
        return _gather_rows(torch.cat([xf, xf.new_zeros(1, C)]), maps.token, maps.row_ext, self.top_k), maps

    def _experts_bmm(self, xf, order, e_sorted, rank, keep, counts, N):
        """Kept rows into an (E, cap, C) buffer, one bmm per weight. The buffer capacity is the cap for a batch
        without padding (static) or, dropless, the largest expert load (one host sync)."""
        E, A, C = self.num_experts, order.numel(), xf.shape[1]
        if self.capacity_factor is not None and self.training:  # the same condition as the cap in forward
            cap_buf = min(self.capacity(N), N)
        else:
            cap_buf = int(counts[:E].max())  # host sync: the one allowed per layer
            if torch.compiler.is_compiling():
                # with capture_scalar_outputs the sync becomes a data-dependent size; at least 2 lets the compiler
                # rule out the size-1 broadcasting case it cannot decide
                cap_buf = max(cap_buf, 2)
        S = E * cap_buf
        slot = torch.where(keep, e_sorted * cap_buf + rank, S)  # (A,) S = nowhere
        rows = torch.full((S + 1,), A, dtype=torch.long, device=xf.device)
        rows.scatter_(0, slot, torch.arange(A, device=xf.device))
        rows = rows[:S]  # (S,) sorted-assignment index of each slot, A = empty
        maps = _RowMaps.build(order, rows, self.top_k)
        xb = _gather_rows(torch.cat([xf, xf.new_zeros(1, C)]), maps.token, maps.row_ext, self.top_k)  # (S, C)
        xb = xb.view(E, cap_buf, C)
        dt = xb.dtype
        h = F.silu(torch.bmm(xb, self.w1.to(dt).transpose(1, 2))) * torch.bmm(xb, self.w3.to(dt).transpose(1, 2))
        out = torch.bmm(h, self.w2.to(dt).transpose(1, 2))  # (E, cap, C)
        return out.reshape(S, C), maps


@dataclass
class _RowMaps:
    """Which expert row serves which assignment, both ways. R expert rows (bmm slots or grouped_mm rows), A = N * k
    assignments in token-major order (assignment n * k + j is token n's j-th choice); each kept assignment has exactly
    one row and each row at most one assignment, so both directions are gathers.

    token      (R,)           token of each row, N for an empty row (it reads the zero row appended to x)
    row        (A,)           row of each assignment, R for a dropped / pad assignment (it reads a zero row)
    row_ext    ((N+1) * k,)   `row` with k entries R appended for the zero row of x
    assignment_ext (R+1,)     assignment of each row, A for empty rows and for the appended zero row
    """

    token: torch.Tensor
    row: torch.Tensor
    row_ext: torch.Tensor
    assignment_ext: torch.Tensor

    @staticmethod
    def build(order: torch.Tensor, rows: torch.Tensor, k: int) -> "_RowMaps":
        """order (A,): sorted position -> assignment; rows (R,): row -> sorted position (A = empty)."""
        A, R = order.numel(), rows.numel()
        assignment = torch.cat([order, order.new_full((1,), A)])[rows]  # (R,)
        # every row's assignment is unique except the sentinel A, written to the extra entry and dropped
        row = torch.full((A + 1,), R, dtype=torch.long, device=order.device).scatter_(
            0, assignment, torch.arange(R, device=order.device))[:A]
        return _RowMaps(token=torch.where(assignment < A, assignment // k, A // k), row=row,
                        row_ext=torch.cat([row, row.new_full((k,), R)]),
                        assignment_ext=torch.cat([assignment, assignment.new_full((1,), A)]))


class _GatherRows(torch.autograd.Function):
    """out = src[index] whose backward is a gather too: grad_src[i] = sum_j grad_ext[back[i * k + j]], where
    grad_ext is grad_out with a zero row appended. Valid when `back` lists, for every row of src, the k output rows
    that read it (padded with the zero row). It replaces index_select's index_add_ backward, whose CPU kernel
    (sorting, per-thread buffers) cost more than the expert matmuls in decoding and stalls under load."""

    @staticmethod
    def forward(ctx, src, index, back, k):
        ctx.save_for_backward(back)
        ctx.k = k
        return src.index_select(0, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (back,) = ctx.saved_tensors
        g = torch.cat([grad, grad.new_zeros(1, grad.shape[1])]).index_select(0, back)
        if ctx.k > 1:
            g = g.view(-1, ctx.k, grad.shape[1]).sum(1)
        return g, None, None, None


def _gather_rows(src: torch.Tensor, index: torch.Tensor, back: torch.Tensor, k: int) -> torch.Tensor:
    return _GatherRows.apply(src, index, back, k)


def _check_inputs(x: torch.Tensor, token_mask: torch.Tensor | None, C: int) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"MoE input must be (B, T, C), got shape {tuple(x.shape)}")
    if x.shape[-1] != C:
        raise ValueError(f"MoE input has {x.shape[-1]} channels, expected n_embd={C}")
    if token_mask is not None:
        if token_mask.shape != x.shape[:2]:
            raise ValueError(f"token_mask must be (B, T) = {tuple(x.shape[:2])}, got {tuple(token_mask.shape)}")
        if token_mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be bool (True = real token), got {token_mask.dtype}")
    return x.shape


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, C: int, I: int) -> bool:
    """Where dispatch="grouped_mm" is allowed: CPU in float32 / bfloat16 (checked by tests/test_moe.py; float64 is
    not supported by the kernel), with rows of C and I elements a multiple of 16 bytes (the kernel's stride rule).
    CUDA grouped_mm (bf16, sm90+) has not been verified here."""
    supported = hasattr(torch, "_grouped_mm") and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    size = torch.empty((), dtype=dtype).element_size()
    return supported and (C * size) % 16 == 0 and (I * size) % 16 == 0


def expert_diversity(module: MoEFeedForward) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity between the experts' flattened weights [w1 | w3 | w2], in fp32
    (models/experts.py): 0 when the experts are mutually orthogonal, 1 when all are identical (or sign-flipped)."""
    return diversity_from_gram(expert_gram((module.w1, module.w3, module.w2)))


def _rename_legacy_expert_keys(state_dict, prefix, *args) -> None:
    """Checkpoints from before the experts became a submodule name their weights `...w1`, not `...experts.w1`."""
    for name in ("w1", "w3", "w2"):
        if prefix + name in state_dict and prefix + "experts." + name not in state_dict:
            state_dict[prefix + "experts." + name] = state_dict.pop(prefix + name)


def _top_p_taken(top_p: torch.Tensor, p: float) -> torch.Tensor:
    """top_p (N, k) probabilities of each token's candidates in selection order -> (N, k) bool: a candidate is taken
    while the mass of the candidates before it is below p (so the first always is, and a larger p takes at least as
    many: the mean experts per token is non-decreasing in p, from 1 at small p to k at p = 1)."""
    before = F.pad(torch.cumsum(top_p, dim=-1)[:, :-1], (1, 0))  # (N, k) exclusive prefix sums
    return before < p


def _make_stats(module, logits, probs, counts, kept, valid, n_valid, diversity=None) -> RouterStats:
    """valid (N,) bool, or None when every token is real; diversity: already computed (expert parallelism)."""
    z = torch.logsumexp(logits, dim=-1).pow(2)  # (N,)
    if valid is not None:
        vf = valid.float()
        probs, z = probs * vf[:, None], z * vf
    total = counts.sum().clamp(min=1)
    return RouterStats(
        expert_counts=counts,
        prob_sum=probs.sum(0),
        z_sum=z.sum(),
        num_tokens=n_valid.float(),
        # The Gram matrix costs E^2 / (tokens * k) of the experts' forward: computed only when it is trained.
        diversity=(probs.new_zeros(()) if not module.diversity_grad else expert_diversity(module)
                   if diversity is None else diversity),
        load=(counts / total).detach(),
        dropped_fraction=probs.new_zeros(()) if kept is counts else ((counts - kept).sum() / total).detach(),
    )


# ----------------------------------------------------------------------------------------------------------------
def moe_aux_losses(stats: list[RouterStats], config: MiniMaxConfig) -> dict[str, torch.Tensor]:
    """Unweighted auxiliary losses over the non-pad tokens of all layers: {"load_balance", "router_z", "diversity"}.

    Load balancing accumulates selection counts and probability sums over layers and normalises once
    (transformers' `load_balancing_loss_func`): E * sum_e (counts_e / tokens) * (prob_sum_e / tokens)."""
    if not stats:
        raise ValueError("moe_aux_losses needs the RouterStats of at least one MoE layer")
    E = config.num_experts
    counts = torch.stack([s.expert_counts for s in stats]).sum(0)  # (E,)
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(0)  # (E,)
    tokens = torch.stack([s.num_tokens for s in stats]).sum().clamp(min=1)
    return {
        "load_balance": E * torch.sum((counts / tokens) * (prob_sum / tokens)),
        "router_z": torch.stack([s.z_sum for s in stats]).sum() / tokens,
        "diversity": torch.stack([s.diversity for s in stats]).mean(),
    }


def moe_total_aux_loss(losses: dict[str, torch.Tensor], config: MiniMaxConfig) -> torch.Tensor:
    """moe_aux_loss_coef * load_balance + moe_z_loss_coef * router_z + moe_diversity_loss_coef * diversity."""
    return (config.moe_aux_loss_coef * losses["load_balance"]
            + config.moe_z_loss_coef * losses["router_z"]
            + config.moe_diversity_loss_coef * losses["diversity"])


# ----------------------------------------------------------------------------------------------------------------
def moe_forward_reference(
    module: MoEFeedForward, x: torch.Tensor, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, RouterStats]:
    """The same layer written plainly: route every token (`_route_reference`), then loop over experts, each taking
    its tokens in order of descending router probability up to the capacity, running its SwiGLU and adding the
    weighted output back. No jitter (call it in eval mode, or with moe_jitter_noise = 0). For tests."""
    B, T, C = _check_inputs(x, token_mask, module.w1.shape[-1])
    E = module.num_experts
    xf = x.reshape(B * T, C)
    valid = torch.ones(B * T, dtype=torch.bool, device=x.device) if token_mask is None else token_mask.reshape(-1)
    logits = xf.float() @ module.gate.weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    top_i = _route_reference(module, probs)  # (N, k), E = slot not taken
    top_p = torch.gather(probs, 1, top_i.clamp(max=E - 1)) * (top_i < E)
    top_w = top_p / top_p.sum(-1, keepdim=True)
    n_valid = int(valid.sum())
    n_assignments = torch.tensor(int(((top_i < E) & valid[:, None]).sum()))
    cap = module.capacity(n_valid, n_assignments) if module.training else None  # training only, as in forward
    y = torch.zeros_like(xf)
    counts = torch.zeros(E)
    kept = torch.zeros(E)
    for e in range(E):
        tok, slot = torch.nonzero((top_i == e) & valid[:, None], as_tuple=True)  # token order
        counts[e] = len(tok)
        best_first = torch.argsort(probs[tok, e].detach(), descending=True, stable=True)
        if cap is not None:
            best_first = best_first[:cap]
        tok, slot = tok[best_first], slot[best_first]
        kept[e] = len(tok)
        h = F.silu(xf[tok] @ module.w1[e].t()) * (xf[tok] @ module.w3[e].t())
        out = h @ module.w2[e].t()
        y = y.index_add(0, tok, out * top_w[tok, slot, None].to(out.dtype))
    if module.layer_scale is not None:
        y = y * module.layer_scale
    stats = _make_stats(module, logits, probs, counts.to(x.device), kept.to(x.device), valid,
                        torch.tensor(n_valid, device=x.device))
    return y.view(B, T, C), stats


def _route_reference(module: MoEFeedForward, probs: torch.Tensor) -> torch.Tensor:
    """Token by token: rank the experts by probs + routing bias and take them in that order, at most k, under top-p
    only while the probability mass already taken (float32, in the same order) is below p.
    probs (N, E) -> expert indices (N, k), E where a slot is not taken."""
    E, k = module.num_experts, module.top_k
    scores = probs.detach() if module.routing_bias is None else probs.detach() + module.routing_bias.float()
    ranked = torch.argsort(scores, dim=-1, descending=True, stable=True)  # (N, E)
    chosen = torch.full((probs.shape[0], k), E, dtype=torch.long, device=probs.device)
    for n in range(probs.shape[0]):
        mass = torch.zeros((), dtype=torch.float32)
        for j in range(k):
            if module.top_p is not None and mass >= module.top_p:
                break
            chosen[n, j] = ranked[n, j]
            mass = mass + probs[n, ranked[n, j]].detach().float()
    return chosen
