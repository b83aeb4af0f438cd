"""Token merging (ToMe), written from the paper: Bolya et al., "Token Merging: Your ViT but Faster",
ICLR 2023, section 3.

Bipartite soft matching, per layer:
  1. split the tokens into two sets A and B by alternating positions (A = even, B = odd);
  2. draw one edge from every token of A to its most similar token of B (cosine similarity of the metric);
  3. keep the r most similar edges;
  4. merge each kept A token into its B partner (size-weighted mean); every other token survives.
The class token (position 0) is never merged and stays first. Everything is batched: no Python loop over
tokens or samples.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

MergeFn = Callable[..., torch.Tensor]


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def max_merge(num_tokens: int, class_token: bool = True) -> int:
    """Largest r one matching step can merge: half of the unprotected tokens (the size of the smaller
    set once the class token is excluded)."""
    return max(num_tokens - int(class_token), 0) // 2


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, class_token: bool = True
) -> Tuple[MergeFn, MergeFn]:
    """Plan one merging step.

    Args:
        metric: (B, N, C) features that define similarity (ToMe uses the attention keys).
        r: number of tokens to remove; clamped to ``max_merge(N, class_token)``.
        class_token: protect token 0 from merging and keep it first.

    Returns:
        ``(merge, unmerge)``. ``merge(x, mode="mean")`` maps (B, N, D) -> (B, N - r, D), reducing each group
        of merged tokens with ``mode`` ("sum", "mean", "amax", ...). ``unmerge(x)`` maps (B, N - r, D) back to
        (B, N, D), copying each merged token to every position it absorbed.
    """
    B, N, _ = metric.shape
    r = min(int(r), max_merge(N, class_token))
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, C), (B, Nb, C)
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb) cosine similarity
        if class_token:
            scores[:, 0, :] = -float("inf")  # the class token (A's first) never gets an edge kept
        best_score, best_dst = scores.max(dim=-1)  # (B, Na): each A token's most similar B token
        order = best_score.argsort(dim=-1, descending=True)  # (B, Na)
        src_idx = order[:, :r]  # (B, r) A tokens merged away
        keep_idx = order[:, r:].sort(dim=-1).values  # (B, Na - r) A tokens kept, original order
        dst_idx = best_dst.gather(-1, src_idx)  # (B, r) where they go in B
        # Output slot of every input token: kept A tokens first (in order), then the B tokens; a merged A token
        # goes to its B partner's slot. Merging is then one scatter, unmerging one gather (benchmarks/NOTES.md).
        n_a = a.shape[1]
        n_kept = n_a - r
        dest_a = torch.empty_like(best_dst)  # (B, Na)
        dest_a.scatter_(1, keep_idx, torch.arange(n_kept, device=metric.device).expand(B, n_kept))
        dest_a.scatter_(1, src_idx, dst_idx + n_kept)
        dest = torch.empty(B, N, 1, dtype=torch.long, device=metric.device)  # (B, N, 1)
        dest[:, ::2, 0] = dest_a
        dest[:, 1::2, 0] = torch.arange(n_kept, N - r, device=metric.device)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        index = dest.expand(B, N, x.shape[-1])
        out = x.new_zeros(B, N - r, x.shape[-1])  # (B, N - r, D); class token first when protected
        if mode == "sum":
            return out.scatter_add(1, index, x)
        return out.scatter_reduce(1, index, x, reduce=mode, include_self=False)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return x.gather(1, dest.expand(B, N, x.shape[-1]))  # (B, N, D)

    return merge, unmerge


def merge_wavg(
    merge: MergeFn, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` (B, N, D) as a size-weighted mean; sizes (B, N, 1) add up. ``size=None`` means ones."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


RSpec = Union[int, Tuple[int, float], Sequence[int]]


def parse_r(num_layers: int, r: RSpec) -> List[int]:
    """Per-layer merge counts from an int (constant), an ``(r, inflection)`` pair or a per-layer list.

    ``(r, inflection)`` keeps the total at about ``num_layers * r`` while tilting the schedule: inflection
    in [-1, 1]; positive merges more in early layers (decreasing schedule, which the ToMe paper found
    best), negative more in late layers, 0 is constant.
    """
    if isinstance(r, bool):
        raise TypeError("r must be an int, an (r, inflection) pair or a list of ints, not a bool")
    if isinstance(r, int):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return [r] * num_layers
    r = list(r)
    if len(r) == 2 and isinstance(r[1], float):
        base, inflect = int(r[0]), float(r[1])
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflection must be in [-1, 1], got {inflect}")
        if num_layers == 1:
            return [base]
        first, last = base * (1.0 + inflect), base * (1.0 - inflect)
        step = (last - first) / (num_layers - 1)
        return [max(int(round(first + step * i)), 0) for i in range(num_layers)]
    if len(r) != num_layers:
        raise ValueError(
            f"a per-layer r schedule needs one entry per layer: got {len(r)} entries for {num_layers} layers"
        )
    if any(int(v) != v or v < 0 for v in r):
        raise ValueError(f"per-layer r values must be non-negative ints, got {r}")
    return [int(v) for v in r]


def token_counts(num_tokens: int, schedule: Sequence[int], class_token: bool = True) -> List[int]:
    """Token count after each layer of ``schedule``, with the same clamping as the matching step."""
    counts, n = [], num_tokens
    for r in schedule:
        n -= min(r, max_merge(n, class_token))
        counts.append(n)
    return counts


def check_schedule(num_tokens: int, schedule: Sequence[int], class_token: bool = True) -> None:
    """Reject a schedule that asks to merge everything: at least one token besides the class token must
    remain before clamping, otherwise the configuration is almost certainly a mistake."""
    protected = int(class_token)
    left = num_tokens - sum(schedule)
    if left <= protected:
        raise ValueError(
            f"the r schedule {list(schedule)} removes {sum(schedule)} of {num_tokens} tokens, leaving "
            f"{left} besides the class token: lower r so that sum(r) <= {num_tokens - protected - 1}"
        )
