// The scheduler behind kernels/host/cuda_host.h: runs a kernel launch on the CPU
// with CUDA's execution model (see that header for the semantics).
//
// A launch (smtl_host_launch) checks the configuration as the driver would,
// then worker OS threads take blocks one at a time. A block's threads are
// fibers on the worker's own stacks; the worker's scheduler resumes every
// runnable fiber in turn until all have returned. A fiber runs until it reaches
// a barrier (__syncthreads, a warp exchange) or returns; the last thread to
// arrive at a barrier releases the others. When no fiber can run but some have
// not returned, the block has deadlocked: the launch fails with a description
// instead of hanging. Odd blocks resume their fibers in reverse order, so code
// that reads another thread's write without a barrier sees it missing in one
// direction or the other.

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "cuda_host.h"
#include "registry.h"

namespace smtl_host {

thread_local ThreadCtx *current_thread = nullptr;
thread_local BlockCtx *current_block = nullptr;

namespace {

// ---- context switching ------------------------------------------------------------
// switch_stack(&save, next): saves the callee-saved registers on the current
// stack, stores its pointer in *save, and resumes the stack `next`.
extern "C" void smtl_switch_stack(void **save, void *next);
extern "C" void smtl_fiber_trampoline();

#if defined(__x86_64__)
asm(R"(
.text
.p2align 4
.globl smtl_switch_stack
.hidden smtl_switch_stack
.type smtl_switch_stack,@function
smtl_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size smtl_switch_stack,.-smtl_switch_stack

.p2align 4
.globl smtl_fiber_trampoline
.hidden smtl_fiber_trampoline
.type smtl_fiber_trampoline,@function
smtl_fiber_trampoline:
    movq %r12, %rdi
    call smtl_fiber_main@PLT
    ud2
.size smtl_fiber_trampoline,.-smtl_fiber_trampoline
)");
#elif defined(__aarch64__)
asm(R"(
.text
.p2align 4
.globl smtl_switch_stack
.hidden smtl_switch_stack
.type smtl_switch_stack,%function
smtl_switch_stack:
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #176
    ret
.size smtl_switch_stack,.-smtl_switch_stack

.p2align 4
.globl smtl_fiber_trampoline
.hidden smtl_fiber_trampoline
.type smtl_fiber_trampoline,%function
smtl_fiber_trampoline:
    mov x0, x19
    bl smtl_fiber_main
    brk #0
.size smtl_fiber_trampoline,.-smtl_fiber_trampoline
)");
#else
#error "kernels/host: context switching is written for x86-64 and aarch64 only"
#endif

constexpr size_t STACK_BYTES = 128 * 1024;
constexpr size_t MAX_THREADS = 1024;

// One worker's fiber stacks (MAX_THREADS of them, each below a guard page),
// kept in a pool so that launches reuse them.
struct StackArena {
  char *base = nullptr;
  size_t page = 0;

  StackArena() {
    page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = MAX_THREADS * (STACK_BYTES + page);
    void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "kernels/host: cannot map fiber stacks\n");
      std::abort();
    }
    base = static_cast<char *>(p);
    for (size_t i = 0; i < MAX_THREADS; ++i) mprotect(base + i * (STACK_BYTES + page), page, PROT_NONE);
  }
  // The top (highest address, 16-byte aligned) of fiber i's stack.
  char *top(size_t i) const { return base + (i + 1) * (STACK_BYTES + page); }
};

std::mutex arena_mutex;
std::vector<StackArena *> free_arenas;

StackArena *take_arena() {
  std::lock_guard<std::mutex> lock(arena_mutex);
  if (free_arenas.empty()) return new StackArena();
  StackArena *a = free_arenas.back();
  free_arenas.pop_back();
  return a;
}

void give_arena(StackArena *a) {
  std::lock_guard<std::mutex> lock(arena_mutex);
  free_arenas.push_back(a);
}

enum class State { Runnable, AtBlockBarrier, AtWarpExchange, Done };

struct Block;

struct Fiber {
  void *sp = nullptr;
  ThreadCtx ctx{};
  State state = State::Runnable;
  Block *block = nullptr;
};

struct Warp {
  unsigned arrived = 0;  // lanes waiting at the current exchange
  unsigned mask = 0;     // the mask of the current exchange
  unsigned generation = 0;
  uint64_t slots[2][32] = {};  // double-buffered: one exchange's values stay readable during the next
};

struct Block {
  BlockCtx ctx{};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned live = 0;             // threads that have not returned
  unsigned at_barrier = 0;       // threads waiting at __syncthreads
  void *scheduler_sp = nullptr;  // the worker's own stack while a fiber runs
  Fiber *running = nullptr;
  void (*thunk)(void **) = nullptr;
  void **args = nullptr;
  bool failed = false;
  std::string error;
  std::vector<unsigned char> dynamic_shared;
};

thread_local Block *current = nullptr;

// Back to the scheduler; returns when the scheduler resumes this fiber.
void yield_to_scheduler(Fiber &f) { smtl_switch_stack(&f.sp, f.block->scheduler_sp); }

void release(Block &b, State waiting, int warp) {
  for (Fiber &f : b.fibers) {
    if (f.state == waiting && (warp < 0 || static_cast<int>(f.ctx.linear / 32) == warp)) f.state = State::Runnable;
  }
}

}  // namespace

extern "C" __attribute__((visibility("hidden"))) void smtl_fiber_main(void *arg) {
  Fiber &f = *static_cast<Fiber *>(arg);
  Block &b = *f.block;
  b.thunk(b.args);
  f.state = State::Done;
  b.live -= 1;
  // Exited threads no longer count at __syncthreads.
  if (b.at_barrier > 0 && b.at_barrier == b.live) {
    b.at_barrier = 0;
    release(b, State::AtBlockBarrier, -1);
  }
  void *unused;
  smtl_switch_stack(&unused, b.scheduler_sp);
  __builtin_trap();  // never resumed
}

void fail(const char *message) {
  Block &b = *current;
  if (!b.failed) {
    b.failed = true;
    const ThreadCtx &t = b.running->ctx;
    char where[160];
    std::snprintf(where, sizeof where, "block (%u,%u,%u) thread (%u,%u,%u): ", b.ctx.block_idx.x, b.ctx.block_idx.y,
                  b.ctx.block_idx.z, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
    b.error = std::string(where) + message;
  }
  Fiber &f = *b.running;
  f.state = State::Done;
  void *unused;
  smtl_switch_stack(&unused, b.scheduler_sp);
  __builtin_trap();
}

void sync_block() {
  Block &b = *current;
  Fiber &f = *b.running;
  b.at_barrier += 1;
  if (b.at_barrier == b.live) {  // the last to arrive releases the others and goes on
    b.at_barrier = 0;
    release(b, State::AtBlockBarrier, -1);
    return;
  }
  f.state = State::AtBlockBarrier;
  yield_to_scheduler(f);
}

const uint64_t *warp_exchange(unsigned mask, const void *value, size_t bytes) {
  Block &b = *current;
  Fiber &f = *b.running;
  const unsigned warp_index = f.ctx.linear / 32, lane = f.ctx.linear & 31u;
  Warp &w = b.warps[warp_index];
  const unsigned block_threads = b.ctx.block_dim.x * b.ctx.block_dim.y * b.ctx.block_dim.z;
  const unsigned lanes_here = std::min(32u, block_threads - warp_index * 32);
  const unsigned existing = lanes_here == 32 ? 0xffffffffu : ((1u << lanes_here) - 1u);
  if (!((mask >> lane) & 1u)) fail("a warp operation's mask excludes the calling lane");
  if (mask & ~existing) fail("a warp operation's mask names lanes that do not exist in this block");
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    fail("lanes of one warp reached a warp operation with different masks");
  }
  const unsigned generation = w.generation;
  uint64_t &slot = w.slots[generation & 1u][lane];
  slot = 0;
  std::memcpy(&slot, value, bytes);
  w.arrived |= 1u << lane;
  if (w.arrived == mask) {
    w.arrived = 0;
    w.generation += 1;
    release(b, State::AtWarpExchange, static_cast<int>(warp_index));
  } else {
    f.state = State::AtWarpExchange;
    yield_to_scheduler(f);
  }
  return w.slots[generation & 1u];
}

namespace {

std::string describe_deadlock(const Block &b) {
  unsigned at_barrier = 0, at_warp = 0, done = 0;
  for (const Fiber &f : b.fibers) {
    at_barrier += f.state == State::AtBlockBarrier;
    at_warp += f.state == State::AtWarpExchange;
    done += f.state == State::Done;
  }
  char text[256];
  std::snprintf(text, sizeof text,
                "block (%u,%u,%u) deadlocked: %u threads wait at __syncthreads, %u at a warp "
                "operation, %u have returned (a barrier not reached by every live thread, or a warp "
                "operation whose mask names a lane that never reaches it)",
                b.ctx.block_idx.x, b.ctx.block_idx.y, b.ctx.block_idx.z, at_barrier, at_warp, done);
  return text;
}

// Runs one block to completion on this OS thread; returns false with b.error set on failure.
bool run_block(Block &b, StackArena &arena, unsigned linear_block) {
  const unsigned n = static_cast<unsigned>(b.fibers.size());
  for (unsigned i = 0; i < n; ++i) {
    Fiber &f = b.fibers[i];
    f.state = State::Runnable;
    f.block = &b;
    // Initial stack: the callee-saved registers smtl_switch_stack pops, then the
    // trampoline as its return address; the fiber pointer rides in r12 / x19.
    uint64_t *sp = reinterpret_cast<uint64_t *>(arena.top(i));
#if defined(__x86_64__)
    *--sp = reinterpret_cast<uint64_t>(&smtl_fiber_trampoline);
    *--sp = 0;                                // rbp
    *--sp = 0;                                // rbx
    *--sp = reinterpret_cast<uint64_t>(&f);  // r12
    *--sp = 0;                                // r13
    *--sp = 0;                                // r14
    *--sp = 0;                                // r15
#else
    sp -= 22;  // 176 bytes: x19..x30, d8..d15
    std::memset(sp, 0, 176);
    sp[0] = reinterpret_cast<uint64_t>(&f);                       // x19
    sp[11] = reinterpret_cast<uint64_t>(&smtl_fiber_trampoline);  // x30 (lr)
#endif
    f.sp = sp;
  }
  b.live = n;
  b.at_barrier = 0;
  for (Warp &w : b.warps) w = Warp();
  b.failed = false;
  current = &b;
  current_block = &b.ctx;
  const bool reverse = (linear_block & 1u) != 0;
  for (;;) {
    bool ran = false;
    for (unsigned k = 0; k < n; ++k) {
      Fiber &f = b.fibers[reverse ? n - 1 - k : k];
      if (f.state != State::Runnable) continue;
      b.running = &f;
      current_thread = &f.ctx;
      smtl_switch_stack(&b.scheduler_sp, f.sp);
      ran = true;
      if (b.failed) return false;
    }
    if (b.live == 0) return true;
    if (!ran) {
      b.error = describe_deadlock(b);
      return false;
    }
  }
}

const char *check_config(const unsigned grid[3], const unsigned block[3], size_t shared_bytes) {
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return "grid has a zero dimension";
  if (grid[0] > 2147483647u || grid[1] > 65535u || grid[2] > 65535u) return "grid dimension above the device limit (2^31-1, 65535, 65535)";
  if (block[0] == 0 || block[1] == 0 || block[2] == 0) return "block has a zero dimension";
  if (block[0] > 1024u || block[1] > 1024u || block[2] > 64u) return "block dimension above the device limit (1024, 1024, 64)";
  if (static_cast<unsigned long long>(block[0]) * block[1] * block[2] > MAX_THREADS) return "more than 1024 threads per block";
  if (shared_bytes > 227u * 1024u) return "dynamic shared memory above the device limit (227 KiB)";
  return nullptr;
}

void write_error(char *out, size_t out_len, const std::string &message) {
  if (out_len == 0) return;
  const size_t n = std::min(out_len - 1, message.size());
  std::memcpy(out, message.data(), n);
  out[n] = '\0';
}

unsigned worker_count(unsigned long long blocks) {
  unsigned n = std::thread::hardware_concurrency();
  if (const char *env = std::getenv("SMTL_HOST_KERNEL_THREADS")) n = static_cast<unsigned>(std::atoi(env));
  n = std::max(1u, std::min(n, 16u));
  return static_cast<unsigned>(std::min<unsigned long long>(n, blocks));
}

}  // namespace
}  // namespace smtl_host

// Runs `kernel` over `grid` x `block` with `shared_bytes` of dynamic shared
// memory. `args` points to each argument's value, in order (cuLaunchKernel's
// convention); `signature` is the caller's idea of the parameter types, checked
// against the kernel's own. Returns 0, or -1 with a message in `error`.
extern "C" int smtl_host_launch(const char *kernel, const unsigned grid[3], const unsigned block[3],
                                size_t shared_bytes, const char *signature, void **args, char *error,
                                size_t error_len) {
  using namespace smtl_host;
  const KernelEntry *entry = find_kernel(kernel);
  if (entry == nullptr) {
    write_error(error, error_len, std::string("no kernel named ") + kernel + " in kernels/*.cu");
    return -1;
  }
  const std::string expected = entry->signature();
  if (expected != signature) {
    write_error(error, error_len,
                std::string(kernel) + ": the launch passes (" + signature + ") but the kernel takes (" + expected + ")");
    return -1;
  }
  if (const char *bad = check_config(grid, block, shared_bytes)) {
    write_error(error, error_len, std::string(kernel) + ": invalid launch configuration: " + bad);
    return -1;
  }
  const unsigned long long blocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
  const unsigned threads = block[0] * block[1] * block[2];
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> stop{false};
  std::mutex error_mutex;
  std::string first_error;

  auto work = [&]() {
    StackArena *arena = take_arena();
    Block b;
    b.ctx.grid_dim = {grid[0], grid[1], grid[2]};
    b.ctx.block_dim = {block[0], block[1], block[2]};
    b.fibers.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.dynamic_shared.assign(shared_bytes, 0xA5);  // poisoned: never zero-initialised on the device
    b.ctx.dynamic_shared = b.dynamic_shared.data();
    b.thunk = entry->thunk;
    b.args = args;
    for (unsigned i = 0; i < threads; ++i) {
      ThreadCtx &t = b.fibers[i].ctx;
      t.linear = i;
      t.thread_idx = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    }
    for (;;) {
      if (stop.load()) break;
      const unsigned long long id = next.fetch_add(1);
      if (id >= blocks) break;
      b.ctx.block_idx = {static_cast<unsigned>(id % grid[0]), static_cast<unsigned>((id / grid[0]) % grid[1]),
                         static_cast<unsigned>(id / (static_cast<unsigned long long>(grid[0]) * grid[1]))};
      if (!run_block(b, *arena, static_cast<unsigned>(id))) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (first_error.empty()) first_error = std::string(kernel) + ": " + b.error;
        stop.store(true);
        break;
      }
    }
    current = nullptr;
    current_block = nullptr;
    current_thread = nullptr;
    give_arena(arena);
  };

  const unsigned workers = worker_count(blocks);
  if (workers == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < workers; ++i) pool.emplace_back(work);
    for (std::thread &t : pool) t.join();
  }
  if (!first_error.empty()) {
    write_error(error, error_len, first_error);
    return -1;
  }
  return 0;
}
