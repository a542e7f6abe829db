"""A cost model, on paper, of all-reduce and MoE dispatch/combine across nodes of 8 H100s, next to
published figures (the README's "Beyond one node" table is this module's output):

    python3 -m symcomm.bench.cost

Terms (per GPU, per direction): B_NVL, the NVLink bandwidth a copy kernel achieves; B_NIC, one
400 Gb/s NIC per GPU (its rail); A_NVL and A_NET, the latency of one signalled step over NVLink and
over the network. Hierarchical: reduce (or gather) inside the node over NVLink, cross the network
once per destination node on each GPU's own rail, finish inside the node, the phases pipelined in
chunks so that the slower one sets the time. Flat: every PE puts its whole message to every other
PE, so off-node traffic crosses the network once per remote GPU, not once per remote node. Built:
symcomm's remote path as it is, hierarchical but with its steps one after the other (each kernel
ends with a barrier), bf16 rows behind their routing codes for dispatch (no FP8 yet), and combine's
partial sums sent back in float32.

What it leaves out: NVLS/SHARP in-switch reduction (NCCL's large all-reduce uses it), congestion and
adaptive routing, NIC message rates for small puts, GPU-NIC affinity, kernel launch and host
overheads, uneven expert load (the model takes routing uniform), and the compute overlapped with
communication.
"""

from __future__ import annotations

from dataclasses import dataclass

B_NVL = 370e9  # bytes/s: NVLink 4, 450 GB/s line rate per direction, about 370 achievable
B_NIC = 50e9  # bytes/s: 400 Gb/s
A_NVL = 3e-6  # s per NVLink step (a put or load round with its flag)
A_NET = 5e-6  # s per network step (an RDMA put with signal, one way)
GPUS_PER_NODE = 8

# DeepSeek-V3: hidden 7168, top-8 of 256 experts, tokens to at most 4 nodes (node-limited routing),
# dispatch in FP8 (a scale per 128 values), combine in BF16.
HIDDEN, TOP_K, MAX_NODES = 7168, 8, 4
DISPATCH_BYTES = HIDDEN + HIDDEN // 128 * 4
COMBINE_BYTES = HIDDEN * 2
SIZES = {"decode": 128, "prefill": 4096}  # tokens per rank
NODES = (2, 4, 16)

# Published, for comparison (H800 with one CX7 400 Gb/s NIC per GPU, DeepSeek-V3 shapes):
# DeepEP's V1 low-latency kernels at 128 tokens (latency, us) and normal kernels at 4096 tokens
# (bottleneck RDMA bandwidth, GB/s), by EP size: github.com/deepseek-ai/DeepEP, docs/legacy.md.
DEEPEP_LOW_LATENCY_US = {16: (118, 195), 32: (155, 273), 128: (192, 369)}  # (dispatch, combine)
DEEPEP_NORMAL_GBS = {16: (43, 43), 32: (58, 57)}
# NCCL all-reduce bus bandwidth at 8 GB and more on H100 SXM with NVLink and NDR InfiniBand, as a
# cluster-validation guide publishes it (saturncloud.io/blog/crusoe-nccl-cluster-validation).
NCCL_LARGE_BUSBW_GBS = "400-450"


@dataclass(frozen=True)
class Estimate:
    hierarchical_s: float
    flat_s: float
    built_s: float


def all_reduce(nbytes: float, nodes: int) -> Estimate:
    """nbytes per GPU, summed over nodes x 8 GPUs."""
    g, n = GPUS_PER_NODE, nodes
    nvl = 2 * (g - 1) / g * nbytes / B_NVL  # reduce-scatter then all-gather inside the node
    net = 2 * (n - 1) / n * (nbytes / g) / B_NIC  # this GPU's 1/8 across the nodes, on its rail
    hierarchical = max(nvl, net) + 2 * A_NVL + 2 * (n - 1) * A_NET
    # One-shot push: every input to every PE; the off-node copies share this GPU's NIC.
    flat = max((g - 1) * nbytes / B_NVL, (n - 1) * g * nbytes / B_NIC) + A_NET
    # Built: push reduce-scatter in the node, this GPU's 1/8 pushed to each rail peer, push all-gather
    # in the node; three kernels, each a data step and a closing barrier.
    built = nvl + (n - 1) * (nbytes / g) / B_NIC + 4 * A_NVL + 2 * A_NET
    return Estimate(hierarchical, flat, built)


def remote_nodes_per_token(nodes: int) -> float:
    """Other nodes a token's top-8 experts sit on (uniform routing, capped by node-limited routing)."""
    return min((nodes - 1) * (1 - (1 - 1 / nodes) ** TOP_K), MAX_NODES)


def moe(tokens: int, nodes: int, combine: bool) -> Estimate:
    """Dispatch, or combine (the same traffic backwards), of `tokens` tokens per GPU."""
    g = GPUS_PER_NODE
    token_bytes = COMBINE_BYTES if combine else DISPATCH_BYTES
    remote = tokens * remote_nodes_per_token(nodes)
    # Counts first (one step), then each token once per destination node on this GPU's rail, then
    # fanned out inside that node to its experts' GPUs.
    net = remote * token_bytes / B_NIC
    nvl = tokens * TOP_K * (g - 1) / g * token_bytes / B_NVL
    hierarchical = max(net, nvl) + 2 * A_NET + A_NVL
    # Every (token, expert) pair straight to its GPU: off-node pairs each cross the network.
    flat = tokens * TOP_K * (nodes - 1) / nodes * token_bytes / B_NIC + 2 * A_NET
    # Built, four barriered steps. Dispatch: counts, a record (8-byte codes, bf16 row) to every
    # destination node, the fan-out by NVLink stores. Combine: records of codes and float32 weights
    # out, the node's weighted sums by NVLink loads, float32 partial sums back.
    row = HIDDEN * 2
    across = remote * (TOP_K * 12 + 2 * row if combine else TOP_K * 8 + row)
    built = across / B_NIC + tokens * TOP_K * (g - 1) / g * row / B_NVL + 4 * A_NET
    return Estimate(hierarchical, flat, built)


def _us(s: float) -> str:
    return f"{s * 1e6:,.0f}"


def table() -> str:
    """The README's table: model next to published figures."""
    rows = ["| op | size | nodes x 8 | hierarchical (model) | flat push (model) | symcomm as built (model) | published |",
            "|---|---|---|---|---|---|---|"]
    for name, tokens in SIZES.items():
        nbytes = tokens * HIDDEN * 2
        for n in NODES:
            e = all_reduce(nbytes, n)
            rows.append(f"| all-reduce bf16 | {name}: {tokens} x {HIDDEN} ({nbytes / 2**20:.1f} MiB) | {n} | "
                        f"{_us(e.hierarchical_s)} us | {_us(e.flat_s)} us | {_us(e.built_s)} us | |")
    big = 8 * 2**30
    e = all_reduce(big, 2)
    def busbw(seconds: float) -> float:  # NCCL's bus bandwidth: 2 (r - 1) / r of the bytes per second
        return big * 2 * 15 / 16 / seconds / 1e9

    rows.append(f"| all-reduce bf16 | 8 GiB | 2 | {busbw(e.hierarchical_s):.0f} GB/s busbw | "
                f"{busbw(e.flat_s):.0f} GB/s busbw | {busbw(e.built_s):.0f} GB/s busbw | "
                f"NCCL: {NCCL_LARGE_BUSBW_GBS} GB/s busbw |")
    for op, which in (("dispatch fp8", 0), ("combine bf16", 1)):
        for name, tokens in SIZES.items():
            for n in NODES:
                e, ep = moe(tokens, n, combine=bool(which)), n * GPUS_PER_NODE
                if name == "decode":
                    pub = DEEPEP_LOW_LATENCY_US.get(ep)
                    published = f"DeepEP low-latency EP{ep}: {pub[which]} us" if pub else ""
                else:
                    pub = DEEPEP_NORMAL_GBS.get(ep)
                    published = f"DeepEP normal EP{ep}: {pub[which]} GB/s RDMA" if pub else ""
                token_bytes = COMBINE_BYTES if which else DISPATCH_BYTES
                rdma = tokens * remote_nodes_per_token(n) * token_bytes / e.hierarchical_s / 1e9
                rows.append(f"| MoE {op} | {name}: {tokens} tokens | {n} | {_us(e.hierarchical_s)} us "
                            f"({rdma:.0f} GB/s RDMA) | {_us(e.flat_s)} us | {_us(e.built_s)} us | {published} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
