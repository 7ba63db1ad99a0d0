"""Which prefix positions of a request the server fills from the stored K/V.

The stored keys carry RoPE for positions ``0..P-1``, so they apply only to a
prompt whose first ``P`` token ids are exactly the prefix (a server always
places a prompt at position 0). Two limits come from the server, not from
IntactKV: positions it already holds (its own prefix cache) are not loaded
again, and the last token of the sequence is never loaded, because the server
must compute at least one token to produce logits.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["loadable_prefix_end", "prefix_positions_to_load", "starts_with_prefix"]


def starts_with_prefix(prompt_token_ids: Sequence[int] | None, prefix_token_ids: Sequence[int]) -> bool:
    """A prompt given as embeddings (``None``) or shorter than the prefix never matches."""
    if prompt_token_ids is None or len(prompt_token_ids) < len(prefix_token_ids):
        return False
    return list(prompt_token_ids[: len(prefix_token_ids)]) == list(prefix_token_ids)


def loadable_prefix_end(prefix_length: int, num_tokens: int) -> int:
    """One past the last prefix position that may be loaded for a sequence of ``num_tokens`` tokens."""
    return max(0, min(prefix_length, num_tokens - 1))


def prefix_positions_to_load(
    prompt_token_ids: Sequence[int] | None,
    prefix_token_ids: Sequence[int],
    num_computed_tokens: int,
    num_tokens: int,
) -> range:
    """Prefix positions to fill from the stored K/V; empty when the prompt does not start with the prefix.

    ``num_computed_tokens`` are positions the server already holds (prefix-cache
    hits); ``num_tokens`` is the request's length so far (prompt, plus output
    tokens when a preempted request is resumed).
    """
    if not starts_with_prefix(prompt_token_ids, prefix_token_ids):
        return range(0)
    end = loadable_prefix_end(len(prefix_token_ids), num_tokens)
    return range(num_computed_tokens, max(num_computed_tokens, end))
