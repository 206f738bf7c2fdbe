// The fused backward's lazy zeroing protocol (kernels/lazy_zero.h; SPARGE_BWD_LAZY_ZERO): on
// random work lists, every covered head's accumulator is split exactly once among the entries of
// the head two before it, and persistent CTAs that take list positions in order, zero their
// slice at an entry's start, announce it at the entry's end and wait at an entry's start never
// deadlock, whatever their number and the entries' durations. A variant that announces one entry
// late (the cheaper order first written) is shown to deadlock, so the simulation can tell.
#include "kernels/lazy_zero.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <queue>
#include <random>
#include <vector>

namespace sparge::kernels::detail {
namespace {

struct List {
  std::vector<int> head;  // head of the entry at each position
  std::vector<int> seg;   // first body entry of each head
  int tail_from = 0;
};

// nbh heads of [min_n, max_n] entries each in head order, then the last `tail` positions
// shuffled across heads (the kernel orders them longest-first: any order must do).
List MakeList(std::mt19937& rng, int nbh, int min_n, int max_n, int tail) {
  List l;
  std::uniform_int_distribution<int> n(min_n, max_n);
  for (int g = 0; g < nbh; ++g) {
    l.seg.push_back(static_cast<int>(l.head.size()));
    const int c = n(rng);
    for (int i = 0; i < c; ++i) l.head.push_back(g);
  }
  const int total = static_cast<int>(l.head.size());
  l.tail_from = total - std::min(total, tail);
  std::shuffle(l.head.begin() + l.tail_from, l.head.end(), rng);
  return l;
}

std::vector<LazyZeroRow> Rows(const List& l, int lo, int hi) {
  std::vector<LazyZeroRow> rows;
  for (int pos = 0; pos < static_cast<int>(l.head.size()); ++pos)
    rows.push_back(LazyZeroRowOf(pos, l.head[pos], l.seg.data(), lo, hi, l.tail_from));
  return rows;
}

TEST(LazyZero, CoveredHeadsAreSplitExactlyOnce) {
  std::mt19937 rng(7);
  int covered_total = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int nbh = 1 + static_cast<int>(rng() % 60), tail = static_cast<int>(rng() % 400);
    const List l = MakeList(rng, nbh, 1, 1 + static_cast<int>(rng() % 300), tail);
    const int hi = LazyZeroHi(l.seg.data(), nbh, 2, l.tail_from, 0);
    const std::vector<LazyZeroRow> rows = Rows(l, 2, hi);
    std::vector<int> entries(nbh, 0);
    for (int g : l.head) ++entries[g];
    for (int g = 0; g < nbh; ++g) {
      const bool covered = g >= 2 && g < hi;
      covered_total += covered;
      // Covered exactly when all of head g - 2's entries precede the tail.
      if (g >= 2) EXPECT_EQ(covered, l.seg[g - 1] <= l.tail_from) << "trial " << trial << " head " << g;
      std::vector<int> seen;
      for (size_t pos = 0; pos < rows.size(); ++pos) {
        if (rows[pos].duty != g) continue;
        EXPECT_EQ(l.head[pos], g - 2);
        EXPECT_LT(static_cast<int>(pos), l.tail_from);
        EXPECT_EQ(rows[pos].slices, entries[g - 2]);
        seen.push_back(rows[pos].slice);
      }
      if (!covered) {
        EXPECT_TRUE(seen.empty()) << "a duty for uncovered head " << g;
        continue;
      }
      std::sort(seen.begin(), seen.end());
      std::vector<int> all(entries[g - 2]);
      std::iota(all.begin(), all.end(), 0);
      EXPECT_EQ(seen, all) << "trial " << trial << " head " << g;
    }
    for (size_t pos = 0; pos < rows.size(); ++pos) {
      const int g = l.head[pos];
      EXPECT_EQ(rows[pos].need, g >= 2 && g < hi ? entries[g - 2] : 0);
    }
  }
  EXPECT_GT(covered_total, 1000);  // the trials do cover heads
}

TEST(LazyZero, NothingWithHeavyFirstEntriesOrTooFewHeads) {
  std::mt19937 rng(3);
  const List l = MakeList(rng, 20, 50, 60, 10);
  EXPECT_EQ(LazyZeroHi(l.seg.data(), 20, 2, l.tail_from, 5), 0);
  EXPECT_GT(LazyZeroHi(l.seg.data(), 20, 2, l.tail_from, 0), 2);
  EXPECT_EQ(LazyZeroHi(l.seg.data(), 2, 2, l.tail_from, 0), 0);
  EXPECT_EQ(LazyZeroHi(l.seg.data(), 20, 0, l.tail_from, 0), 0);
}

// Persistent CTAs as in the fused kernel: each takes its first position, and at the start of
// every entry takes the next one (w_next), stores the entry's duty, then waits until its head's
// zeroing is announced; at the end of the entry it announces the duty (late_announce: at the end
// of the following entry instead, or at exit). Returns false on a deadlock (CTAs waiting, no
// event left). Checks that no entry runs before its head's slices are all stored.
bool Simulate(const List& l, const std::vector<LazyZeroRow>& rows, int ctas, std::mt19937& rng, bool late_announce) {
  const int total = static_cast<int>(l.head.size()), nbh = static_cast<int>(l.seg.size());
  std::vector<int> announced(nbh, 0), stored(nbh, 0);
  std::vector<int> cur(ctas), nxt(ctas, -1), pending(ctas, -1);
  std::vector<bool> waiting(ctas, false), done(ctas, false);
  int next = 0;
  using Event = std::pair<double, int>;  // (time the CTA's entry ends, CTA)
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> ends;
  std::exponential_distribution<double> dur(1.0);
  double now = 0;
  auto announce = [&](int c) {
    if (pending[c] >= 0) ++announced[pending[c]];
    pending[c] = -1;
  };
  // Starts the CTA's current entry (or finishes the CTA); true if it runs, false if it waits.
  auto start = [&](int c) {
    if (cur[c] >= total) {
      announce(c);
      done[c] = true;
      return true;
    }
    const LazyZeroRow& r = rows[cur[c]];
    if (!waiting[c]) {  // first attempt: take the next position and store the duty
      nxt[c] = next++;
      if (r.duty >= 0) ++stored[r.duty];
    }
    const int g = l.head[cur[c]];
    if (r.need > 0 && announced[g] < r.need) {
      waiting[c] = true;
      return false;
    }
    waiting[c] = false;
    if (r.need > 0) EXPECT_EQ(stored[g], r.need) << "entry " << cur[c] << " ran before its head was zeroed";
    // Heavy-tailed durations: some entries run far longer than others (chunk-size items).
    ends.push({now + dur(rng) * (rng() % 16 == 0 ? 40.0 : 1.0), c});
    return true;
  };
  for (int c = 0; c < ctas; ++c) cur[c] = next++;
  for (int c = 0; c < ctas; ++c) start(c);
  while (true) {
    // Retry waiting CTAs after every change.
    bool progressed = true;
    while (progressed) {
      progressed = false;
      for (int c = 0; c < ctas; ++c)
        if (waiting[c] && start(c)) progressed = true;
    }
    if (ends.empty()) break;
    const auto [t, c] = ends.top();
    ends.pop();
    now = t;
    const LazyZeroRow& r = rows[cur[c]];
    if (late_announce) {
      announce(c);  // the previous entry's duty, one entry late
      pending[c] = r.duty;
    } else {
      pending[c] = r.duty;
      announce(c);
    }
    cur[c] = nxt[c];
    start(c);
  }
  return std::all_of(done.begin(), done.end(), [](bool d) { return d; });
}

TEST(LazyZero, PersistentCtasNeverDeadlock) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 400; ++trial) {
    const int nbh = 3 + static_cast<int>(rng() % 40);
    const List l = MakeList(rng, nbh, 1, 1 + static_cast<int>(rng() % 120), static_cast<int>(rng() % 300));
    const int hi = LazyZeroHi(l.seg.data(), nbh, 2, l.tail_from, 0);
    const std::vector<LazyZeroRow> rows = Rows(l, 2, hi);
    const int ctas = 1 + static_cast<int>(rng() % 160);
    ASSERT_TRUE(Simulate(l, rows, ctas, rng, false)) << "deadlock: trial " << trial << ", " << ctas << " CTAs, "
                                                     << nbh << " heads";
  }
}

// The simulation can fail: announcing each duty one entry late lets two CTAs each wait for the
// other's unannounced duty.
TEST(LazyZero, AnnouncingLateCanDeadlock) {
  std::mt19937 rng(5);
  int deadlocks = 0;
  for (int trial = 0; trial < 400 && deadlocks == 0; ++trial) {
    const int nbh = 3 + static_cast<int>(rng() % 20);
    const List l = MakeList(rng, nbh, 1, 1 + static_cast<int>(rng() % 20), static_cast<int>(rng() % 10));
    const int hi = LazyZeroHi(l.seg.data(), nbh, 2, l.tail_from, 0);
    const std::vector<LazyZeroRow> rows = Rows(l, 2, hi);
    deadlocks += !Simulate(l, rows, 1 + static_cast<int>(rng() % 8), rng, true);
  }
  EXPECT_GT(deadlocks, 0);
}

}  // namespace
}  // namespace sparge::kernels::detail
