#!/usr/bin/env python3
"""Model check of the persistent warp-specialised forward's synchronisation protocol
(kernels/block_sparse_fwd_sm90.cu, FwdSm90WsKernel<..., kPersistent = true>).

One CTA: the producer thread and the two consumer warpgroups as coroutines, the mbarriers
(q_full, q_empty, k_full/v_full/empty of the 3-stage K/V ring) with arrival counts, transaction
bytes and phases (try_wait.parity semantics), named barriers 1 and 2 (ping-pong turns), the
shared item slots, and TMA loads that land after random delays. Random interleavings over random
item lists (empty rows included) check that every consumer reads the Q and K/V tiles of its own
item and tile, sees every item in order, and never deadlocks. The kernel cannot be run without a
GPU; this checks the protocol it implements, and keeps checking it if the protocol changes here.
Three mutations (no release of an item's last ring slot, no wait for q_empty before reloading Q,
no initial turn hand-over) must each be caught, so the model is known to be able to fail.
Usage: python3 ws_persistent_protocol_model.py [schedules]"""
import random
import sys

STAGES = 3


class Mbar:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def arrive(self, n=1):
        self.pending -= n
        assert self.pending >= 0, "more arrivals than the barrier's count"
        self._complete()

    def expect_tx(self, nbytes):
        self.tx += nbytes

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        assert self.tx >= 0
        self._complete()

    def _complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity):  # mbarrier.try_wait.parity
        return (self.phase & 1) != parity


class NamedBar:  # bar.sync / bar.arrive with two warpgroups as the units
    def __init__(self):
        self.arrived, self.gen = 0, 0

    def arrive(self):
        self.arrived += 1
        if self.arrived == 2:
            self.arrived, self.gen = 0, self.gen + 1


class Deadlock(Exception):
    pass


def run(counts, seed, mutation=None):
    rng = random.Random(seed)
    total = len(counts)
    q_full, q_empty = Mbar(1), Mbar(8)
    k_full = [Mbar(1) for _ in range(STAGES)]
    v_full = [Mbar(1) for _ in range(STAGES)]
    empty = [Mbar(8) for _ in range(STAGES)]
    bars = {1: NamedBar(), 2: NamedBar()}
    ticket = [0]
    smem = {"q": None, "k": [None] * STAGES, "v": [None] * STAGES, "slot": [None, None]}
    inflight = []
    clock = [0]
    seen = {0: [], 1: []}

    def tma(fn):
        inflight.append((clock[0] + rng.randint(1, 6), fn))

    def producer():
        s, phase, item, j = 0, 0, 0, 0  # grid of one CTA: first item 0, then the counter
        while True:
            if item >= total:
                item = -1
            if j > 0 and mutation != "no_q_empty_wait":
                while not q_empty.done((j - 1) & 1):
                    yield
            smem["slot"][j & 1] = item
            if item < 0:
                q_full.arrive()
                return
            nxt = 1 + ticket[0]
            ticket[0] += 1
            n = counts[item]
            if n > 0:
                q_full.expect_tx(1)
                q_full.arrive()

                def q_landed(it=item):
                    smem["q"] = it
                    q_full.complete_tx(1)
                tma(q_landed)
                for i in range(n):
                    while not empty[s].done(phase ^ 1):
                        yield
                    for bar, key in ((k_full[s], "k"), (v_full[s], "v")):
                        bar.expect_tx(1)
                        bar.arrive()

                        def landed(bar=bar, key=key, s=s, tag=(item, i)):
                            smem[key][s] = tag
                            bar.complete_tx(1)
                        tma(landed)
                    s += 1
                    if s == STAGES:
                        s, phase = 0, phase ^ 1
                    yield
            else:
                q_full.arrive()  # an empty row: published, no loads
            j += 1
            item = nxt
            yield

    def consumer(cw):
        my_bar, other_bar = 1 + cw, 2 - cw
        st, ph, j = 0, 0, 0

        def turn(bar):
            gen = bars[bar].gen
            bars[bar].arrive()
            while bars[bar].gen == gen:
                yield

        while True:
            while not q_full.done(j & 1):
                yield
            item = smem["slot"][j & 1]
            if item < 0:
                return
            n = counts[item]
            if n > 0:
                while not k_full[st].done(ph):
                    yield
                if cw == 1 and mutation != "no_initial_handover":
                    bars[1].arrive()
                yield from turn(my_bar)
                assert smem["q"] == item and smem["k"][st] == (item, 0), ("S0", cw, item)
                bars[other_bar].arrive()
                if n == 1:
                    q_empty.arrive(4)  # one arrival per warp once its last S GEMM completed
                yield
                for i in range(1, n):
                    pst, pph = st, ph
                    st += 1
                    if st == STAGES:
                        st, ph = 0, ph ^ 1
                    while not k_full[st].done(ph):
                        yield
                    while not v_full[pst].done(pph):
                        yield
                    yield from turn(my_bar)
                    assert smem["q"] == item and smem["k"][st] == (item, i), ("S", cw, item, i)
                    assert smem["v"][pst] == (item, i - 1), ("PV", cw, item, i - 1)
                    bars[other_bar].arrive()
                    if i == n - 1:
                        q_empty.arrive(4)
                    yield
                    empty[pst].arrive(4)
                    yield
                while not v_full[st].done(ph):
                    yield
                yield from turn(my_bar)
                assert smem["v"][st] == (item, n - 1), ("PV last", cw, item)
                if cw == 0:
                    bars[other_bar].arrive()
                yield
                if mutation != "no_last_slot_release":
                    empty[st].arrive(4)
                st += 1
                if st == STAGES:
                    st, ph = 0, ph ^ 1
            else:
                q_empty.arrive(4)
            seen[cw].append(item)
            j += 1
            yield

    threads = {0: producer(), 1: consumer(0), 2: consumer(1)}
    while threads:
        clock[0] += 1
        for f in [f for f in inflight if f[0] <= clock[0]]:
            inflight.remove(f)
            f[1]()
        t = rng.choice(sorted(threads))
        try:
            next(threads[t])
        except StopIteration:
            del threads[t]
        if clock[0] > 100000:
            raise Deadlock("no progress: %s" % sorted(threads))
    return seen


def check(schedules, mutation=None):
    for seed in range(schedules):
        rng = random.Random(seed)
        counts = [rng.choice([0, 1, 1, 2, 3, 4, 5]) for _ in range(rng.randint(1, 12))]
        seen = run(counts, seed, mutation)
        for cw in (0, 1):
            assert seen[cw] == list(range(len(counts))), (seed, cw, seen[cw], counts)


def main():
    schedules = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    check(schedules)
    print("protocol: %d random schedules, no deadlock, every read saw its own tile" % schedules)
    for mutation in ("no_last_slot_release", "no_q_empty_wait", "no_initial_handover"):
        try:
            check(schedules, mutation)
        except (AssertionError, Deadlock) as e:
            print("mutation %s caught: %s" % (mutation, str(e)[:80]))
            continue
        print("mutation %s NOT caught: the model cannot fail" % mutation)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
