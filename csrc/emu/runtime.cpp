// The emulated device: PEs with symmetric heaps, streams that run launches in order, blocks on OS
// threads, CUDA threads as fibers, traps, and the few CUDA runtime and NVSHMEM calls the core makes.
#include "emu/runtime.h"
#include "emu/rma.h"

#include <dirent.h>
#include <fcntl.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "core/check.h"
#include "core/device_state.h"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace symcomm::emu {
namespace {

// Thrown inside a fiber to end it: by trap(), and by every thread of a launch that another thread
// of it has trapped.
struct Trap {};

struct Stream;

struct Pe {
  int index = 0;
  char* heap = nullptr;
  std::mutex mu;
  std::string error;  // sticky, like a CUDA context after a trap
  std::uint64_t launches = 0;
  std::vector<std::unique_ptr<Stream>> streams;  // [0] is the default stream
  std::set<const void*> loaded;  // the kernels cudaFuncGetAttributes has loaded
};

// Lock-free, so that it works between processes too: PE 0's is every PE's nvshmem_barrier_all.
struct Barrier {
  std::atomic<int> arrived;
  std::atomic<std::uint64_t> round;
};
static_assert(std::atomic<int>::is_always_lock_free && std::atomic<std::uint64_t>::is_always_lock_free,
              "the barrier's atomics must work in memory shared between processes");

// The page before each heap: zeroed with it, in the same mapping (a shared segment after start_process).
struct Header {
  std::atomic<std::int64_t> creator;  // start_process: the creator's pid, stored once the segment has its size
  Barrier barrier;
};
constexpr std::size_t kHeaderBytes = 4096;
static_assert(sizeof(Header) <= kHeaderBytes);

struct World {
  int npes = 0;
  std::size_t heap_bytes = 0;
  int local = -1;        // the PE this process hosts (start_process); -1: every PE is here
  std::string own_name;  // this PE's segment until its name is removed
  std::vector<std::unique_ptr<Pe>> pes;

  Header& header(int pe) { return *reinterpret_cast<Header*>(pes[pe]->heap - kHeaderBytes); }
};

Settings g_settings;
std::unique_ptr<World> g_world;
thread_local int t_pe = -1;

World& world() {
  SYMCOMM_CHECK(g_world != nullptr, "the emulated device is not started (call emu.start or emu.start_process first)");
  return *g_world;
}

// The PE whose calls this thread makes, or -1.
int current_index() {
  if (g_world == nullptr) return -1;
  return g_world->local >= 0 ? g_world->local : t_pe;
}

Pe& current_pe() {
  World& w = world();
  const int q = current_index();
  SYMCOMM_CHECK(q >= 0 && q < w.npes, "no emulated PE is current on this thread (call emu.set_pe first)");
  return *w.pes[q];
}

std::string pe_error(Pe& pe) {
  std::lock_guard<std::mutex> lock(pe.mu);
  return pe.error;
}

// A stream: one worker thread that runs its tasks in the order they were queued.
struct Stream {
  Pe* pe;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  std::uint64_t queued = 0, done = 0;
  bool stop = false;
  std::thread worker;

  explicit Stream(Pe* owner) : pe(owner), worker([this] { run(); }) {}

  ~Stream() { finish(); }

  // Lets the worker run what it was given, then ends it.
  void finish() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    if (worker.joinable()) worker.join();
  }

  std::uint64_t push(std::function<void()> task) {
    std::lock_guard<std::mutex> lock(mu);
    queue.push_back(std::move(task));
    cv.notify_all();
    return ++queued;
  }

  std::uint64_t tail() {
    std::lock_guard<std::mutex> lock(mu);
    return queued;
  }

  void wait_for(std::uint64_t n) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done >= n; });
  }

  // False once `deadline` passed first.
  bool wait_for(std::uint64_t n, std::chrono::nanoseconds deadline) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, deadline, [&] { return done >= n; });
  }

  void run() {
    t_pe = pe->index;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stop || !queue.empty(); });
        if (queue.empty()) return;
        task = std::move(queue.front());
        queue.pop_front();
      }
      task();
      {
        std::lock_guard<std::mutex> lock(mu);
        ++done;
      }
      cv.notify_all();
    }
  }
};

Stream& stream_of(Pe& pe, std::uintptr_t handle) {
  if (handle == 0) return *pe.streams[0];
  for (auto& s : pe.streams)
    if (reinterpret_cast<std::uintptr_t>(s.get()) == handle) return *s;
  fail(__FILE__, __LINE__, "stream " + std::to_string(handle) + " does not belong to emulated PE " +
                               std::to_string(pe.index));
}

// ---- blocks and fibers ----

struct Launch {
  Pe* pe;
  dim3 grid, block;
  std::function<void()> body;
  std::uint64_t seed;
  std::atomic<bool> aborted{false};
  std::mutex mu;
  std::string error;
};

enum class State { kRunnable, kBarrier, kWarpBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  uint3 index;
  State state = State::kRunnable;
  bool spun = false;  // its last switch was a wait loop seeing the same flag value again
  const void* last_flag = nullptr;
  std::uint64_t last_value = 0;
  std::uint64_t rng = 0;
  std::string said;  // its last printf, repeated in the error if it traps
#if defined(__SANITIZE_THREAD__)
  void* tsan = nullptr;
#endif
};

struct Block {
  Launch* launch;
  uint3 index;
  ucontext_t scheduler;
#if defined(__SANITIZE_THREAD__)
  void* scheduler_tsan = nullptr;
#endif
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  int live = 0, arrived = 0;
  std::string said;  // the block's last printf, for a thread that traps without a message of its own
  Fiber* trapped = nullptr;  // the first thread that trapped
};

thread_local Block* t_block = nullptr;

constexpr std::size_t kStackBytes =
#if defined(__SANITIZE_THREAD__)
    512 * 1024;
#else
    64 * 1024;
#endif

void to_scheduler() {
  Block* b = t_block;
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(b->scheduler_tsan, 0);
#endif
  swapcontext(&b->current->ctx, &b->scheduler);
}

void to_fiber(Block* b, Fiber* f) {
  b->current = f;
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(f->tsan, 0);
#endif
  swapcontext(&b->scheduler, &f->ctx);
}

// Another block of the launch trapped: end here.
void check_aborted() {
  if (t_block->launch->aborted.load(std::memory_order_relaxed)) throw Trap{};
}

// Before a thread waits or meets the others: once a thread of its block trapped, the threads that
// still run may finish what they are doing (a warp's lanes step together), but none gets further.
void check_trapped() {
  if (t_block->trapped != nullptr) throw Trap{};
  check_aborted();
}

void release_barrier(Block* b) {
  b->arrived = 0;
  for (Fiber& f : b->fibers)
    if (f.state == State::kBarrier) f.state = State::kRunnable;
}

// The lanes of f's warp (32 threads in index order, as on a GPU); releases them from __syncwarp() if
// every live lane but `arriving` waits there, and says whether it did.
bool release_warp(Block* b, const Fiber* f, bool arriving) {
  const std::size_t first = (f - b->fibers.data()) / 32 * 32, last = std::min(first + 32, b->fibers.size());
  int live = 0, waiting = arriving ? 1 : 0;
  for (std::size_t k = first; k < last; ++k) {
    live += b->fibers[k].state != State::kDone;
    waiting += b->fibers[k].state == State::kWarpBarrier;
  }
  if (waiting == 0 || waiting < live) return false;
  for (std::size_t k = first; k < last; ++k)
    if (b->fibers[k].state == State::kWarpBarrier) b->fibers[k].state = State::kRunnable;
  return true;
}

void record_error(Launch* l, const std::string& what, const std::string& said) {
  std::lock_guard<std::mutex> lock(l->mu);
  if (l->error.empty()) {
    l->error = what;
    if (!said.empty()) l->error += "; the kernel said: " + said;
  }
}

std::string where(const Fiber* f) {
  const Block* b = t_block;
  const uint3 t = f->index;
  return "emulated PE " + std::to_string(b->launch->pe->index) + ", block " + std::to_string(b->index.x) +
         ", thread " + std::to_string(t.x);
}

void fiber_main() {
  Block* b = t_block;
  Fiber* f = b->current;
  try {
    b->launch->body();
  } catch (const Trap&) {
  } catch (const std::exception& e) {
    record_error(b->launch, where(f) + ": " + e.what(), "");
    b->launch->aborted = true;
  }
  f->state = State::kDone;
  --b->live;
  if (b->trapped == nullptr && b->arrived > 0 && b->arrived == b->live) release_barrier(b);
  if (b->trapped == nullptr) release_warp(b, f, false);
  to_scheduler();
}

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void run_block(Launch* l, uint3 index) {
  Block b;
  b.launch = l;
  b.index = index;
  const dim3 dim = l->block;
  const int n = static_cast<int>(dim.x * dim.y * dim.z);
  b.fibers.resize(n);
  b.live = n;
  void* stacks = mmap(nullptr, kStackBytes * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
  SYMCOMM_CHECK(stacks != MAP_FAILED, "cannot map the emulated threads' stacks");
  const std::uint64_t block_seed = mix(l->seed ^ mix((index.z * l->grid.y + index.y) * l->grid.x + index.x));
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.index = uint3{i % dim.x, i / dim.x % dim.y, i / (dim.x * dim.y)};
    f.rng = mix(block_seed + i);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = static_cast<char*>(stacks) + kStackBytes * i;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#if defined(__SANITIZE_THREAD__)
    f.tsan = __tsan_create_fiber(0);
#endif
  }
#if defined(__SANITIZE_THREAD__)
  b.scheduler_tsan = __tsan_get_current_fiber();
#endif
  t_block = &b;
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 shuffle(block_seed);
  int idle_rounds = 0;
  while (b.live > 0 && !l->aborted) {
    if (g_settings.chaos_rate > 0) std::shuffle(order.begin(), order.end(), shuffle);
    bool spun_only = true, ran = false;
    const bool last_turn = b.trapped != nullptr;  // a thread trapped: the others' last turn
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kRunnable) continue;
      ran = true;
      f.spun = false;
      to_fiber(&b, &f);
      spun_only = spun_only && f.spun;
      if (l->aborted) break;
    }
    if (last_turn || !ran) break;
    // Every thread is waiting for a flag that has not changed: let the other blocks and PEs run.
    if (spun_only) {
      ++idle_rounds;
      if (idle_rounds < 4)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(std::min(idle_rounds * 10, 500)));
    } else {
      idle_rounds = 0;
    }
  }
  if (b.trapped != nullptr) {
    const std::string& said = b.trapped->said;
    record_error(l, where(b.trapped) + " trapped", said.empty() ? b.said : said);
    l->aborted = true;
  }
  t_block = nullptr;
#if defined(__SANITIZE_THREAD__)
  for (Fiber& f : b.fibers) __tsan_destroy_fiber(f.tsan);
#endif
  // Fibers of an aborted launch are abandoned mid-kernel; kernels keep nothing on the heap.
  munmap(stacks, kStackBytes * n);
}

void run_grid(Launch* l) {
  std::vector<std::thread> blocks;
  for (unsigned z = 0; z < l->grid.z; ++z)
    for (unsigned y = 0; y < l->grid.y; ++y)
      for (unsigned x = 0; x < l->grid.x; ++x)
        blocks.emplace_back([l, x, y, z] {
          t_pe = l->pe->index;
          run_block(l, uint3{x, y, z});
        });
  for (auto& t : blocks) t.join();
  if (!l->error.empty()) {
    std::lock_guard<std::mutex> lock(l->pe->mu);
    if (l->pe->error.empty()) l->pe->error = l->error;
  }
}

[[noreturn]] void device_fail(const std::string& msg) {
  if (t_block == nullptr) throw Error("symcomm emulation: " + msg);
  device_printf("symcomm emulation: %s\n", msg.c_str());
  trap();
}

// A warp-wide call in a block of partial warps (Settings::threads below 32) would leave lanes out,
// and a kernel that counts its warps would find none and never advance: fail instead.
void check_whole_warps(const char* what) {
  const unsigned threads = t_block->launch->block.x;
  if (threads % 32 != 0)
    device_fail(std::string(what) + " in a block of " + std::to_string(threads) +
                " threads: warp-wide calls need whole warps (emu.configure's threads cap is below 32?)");
}

}  // namespace

// ---- what device.h declares ----

uint3 thread_index() { return t_block->current->index; }
uint3 block_index() { return t_block->index; }
dim3 block_dim() { return t_block->launch->block; }
dim3 grid_dim() { return t_block->launch->grid; }

void sync_block() {
  Block* b = t_block;
  check_trapped();
  if (++b->arrived == b->live) {
    release_barrier(b);
    return;
  }
  b->current->state = State::kBarrier;
  to_scheduler();
  check_aborted();
}

void sync_warp() {
  Block* b = t_block;
  check_trapped();
  check_whole_warps("__syncwarp");
  if (release_warp(b, b->current, true)) return;
  b->current->state = State::kWarpBarrier;
  to_scheduler();
  check_aborted();
}

// The launch ends once the other threads of the block have had their turn: on a GPU the lanes of a
// warp run together, so the lane that prints the message and the lane that traps first are one step.
void trap() {
  if (t_block->trapped == nullptr) t_block->trapped = t_block->current;
  throw Trap{};
}

void schedule(const void* flag) {
  Block* b = t_block;
  if (b == nullptr) return;
  check_trapped();
  rma::progress();
  Fiber* f = b->current;
  const std::uint64_t value = __atomic_load_n(static_cast<const std::uint64_t*>(flag), __ATOMIC_RELAXED);
  f->spun = f->last_flag == flag && f->last_value == value;
  f->last_flag = flag;
  f->last_value = value;
  to_scheduler();
  check_aborted();
}

void chaos_point() {
  Block* b = t_block;
  if (b == nullptr || g_settings.chaos_rate <= 0) return;
  Fiber* f = b->current;
  f->rng = mix(f->rng);
  if (static_cast<double>(f->rng >> 11) * 0x1p-53 >= g_settings.chaos_rate) return;
  check_trapped();
  to_scheduler();
  check_aborted();
}

void check_aligned(const void* p, std::size_t align) {
  if (reinterpret_cast<std::uintptr_t>(p) % align == 0) return;
  char addr[32];
  std::snprintf(addr, sizeof addr, "%p", p);
  device_fail("misaligned address: a " + std::to_string(align) + "-byte load from " + addr);
}

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

void fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

int device_printf(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  const int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::fputs(buf, stdout);
  std::fflush(stdout);
  if (t_block != nullptr) {
    std::string& said = t_block->current->said;
    said = buf;
    while (!said.empty() && said.back() == '\n') said.pop_back();
    t_block->said = said;
  }
  return n;
}

void launch(const void* entry, dim3 grid, dim3 block, std::uintptr_t stream, std::function<void()> body) {
  Pe& pe = current_pe();
  {
    // A GPU would load the kernel here, at its first launch, and that load may wait for the kernels
    // already running, some of which may be waiting for this one: the emulation insists on load_kernels.
    std::lock_guard<std::mutex> lock(pe.mu);
    SYMCOMM_CHECK(pe.loaded.count(entry) == 1, "emulated PE " + std::to_string(pe.index) +
                                                   " launched a kernel before load_kernels() loaded it");
  }
  SYMCOMM_CHECK(grid.x * grid.y * grid.z >= 1 && block.x * block.y * block.z >= 1 && block.x * block.y * block.z <= 1024,
                "invalid launch configuration");
  if (g_settings.threads > 0 && block.y == 1 && block.z == 1) block.x = std::min<unsigned>(block.x, g_settings.threads);
  Stream& s = stream_of(pe, stream);
  auto l = std::make_shared<Launch>();
  l->pe = &pe;
  l->grid = grid;
  l->block = block;
  l->body = std::move(body);
  l->seed = mix(g_settings.chaos_seed ^ mix(static_cast<std::uint64_t>(pe.index) << 40 ^ pe.launches++));
  // A kernel boundary is a consistency step: put data that landed is visible to the next kernel.
  s.push([l] {
    rma::make_visible(l->pe->index);
    if (pe_error(*l->pe).empty()) run_grid(l.get());
    rma::make_visible(l->pe->index);
  });
}

// ---- the emulation's own controls (csrc/emu/bindings.cpp) ----

namespace {

std::unique_ptr<World> new_world(int npes, std::size_t heap_bytes) {
  SYMCOMM_CHECK(g_world == nullptr, "the emulated device is already started");
  SYMCOMM_CHECK(npes >= 1 && heap_bytes >= 4096 && heap_bytes % 4096 == 0,
                "need at least one PE and a heap of whole 4 KiB pages");
  auto w = std::make_unique<World>();
  w->npes = npes;
  w->heap_bytes = heap_bytes;
  for (int q = 0; q < npes; ++q) {
    w->pes.push_back(std::make_unique<Pe>());
    w->pes.back()->index = q;
  }
  return w;
}

// Every PE's call meets the others' at PE 0's counters; false if the deadline passed first.
bool meet(World& w, std::uint64_t deadline_ns) {
  Barrier& b = w.header(0).barrier;
  const std::uint64_t round = b.round.load(std::memory_order_acquire);
  if (b.arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == w.npes) {
    b.arrived.store(0, std::memory_order_relaxed);
    b.round.fetch_add(1, std::memory_order_release);
    return true;
  }
  while (b.round.load(std::memory_order_acquire) == round) {
    if (now_ns() > deadline_ns) return false;
    if (t_block != nullptr)
      schedule(&b.round);
    else
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

std::string segment_prefix(const std::string& job) { return "/symcomm-emu-" + job + "-"; }
std::string segment_name(const std::string& job, int pe) { return segment_prefix(job) + std::to_string(pe); }

// A pid taken by another user's process counts as alive too.
bool alive(std::int64_t pid) { return kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH; }

struct Mapping {
  char* base = nullptr;
  std::size_t bytes = 0;
  std::int64_t creator() const { return reinterpret_cast<Header*>(base)->creator.load(std::memory_order_acquire); }
};

// The whole segment, or no mapping while it is absent or not yet sized.
Mapping map_segment(const std::string& name) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    SYMCOMM_CHECK(errno == ENOENT, "cannot open /dev/shm" + name + ": " + std::strerror(errno));
    return {};
  }
  struct stat st {};
  const bool sized = fstat(fd, &st) == 0 && static_cast<std::size_t>(st.st_size) >= kHeaderBytes;
  void* p = sized ? mmap(nullptr, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  close(fd);
  if (p == MAP_FAILED) return {};
  return {static_cast<char*>(p), static_cast<std::size_t>(st.st_size)};
}

// Removes the segments of killed runs of other jobs (runs name their jobs afresh, so a leftover's name
// never comes again): those whose creator recorded its pid and has died. Others' segments, which
// this user may not open, and segments still being created are left alone, and so are `job`'s own:
// each of its PEs replaces its own leftover (create_segment), and a removal by name here could take
// the new segment that replaced the one found dead.
void remove_leftovers(const std::string& job) {
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return;
  while (const dirent* entry = readdir(dir)) {
    const std::string name = std::string("/") + entry->d_name;
    if (name.rfind("/symcomm-emu-", 0) != 0 || name.rfind(segment_prefix(job), 0) == 0) continue;
    const int fd = shm_open(name.c_str(), O_RDONLY, 0);
    if (fd < 0) continue;
    struct stat st {};
    void* p = fstat(fd, &st) == 0 && static_cast<std::size_t>(st.st_size) >= kHeaderBytes
                  ? mmap(nullptr, kHeaderBytes, PROT_READ, MAP_SHARED, fd, 0)
                  : MAP_FAILED;
    close(fd);
    if (p == MAP_FAILED) continue;
    const std::int64_t pid = static_cast<const Header*>(p)->creator.load(std::memory_order_acquire);
    munmap(p, kHeaderBytes);
    if (pid != 0 && !alive(pid)) shm_unlink(name.c_str());
  }
  closedir(dir);
}

// The local PE's segment, zeroed, in place of a killed run's leftover.
void create_segment(World& w, const std::string& job, std::uint64_t deadline_ns) {
  const std::string name = segment_name(job, w.local);
  int fd;
  while ((fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600)) < 0) {
    SYMCOMM_CHECK(errno == EEXIST, "cannot create /dev/shm" + name + ": " + std::strerror(errno));
    const Mapping old = map_segment(name);
    const std::int64_t pid = old.base != nullptr ? old.creator() : 0;
    if (old.base != nullptr) munmap(old.base, old.bytes);
    SYMCOMM_CHECK(pid == 0 || !alive(pid), "emulated PE " + std::to_string(w.local) + ": /dev/shm" + name +
                                               " belongs to process " + std::to_string(pid) +
                                               ", which is alive (another run with job '" + job + "'?)");
    // A creator records its pid right after sizing the segment: one that has not by the deadline died.
    if (pid != 0 || now_ns() > deadline_ns)
      shm_unlink(name.c_str());
    else
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  w.own_name = name;
  const std::size_t bytes = kHeaderBytes + w.heap_bytes;
  void* p = ftruncate(fd, static_cast<off_t>(bytes)) == 0
                ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                : MAP_FAILED;
  const int err = errno;
  close(fd);
  SYMCOMM_CHECK(p != MAP_FAILED, "cannot make /dev/shm" + name + " a heap of " + std::to_string(w.heap_bytes) +
                                     " bytes: " + std::strerror(err));
  w.pes[w.local]->heap = static_cast<char*>(p) + kHeaderBytes;
  w.header(w.local).creator.store(getpid(), std::memory_order_release);
}

// Maps PE q's segment once its creator, alive, has sized it; false if not yet.
bool map_peer(World& w, const std::string& job, int q) {
  const Mapping m = map_segment(segment_name(job, q));
  if (m.base == nullptr) return false;
  const std::int64_t pid = m.creator();
  if (pid == 0 || !alive(pid)) {  // not yet sized, or a killed run's leftover that PE q replaces when it starts
    munmap(m.base, m.bytes);
    return false;
  }
  if (m.bytes != kHeaderBytes + w.heap_bytes) {
    munmap(m.base, m.bytes);
    fail(__FILE__, __LINE__, "emulated PE " + std::to_string(w.local) + ": PE " + std::to_string(q) + "'s heap is " +
                                 std::to_string(m.bytes - kHeaderBytes) + " bytes, this one's " +
                                 std::to_string(w.heap_bytes));
  }
  w.pes[q]->heap = m.base + kHeaderBytes;
  return true;
}

void connect(World& w, const std::string& job, double timeout_s) {
  const std::uint64_t deadline = now_ns() + static_cast<std::uint64_t>(timeout_s * 1e9);
  const std::string me = "emulated PE " + std::to_string(w.local) + " of job '" + job + "'";
  std::ostringstream within;
  within << " within " << timeout_s << " s";
  remove_leftovers(job);
  create_segment(w, job, deadline);
  std::vector<int> missing;
  for (int q = 0; q < w.npes; ++q)
    if (q != w.local) missing.push_back(q);
  for (;;) {
    missing.erase(std::remove_if(missing.begin(), missing.end(), [&](int q) { return map_peer(w, job, q); }),
                  missing.end());
    if (missing.empty()) break;
    if (now_ns() > deadline) {
      std::string names;
      for (int q : missing) names += (names.empty() ? "" : ", ") + std::to_string(q);
      fail(__FILE__, __LINE__,
           me + ": PE" + (missing.size() > 1 ? "s " : " ") + names + " did not start" + within.str());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  SYMCOMM_CHECK(meet(w, deadline), me + ": not every PE reached the start barrier" + within.str() +
                                       " (one of them has ended since?)");
  // Every PE has mapped every segment: the names are of no more use, and removing them now leaves
  // nothing behind, however the processes end.
  shm_unlink(w.own_name.c_str());
  w.own_name.clear();
}

}  // namespace

void start(int npes, std::size_t heap_bytes) {
  auto w = new_world(npes, heap_bytes);
  for (auto& pe : w->pes) {
    void* p = mmap(nullptr, kHeaderBytes + heap_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    SYMCOMM_CHECK(p != MAP_FAILED, "cannot map an emulated heap of " + std::to_string(heap_bytes) + " bytes");
    pe->heap = static_cast<char*>(p) + kHeaderBytes;
    pe->streams.push_back(std::make_unique<Stream>(pe.get()));
  }
  g_world = std::move(w);
  rma::start(npes, /*staged=*/true, g_settings.chaos_seed);
}

void start_process(int pe, int npes, std::size_t heap_bytes, const std::string& job, double timeout_s) {
  SYMCOMM_CHECK(!job.empty() && job.size() <= 64 &&
                    job.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-") ==
                        std::string::npos,
                "job name '" + job + "' must be 1 to 64 characters of [A-Za-z0-9_.-]");
  SYMCOMM_CHECK(timeout_s > 0, "the start timeout must be positive");
  auto w = new_world(npes, heap_bytes);
  SYMCOMM_CHECK(pe >= 0 && pe < npes,
                "PE " + std::to_string(pe) + " is out of range [0, " + std::to_string(npes) + ")");
  w->local = pe;
  g_world = std::move(w);
  try {
    connect(*g_world, job, timeout_s);
  } catch (...) {
    stop();
    throw;
  }
  Pe& local = *g_world->pes[pe];
  local.streams.push_back(std::make_unique<Stream>(&local));
  rma::start(npes, /*staged=*/false, mix(g_settings.chaos_seed ^ static_cast<std::uint64_t>(pe)));
}

void stop() {
  if (g_world == nullptr) return;
  World& w = *g_world;
  // Streams finish what they were given first (every wait has a deadline), all of them before any is
  // freed: a stream may be waiting for an event of another.
  for (auto& pe : w.pes)
    for (auto& s : pe->streams) s->finish();
  for (auto& pe : w.pes) pe->streams.clear();
  rma::stop();
  for (auto& pe : w.pes)
    if (pe->heap != nullptr) munmap(pe->heap - kHeaderBytes, kHeaderBytes + w.heap_bytes);
  if (!w.own_name.empty()) shm_unlink(w.own_name.c_str());  // start_process failed before removing it
  g_world.reset();
  t_pe = -1;
}

void configure(const Settings& s) { g_settings = s; }
const Settings& settings() { return g_settings; }

void set_pe(int pe) {
  World& w = world();
  SYMCOMM_CHECK(pe >= 0 && pe < w.npes, "PE " + std::to_string(pe) + " is out of range");
  SYMCOMM_CHECK(w.local < 0 || pe == w.local, "this process hosts emulated PE " + std::to_string(w.local) +
                                                  " only (emu.start_process): PE " + std::to_string(pe) +
                                                  " runs in another process");
  t_pe = pe;
}

int local_pe() { return g_world == nullptr ? -1 : g_world->local; }

std::uintptr_t heap(int pe) {
  SYMCOMM_CHECK(pe >= 0 && pe < world().npes, "PE " + std::to_string(pe) + " is out of range");
  return reinterpret_cast<std::uintptr_t>(world().pes[pe]->heap);
}

std::size_t heap_bytes() { return world().heap_bytes; }

std::uintptr_t stream_create() {
  Pe& pe = current_pe();
  pe.streams.push_back(std::make_unique<Stream>(&pe));
  return reinterpret_cast<std::uintptr_t>(pe.streams.back().get());
}

Event event_record(std::uintptr_t stream) {
  Stream& s = stream_of(current_pe(), stream);
  return Event{reinterpret_cast<std::uintptr_t>(&s), s.tail()};
}

void stream_wait_event(std::uintptr_t stream, Event e) {
  Stream& s = stream_of(current_pe(), stream);
  Stream* other = reinterpret_cast<Stream*>(e.stream);
  // A GPU would wait for ever on an event that never completes (a cycle of waits); here the wait has
  // the device waits' deadline, twice over, and then fails the PE.
  Pe* pe = s.pe;
  s.push([pe, other, n = e.count] {
    if (other->wait_for(n, std::chrono::nanoseconds(2 * wait_timeout_ns()))) return;
    std::lock_guard<std::mutex> lock(pe->mu);
    if (pe->error.empty()) pe->error = "emulated PE " + std::to_string(pe->index) + ": a stream waited for an event that never completed";
  });
}


void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::size_t bytes, std::uintptr_t stream) {
  stream_of(current_pe(), stream).push([=] {
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
  });
}

}  // namespace symcomm::emu

// ---- NVSHMEM ----

using symcomm::emu::current_pe;
using symcomm::emu::world;

int nvshmem_my_pe() { return current_pe().index; }
int nvshmem_n_pes() { return world().npes; }

namespace {

// PE pe's copy of the caller's symmetric address ptr, whichever node pe is on: where a put lands.
void* symmetric_address(const void* ptr, int pe, const char* what) {
  auto& w = world();
  const auto& me = current_pe();
  if (pe < 0 || pe >= w.npes)
    symcomm::emu::device_fail(std::string(what) + ": PE " + std::to_string(pe) + " is out of range [0, " +
                              std::to_string(w.npes) + ")");
  const std::ptrdiff_t offset = static_cast<const char*>(ptr) - me.heap;
  if (offset < 0 || static_cast<std::size_t>(offset) >= w.heap_bytes) {
    char addr[32];
    std::snprintf(addr, sizeof addr, "%p", ptr);
    symcomm::emu::device_fail(std::string(what) + ": address " + std::string(addr) + " is not in PE " +
                              std::to_string(me.index) + "'s symmetric heap");
  }
  return w.pes[pe]->heap + offset;
}

// A block-wide call: every thread's earlier writes are in before one thread issues it, and nobody goes
// on before it is issued (a blocking put's source may be reused once it returns).
template <typename F>
void by_the_block(F issue) {
  __syncthreads();
  if (threadIdx.x == 0) issue();
  __syncthreads();
}

// A warp-wide call: the lanes' earlier writes are in before lane 0 issues it.
template <typename F>
void by_the_warp(const char* what, F issue) {
  symcomm::emu::check_whole_warps(what);
  __syncwarp();
  if (threadIdx.x % 32 == 0) issue();
}

char* own(const void* ptr, const char* what) {
  return static_cast<char*>(symmetric_address(ptr, nvshmem_my_pe(), what));
}

}  // namespace

void* nvshmem_ptr(const void* ptr, int pe) {
  void* peer = symmetric_address(ptr, pe, "nvshmem_ptr");
  const int per_node = symcomm::emu::settings().pes_per_node;
  return per_node > 0 && pe / per_node != current_pe().index / per_node ? nullptr : peer;
}

// As NVSHMEM's: a quiet, the meeting, and the consistency step.
void nvshmem_barrier_all() {
  const int me = current_pe().index;
  symcomm::emu::rma::quiet(me);
  if (!symcomm::emu::meet(world(), symcomm::emu::now_ns() + 30ull * 1000 * 1000 * 1000))
    symcomm::emu::device_fail("nvshmem_barrier_all timed out on PE " + std::to_string(me));
  symcomm::emu::rma::make_visible(me);
}

// The emulated host library is up while the emulated device is started (emu.start or emu.start_process
// plays nvshmem4py's init), and the device state is shared by every PE of this process, so registering it
// has nothing to do.
int nvshmemx_init_status() {
  return symcomm::emu::g_world == nullptr ? NVSHMEM_STATUS_NOT_INITIALIZED : NVSHMEM_STATUS_IS_INITIALIZED;
}

int nvshmemi_init_thread(int requested, int* provided, unsigned int, nvshmemx_init_attr_t*, nvshmemi_version_t) {
  world();
  *provided = requested;
  return 0;
}

void nvshmemi_finalize() {}

void nvshmemx_putmem_signal_block(void* dest, const void* source, std::size_t bytes, std::uint64_t* sig_addr,
                                  std::uint64_t signal, int sig_op, int pe) {
  const char* what = "nvshmemx_putmem_signal_block";
  char* to = static_cast<char*>(symmetric_address(dest, pe, what));
  auto* sig = static_cast<std::uint64_t*>(symmetric_address(sig_addr, pe, what));
  by_the_block([&] {
    const int me = nvshmem_my_pe();
    const std::uint64_t data = symcomm::emu::rma::put(me, pe, to, static_cast<const char*>(source), bytes, true);
    symcomm::emu::rma::signal(me, pe, sig, signal, sig_op == NVSHMEM_SIGNAL_ADD, data);
  });
}

void nvshmemx_putmem_block(void* dest, const void* source, std::size_t bytes, int pe) {
  const char* from = own(source, "nvshmemx_putmem_block (source)");
  char* to = static_cast<char*>(symmetric_address(dest, pe, "nvshmemx_putmem_block"));
  by_the_block([&] { symcomm::emu::rma::put(nvshmem_my_pe(), pe, to, from, bytes, true); });
}

void nvshmemx_putmem_nbi_warp(void* dest, const void* source, std::size_t bytes, int pe) {
  const char* what = "nvshmemx_putmem_nbi_warp";
  by_the_warp(what, [&] {
    const char* from = own(source, "nvshmemx_putmem_nbi_warp (source)");
    char* to = static_cast<char*>(symmetric_address(dest, pe, what));
    symcomm::emu::rma::put(nvshmem_my_pe(), pe, to, from, bytes, false);
  });
}

void nvshmemx_getmem_nbi_warp(void* dest, const void* source, std::size_t bytes, int pe) {
  const char* what = "nvshmemx_getmem_nbi_warp";
  by_the_warp(what, [&] {
    char* to = own(dest, "nvshmemx_getmem_nbi_warp (destination)");
    const char* from = static_cast<const char*>(symmetric_address(source, pe, what));
    symcomm::emu::rma::get(nvshmem_my_pe(), pe, to, from, bytes);
  });
}

void nvshmem_fence() { symcomm::emu::rma::fence(nvshmem_my_pe()); }

void nvshmem_quiet() { symcomm::emu::rma::quiet(nvshmem_my_pe()); }

void nvshmemx_signal_op(std::uint64_t* sig_addr, std::uint64_t signal, int sig_op, int pe) {
  auto* sig = static_cast<std::uint64_t*>(symmetric_address(sig_addr, pe, "nvshmemx_signal_op"));
  symcomm::emu::rma::signal(nvshmem_my_pe(), pe, sig, signal, sig_op == NVSHMEM_SIGNAL_ADD, 0);
}

std::uint64_t nvshmem_signal_wait_until(std::uint64_t* sig_addr, int cmp, std::uint64_t cmp_value) {
  SYMCOMM_CHECK(cmp == NVSHMEM_CMP_GE, "the emulated nvshmem_signal_wait_until compares with NVSHMEM_CMP_GE only");
  std::uint64_t seen;
  while ((seen = __atomic_load_n(sig_addr, __ATOMIC_ACQUIRE)) < cmp_value) symcomm::emu::schedule(sig_addr);
  symcomm::emu::rma::make_visible(nvshmem_my_pe());
  return seen;
}

// ---- the CUDA runtime calls the core makes ----

extern "C" {

cudaError_t cudaGetLastError(void) {
  if (symcomm::emu::current_index() < 0) return cudaSuccess;
  return symcomm::emu::pe_error(current_pe()).empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

cudaError_t cudaPeekAtLastError(void) { return cudaGetLastError(); }

const char* cudaGetErrorString(cudaError_t error) {
  thread_local std::string text;
  if (error == cudaSuccess) return "no error";
  text = error == cudaErrorLaunchFailure ? "unspecified launch failure" : "error " + std::to_string(error);
  if (symcomm::emu::current_index() >= 0) {
    const std::string why = symcomm::emu::pe_error(current_pe());
    if (!why.empty()) text += " (" + why + ")";
  }
  return text.c_str();
}

cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }

// Loads the kernel on the current PE. The attributes are zero: nothing reads them.
cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void* func) {
  if (func == nullptr) return cudaErrorInvalidDeviceFunction;
  auto& pe = current_pe();
  std::memset(attr, 0, sizeof *attr);
  std::lock_guard<std::mutex> lock(pe.mu);
  pe.loaded.insert(func);
  return cudaSuccess;
}

cudaError_t cudaMemcpyToSymbol(const void* symbol, const void* src, size_t count, size_t offset, enum cudaMemcpyKind) {
  std::memcpy(static_cast<char*>(const_cast<void*>(symbol)) + offset, src, count);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
  auto& pe = current_pe();
  for (auto& s : pe.streams) s->wait_for(s->tail());
  return cudaGetLastError();
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  auto& s = symcomm::emu::stream_of(current_pe(), reinterpret_cast<std::uintptr_t>(stream));
  s.wait_for(s.tail());
  return cudaGetLastError();
}

}  // extern "C"
