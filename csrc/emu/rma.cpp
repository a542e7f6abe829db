// NVSHMEM's delivery order, emulated (see rma.h). What NVSHMEM promises, and so all that is kept:
// - two operations from one PE to another land in either order, unless nvshmem_fence (same target) or
//   nvshmem_quiet (every target) separates them; a put may land in pieces, in any order;
// - putmem_signal's signal lands after all of its data;
// - everything a PE issued has landed once its nvshmem_quiet returns;
// - put data that has landed is visible to the target's threads after its consistency step (its
//   waits on signals, barriers, a kernel boundary), as proxy-based transports need.
// Everything else is left to a random pick from the chaos seed.
#include "emu/rma.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

namespace symcomm::emu::rma {
namespace {

// A put lands in at most this many pieces.
constexpr std::size_t kPieces = 4;
// In one process, an operation may not land before a delay drawn up to this: long enough to be
// overtaken by one issued in a later kernel (an emulated launch takes about a tenth of it).
constexpr std::uint64_t kMostDelayNs = 2'000'000;

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

struct Op {
  std::uint64_t id;
  int from, to;
  std::uint64_t epoch;  // the issuer's fences so far
  std::uint64_t group;  // a put's pieces share one
  std::uint64_t after;  // a group that must land first, or 0
  std::uint64_t ready;  // not before (steady clock, ns)
  std::function<void()> land;
};

// Every operation in flight, for land_one.
constexpr auto kAny = [](const Op&) { return true; };

struct Landed {
  char* dst;
  std::vector<char> bytes;
};

struct Network {
  int npes = 0;
  bool staged = false;
  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;
  std::mt19937_64 rng;
  std::uint64_t next_id = 1, next_group = 1;
  std::vector<Op> flight;
  std::vector<std::uint64_t> epochs;                           // per PE: its fences
  std::unordered_map<std::uint64_t, std::multiset<std::uint64_t>> route_epochs;  // (from, to): epochs in flight
  std::unordered_map<std::uint64_t, int> group_left;          // group: its pieces in flight
  std::vector<std::set<std::uint64_t>> issued;               // per PE: ids in flight
  std::vector<std::vector<Landed>> invisible;                 // per PE: landed, not yet visible
  std::atomic<std::size_t> count{0};
  Stats stats;
  std::thread worker;

  std::uint64_t route(int from, int to) const { return static_cast<std::uint64_t>(from) * npes + to; }

  bool may_land(const Op& op, std::uint64_t now) const {
    if (op.ready > now) return false;
    if (*route_epochs.at(route(op.from, op.to)).begin() < op.epoch) return false;
    return op.after == 0 || group_left.count(op.after) == 0;
  }

  void add(int from, int to, std::uint64_t group, std::uint64_t after, std::function<void()> land) {
    Op op{next_id++, from, to, epochs[from], group, after, staged ? now_ns() + rng() % kMostDelayNs : 0,
          std::move(land)};
    route_epochs[route(op.from, op.to)].insert(op.epoch);
    if (op.group) ++group_left[op.group];
    issued[op.from].insert(op.id);
    flight.push_back(std::move(op));
    count = flight.size();
  }

  void land(std::size_t k) {
    Op op = std::move(flight[k]);
    flight[k] = std::move(flight.back());
    flight.pop_back();
    count = flight.size();
    auto& epochs_in_flight = route_epochs[route(op.from, op.to)];
    epochs_in_flight.erase(epochs_in_flight.find(op.epoch));
    if (op.group && --group_left[op.group] == 0) group_left.erase(op.group);
    std::set<std::uint64_t>& mine = issued[op.from];
    stats.overtakes += *mine.begin() < op.id;
    mine.erase(op.id);
    ++stats.landed;
    op.land();
  }

  // Lands one operation that may land at `now`, picked at random among those `which` accepts; false if
  // none. `now` past every delay: as soon as the order allows (a quiet).
  template <typename Which>
  bool land_one(Which which, std::uint64_t now = ~0ull) {
    const std::size_t n = flight.size();
    if (n == 0) return false;
    const std::size_t first = rng() % n;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t k = (first + i) % n;
      if (which(flight[k]) && may_land(flight[k], now)) {
        land(k);
        return true;
      }
    }
    return false;
  }

  void write(int to, char* dst, const char* src, std::size_t bytes) {
    stats.bytes += bytes;
    if (!staged) {
      std::memcpy(dst, src, bytes);
      return;
    }
    invisible[to].push_back(Landed{dst, std::vector<char>(src, src + bytes)});
  }

  void show(int pe) {
    for (Landed& l : invisible[pe]) std::memcpy(l.dst, l.bytes.data(), l.bytes.size());
    invisible[pe].clear();
  }

  // NVSHMEM delivers without being waited for: every tick, what may land does.
  void run() {
    std::unique_lock<std::mutex> lock(mu);
    while (!stopping) {
      cv.wait_for(lock, std::chrono::microseconds(250));
      const std::uint64_t now = now_ns();
      while (land_one(kAny, now)) {
      }
    }
  }
};

Network* g_net = nullptr;

}  // namespace

void start(int npes, bool staged, std::uint64_t seed) {
  auto* net = new Network;
  net->npes = npes;
  net->staged = staged;
  net->rng.seed(seed);
  net->epochs.assign(npes, 0);
  net->issued.resize(npes);
  net->invisible.resize(npes);
  g_net = net;
  net->worker = std::thread([net] { net->run(); });
}

void stop() {
  Network* net = g_net;
  if (net == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(net->mu);
    net->stopping = true;
    while (net->land_one(kAny)) {
    }
    for (int pe = 0; pe < net->npes; ++pe) net->show(pe);
  }
  net->cv.notify_all();
  net->worker.join();
  g_net = nullptr;
  delete net;
}

std::uint64_t put(int from, int to, char* dst, const char* src, std::size_t bytes, bool now) {
  Network& net = *g_net;
  std::shared_ptr<std::vector<char>> copy;
  if (now) copy = std::make_shared<std::vector<char>>(src, src + bytes);
  std::lock_guard<std::mutex> lock(net.mu);
  const std::uint64_t group = net.next_group++;
  const std::size_t piece = std::max<std::size_t>(16, (bytes + kPieces - 1) / kPieces / 16 * 16);
  for (std::size_t lo = 0; lo < bytes; lo += piece) {
    const std::size_t n = std::min(piece, bytes - lo);
    net.add(from, to, group, 0, [&net, to, d = dst + lo, s = src + lo, n, copy, lo] {
      net.write(to, d, copy ? copy->data() + lo : s, n);
    });
  }
  return group;
}

void get(int from, int from_pe, char* dst, const char* src, std::size_t bytes) {
  Network& net = *g_net;
  std::lock_guard<std::mutex> lock(net.mu);
  // A get reads the peer's memory, where landed data already is, and completes only at a quiet.
  net.add(from, from_pe, 0, 0, [&net, from_pe, dst, src, bytes] {
    net.show(from_pe);
    net.stats.bytes += bytes;
    std::memcpy(dst, src, bytes);
  });
}

void signal(int from, int to, std::uint64_t* sig, std::uint64_t value, bool add, std::uint64_t after) {
  Network& net = *g_net;
  std::lock_guard<std::mutex> lock(net.mu);
  net.add(from, to, 0, after, [sig, value, add] {
    if (add)
      __atomic_fetch_add(sig, value, __ATOMIC_RELEASE);
    else
      __atomic_store_n(sig, value, __ATOMIC_RELEASE);
  });
}

void fence(int pe) {
  std::lock_guard<std::mutex> lock(g_net->mu);
  ++g_net->epochs[pe];
}

void quiet(int pe) {
  Network& net = *g_net;
  std::lock_guard<std::mutex> lock(net.mu);
  while (net.land_one([pe](const Op& op) { return op.from == pe; })) {
  }
}

void make_visible(int pe) {
  Network& net = *g_net;
  if (!net.staged) return;
  std::lock_guard<std::mutex> lock(net.mu);
  net.show(pe);
}

void progress() {
  Network* net = g_net;
  if (net == nullptr || net->count.load(std::memory_order_relaxed) == 0) return;
  std::lock_guard<std::mutex> lock(net->mu);
  // Across processes a PE's peers cannot land what it issued, and its own threads may be asleep in a
  // wait: everything in flight that may land does here (in a random order still). In one process, where
  // every PE's scheduling points land operations, each lands one: that is where the orders are checked.
  const std::uint64_t now = now_ns();
  if (!net->staged) {
    while (net->land_one(kAny, now)) {
    }
  } else {
    net->land_one(kAny, now);
  }
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_net->mu);
  return g_net->stats;
}

}  // namespace symcomm::emu::rma
