"""Expert-parallel mixture of experts over torch.ops.symcomm.moe_dispatch / moe_combine (docs/moe.md).

Every rank routes its own tokens. Rank r owns experts [r * E / N, (r + 1) * E / N); dispatch sends
each (token, expert) pair's row to its expert's owner, the owner runs its experts on everything it
received, and combine brings each pair's output back to the token's rank, weighted and summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from symcomm import runtime
from symcomm.nn.sharding import load_shards, split

ops = torch.ops.symcomm


@dataclass(frozen=True)
class _Buffers:
    """A layer's exchange buffers, allocated once; forward and backward both use them as scratch,
    since nothing that autograd saves points into them."""

    num_experts: int
    expert_x: torch.Tensor  # [E_local, capacity, H]: the rows this rank's experts received
    expert_y: torch.Tensor  # [E_local, capacity, H]: the experts' outputs, read by combine
    expert_counts: torch.Tensor  # [E_local] int32: rows received per local expert

    def received(self) -> torch.Tensor:
        """A copy of expert_x with the rows past each expert's count zeroed. Those rows hold stale
        data (uninitialised memory at first, possibly NaN) that no output reads, but the expert
        weights' gradients sum over every row, and 0 * NaN is NaN. Being a copy, it also leaves the
        buffer free for the next dispatch."""
        slots = torch.arange(self.expert_x.shape[1], device=self.expert_counts.device)
        valid = slots < self.expert_counts.unsqueeze(1)
        return self.expert_x.masked_fill(~valid.unsqueeze(-1), 0)

    def staged(self, expert_y: torch.Tensor) -> torch.Tensor:
        """expert_y in the buffer combine reads: on the nvshmem backend peers read it directly, so it
        must be the symmetric tensor allocated up front."""
        self.expert_y.copy_(expert_y)
        return self.expert_y


class _Dispatch(torch.autograd.Function):
    """(rows, routing) = moe_dispatch(x, topk_ids). Each token's row is copied to k slots, so its
    gradient is the sum of those slots' gradients: a combine with unit weights."""

    @staticmethod
    def forward(ctx, x, topk_ids, bufs):
        routing = ops.moe_dispatch(x, topk_ids, bufs.num_experts, bufs.expert_x, bufs.expert_counts)
        ctx.bufs = bufs
        ctx.save_for_backward(routing)
        ctx.mark_non_differentiable(routing)
        return bufs.received(), routing

    @staticmethod
    def backward(ctx, grad_rows, _):
        (routing,) = ctx.saved_tensors
        ones = torch.ones(routing.shape, dtype=torch.float32, device=routing.device)
        return ops.moe_combine(ctx.bufs.staged(grad_rows), ones, routing), None, None


class _Combine(torch.autograd.Function):
    """y = moe_combine(expert_y, topk_weights, routing): y[t] = sum_j w[t, j] * expert_y[routing[t, j]].

    Gradient for expert_y: the slot of pair (t, j) gets w[t, j] * g[t], one row per pair, while
    moe_dispatch sends one row per token to all of its experts. So backward dispatches the T * k pairs
    as T * k tokens with one expert each (routing // capacity); they land in the forward's slots,
    because slots are ordered by source rank, then token, then j, and pair t * k + j sorts as (t, j).
    Gradient for w[t, j]: <g[t], expert_y[routing[t, j]]>, with those rows fetched by a combine of the
    same T * k one-expert tokens at unit weight."""

    @staticmethod
    def forward(ctx, expert_y, topk_weights, routing, bufs):
        ctx.bufs = bufs
        ctx.save_for_backward(expert_y, topk_weights, routing)
        return ops.moe_combine(bufs.staged(expert_y), topk_weights, routing)

    @staticmethod
    def backward(ctx, g):
        expert_y, weights, routing = ctx.saved_tensors
        bufs = ctx.bufs
        pairs = routing.reshape(-1, 1)
        g = g.float()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            rows = (weights.unsqueeze(-1) * g.unsqueeze(1)).flatten(0, 1).to(expert_y.dtype)
            experts = pairs // bufs.expert_x.shape[1]
            ops.moe_dispatch(rows, experts, bufs.num_experts, bufs.expert_x, bufs.expert_counts)
            grad_y = bufs.received()
        if ctx.needs_input_grad[1]:
            ones = torch.ones(pairs.shape, dtype=torch.float32, device=pairs.device)
            fetched = ops.moe_combine(bufs.staged(expert_y), ones, pairs).float()
            grad_w = (fetched.view(*routing.shape, g.shape[1]) * g.unsqueeze(1)).sum(-1)
        return grad_y, grad_w, None, None


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ExpertParallelMoE: {name} must be a positive int, got {value!r}")


class ExpertParallelMoE(nn.Module):
    """A mixture of SwiGLU experts, down(silu(gate(x)) * up(x)), with experts split across ranks.

    Router: logits = x @ router_weight.T in float32, softmax, the top_k experts per token, their
    weights optionally renormalised to sum to 1. The router weight [E, H] is replicated; its gradient
    is this rank's tokens' share, to be summed over ranks like any data-parallel gradient. Rank r
    holds experts [r * E / N, (r + 1) * E / N): w_gate and w_up [E_local, F, H], w_down
    [E_local, H, F]; their gradients are complete (they come from every rank's tokens).

    forward(x [..., H]) -> [..., H], as Hugging Face MoE blocks take it (e.g. [batch, seq, H]): the
    T tokens of x's leading dimensions, T <= max_tokens_per_rank; T may differ across ranks and be 0.
    It is collective: every rank calls it once per step.

    The constructor allocates the exchange buffers, `exchange.expert_x` and `exchange.expert_y`
    ([E_local, N * max_tokens_per_rank, H], enough for any routing) and `exchange.expert_counts`,
    with symcomm.empty, which is collective on the nvshmem backend: construct layers in the same
    order on every rank. They live until symcomm.finalize(). They are not module buffers, so
    Module.to() leaves them (and their dtype) alone.

    Backward works like forward, through the same two ops and buffers (tested on the torch backend;
    on the nvshmem backend the ops' own limits apply, see docs/moe.md).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, max_tokens_per_rank: int, *, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in [("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                            ("num_experts", num_experts), ("top_k", top_k),
                            ("max_tokens_per_rank", max_tokens_per_rank)]:
            _check_positive(name, value)
        world = runtime.world_size()
        if num_experts % world:
            raise ValueError(f"ExpertParallelMoE: num_experts={num_experts} is not divisible by the expert-parallel "
                             f"size {world} (the world size)")
        if top_k > num_experts:
            raise ValueError(f"ExpertParallelMoE: top_k={top_k} is more than num_experts={num_experts}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.max_tokens_per_rank = max_tokens_per_rank
        local = num_experts // world
        kw = dict(device=device, dtype=dtype)
        self.router_weight = nn.Parameter(torch.empty(num_experts, hidden_size, **kw))
        self.w_gate = nn.Parameter(torch.empty(local, intermediate_size, hidden_size, **kw))
        self.w_up = nn.Parameter(torch.empty(local, intermediate_size, hidden_size, **kw))
        self.w_down = nn.Parameter(torch.empty(local, hidden_size, intermediate_size, **kw))
        if self.router_weight.device.type != "meta":
            self.reset_parameters()
        # With distinct experts per token, an expert gets at most one row per token of every rank.
        shape = (local, world * max_tokens_per_rank, hidden_size)
        buffer_dtype = dtype or torch.get_default_dtype()
        self.exchange = _Buffers(num_experts, runtime.empty(shape, buffer_dtype), runtime.empty(shape, buffer_dtype),
                                  runtime.empty((local,), torch.int32))

    def reset_parameters(self) -> None:
        # The router is replicated and must be equal on every rank, so it starts at zero (like the
        # row-parallel bias); each rank draws its own experts, which no other rank holds.
        nn.init.zeros_(self.router_weight)
        for w, fan_in in ((self.w_gate, self.hidden_size), (self.w_up, self.hidden_size),
                          (self.w_down, self.intermediate_size)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)

    @classmethod
    def from_dense(cls, router_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   top_k: int, renormalize: bool, max_tokens_per_rank: int) -> ExpertParallelMoE:
        """This rank's layer from the full weights: router_weight [E, H], w_gate and w_up [E, F, H],
        w_down [E, H, F] (the layout dense_moe takes)."""
        if router_weight.dim() != 2 or w_gate.dim() != 3:
            raise ValueError(f"ExpertParallelMoE.from_dense: router_weight must be [E, H] and w_gate [E, F, H], got "
                             f"{tuple(router_weight.shape)} and {tuple(w_gate.shape)}")
        experts, hidden = router_weight.shape
        inter = w_gate.shape[1]
        for name, w, shape in (("w_gate", w_gate, (experts, inter, hidden)), ("w_up", w_up, (experts, inter, hidden)),
                               ("w_down", w_down, (experts, hidden, inter))):
            if tuple(w.shape) != shape:
                raise ValueError(f"ExpertParallelMoE.from_dense: {name} must be {shape} (E and H from router_weight, "
                                 f"F from w_gate), got {tuple(w.shape)}")
        module = cls(hidden, inter, experts, top_k, renormalize, max_tokens_per_rank, device="meta",
                     dtype=router_weight.dtype)
        rank, world = runtime.rank(), runtime.world_size()
        return load_shards(module, {"router_weight": router_weight.detach().clone(),
                                    **{name: split(w.detach(), 0, rank, world)
                                       for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down))}})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"ExpertParallelMoE: x must be [..., hidden_size={self.hidden_size}], got {tuple(x.shape)}")
        return self._tokens(x.reshape(-1, self.hidden_size)).view(x.shape)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """forward on x [T, H]."""
        if x.dtype != self.exchange.expert_x.dtype:
            raise TypeError(f"ExpertParallelMoE: x has dtype {x.dtype}; the layer's buffers hold "
                            f"{self.exchange.expert_x.dtype}")
        if x.shape[0] > self.max_tokens_per_rank:
            raise ValueError(f"ExpertParallelMoE: x has {x.shape[0]} tokens, more than max_tokens_per_rank="
                             f"{self.max_tokens_per_rank} (the size the expert buffers were allocated for)")
        logits = x.float() @ self.router_weight.float().t()
        weights, ids = torch.softmax(logits, -1).topk(self.top_k, -1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if torch.is_grad_enabled():
            rows, routing = _Dispatch.apply(x, ids, self.exchange)
            return _Combine.apply(self._experts(rows), weights, routing, self.exchange)
        # Inference needs no copies: the experts read the received rows in place and write straight into
        # the buffer combine reads. Rows past an expert's count are stale; combine never reads them.
        bufs = self.exchange
        routing = ops.moe_dispatch(x, ids, self.num_experts, bufs.expert_x, bufs.expert_counts)
        self._experts(bufs.expert_x, out=bufs.expert_y)
        return ops.moe_combine(bufs.expert_y, weights, routing)

    def _experts(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Every local expert on its whole [capacity, H] block at once (batched over experts)."""
        gate = torch.bmm(rows, self.w_gate.transpose(1, 2))
        up = torch.bmm(rows, self.w_up.transpose(1, 2))
        return torch.bmm(F.silu(gate) * up, self.w_down.transpose(1, 2), out=out)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, local_experts={self.w_gate.shape[0]}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}, max_tokens_per_rank={self.max_tokens_per_rank}")


def dense_moe(x: torch.Tensor, router_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
              w_down: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """The same mixture on one process from the full weights, one expert at a time with no buffers
    (the reference ExpertParallelMoE is tested against). The router runs in x's dtype, or float32 if
    that is narrower."""
    router_dtype = torch.promote_types(x.dtype, torch.float32)
    probs = torch.softmax(x.to(router_dtype) @ router_weight.to(router_dtype).t(), -1)
    weights, ids = probs.topk(top_k, -1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    y = torch.zeros(x.shape, dtype=router_dtype, device=x.device)
    for e in range(router_weight.shape[0]):
        tokens, j = (ids == e).nonzero(as_tuple=True)
        h = F.silu(F.linear(x[tokens], w_gate[e])) * F.linear(x[tokens], w_up[e])
        y = y.index_add(0, tokens, weights[tokens, j].unsqueeze(1) * F.linear(h, w_down[e]))
    return y.to(x.dtype)
