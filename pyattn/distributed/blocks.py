"""Which part of which key shard each query shard sees: the block structure of ring attention.

Pure arithmetic on positions (no tensors, no communication), so it is tested exhaustively against
dense masks. A rank's shard is one or more *spans* of the whole sequence ("contiguous": rank r holds
positions [r·n, (r+1)·n); "zigzag": of 2W chunks of n/2, rank r holds chunks r and 2W−1−r, in
that order). For a query span against a key span, the global rule (key j visible to query i iff
i − left ≤ j ≤ i + right, causal being right = 0, −1 = unbounded) becomes, in the block's own
coordinates, a band lo ≤ j − i ≤ hi. :func:`plan_block` cuts the block to the smallest rectangle
holding every visible pair (rows outside it see no key of this span, so they are skipped, not
masked) and expresses the band there with :func:`pyattn.flash_attention`'s own arguments: a
bottom-right-aligned ``causal`` and ``window``. Full blocks need no window at all; a block with no
visible pair is skipped. No dense mask is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARDINGS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Span:
    """A run of consecutive positions of the whole sequence held by one rank."""

    local_start: int  # where the span sits in the rank's shard
    global_start: int  # where it sits in the whole sequence
    length: int


@dataclass(frozen=True)
class Block:
    """One attention call: queries ``rows`` of the query shard against keys ``cols`` of the key shard,
    with ``flash_attention``'s ``causal`` and ``window`` (aligned at that sub-block's bottom-right corner)."""

    rows: slice
    cols: slice
    causal: bool
    window: tuple[int, int]

    @property
    def full(self) -> bool:
        return not self.causal and self.window == (-1, -1)

    @property
    def area(self) -> int:
        return (self.rows.stop - self.rows.start) * (self.cols.stop - self.cols.start)


def shard_spans(sharding: str, rank: int, world_size: int, shard_length: int) -> tuple[Span, ...]:
    """The spans of the whole sequence that ``rank``'s shard of ``shard_length`` positions holds."""
    if sharding == "contiguous":
        return (Span(0, rank * shard_length, shard_length),)
    if sharding == "zigzag":
        if shard_length % 2:
            raise ValueError(f"zigzag sharding: each shard holds two equal chunks, so its length must be even, "
                             f"got {shard_length}")
        chunk = shard_length // 2
        return (Span(0, rank * chunk, chunk), Span(chunk, (2 * world_size - 1 - rank) * chunk, chunk))
    raise ValueError(f"sharding must be one of {list(SHARDINGS)}, got {sharding!r}")


def plan_block(query: Span, key: Span, window_left: int, window_right: int) -> Block | None:
    """The call that computes what ``query`` sees of ``key`` under the global window, or None if nothing.

    window_left/right: the global rule's bounds (>= 0, or -1 for unbounded; causal is right = 0).
    """
    rows_total, cols_total = query.length, key.length
    unbounded = rows_total + cols_total  # beyond any |j - i| inside the block
    shift = query.global_start - key.global_start  # global j - i = local j - i - shift
    lo = shift - window_left if window_left >= 0 else -unbounded  # visible iff lo <= j - i <= hi (local)
    hi = shift + window_right if window_right >= 0 else unbounded
    # The smallest rectangle holding every visible (i, j): row i sees j in [i + lo, i + hi] ∩ [0, cols).
    row_start, row_stop = max(0, -hi), min(rows_total, cols_total - lo)
    col_start, col_stop = max(0, lo), min(cols_total, rows_total + hi)
    if lo > hi or row_start >= row_stop or col_start >= col_stop:
        return None
    # flash_attention on the rectangle sees j' - i' in [off - left, off + right], off = cols - rows (its
    # bottom-right alignment); matching the band gives left = (col_stop - row_stop) - lo, right = hi - that.
    corner = col_stop - row_stop
    left, right = corner - lo, hi - corner
    if left >= col_stop - col_start - 1:  # reaches past the first key: no bound
        left = -1
    if right >= row_stop - row_start - 1:
        right = -1
    rows, cols = slice(query.local_start + row_start, query.local_start + row_stop), \
        slice(key.local_start + col_start, key.local_start + col_stop)
    if right == 0:
        return Block(rows, cols, causal=True, window=(left, -1))
    return Block(rows, cols, causal=False, window=(left, right))


def _merged(first: Block, second: Block) -> Block | None:
    """Two full blocks side by side as one call (fewer, larger launches), or None."""
    if not (first.full and second.full):
        return None
    if first.cols == second.cols and first.rows.stop == second.rows.start:
        return Block(slice(first.rows.start, second.rows.stop), first.cols, False, (-1, -1))
    if first.rows == second.rows and first.cols.stop == second.cols.start:
        return Block(first.rows, slice(first.cols.start, second.cols.stop), False, (-1, -1))
    return None


def plan_step(query_spans: tuple[Span, ...], key_spans: tuple[Span, ...], window_left: int,
              window_right: int) -> list[Block]:
    """The calls that compute what a query shard sees of one key shard (full neighbours merged)."""
    if query_spans == key_spans and window_left < 0 and window_right in (-1, 0):
        # A shard against itself: its spans are in increasing global order, so "j <= i" (or "every j")
        # reads the same in local positions: one causal (or full) call on the whole shard.
        whole = slice(0, sum(span.length for span in query_spans))
        return [Block(whole, whole, causal=window_right == 0, window=(-1, -1))]
    blocks = [block for query in query_spans for key in key_spans
              if (block := plan_block(query, key, window_left, window_right)) is not None]
    merged = True
    while merged:
        merged = False
        for i in range(len(blocks)):
            for j in range(len(blocks)):
                if i != j and (union := _merged(blocks[i], blocks[j])) is not None:
                    blocks = [b for n, b in enumerate(blocks) if n not in (i, j)] + [union]
                    merged = True
                    break
            if merged:
                break
    return sorted(blocks, key=lambda b: (b.rows.start, b.cols.start))
