"""bench/kernels/l2_model.py: the L2 model's accounting and the work orders it mirrors.

The model ranks backward work orders before GPU time is spent on them (kernels/NOTES.md,
"Backward v12"), so its byte counts and its copy of the kernels' scheduling rules must be right:
LRU hits, misses and dirty write-backs on hand-made access patterns; every (head, key tile,
query tile) pair exactly once in every order; chunks within their size and in place; candidates
beyond the slots first; the tail longest-first; the median sort within heads only.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.environ.get("SPARGE_SOURCE_DIR", "."), "bench", "kernels"))
import l2_model as m  # noqa: E402


def test_lru_counts_misses_and_dirty_write_backs():
    l2 = m.L2(cap=3 * 100)
    for key in ["a", "b", "c"]:
        l2.access(key, 100)
    assert (l2.rd, l2.wr, l2.miss, l2.hit) == (300, 0, 3, 0)
    l2.access("a", 100)  # hit; "b" is now the least recently used
    l2.access("d", 100, rmw=True)  # miss: reads the line, evicts "b" (clean)
    assert (l2.rd, l2.wr, l2.hit) == (400, 0, 1)
    assert "b" not in l2.lru and "d" in l2.lru
    for key in ["e", "f", "g"]:  # evicts "c", "a", then the dirty "d": one write-back
        l2.access(key, 100)
    assert l2.wr == 100
    l2.access("h", 100, write=True)  # a write miss allocates without reading
    assert l2.rd == 700
    l2.flush()  # the dirty "h" is still cached
    assert l2.wr == 200


def test_hint_levels_protect_the_accumulator_and_demote_streamed_tiles():
    l2 = m.L2(cap=2 * 100, hints=2)
    l2.access("acc", 100, rmw=True, cls="last")
    l2.access("q1", 100, cls="first")
    l2.access("q2", 100, cls="first")  # evicts q1 (the older evict-first line), not acc
    assert "acc" in l2.keep and "q1" not in l2.first and "q2" in l2.first
    l2.access("n", 100)  # a normal line goes after the evict-first ones: q2 leaves
    assert "q2" not in l2.first and "n" in l2.lru and "acc" in l2.keep
    plain = m.L2(cap=2 * 100, hints=0)
    for key in ["acc", "q1", "q2"]:
        plain.access(key, 100, rmw=key == "acc")
    assert "acc" not in plain.lru and plain.wr == 100


def synthetic_mask(H=2, nk=16, nq=16, heavy=(0,), seed=0):
    """Transposed LUT: each key block kept by a few query blocks, the `heavy` ones by all."""
    rng = np.random.default_rng(seed)
    tc = np.zeros((H, nk), dtype=np.int32)
    ti = np.full((H, nk, nq), -1, dtype=np.int32)
    for h in range(H):
        for kt in range(nk):
            qbs = np.arange(nq) if kt in heavy else np.sort(rng.choice(nq, size=rng.integers(1, 4), replace=False))
            tc[h, kt] = len(qbs)
            ti[h, kt, :len(qbs)] = qbs
    return tc, ti


def pairs(order):
    return sorted((it.h, it.kt, t) for it in order for t in it.tiles)


@pytest.mark.parametrize("chunk_blocks,max_slots,sort", [(4, 100, False), (4, 100, True), (4, 1, False), (32, 100, True)])
def test_kernel_chunk_order_covers_every_pair_once(chunk_blocks, max_slots, sort):
    L = 16 * 128
    tc, ti = synthetic_mask()
    items = m.make_items(tc, ti, L, 128)
    order = m.order_kernel_chunk(items, sms=4, chunk_blocks=chunk_blocks, max_slots=max_slots, sort_median=sort)
    assert pairs(order) == pairs(items)
    chunked = [it for it in order if it.chunked]
    whole_heavy = [it for it in order if not it.chunked and len(it.tiles) == 2 * 16]
    if chunk_blocks == 32:  # no tile is kept by more than 32 blocks: nothing to chunk
        assert not chunked
        return
    # Chunks: at most chunk_blocks query blocks each, their tiles in LUT order per key tile.
    assert all(len(it.tiles) <= 2 * chunk_blocks for it in chunked)
    if max_slots == 1:  # one heavy tile chunked (head 0's), the other first and whole
        assert {it.h for it in chunked} == {0} and order[0] is whole_heavy[0] and whole_heavy[0].h == 1
    else:
        assert len(chunked) == 2 * 4 and not whole_heavy


def test_tail_is_longest_first_and_sort_stays_within_heads():
    L = 64 * 128
    tc, ti = synthetic_mask(H=3, nk=64, nq=64, heavy=(0, 7), seed=3)
    items = m.make_items(tc, ti, L, 128)
    sms = 4
    order = m.order_kernel_chunk(items, sms, chunk_blocks=8, max_slots=100, sort_median=True)
    tail = order[-2 * sms:]
    assert [len(it.tiles) for it in tail] == sorted((len(it.tiles) for it in tail), reverse=True)
    body = order[:-2 * sms]
    heads = [it.h for it in body]
    assert heads == sorted(heads)  # head by head
    for h in range(3):
        med = [it.tiles[len(it.tiles) // 2] for it in body if it.h == h]
        assert med == sorted(med)


def test_sharing_query_tiles_needs_fewer_dram_bytes():
    """Two orders of the same items: sorted by query position, concurrently running items share
    query tiles, so a small L2 reads fewer bytes than in a shuffled order."""
    H, nk, nq = 1, 64, 64
    tc = np.full((H, nk), 4, dtype=np.int32)
    ti = np.full((H, nk, nq), -1, dtype=np.int32)
    for kt in range(nk):
        ti[0, kt, :4] = [(kt // 4) * 4 + j for j in range(4)]  # groups of 4 key tiles share 4 query blocks
    items = m.make_items(tc, ti, nq * 128, 128)
    rng = np.random.default_rng(1)
    shuffled = [items[i] for i in rng.permutation(len(items))]
    cap = 8 * 4 * 2 * (2 * m.QB + m.LDB + m.ACCB)  # about two groups' query tiles
    grouped = m.simulate(items, sms=4, cap=cap)
    scattered = m.simulate(shuffled, sms=4, cap=cap)
    assert grouped["read_gb"] < 0.8 * scattered["read_gb"]
    assert grouped["makespan"] == scattered["makespan"]


def test_list_room_limits_chunking_like_the_kernel():
    """Chunks of one block: each sink tile needs nq - 1 = 31 extra entries; with 3 x items of room
    only the first ones in item order are chunked, the others go first and whole."""
    nk = nq = 32
    tc, ti = synthetic_mask(H=4, nk=nk, nq=nq, heavy=(0, 5, 9, 17, 30))
    items = m.make_items(tc, ti, nq * 128, 128)
    order = m.order_kernel_chunk(items, sms=4, chunk_blocks=1, max_slots=1000)
    chunked = {(it.h, it.kt) for it in order if it.chunked}
    assert len(chunked) == (3 * len(items)) // (nq - 1) == 12  # of 20 sink tiles
    assert chunked == {(h, kt) for h in range(4) for kt in (0, 5, 9, 17, 30)
                       if h * 5 + (0, 5, 9, 17, 30).index(kt) < 12}
    whole_first = order[:8]
    assert all(len(it.tiles) == 2 * nq and not it.chunked for it in whole_first)
    assert pairs(order) == pairs(items)


def test_per_head_dq_conversion_reads_the_accumulator_from_l2_only_while_it_fits():
    """The per-head dQ conversion in the model (SPARGE_BWD_FUSED_DQ=1 of the twelfth session, since
    removed from the kernel; the model keeps the account of why it did not pay): each head's accumulator tiles are converted after its
    last item (read, zeros stored back, dQ written). With an L2 that holds a head's accumulator the
    conversion reads nothing from DRAM, so the whole backward moves fewer bytes than the default's
    zeroing + kernel + convert; with a tiny L2 every conversion read misses."""
    H, nk, nq = 2, 8, 8
    tc = np.full((H, nk), nq, dtype=np.int32)  # dense: every key tile visits every query block
    ti = np.tile(np.arange(nq, dtype=np.int32), (H, nk, 1))
    items = m.make_items(tc, ti, nq * 128, 128)  # head 0's items, then head 1's
    nqt = 2 * nq
    acc_bytes = H * nqt * m.ACCB

    def conv_reads(cap):
        base = m.simulate(items, sms=2, cap=cap, hints=2)
        heads = m.simulate(items, sms=2, cap=cap, hints=2, dq_heads=True, nqt=nqt)
        # The conversion's DRAM reads: what the run with conversions read beyond the kernel alone.
        return base, heads, (heads["read_gb"] - base["read_gb"]) * 1e9

    big = 4 * nqt * (2 * m.QB + m.LDB + m.ACCB) + 4 * m.KVB  # a head's tiles several times over
    base, heads, extra = conv_reads(big)
    assert extra <= 0.0
    default_total = base["read_gb"] + base["write_gb"] + 2.5 * acc_bytes / 1e9
    assert heads["read_gb"] + heads["write_gb"] < default_total
    base, heads, extra = conv_reads(2 * m.ACCB)
    assert extra >= 0.9 * acc_bytes
