"""Passage recall: memory finds the passages a prompt asks about; the model reads them in its window.

The memory read answers with the token after each query token's match, an induction head over the
past: it answers a question that restates a fact up to its value. A question in other words finds
the fact only through the rare tokens it shares with it (a name, a code), and no read at the
memory layer turns that into the value (docs/research-log.md § Runs 20–26). The model reads a
fact well when the fact is in its window. So before a prompt's local window is read:

1. the prompt's last `query_tokens` vote for the blocks of memory (`block` tokens each, in the
   order memory was written) that hold them, each distinct token with log(blocks / the blocks
   holding it): a word found in most blocks votes for next to nothing, a name found once votes most;
2. the best `blocks` blocks whose vote is at least `stand_out` times the 16th-best block's, and at
   least `near_best` times the best block's, become passages, widened by `margin` tokens on each
   side and merged where they touch;
3. the passages go at the front of the window in the order they were written (at most a quarter
   of the window); the window's oldest tokens give way to them and go to memory like the rest of
   the prompt's past.

Memories that hold their token ids in this process take part (`passage_tokens`): a bank (the
prompt's own past, a session) and built memories opened here. Remote shard replicas do not.
"""

from __future__ import annotations

import numpy as np

# The block whose vote is "the background" a passage must stand out from (the last one in a
# memory of fewer blocks).
REFERENCE_BLOCK = 16


def block_votes(memory_ids: np.ndarray, question: np.ndarray, block: int) -> np.ndarray:
    """(ceil(N / block),) votes of the question's distinct tokens for the blocks holding them."""
    ids = np.asarray(memory_ids, dtype=np.int64)
    n = len(ids)
    votes = np.zeros(-(-n // block))
    asked = np.unique(np.asarray(question, dtype=np.int64))
    asked = asked[asked >= 0]
    if n == 0 or len(asked) == 0:
        return votes
    at = np.flatnonzero(np.isin(ids, asked))  # memory positions holding a question token, in order
    held = ids[at]
    for t in asked.tolist():
        blocks = at[held == t] // block  # ascending
        if len(blocks) == 0:
            continue
        blocks = blocks[np.concatenate([[True], blocks[1:] != blocks[:-1]])]  # one vote a block
        votes[blocks] += np.log(len(votes) / len(blocks))
    return votes


def find_passages(memory_ids: np.ndarray, question: np.ndarray, config, max_tokens: int) -> list[tuple[int, int]]:
    """Ranges [a, b) of memory_ids (in written order) to read before the window: see the module
    docstring. `config` is a PassageConfig; at most `max_tokens` tokens in all (the best blocks
    first)."""
    if config.blocks == 0 or max_tokens <= 0:
        return []
    n = len(memory_ids)
    votes = block_votes(memory_ids, question, config.block)
    if not votes.any():
        return []
    order = np.argsort(-votes, kind="stable")
    # a passage stands out from the background and comes near the best block
    least = max(config.stand_out * votes[order[min(REFERENCE_BLOCK, len(order)) - 1]],
                config.near_best * votes[order[0]])
    chosen, spans = [], []
    for b in order[: config.blocks].tolist():
        if votes[b] <= 0 or votes[b] < least:
            break
        span = (max(0, b * config.block - config.margin), min(n, (b + 1) * config.block + config.margin))
        merged = merge_spans(sorted(spans + [span]))
        if sum(e - s for s, e in merged) > max_tokens:
            break
        chosen, spans = merged, spans + [span]
    return chosen


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [a, b) ranges -> the same ranges with those that touch or overlap joined."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
