"""The fast path of block-sparse attention (`minimax_gpt.ops.block_sparse`): attention over chosen key blocks only.

Given each query's chosen earlier blocks, the work is cut into tiles:
  - own blocks: one block-diagonal causal attention, every block of block_size queries against its own keys;
  - chosen blocks: for each key block j and row r (batch and head), the queries that chose it, against its
    block_size keys, unmasked (every key of an earlier block precedes the query). Tiles with similar numbers of
    queries share a bucket, which runs as one batched call: nb tiles, each padded to the bucket's largest count L
    (`plan_tiles` picks the buckets that minimise padded work plus a fixed cost per call).
Each tile returns its output and log-sum-exp; a query's tiles are merged by their log-sum-exps. The backward gives
each tile the query's final output and log-sum-exp, which makes the tile's FlashAttention backward (P = exp(S - lse),
dS = P * (dP - rowsum(dO * O))) the exact gradient of the merged result; nothing quadratic is saved. A padding slot
reads some real query and gets lse = +inf in the backward, so P = 0 there and it adds nothing to any gradient.

The plan (which pair runs in which slot) is made once per forward, by sorting, with no loop over blocks, and reused
by the backward. A forward+backward runs about 60 large operations plus about 12 per bucket, whatever the number of
blocks: on a shared CPU every operation is a parallel region that waits for its slowest thread, so few and large
regions keep two threads useful where many small ones would not. Gathers of whole blocks use indexing, and long
tiles are split into chunks (`_query_split`), to avoid two slow cases of PyTorch's CPU kernels on two threads.

Tensors are kept token-major, (T, R, D) with R = B * H rows, the memory layout of the projections' (B, T, H, D)
output and of PyTorch's CPU FlashAttention kernel. A tile runs through that kernel ("fused", CPU) or through matmuls
(any device).

Shapes: B batch, H query heads, Hkv key/value heads, T tokens, D head dim, K choices per query, R = B * H,
N = ceil(T / block_size) blocks, Nc = T // block_size complete blocks (the only ones a query can choose),
G = Nc * R (block, row) tiles, P pair slots of all buckets, nb tiles in a bucket, L slots per tile in a bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TilePlan:
    """Where each (query row, chosen block) pair runs. Tile g = j * R + r holds the queries of row r that chose
    block j; buckets lie one after another in P slots, bucket b's tiles as (nb, L), slot (i, c) the c-th query of
    its i-th tile. A padding slot reads query row 0 (`rows`) and the extra log-sum-exp row T * R (`lse_rows`)."""
    rows: torch.Tensor  # (P,) query row t * R + r of each slot
    lse_rows: torch.Tensor  # (P,) as rows, T * R for padding
    pair_slots: torch.Tensor  # (K, T * R) the slot of each query row's k-th choice; P (an extra zero slot) for none
    tiles: torch.Tensor  # (n_tiles,) the buckets' tiles g one after another
    tile_places: torch.Tensor  # (G,) each tile's place in `tiles`; n_tiles if no query chose it
    buckets: list[tuple[int, int, int, int]]  # (nb, L, first slot, first place in `tiles`)


def block_sparse_tiles(q, k, v, selected: torch.Tensor, block_size: int, scale: float, fused: bool,
                       call_cost: int | None = None) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D), selected (B, H, T, K) from `select_blocks` (-1: none) -> (B, H, T, D).
    call_cost: the padding slots one more bucket is worth. None: 2 ** 19 // block_size on one thread (1,024 at block
    512), 2 ** 23 // block_size on more (16,384: each of a bucket's dozen parallel regions waits for the slowest
    thread, which on a shared CPU costs more than padding; measured at 32k on two busy cores, 11 buckets with 13%
    padding ran 7.0 s where 38 buckets with 3% ran 8.4 s, while one thread gained 7% from the 38)."""
    if call_cost is None:
        call_cost = (2 ** 19 if torch.get_num_threads() == 1 else 2 ** 23) // block_size
    max_slots = None if fused else max(1, 2 ** 25 // block_size)  # matmul tiles hold (nb, L, bs) scores
    plan = plan_tiles(selected, block_size, call_cost, max_slots)
    return _BlockSparse.apply(q, k, v, plan, block_size, scale, fused)


def plan_tiles(selected: torch.Tensor, block_size: int, call_cost: int, max_slots: int | None = None) -> TilePlan:
    """The buckets and slots for `selected` (B, H, T, K). A bucket's cost is nb * L slots plus call_cost; max_slots
    caps nb * L (a bucket of one tile is always allowed)."""
    B, H, T, K = selected.shape
    R, Nc, device = B * H, T // block_size, selected.device
    choice = selected.reshape(R, T * K)  # pair p = t * K + k of row r
    choice = choice.masked_fill(choice < 0, Nc)  # "no block" sorts last
    block, order = choice.sort(dim=1, stable=True)  # (R, T * K) pairs grouped by block, in query order within one
    counts = torch.zeros(R, Nc + 1, dtype=torch.long, device=device).scatter_add_(1, choice, torch.ones_like(choice))
    starts = counts.cumsum(1) - counts  # (R, Nc + 1)
    buckets_cpu = _buckets(counts[:, :Nc].t().flatten().tolist(), call_cost, max_slots)  # tile g = j * R + r
    n_tiles = sum(len(ids) for ids, _ in buckets_cpu)
    base, places, buckets, first, place = [0] * (Nc * R), [n_tiles] * (Nc * R), [], 0, 0
    for ids, L in buckets_cpu:
        for i, g in enumerate(ids):
            base[g], places[g] = first + i * L, place + i
        buckets.append((len(ids), L, first, place))
        first, place = first + len(ids) * L, place + len(ids)
    # slot of the pair in sorted place s of row r: base[g] + s - starts[r, j]; "no block": slot P, past the last bucket
    base = torch.tensor(base + [first] * R, dtype=torch.long, device=device).view(Nc + 1, R).t() - starts
    slot = base.gather(1, block) + torch.arange(T * K, device=device)  # (R, T * K)
    chosen = block < Nc
    slot.masked_fill_(~chosen, first)
    row = order // K * R + torch.arange(R, device=device)[:, None]  # (R, T * K) query row t * R + r
    slot_c, row_c = slot[chosen], row[chosen]
    rows = torch.zeros(first, dtype=torch.long, device=device).index_copy_(0, slot_c, row_c)
    lse_rows = torch.full((first,), T * R, dtype=torch.long, device=device).index_copy_(0, slot_c, row_c)
    pair_slots = torch.empty_like(slot).scatter_(1, order, slot).view(R, T, K).permute(2, 1, 0)  # (K, T, R)
    tiles = torch.tensor([g for ids, _ in buckets_cpu for g in ids], dtype=torch.long, device=device)
    return TilePlan(rows, lse_rows, pair_slots.reshape(K, T * R), tiles,
                    torch.tensor(places, dtype=torch.long, device=device), buckets)


def _buckets(counts: list[int], call_cost: int, max_slots: int | None) -> list[tuple[list[int], int]]:
    """Tiles with counts > 0 into buckets (tile ids, L = their largest count): tiles sorted by count, each bucket
    a run of them, the runs chosen by dynamic programming to minimise sum(nb * L) + call_cost * buckets."""
    order = sorted((g for g, n in enumerate(counts) if n > 0), key=lambda g: -counts[g])
    a, M = [counts[g] for g in order], len(order)
    rest = [0] * (M + 1)  # rest[i] = sum(a[i:]), the unpadded work, a lower bound of any cost of order[i:]
    for i in range(M - 1, -1, -1):
        rest[i] = rest[i + 1] + a[i]
    best, cut = [0] * (M + 1), [M] * (M + 1)  # best[i]: the least cost of order[i:]; cut[i]: where its bucket ends
    for i in range(M - 1, -1, -1):
        best[i] = None
        for e in range(i + 1, M + 1):
            pad = (e - i) * a[i] - (rest[i] - rest[e])
            if best[i] is not None and (rest[i] + pad + call_cost >= best[i]
                                        or max_slots is not None and (e - i) * a[i] > max_slots):
                break  # pad grows with e: no later end can do better (or fit)
            cost = (e - i) * a[i] + call_cost + best[e]
            if best[i] is None or cost < best[i]:
                best[i], cut[i] = cost, e
    buckets, i = [], 0
    while i < M:
        buckets.append((order[i : cut[i]], -(-a[i] // 8) * 8))  # L a multiple of 8, for `_query_split`
        i = cut[i]
    return buckets


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: TilePlan, bs, scale, fused):
        B, H, T, D = q.shape
        R = B * H
        qt, kt, vt = _token_major(q), _token_major(k, H), _token_major(v, H)  # (T, R, D)
        o_own, lse_own = _tile(*(_blocks(x, bs) for x in (qt, kt, vt)), True, scale, fused)
        out = _unblock(o_own, T).reshape(T * R, D)
        lse = _unblock(lse_own[..., None], T).reshape(T * R)
        if plan.buckets:
            q_sel = qt.reshape(T * R, D).index_select(0, plan.rows)  # (P, D)
            kg, vg = (_tile_keys(x, plan.tiles, bs) for x in (kt, vt))  # (n_tiles, 1, bs, D)
            P = plan.rows.numel()
            o_sel, lse_sel = out.new_empty(P + 1, D), lse.new_empty(P + 1)  # slot P: no choice, weight 0
            o_sel[P], lse_sel[P] = 0.0, float("-inf")
            for nb, L, first, g0 in plan.buckets:
                c = _query_split(nb, L, torch.get_num_threads())
                o_b, lse_b = _tile(_slots(q_sel, nb, L, first, c), *(x[g0 : g0 + nb].expand(nb, c, bs, D)
                                                                      for x in (kg, vg)), False, scale, fused)
                _slots(o_sel, nb, L, first, c).copy_(o_b)  # (nb, c, L / c, D)
                _slots(lse_sel, nb, L, first, c).copy_(lse_b)
            lse_all = torch.cat((lse[None], lse_sel[plan.pair_slots]))  # (K + 1, T * R)
            lse = lse_all.logsumexp(dim=0)  # (T * R,)
            w = torch.exp(lse_all - lse)[..., None]  # (K + 1, T * R, 1)
            out = out * w[0]
            for k_i, slots in enumerate(plan.pair_slots):
                out.addcmul_(o_sel.index_select(0, slots), w[k_i + 1])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.block_size, ctx.scale, ctx.fused = plan, bs, scale, fused
        return out.view(T, B, H, D).permute(1, 2, 0, 3)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, bs, scale, fused = ctx.plan, ctx.block_size, ctx.scale, ctx.fused
        B, H, T, D = q.shape
        Hkv, R, Nc = k.shape[1], B * H, T // bs
        qt, kt, vt, do = _token_major(q), _token_major(k, H), _token_major(v, H), _token_major(grad_out)
        dq, dk, dv = (_unblock(g, T).reshape(T * R, D) for g in _tile_backward(
            *(_blocks(x, bs) for x in (do, qt, kt, vt, out.view(T, R, D))), _blocks(lse.view(T, R, 1), bs)[..., 0],
            True, scale, fused))
        if plan.buckets:
            q_sel, do_sel, o_sel = (x.reshape(T * R, D).index_select(0, plan.rows) for x in (qt, do, out))
            lse_sel = torch.cat((lse, lse.new_full((1,), float("inf")))).index_select(0, plan.lse_rows)  # (P,)
            kg, vg = (_tile_keys(x, plan.tiles, bs) for x in (kt, vt))  # (n_tiles, 1, bs, D)
            P, n_tiles = plan.rows.numel(), plan.tiles.numel()
            dq_sel = dq.new_empty(P + 1, D)  # slot P: no choice
            dkv_sel = dk.new_empty(2, n_tiles + 1, bs, D)  # dk, dv of each tile; tile n_tiles: none
            dq_sel[P], dkv_sel[:, n_tiles] = 0.0, 0.0
            for nb, L, first, g0 in plan.buckets:
                c = _query_split(nb, L, torch.get_num_threads())
                dq_b, dk_b, dv_b = _tile_backward(
                    *(_slots(x, nb, L, first, c) for x in (do_sel, q_sel)),
                    *(x[g0 : g0 + nb].expand(nb, c, bs, D) for x in (kg, vg)),
                    *(_slots(x, nb, L, first, c) for x in (o_sel, lse_sel)), False, scale, fused)
                _slots(dq_sel, nb, L, first, c).copy_(dq_b)
                for g_b, g_sel in ((dk_b, dkv_sel[0, g0 : g0 + nb]), (dv_b, dkv_sel[1, g0 : g0 + nb])):
                    g_sel.copy_(g_b[:, 0]) if c == 1 else torch.sum(g_b, dim=1, out=g_sel)  # (nb, bs, D)
            for slots in plan.pair_slots:
                dq += dq_sel.index_select(0, slots)
            dkv_sel = dkv_sel[:, plan.tile_places].view(2, Nc, R, bs, D).transpose(2, 3)  # (2, Nc, bs, R, D)
            for g, g_sel in zip((dk, dv), dkv_sel):
                g[: Nc * bs * R].view(Nc, bs, R, D).add_(g_sel)
        dq = dq.view(T, B, H, D).permute(1, 2, 0, 3)
        dk, dv = (g.view(T, B, Hkv, H // Hkv, D).sum(dim=3).permute(1, 2, 0, 3) for g in (dk, dv))
        return dq, dk, dv, None, None, None, None


def _token_major(x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
    """(B, h, T, D) -> (T, B * heads, D), key/value heads repeated to `heads` query heads (a view where possible)."""
    B, h, T, D = x.shape
    x = x.permute(2, 0, 1, 3)  # (T, B, h, D)
    if heads is not None and heads != h:
        x = x[:, :, :, None].expand(T, B, h, heads // h, D)
    return x.reshape(T, B * (heads or h), D)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(T, R, ...) -> (N, R, block_size, ...) in place of memory, zero-padded to N whole blocks. As a tile batch:
    N batches of R heads, the kernel's (B, H, L, D) with the (B, L, H, D) memory it prefers."""
    T = x.shape[0]
    N = -(-T // block_size)
    if N * block_size != T:
        x = torch.cat((x, x.new_zeros(N * block_size - T, *x.shape[1:])))
    return x.view(N, block_size, *x.shape[1:]).transpose(1, 2)


def _unblock(x: torch.Tensor, T: int) -> torch.Tensor:
    """The inverse of `_blocks`: (N, R, block_size, ...) -> (T, R, ...)."""
    N, R, bs = x.shape[:3]
    return x.transpose(1, 2).reshape(N * bs, R, *x.shape[3:])[:T]


def _slots(x: torch.Tensor, nb: int, L: int, first: int, split: int = 1) -> torch.Tensor:
    """A bucket's slots of x (P, ...) as a tile batch (nb, split, L // split, ...): each tile's queries in `split`
    chunks, which the kernel takes as heads."""
    return x[first : first + nb * L].view(nb, split, L // split, *x.shape[1:])


def _query_split(nb: int, L: int, threads: int) -> int:
    """Chunks c per tile, which the kernel takes as heads. PyTorch's CPU FlashAttention kernels run one thread per
    (batch, head) (the backward; the forward also splits the queries), and a call with a single one runs its matrix
    products multithreaded one by one, about 50x slower on two threads (torch 2.13, MKL). Split until nb * c >= 2
    and, into chunks of at least 256 queries, until there are 4 chunks per thread; L is a multiple of 8."""
    c = 1
    while c < 8 and L % (2 * c) == 0 and (nb * c < 2 or nb * c < 4 * threads and L // (2 * c) >= 256):
        c *= 2
    return c


def _tile_keys(x: torch.Tensor, tiles: torch.Tensor, block_size: int) -> torch.Tensor:
    """The keys (or values) of tiles g = j * R + r: x (T, R, D) -> (n, 1, bs, D), block j of row r. Indexing, not
    index_select: on two threads index_select copies large slices about 20x slower here (torch 2.13, CPU)."""
    T, R, D = x.shape
    Nc = T // block_size
    return x[: Nc * block_size].view(Nc, block_size, R, D)[tiles // R, :, tiles % R][:, None]


def _tile(q, k, v, causal: bool, scale: float, fused: bool):
    """softmax(q k^T * scale) v and its log-sum-exp: q (b, R, n, D), k/v (b, R, m, D) -> (b, R, n, D), (b, R, n);
    causal needs n == m."""
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    s = _tile_scores(q, k, causal, scale)  # (b, R, n, m)
    lse = s.logsumexp(dim=-1)
    return torch.matmul(torch.exp(s - lse[..., None]), v), lse


def _tile_backward(do, q, k, v, out, lse, causal: bool, scale: float, fused: bool):
    """Gradients (dq, dk, dv) of one tile whose rows are normalised by the given (final) log-sum-exp lse (b, R, n)."""
    if fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, scale=scale)
    p = torch.exp(_tile_scores(q, k, causal, scale) - lse[..., None])  # (b, R, n, m)
    ds = p * (torch.matmul(do, v.transpose(-1, -2)) - (do * out).sum(dim=-1, keepdim=True))
    return (torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale,
            torch.matmul(p.transpose(-1, -2), do))


def _tile_scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    s = torch.matmul(q * scale, k.transpose(-1, -2))  # (b, R, n, m)
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s
