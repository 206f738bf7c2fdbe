// The lazy zeroing protocol of the fused backward (SPARGE_BWD_LAZY_ZERO, kernels/NOTES.md "Ninth
// session"), as plain functions shared by the schedule kernel and a CPU test that simulates the
// persistent CTAs (tests/kernels/lazy_zero_test.cc).
//
// The work list holds B * H heads' entries in head order ("body", entry e at list position e
// when there are no heavy-first entries), except its last entries from tail_from on, which are
// reordered across heads. seg[g] is the first body entry of head g. Head g's dQ accumulator is
// zeroed inside the fused kernel ("covered") when g >= lo and all of head g - 2's entries lie
// before the tail: entry j of head g - 2's n entries zeroes slice j of n of head g at its start
// and announces it at its end; an entry of head g waits at its start until all of head g - 2's
// entries have announced.
#pragma once

#if defined(__CUDACC__)
#define SPARGE_LAZY_HD __host__ __device__
#else
#define SPARGE_LAZY_HD
#endif

namespace sparge::kernels::detail {

// One past the last covered head (heads lo .. hi - 1, seg rising so the covered heads are a
// range), or 0 when none is: no lazy zeroing with heavy-first entries (their heads' entries come
// before everything).
SPARGE_LAZY_HD inline int LazyZeroHi(const int* seg, int nbh, int lo, int tail_from, int heavy_total) {
  if (heavy_total != 0 || lo < 2) return 0;
  int a = lo, b = nbh - 1, last = lo - 1;
  while (a <= b) {
    const int m = (a + b) / 2;
    if (seg[m - 1] <= tail_from) {
      last = m;
      a = m + 1;
    } else {
      b = m - 1;
    }
  }
  return last >= lo ? last + 1 : 0;
}

struct LazyZeroRow {
  int duty;    // head whose slice this entry zeroes, -1 for none
  int slice;   // which slice
  int slices;  // of how many
  int need;    // announcements (per entry) an entry of its head waits for; 0: none
};

// The row of list position pos, whose entry belongs to head g; covered heads [lo, hi).
SPARGE_LAZY_HD inline LazyZeroRow LazyZeroRowOf(int pos, int g, const int* seg, int lo, int hi, int tail_from) {
  LazyZeroRow r{-1, 0, 1, 0};
  if (g + 2 >= lo && g + 2 < hi && pos < tail_from) {
    r.duty = g + 2;
    r.slice = pos - seg[g];
    r.slices = seg[g + 1] - seg[g];
  }
  if (g >= lo && g < hi) r.need = seg[g - 1] - seg[g - 2];
  return r;
}

}  // namespace sparge::kernels::detail
