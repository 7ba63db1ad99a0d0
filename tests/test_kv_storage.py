"""Growing buffers of the quantized region: the same tokens as concatenation, bounded copies and bounded room.

A stream's segments, kept from one read to the next: always those of a stream built anew.
"""

from __future__ import annotations

import pytest
import torch

from intactkv_modifier.kv_quant import TensorQuantSettings, quantize
from intactkv_modifier.kv_quant.storage import GROWTH, MIN_ROOM_TOKENS, GrowingTensor, QuantizedStore
from intactkv_modifier.kv_quant.stream import QuantizedSegment, Segment, TokenStream


def test_appends_and_forgetting_hold_the_tokens_concatenation_would():
    torch.manual_seed(0)
    parts = [torch.randn(2, 3, length, 4) for length in (5, 300, 1, 700, 64)]
    grown = GrowingTensor(parts[0])
    for part in parts[1:3]:
        grown.append(part)
    grown.drop_leading(100)
    for part in parts[3:]:
        grown.append(part)
    assert torch.equal(grown.view, torch.cat(parts, dim=2)[:, :, 100:])
    assert torch.equal(grown.select_rows(torch.tensor([1])).view, grown.view[1:])


def test_a_long_context_is_copied_a_bounded_number_of_times_and_holds_bounded_room():
    """32K tokens appended 32 at a time: tens of reallocations (a cat per block would be 1,000), room <= 1/16 + 256."""
    block = torch.zeros(1, 1, 32, 8, dtype=torch.uint8)
    grown = GrowingTensor(block)
    storages = {grown.storage.data_ptr()}
    for _ in range(1023):
        grown.append(block)
        storages.add(grown.storage.data_ptr())
        assert grown.storage.shape[2] <= grown.length * (1 + GROWTH) + MIN_ROOM_TOKENS + 32
    assert grown.length == 32 * 1024
    assert len(storages) < 64


def test_quantized_store_forgets_whole_groups_and_reads_back_its_tokens():
    settings = TensorQuantSettings(bits=4, granularity="per_channel", group_size=8)
    torch.manual_seed(0)
    blocks = [quantize(torch.randn(1, 2, 16, 8), settings) for _ in range(3)]
    store = QuantizedStore(blocks[0])
    store.append(blocks[1])
    store.drop_leading(8)
    store.append(blocks[2])
    held = store.tensor()
    assert held.num_tokens == 40
    assert torch.equal(held.codes, torch.cat([b.codes for b in blocks], dim=2)[:, :, 8:])
    assert torch.equal(held.scale, torch.cat([b.scale for b in blocks], dim=2)[:, :, 1:])
    with pytest.raises(ValueError, match="cannot drop 4 tokens"):
        store.drop_leading(4)


def _same_segments(actual: list[Segment], expected: list[Segment]) -> bool:
    if len(actual) != len(expected):
        return False
    for a, e in zip(actual, expected):
        if isinstance(a, QuantizedSegment) != isinstance(e, QuantizedSegment):
            return False
        if isinstance(a, QuantizedSegment) and isinstance(e, QuantizedSegment):
            tensors = [
                (a.tensor.codes, e.tensor.codes),
                (a.tensor.scale, e.tensor.scale),
                (a.tensor.minimum, e.tensor.minimum),
            ]
            if (a.skip, a.tail) != (e.skip, e.tail) or not all(torch.equal(x, y) for x, y in tensors):
                return False
        elif not torch.equal(a, e):
            return False
    return True


@pytest.mark.parametrize(("window", "read_window"), [(None, False), (20, False), (20, True)])
def test_segments_kept_between_reads_are_those_of_a_fresh_stream(window, read_window):
    """Read after every append (the prefix filling, blocks quantized, a window forgetting, rows reordered), from
    the window's start as a layer reads, or from slot 0 at every step, which keeps them from the step before."""
    settings = TensorQuantSettings(bits=4, granularity="per_channel", group_size=8)
    stream = TokenStream(settings, residual_length=4, prefix_length=3)
    torch.manual_seed(0)
    length = 0
    for step, tokens in enumerate([2, 1, 9, *[1] * 30, 17, *[1] * 20]):
        if step == 40:
            stream = stream.select_rows(torch.tensor([1, 0]))
        length += tokens
        keep_from = 0 if window is None else max(0, length - window + 1)
        stream.append(torch.randn(2, 2, tokens, 8), keep_from)
        start = keep_from if read_window else 0
        assert _same_segments(stream.segments(start), stream.select_rows(torch.arange(2)).segments(start))
    assert stream.quantized_tokens > 0
