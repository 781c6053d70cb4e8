// The emulator runtime: runs one dispatch of a compiled Metal kernel body on the CPU.
//
// Process model: the Python side writes every buffer of the dispatch into one file,
// starts this program (the launcher) with the kernel object's path and a text spec on
// stdin, and reads the outputs back from the file. The launcher locks its process down
// (see "containment" below) BEFORE it loads the kernel object, so no kernel code, static
// constructors included, ever runs outside the sandbox. Each threadgroup runs on one worker OS thread; when the body synchronises
// (barriers, simd_/quad_ functions) each Metal thread is a fiber and a scheduler
// releases barriers and resolves simdgroup exchanges. A kernel that needs neither runs
// its threads as plain calls.
//
// Reporting: "HLH_LOCKED {json}" first on stdout once locked down (the parent uses no
// result without it), "HLH_DONE {}" at the end; success is exit code 0. A sanitizer fault or dispatch error prints one
// line "HLH_FAULT {json}" on stderr and exits with 3; warnings print "HLH_WARN {json}".
// Memory faults inside the body print "HLH_CRASH {json}" from the signal handler.
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <dlfcn.h>
#include <elf.h>
#include <sched.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "msl_rt_api.h"

namespace {

constexpr int kSimdWidth = 32;
constexpr unsigned long kTgLimit = 32768;      // Metal: 32 KB of threadgroup memory
constexpr unsigned long kTgArena = 64 * 1024;  // room to detect going over the limit

// ---------------------------------------------------------------- dispatch spec
struct Param { unsigned long offset, nbytes, pointer; std::string name; char* base; };  // pointer: offset of element 0 in the region
struct Spec {
  std::string file;
  unsigned gx = 1, gy = 1, gz = 1, tx = 1, ty = 1, tz = 1;
  int workers = 1;
  bool reverse = false;
  bool sanitize = false;
  unsigned long mem_limit = 0;
  unsigned long cpu_limit = 0;
  bool fail_lockdown = false;  // tests: behave as if the filter could not be installed
  std::vector<Param> params;
};
Spec g_spec;
// The device window: every address a buffer access may legitimately land near. Without
// the sanitizer it is the one shared mapping; with it each buffer has its own mapping,
// far from the others, so an index that strays off one buffer never lands in another.
char* g_dev_lo = nullptr;
char* g_dev_hi = nullptr;
std::vector<void*> g_param_ptrs;
// The kernel object, loaded only after the process is locked down.
const msl_kernel_desc* g_kernel = nullptr;
void (*g_kernel_thread)(void* const*, const msl_thread_info*) = nullptr;
uintptr_t g_kernel_base = 0;

// ---------------------------------------------------------------- reporting
std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') { o += '\\'; o += c; }
    else if (c == '\n') o += "\\n";
    else if ((unsigned char)c < 0x20) o += ' ';
    else o += c;
  }
  return o + "\"";
}
void write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = write(fd, s.data() + off, s.size() - off);
    if (n <= 0) { if (errno == EINTR) continue; return; }
    off += size_t(n);
  }
}
std::atomic<int> g_fault_once{0};
[[noreturn]] void fault_exit(const std::string& json_body) {
  if (g_fault_once.exchange(1) == 0) write_all(2, "HLH_FAULT {" + json_body + "}\n");
  _exit(3);
}
std::string hex(const void* p) {
  char b[32];
  snprintf(b, sizeof b, "0x%lx", (unsigned long)p);
  return b;
}
std::string u3(msl_uint3 v) {
  char b[64];
  snprintf(b, sizeof b, "[%u, %u, %u]", v.x, v.y, v.z);
  return b;
}

// ---------------------------------------------------------------- fibers
enum State : uint8_t { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };

#if defined(__x86_64__)
extern "C" void msl_switch(void** save_sp, void* to_sp);
asm(R"(
.text
.globl msl_switch
.type msl_switch,@function
msl_switch:
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
.size msl_switch,.-msl_switch
.section .note.GNU-stack,"",@progbits
.text
)");
struct Ctx { void* sp; };
#define MSL_ASM_FIBERS 1
#else
struct Ctx { ucontext_t uc; };
#endif

struct Fiber {
  Ctx ctx;
  State st;
  uint8_t simd_kind;  // for AT_SIMD: 0 exchange, 1 simdgroup_barrier
  const void* site;
  const void* in;
  void* out;
  uint32_t aux;
  msl_resolver fn;
};

struct Group;
struct Worker {
  // threadgroup memory
  char* arena = nullptr;
  unsigned long arena_used = 0;
  // fibers
  char* stacks = nullptr;
  size_t stack_size = 0;
  int stack_cap = 0;
  std::vector<Fiber> fibers;
  Ctx sched;
  // current group
  Group* group = nullptr;
  int cur = -1;                 // index of the running thread in the group, -1 outside
  uint64_t group_serial = 0;
  uint64_t phase = 0;           // bumps at every group start and barrier release
  uint64_t group_phase = 0;     // phase at the start of the current group
  std::vector<uint32_t> simd_epoch;  // per simdgroup: simdgroup_barrier count
  // sanitizer shadow of threadgroup memory, one entry per byte
  struct Shadow { uint64_t w_phase, r_phase; uint16_t wtid, rtid, rsg; uint8_t rmulti; uint32_t wsimd, rsimd; };
  Shadow* shadow = nullptr;
  // A read of threadgroup memory no thread has written yet: a race if another thread
  // writes the slot later in the same barrier interval, else reported when it closes.
  bool pend = false;
  unsigned long pend_off = 0;
  int pend_tid = 0;
  const void* pend_pc = nullptr;
};
thread_local Worker* t_worker = nullptr;

struct Group {
  msl_uint3 pos, size, ngroups;
  int n;
};

struct WarnCounts { std::atomic<long> exited_before_barrier{0}, divergent_barrier{0}; };
WarnCounts g_warn;

// Thread attributes, computed from the group and the linear index in it.
void thread_info(const Group& g, int i, msl_thread_info& t) {
  const Spec& s = g_spec;
  uint32_t lx = i % g.size.x, ly = (i / g.size.x) % g.size.y, lz = i / (g.size.x * g.size.y);
  t.thread_position_in_threadgroup = {lx, ly, lz};
  t.threadgroup_position_in_grid = g.pos;
  t.threadgroups_per_grid = g.ngroups;
  t.threads_per_grid = {s.gx, s.gy, s.gz};
  t.grid_size = {s.gx, s.gy, s.gz};
  t.grid_origin = {0, 0, 0};
  t.threads_per_threadgroup = g.size;
  t.dispatch_threads_per_threadgroup = {s.tx, s.ty, s.tz};
  t.thread_position_in_grid = {g.pos.x * s.tx + lx, g.pos.y * s.ty + ly, g.pos.z * s.tz + lz};
  unsigned nominal = s.tx * s.ty * s.tz;
  t.thread_index_in_threadgroup = uint32_t(i);
  t.thread_index_in_simdgroup = uint32_t(i % kSimdWidth);
  t.simdgroup_index_in_threadgroup = uint32_t(i / kSimdWidth);
  t.simdgroups_per_threadgroup = uint32_t((g.n + kSimdWidth - 1) / kSimdWidth);
  t.dispatch_simdgroups_per_threadgroup = (nominal + kSimdWidth - 1) / kSimdWidth;
  t.thread_index_in_quadgroup = uint32_t(i % 4);
  t.quadgroup_index_in_threadgroup = uint32_t(i / 4);
  t.quadgroups_per_threadgroup = uint32_t((g.n + 3) / 4);
  t.dispatch_quadgroups_per_threadgroup = (nominal + 3) / 4;
  t.threads_per_simdgroup = kSimdWidth;
  t.thread_execution_width = kSimdWidth;
}

std::string thread_desc(int i) {
  Worker& w = *t_worker;
  msl_thread_info t;
  thread_info(*w.group, i, t);
  return "{\"thread_position_in_grid\": " + u3(t.thread_position_in_grid) +
         ", \"threadgroup_position_in_grid\": " + u3(t.threadgroup_position_in_grid) +
         ", \"thread_index_in_threadgroup\": " + std::to_string(i) + "}";
}

std::string site_json(const void* site) {
  // a call site as encoded by the kernel side (msl_site_): header/source bit and line
  uintptr_t v = (uintptr_t)site;
  return std::string("{\"part\": \"") + ((v >> 24) & 1 ? "source" : "header") + "\", \"line\": " +
         std::to_string(v & 0xffffff) + "}";
}

// A fault at a code address (memory accesses) or at a call site (barriers).
[[noreturn]] void sanitizer_fault(const char* kind, const std::string& what, const void* pc,
                                  const std::vector<int>& threads, const void* site = nullptr) {
  std::string th = "[";
  for (size_t k = 0; k < threads.size(); k++) th += (k ? ", " : "") + thread_desc(threads[k]);
  th += "]";
  fault_exit("\"kind\": " + json_str(kind) + ", \"what\": " + json_str(what) + ", \"pc\": \"" + hex((const void*)((uintptr_t)pc - g_kernel_base)) + "\"" +
             (site ? ", \"site\": " + site_json(site) : std::string()) + ", \"threads\": " + th);
}

// At the end of a barrier interval (or of the group): a read of threadgroup memory that
// no thread wrote in it, and no thread of the group wrote before, was uninitialized.
void flush_uninitialized(Worker& w) {
  if (!w.pend) return;
  sanitizer_fault("uninitialized",
                  "read of threadgroup memory (offset " + std::to_string(w.pend_off) +
                      ") that no thread of this threadgroup has written",
                  w.pend_pc, {w.pend_tid});
}

// ---------------------------------------------------------------- fiber plumbing
void switch_to_sched() {
  Worker& w = *t_worker;
#ifdef MSL_ASM_FIBERS
  msl_switch(&w.fibers[w.cur].ctx.sp, w.sched.sp);
#else
  swapcontext(&w.fibers[w.cur].ctx.uc, &w.sched.uc);
#endif
}

void run_thread_body(int i) {
  Worker& w = *t_worker;
  msl_thread_info t;
  thread_info(*w.group, i, t);
  g_kernel_thread(g_param_ptrs.data(), &t);
}

extern "C" void msl_fiber_main() {
  Worker& w = *t_worker;
  run_thread_body(w.cur);
  w.fibers[w.cur].st = DONE;
  switch_to_sched();
  __builtin_unreachable();
}

void ensure_stacks(Worker& w, int n) {
  if (n <= w.stack_cap) return;
  if (w.stacks) munmap(w.stacks, size_t(w.stack_cap) * w.stack_size);
  w.stack_size = g_spec.sanitize ? 512 * 1024 : 128 * 1024;
  size_t total = size_t(n) * w.stack_size;
  w.stacks = (char*)mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (w.stacks == MAP_FAILED) fault_exit("\"kind\": \"resources\", \"what\": \"cannot map fiber stacks\"");
  for (int i = 0; i < n; i++) mprotect(w.stacks + size_t(i) * w.stack_size, 4096, PROT_NONE);  // guard page
  w.stack_cap = n;
  w.fibers.resize(size_t(n));
}

void start_fiber(Worker& w, int i) {
  Fiber& f = w.fibers[size_t(i)];
  f.st = RUNNABLE;
  char* stk = w.stacks + size_t(i) * w.stack_size;
#ifdef MSL_ASM_FIBERS
  uintptr_t top = (uintptr_t)(stk + w.stack_size) & ~uintptr_t(15);
  void** sp = (void**)top;
  *--sp = nullptr;                         // fake return address of msl_fiber_main
  *--sp = (void*)&msl_fiber_main;          // msl_switch returns here
  for (int k = 0; k < 6; k++) *--sp = nullptr;  // rbp rbx r12..r15
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = stk + 4096;
  f.ctx.uc.uc_stack.ss_size = w.stack_size - 4096;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, (void (*)())msl_fiber_main, 0);
#endif
}

void resume(Worker& w, int i) {
  w.cur = i;
#ifdef MSL_ASM_FIBERS
  msl_switch(&w.sched.sp, w.fibers[size_t(i)].ctx.sp);
#else
  swapcontext(&w.sched.uc, &w.fibers[size_t(i)].ctx.uc);
#endif
  w.cur = -1;
}

// Resolve one simdgroup: called when none of its lanes is runnable and some wait on
// a simd operation. The lanes waiting at the earliest source line go first: a loop's
// body comes before the code after the loop, so lanes still looping are resolved
// before the others meet them at the next common operation.
bool resolve_simdgroup(Worker& w, int lo, int hi) {
  const void* site = nullptr;
  msl_resolver fn = nullptr;
  uint8_t kind = 0;
  for (int i = lo; i < hi; i++) {
    Fiber& f = w.fibers[size_t(i)];
    if (f.st == AT_SIMD && (site == nullptr || f.site < site)) { site = f.site; fn = f.fn; kind = f.simd_kind; }
  }
  if (!site) return false;
  int lane[kSimdWidth];
  const void* in[kSimdWidth];
  void* out[kSimdWidth];
  uint32_t aux[kSimdWidth];
  int n = 0;
  for (int i = lo; i < hi; i++) {
    Fiber& f = w.fibers[size_t(i)];
    if (f.st == AT_SIMD && f.site == site && f.fn == fn && f.simd_kind == kind) {
      lane[n] = i - lo; in[n] = f.in; out[n] = f.out; aux[n] = f.aux; n++;
      f.st = RUNNABLE;
    }
  }
  if (kind == 1) {
    w.simd_epoch[size_t(lo / kSimdWidth)]++;
  } else {
    msl_simd_ctx c{n, lane, in, out, aux, hi - lo};
    int saved = w.cur;
    w.cur = lo + lane[0];  // a resolver that faults names a participating thread
    fn(&c);
    w.cur = saved;
  }
  return true;
}

void run_group_fibers(Worker& w, Group& g) {
  const int n = g.n;
  ensure_stacks(w, n);
  w.simd_epoch.assign(size_t((n + kSimdWidth - 1) / kSimdWidth), 0);
  for (int i = 0; i < n; i++) start_fiber(w, i);
  int done = 0;
  for (;;) {
    if (g_spec.reverse) {
      for (int i = n - 1; i >= 0; i--)
        if (w.fibers[size_t(i)].st == RUNNABLE) { resume(w, i); done += w.fibers[size_t(i)].st == DONE; }
    } else {
      for (int i = 0; i < n; i++)
        if (w.fibers[size_t(i)].st == RUNNABLE) { resume(w, i); done += w.fibers[size_t(i)].st == DONE; }
    }
    if (done == n) break;
    bool progress = false;
    for (int lo = 0; lo < n; lo += kSimdWidth) progress |= resolve_simdgroup(w, lo, std::min(n, lo + kSimdWidth));
    if (progress) continue;
    // Every live thread now waits at a threadgroup barrier.
    const void* site0 = nullptr;
    bool diverged = false;
    std::vector<int> at;
    for (int i = 0; i < n; i++) {
      Fiber& f = w.fibers[size_t(i)];
      if (f.st != AT_BARRIER) continue;
      if (!site0) site0 = f.site; else if (f.site != site0) diverged = true;
      at.push_back(i);
    }
    if (done > 0 || diverged) {
      if (g_spec.sanitize) {
        std::vector<int> culprits;
        if (diverged) {
          for (int i : at) {
            if (w.fibers[size_t(i)].site == site0) continue;
            uintptr_t other = (uintptr_t)w.fibers[size_t(i)].site;
            sanitizer_fault("barrier-divergence",
                            "threads of one threadgroup wait at different threadgroup_barrier calls (the other at " +
                                std::string((other >> 24) & 1 ? "source" : "header") + " line " +
                                std::to_string(other & 0xffffff) + ")",
                            nullptr, {at[0], i}, site0);
          }
        }
        for (int i = 0; i < n; i++) if (w.fibers[size_t(i)].st == DONE) { culprits = {at[0], i}; break; }
        sanitizer_fault("barrier-divergence",
                        std::to_string(at.size()) + " of " + std::to_string(n) +
                            " threads reached threadgroup_barrier; the others had returned",
                        nullptr, culprits, site0);
      }
      if (done > 0) g_warn.exited_before_barrier++;
      if (diverged) g_warn.divergent_barrier++;
    }
    flush_uninitialized(w);
    for (int i : at) w.fibers[size_t(i)].st = RUNNABLE;
    w.phase++;
  }
}

void run_group_direct(Worker& w, Group& g) {
  msl_thread_info t;
  thread_info(g, 0, t);
  const uint32_t sx = g.size.x, sxy = g.size.x * g.size.y;
  for (int k = 0; k < g.n; k++) {
    const int i = g_spec.reverse ? g.n - 1 - k : k;
    const uint32_t lx = uint32_t(i) % sx, ly = (uint32_t(i) % sxy) / sx, lz = uint32_t(i) / sxy;
    w.cur = i;
    t.thread_position_in_threadgroup = {lx, ly, lz};
    t.thread_position_in_grid = {g.pos.x * g_spec.tx + lx, g.pos.y * g_spec.ty + ly, g.pos.z * g_spec.tz + lz};
    t.thread_index_in_threadgroup = uint32_t(i);
    t.thread_index_in_simdgroup = uint32_t(i % kSimdWidth);
    t.simdgroup_index_in_threadgroup = uint32_t(i / kSimdWidth);
    t.thread_index_in_quadgroup = uint32_t(i % 4);
    t.quadgroup_index_in_threadgroup = uint32_t(i / 4);
    g_kernel_thread(g_param_ptrs.data(), &t);
  }
  w.cur = -1;
}

void worker_main(std::atomic<long>* next, long total, msl_uint3 ng) {
  Worker w;
  t_worker = &w;
  w.arena = (char*)mmap(nullptr, kTgArena, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (g_spec.sanitize) {
    w.shadow = (Worker::Shadow*)mmap(nullptr, kTgArena * sizeof(Worker::Shadow), PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  }
  const Spec& s = g_spec;
  for (long k; (k = next->fetch_add(1)) < total;) {
    Group g;
    g.pos = {uint32_t(k % ng.x), uint32_t((k / ng.x) % ng.y), uint32_t(k / ((long)ng.x * ng.y))};
    g.size = {std::min(s.tx, s.gx - g.pos.x * s.tx), std::min(s.ty, s.gy - g.pos.y * s.ty),
              std::min(s.tz, s.gz - g.pos.z * s.tz)};
    g.ngroups = ng;
    g.n = int(g.size.x * g.size.y * g.size.z);
    w.group = &g;
    w.group_serial++;
    w.phase++;
    w.group_phase = w.phase;
    w.arena_used = 0;
    if (g_kernel->needs_sync) run_group_fibers(w, g);
    else run_group_direct(w, g);
    flush_uninitialized(w);
    w.group = nullptr;
  }
  t_worker = nullptr;
}

// ---------------------------------------------------------------- sanitizer: memory accesses
// The kernel object is compiled with -fsanitize=thread but linked without ThreadSanitizer:
// the __tsan_* hooks it calls before every load and store land here.
const Param* find_param(const char* a) {
  for (const Param& p : g_spec.params)
    if (a >= p.base && a < p.base + p.nbytes) return &p;
  return nullptr;
}
const Param* nearest_param(const char* a, long& delta) {
  const Param* best = nullptr;
  long bestd = 0;
  for (const Param& p : g_spec.params) {
    long d = a < p.base ? long(a - p.base) : long(a - (p.base + p.nbytes)) + 1;
    if (!best || labs(d) < labs(bestd)) { best = &p; bestd = d; }
  }
  delta = bestd;
  return best;
}

inline bool excused(Worker& w, uint32_t me, uint16_t other, uint32_t other_simd) {
  if (w.simd_epoch.empty()) return false;
  // threads of one simdgroup are ordered by a simdgroup_barrier between their accesses
  return me / kSimdWidth == other / kSimdWidth && w.simd_epoch[me / kSimdWidth] > other_simd;
}

__attribute__((noinline)) void check_access(const void* addr, unsigned long size, bool write, const void* pc) {
  Worker* wp = t_worker;
  if (!wp || wp->cur < 0) return;
  Worker& w = *wp;
  const char* a = (const char*)addr;
  if (a >= w.arena && a < w.arena + kTgArena) {
    unsigned long off = (unsigned long)(a - w.arena);
    if (off + size > w.arena_used)
      sanitizer_fault("out-of-bounds",
                      std::string(write ? "write" : "read") + " of " + std::to_string(size) +
                          " bytes at threadgroup offset " + std::to_string(off) + ", past the " +
                          std::to_string(w.arena_used) + " bytes of threadgroup memory declared",
                      pc, {w.cur});
    const uint16_t me = uint16_t(w.cur);
    const uint32_t my_simd = w.simd_epoch.empty() ? 0 : w.simd_epoch[size_t(me / kSimdWidth)];
    for (unsigned long b = off; b < off + size; b++) {
      Worker::Shadow& sh = w.shadow[b];
      if (!write) {
        if (sh.w_phase < w.group_phase && !w.pend) {
          w.pend = true; w.pend_off = b; w.pend_tid = w.cur; w.pend_pc = pc;
        }
        if (sh.w_phase == w.phase && sh.wtid != me && !excused(w, me, sh.wtid, sh.wsimd))
          sanitizer_fault("race",
                          "read of threadgroup memory (offset " + std::to_string(b) +
                              ") written by another thread with no barrier in between",
                          pc, {w.cur, sh.wtid});
        if (sh.r_phase != w.phase) {
          sh.r_phase = w.phase; sh.rtid = me; sh.rmulti = 0; sh.rsg = uint16_t(me / kSimdWidth); sh.rsimd = my_simd;
        } else if (sh.rtid != me) {
          sh.rmulti = 1;
          if (sh.rsg != me / kSimdWidth) sh.rsg = 0xffff;
          if (my_simd < sh.rsimd) sh.rsimd = my_simd;
        }
      } else {
        if (sh.w_phase == w.phase && sh.wtid != me && !excused(w, me, sh.wtid, sh.wsimd))
          sanitizer_fault("race",
                          "two threads write threadgroup memory (offset " + std::to_string(b) +
                              ") with no barrier in between",
                          pc, {w.cur, sh.wtid});
        if (sh.r_phase == w.phase) {
          bool ok;
          if (!sh.rmulti) ok = sh.rtid == me || excused(w, me, sh.rtid, sh.rsimd);
          else ok = sh.rsg == me / kSimdWidth && !w.simd_epoch.empty() && w.simd_epoch[size_t(sh.rsg)] > sh.rsimd;
          if (!ok)
            sanitizer_fault("race",
                            "write of threadgroup memory (offset " + std::to_string(b) +
                                ") that another thread reads earlier in the same barrier interval "
                                "(no barrier in between: on a GPU the read may see the old or the new value)",
                            pc, {w.cur, sh.rtid});
        }
        sh.w_phase = w.phase; sh.wtid = me; sh.wsimd = my_simd;
      }
    }
    return;
  }
  if (a >= g_dev_lo && a < g_dev_hi) {
    const Param* p = find_param(a);
    if (p && a + size <= p->base + p->nbytes) return;
    long delta = 0;
    const Param* q = p ? p : nearest_param(a, delta);
    std::string where;
    if (p) where = "runs past the end of '" + p->name + "'";
    else if (delta > 0) where = std::to_string(delta) + " bytes past the end of '" + q->name + "'";
    else where = std::to_string(-delta) + " bytes before the start of '" + q->name + "'";
    sanitizer_fault("out-of-bounds",
                    std::string(write ? "write" : "read") + " of " + std::to_string(size) + " bytes " + where +
                        " (" + std::to_string(q->nbytes) + " bytes)",
                    pc, {w.cur});
  }
}

}  // namespace

// ---------------------------------------------------------------- the kernel-facing API
extern "C" {

void msl_rt_barrier(int kind, const void* site) {
  Worker& w = *t_worker;
  Fiber& f = w.fibers[size_t(w.cur)];
  f.site = site;
  if (kind == MSL_BARRIER_THREADGROUP) {
    f.st = AT_BARRIER;
  } else {
    f.st = AT_SIMD; f.simd_kind = 1; f.fn = nullptr; f.in = nullptr; f.out = nullptr; f.aux = 0;
  }
  switch_to_sched();
}

void msl_rt_simd(const void* in, void* out, uint32_t aux, msl_resolver fn, const void* site) {
  Worker& w = *t_worker;
  Fiber& f = w.fibers[size_t(w.cur)];
  f.st = AT_SIMD; f.simd_kind = 0; f.in = in; f.out = out; f.aux = aux; f.fn = fn; f.site = site;
  switch_to_sched();
}

uint32_t msl_rt_lane(void) { return uint32_t(t_worker->cur % kSimdWidth); }

void* msl_rt_tg_alloc(msl_tg_slot* slot, unsigned long bytes, unsigned long align) {
  Worker& w = *t_worker;
  if (slot->group == w.group_serial && slot->ptr) return slot->ptr;
  if (align < 16) align = 16;
  unsigned long off = (w.arena_used + align - 1) / align * align;
  if (off + bytes > kTgLimit)
    fault_exit("\"kind\": \"threadgroup-memory\", \"what\": " +
               json_str("threadgroup memory of " + std::to_string(off + bytes) +
                        " bytes exceeds the 32 KB (32768 bytes) Metal allows a threadgroup"));
  w.arena_used = off + bytes;
  slot->group = w.group_serial;
  slot->ptr = w.arena + off;
  // Poison: a read of memory no thread wrote yields NaN (floats) or -1 (integers).
  if (!g_spec.sanitize) memset(slot->ptr, 0xff, bytes);
  return slot->ptr;
}

void msl_rt_atomic_access(const void* addr, unsigned long size) {
  // atomics never race; they are checked for bounds, and count as initializing writes
  Worker* w = t_worker;
  if (!w || w->cur < 0) return;
  const char* a = (const char*)addr;
  if (a >= w->arena && a < w->arena + kTgArena) {
    unsigned long off = (unsigned long)(a - w->arena);
    if (off + size > w->arena_used) check_access(addr, size, true, __builtin_return_address(0));
    for (unsigned long b = off; b < off + size && b < w->arena_used; b++) {
      Worker::Shadow& sh = w->shadow[b];
      if (sh.w_phase < w->group_phase) { sh.w_phase = w->group_phase; sh.wtid = uint16_t(w->cur); sh.wsimd = 0; }
    }
    return;
  }
  check_access(addr, size, true, __builtin_return_address(0));
}

void msl_rt_fault(const char* kind, const char* what) {
  Worker& w = *t_worker;
  // kernel text can call this too: it picks no error class and writes no text of its own
  if (strcmp(kind, "inactive-lanes") != 0)
    sanitizer_fault("kernel-fault", "the kernel reported an unknown fault", __builtin_return_address(0), {w.cur});
  if (!g_spec.sanitize) return;  // undefined result, as on the GPU
  if (strcmp(what, "simdgroup_multiply_accumulate needs all 32 lanes of the simdgroup") != 0)
    what = "an operation needs all lanes of the simdgroup";
  sanitizer_fault(kind, what, __builtin_return_address(0), {w.cur});
}

// ThreadSanitizer's instrumentation ABI.
#define MSL_TSAN_RW(n)                                                                                          \
  void __tsan_read##n(void* a) { check_access(a, n, false, __builtin_return_address(0)); }                     \
  void __tsan_write##n(void* a) { check_access(a, n, true, __builtin_return_address(0)); }                     \
  void __tsan_unaligned_read##n(void* a) { check_access(a, n, false, __builtin_return_address(0)); }           \
  void __tsan_unaligned_write##n(void* a) { check_access(a, n, true, __builtin_return_address(0)); }           \
  void __tsan_volatile_read##n(void* a) { check_access(a, n, false, __builtin_return_address(0)); }            \
  void __tsan_volatile_write##n(void* a) { check_access(a, n, true, __builtin_return_address(0)); }
MSL_TSAN_RW(1)
MSL_TSAN_RW(2)
MSL_TSAN_RW(4)
MSL_TSAN_RW(8)
MSL_TSAN_RW(16)
#undef MSL_TSAN_RW
void __tsan_read_range(void* a, unsigned long n) { check_access(a, n, false, __builtin_return_address(0)); }
void __tsan_write_range(void* a, unsigned long n) { check_access(a, n, true, __builtin_return_address(0)); }
void* __tsan_memcpy(void* d, const void* s, unsigned long n) {
  check_access(s, n, false, __builtin_return_address(0));
  check_access(d, n, true, __builtin_return_address(0));
  return memcpy(d, s, n);
}
void* __tsan_memmove(void* d, const void* s, unsigned long n) {
  check_access(s, n, false, __builtin_return_address(0));
  check_access(d, n, true, __builtin_return_address(0));
  return memmove(d, s, n);
}
void* __tsan_memset(void* d, int c, unsigned long n) {
  check_access(d, n, true, __builtin_return_address(0));
  return memset(d, c, n);
}
void __tsan_init(void) {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void) {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}  // extern "C"

// ---------------------------------------------------------------- process setup
namespace {

void on_crash(int sig, siginfo_t* si, void* uctx) {
  (void)uctx;
  std::string extra;
  Worker* w = t_worker;
  if (w && w->group && w->cur >= 0) extra = ", \"threads\": [" + thread_desc(w->cur) + "]";
  bool guard = false;
  if (w && w->stacks && (char*)si->si_addr >= w->stacks &&
      (char*)si->si_addr < w->stacks + size_t(w->stack_cap) * w->stack_size) {
    size_t off = size_t((char*)si->si_addr - w->stacks) % w->stack_size;
    guard = off < 4096;
  }
  std::string msg = "HLH_CRASH {\"signal\": " + std::to_string(sig) + ", \"addr\": \"" + hex(si->si_addr) +
                    "\", \"stack_overflow\": " + (guard ? "true" : "false") + extra + "}\n";
  write_all(2, msg);
  _exit(4);
}

void install_crash_handlers() {
  static char altstack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = on_crash;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP}) sigaction(sig, &sa, nullptr);
}

// ---------------------------------------------------------------- containment
// The security boundary. Kernel code is native code from an untrusted template, so none
// of it runs before the process is locked down: the launcher maps the buffers, closes
// every other file, drops privileges, enters new namespaces where it may, and installs a
// system-call allow-list (seccomp) BEFORE it loads the kernel object; the object's own
// initialisers are refused. Loading needs a read-only open; once loaded, a second filter
// removes even that. Anything outside the list kills the process (SIGSYS).
constexpr int kProbeErrno = 4000;  // getppid answers this errno once the filter is in

struct Bpf {
  std::vector<sock_filter> p;
  void ld_nr() { p.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr))); }
  void ld_arg(int i, bool hi) {
    p.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, uint32_t(offsetof(seccomp_data, args) + 8 * i + (hi ? 4 : 0))));
  }
  // nr -> action
  void rule(long nr, uint32_t action) {
    ld_nr();
    p.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(nr), 0, 1));
    p.push_back(BPF_STMT(BPF_RET | BPF_K, action));
  }
  // nr with (low word of arg i & mask) == value and the high word zero -> allow; nr otherwise -> kill
  void rule_arg(long nr, int i, uint32_t mask, uint32_t value, bool check_hi = true) {
    ld_nr();
    p.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(nr), 0, uint8_t(check_hi ? 7 : 5)));
    if (check_hi) {
      ld_arg(i, true);
      p.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 4));
    }
    ld_arg(i, false);
    p.push_back(BPF_STMT(BPF_ALU | BPF_AND | BPF_K, mask));
    p.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, value, 0, 1));
    p.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    p.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
  }
};

#if defined(__x86_64__)
constexpr uint32_t kArch = 0xC000003E;  // AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
constexpr uint32_t kArch = 0xC00000B7;  // AUDIT_ARCH_AARCH64
#else
constexpr uint32_t kArch = 0;
#endif

// loading: true while the kernel object is being loaded (a read-only open allowed).
bool install_filter(bool loading) {
  if (!kArch) return false;
  Bpf b;
  b.p.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)));
  b.p.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kArch, 1, 0));
  b.p.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
#if defined(__x86_64__)
  b.ld_nr();  // the x32 ABI shares the arch value: refuse it
  b.p.push_back(BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1));
  b.p.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
#endif
  static const long plain[] = {
      SYS_read, SYS_write, SYS_close, SYS_munmap, SYS_madvise, SYS_brk, SYS_futex, SYS_exit, SYS_exit_group,
      SYS_rt_sigreturn, SYS_rt_sigprocmask, SYS_rt_sigaction, SYS_sched_yield, SYS_clock_gettime, SYS_gettid, SYS_getpid,
      SYS_clock_nanosleep, SYS_mremap, SYS_fstat, SYS_sigaltstack, SYS_set_robust_list, SYS_rseq, SYS_getrandom,
#ifdef SYS_nanosleep
      SYS_nanosleep,
#endif
  };
  for (long nr : plain) b.rule(nr, SECCOMP_RET_ALLOW);
  b.rule(SYS_getppid, SECCOMP_RET_ERRNO | kProbeErrno);
  // signals only to this process itself (abort, raise)
  b.rule_arg(SYS_tgkill, 0, 0xffffffffu, uint32_t(getpid()), false);
  if (loading) {
    // threads, never processes: the launcher starts its workers under this filter only
    b.rule_arg(SYS_clone, 0, CLONE_THREAD, CLONE_THREAD);
    b.rule(SYS_clone3, SECCOMP_RET_ERRNO | ENOSYS);  // its flags are out of reach: glibc falls back to clone
    // the loader: open the object read-only, stat it by descriptor, map it executable
    b.rule_arg(SYS_openat, 2, 0xffffffffu, O_RDONLY | O_CLOEXEC, false);
    b.rule_arg(SYS_newfstatat, 3, 0xffffffffu, AT_EMPTY_PATH, false);
    b.rule(SYS_pread64, SECCOMP_RET_ALLOW);
    b.rule(SYS_mmap, SECCOMP_RET_ALLOW);
    b.rule(SYS_mprotect, SECCOMP_RET_ALLOW);
    b.rule(SYS_seccomp, SECCOMP_RET_ALLOW);  // to add the second filter (filters only ever add limits)
  } else {
    // installed once the workers run (on every thread): the kernel starts no thread of its own
    b.rule(SYS_clone3, SECCOMP_RET_ERRNO | ENOSYS);  // glibc falls back to clone, which kills
    b.rule(SYS_clone, SECCOMP_RET_KILL_PROCESS);
    // no open, no new executable memory (both filters apply: the stricter answer wins)
    b.rule_arg(SYS_mmap, 2, PROT_EXEC, 0);
    b.rule_arg(SYS_mprotect, 2, PROT_EXEC, 0);
  }
  b.p.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
  sock_fprog fp{(unsigned short)b.p.size(), b.p.data()};
  // the second filter applies to every thread of the process at once (TSYNC)
  return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, loading ? 0 : SECCOMP_FILTER_FLAG_TSYNC, &fp) == 0;
}

// What the lockdown achieved, reported to the parent, which refuses to use results
// without it. seccomp and no_new_privs are required; the rest are extra walls.
struct Lockdown {
  bool no_new_privs = false, seccomp = false, probe = false, caps_dropped = false, landlock = false;
  std::string namespaces;
};

// Landlock (Linux 5.13+): from here the process may read the kernel object (dlopen maps it)
// and the system's libraries and loader cache (the loader may look one up), and nothing
// else: whatever runs while the object loads (before the second filter) opens no user file.
// No writes anywhere, no TCP, no signals or abstract sockets outside (where the ABI has them).
bool landlock_to_object(int kfd) {
  constexpr long kCreate = 444, kAddRule = 445, kRestrict = 446;
  long abi = syscall(kCreate, nullptr, 0, 1u);  // LANDLOCK_CREATE_RULESET_VERSION
  if (abi < 1) return false;
  uint64_t fs = abi >= 5 ? (1ull << 16) - 1 : abi >= 3 ? (1ull << 15) - 1 : abi >= 2 ? (1ull << 14) - 1 : (1ull << 13) - 1;
  struct { uint64_t fs, net, scoped; } attr{fs, abi >= 4 ? 3ull : 0ull, abi >= 6 ? 3ull : 0ull};
  long rs = syscall(kCreate, &attr, size_t(abi >= 6 ? 24 : abi >= 4 ? 16 : 8), 0u);
  if (rs < 0) return false;
  constexpr uint64_t kExecute = 1, kReadFile = 4, kReadDir = 8;
  auto allow = [&](int fd, uint64_t rights) {
    struct __attribute__((packed)) { uint64_t allowed; int32_t parent_fd; } rule{rights, fd};
    return syscall(kAddRule, rs, 1 /* LANDLOCK_RULE_PATH_BENEATH */, &rule, 0u) == 0;
  };
  bool ok = allow(kfd, kReadFile | kExecute);
  for (const char* dir : {"/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache"}) {
    int f = open(dir, O_PATH | O_CLOEXEC);
    if (f < 0) continue;
    struct stat st;
    bool is_dir = fstat(f, &st) == 0 && S_ISDIR(st.st_mode);
    ok = allow(f, is_dir ? kReadFile | kReadDir | kExecute : kReadFile) && ok;
    close(f);
  }
  ok = ok && syscall(kRestrict, rs, 0u) == 0;
  close(int(rs));
  return ok;
}

void write_file(const char* path, const std::string& text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  write_all(fd, text);
  close(fd);
}

Lockdown lock_down(unsigned long mem_limit, unsigned long cpu_seconds, int kfd) {
  Lockdown l;
  auto limit = [](int what, rlim_t v) { rlimit rl{v, v}; setrlimit(what, &rl); };
  limit(RLIMIT_CORE, 0);
  limit(RLIMIT_FSIZE, 0);  // no file may grow
  limit(RLIMIT_NOFILE, 16);
  if (mem_limit) limit(RLIMIT_AS, mem_limit);
  if (cpu_seconds) { rlimit rl{cpu_seconds, cpu_seconds + 1}; setrlimit(RLIMIT_CPU, &rl); }
  // Namespaces where the system allows them (not required: the filter holds alone).
  uid_t uid = getuid();
  gid_t gid = getgid();
  const int base = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC;
  if (unshare(CLONE_NEWUSER | base) == 0) {
    l.namespaces = "user,net,mount,ipc";
    write_file("/proc/self/setgroups", "deny");
    write_file("/proc/self/uid_map", "0 " + std::to_string(uid) + " 1");
    write_file("/proc/self/gid_map", "0 " + std::to_string(gid) + " 1");
  } else if (unshare(base) == 0) {
    l.namespaces = "net,mount,ipc";
  } else if (unshare(CLONE_NEWUSER) == 0) {
    l.namespaces = "user";
  }
  // Capabilities: none, in any namespace.
  prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
  for (int cap = 0; cap < 64; cap++) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
  struct { uint32_t version; int pid; } hdr{0x20080522, 0};  // _LINUX_CAPABILITY_VERSION_3
  struct { uint32_t effective, permitted, inheritable; } data[2] = {};
  l.caps_dropped = syscall(SYS_capset, &hdr, data) == 0;
  l.no_new_privs = prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0;
  if (l.no_new_privs) l.landlock = landlock_to_object(kfd);
  if (l.no_new_privs && !g_spec.fail_lockdown) l.seccomp = install_filter(true);
  if (l.seccomp) {
    errno = 0;
    long r = syscall(SYS_getppid);
    l.probe = r == -1 && errno == kProbeErrno;
  }
  return l;
}

// The kernel object may not run code while it loads (constructors, IFUNC resolvers):
// Metal has no dynamic initialisation of program-scope variables. The toolchain strips
// initialiser sections; this refuses an object that has any left, reading its dynamic
// section straight from the file.
std::string object_problem(int fd) {
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < (off_t)sizeof(Elf64_Ehdr)) return "unreadable";
  size_t n = size_t(st.st_size);
  const char* m = (const char*)mmap(nullptr, n, PROT_READ, MAP_PRIVATE, fd, 0);
  if (m == MAP_FAILED) return "unreadable";
  std::string why;
  auto in = [&](uint64_t off, uint64_t len) { return off <= n && len <= n - off; };
  const Elf64_Ehdr* eh = (const Elf64_Ehdr*)m;
  if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_type != ET_DYN ||
      !in(eh->e_phoff, uint64_t(eh->e_phnum) * sizeof(Elf64_Phdr))) {
    why = "not a 64-bit shared object";
  } else {
    const Elf64_Phdr* ph = (const Elf64_Phdr*)(m + eh->e_phoff);
    auto file_off = [&](uint64_t vaddr, uint64_t& off) {  // virtual address -> file offset
      for (int i = 0; i < eh->e_phnum; i++)
        if (ph[i].p_type == PT_LOAD && vaddr >= ph[i].p_vaddr && vaddr < ph[i].p_vaddr + ph[i].p_filesz) {
          off = vaddr - ph[i].p_vaddr + ph[i].p_offset;
          return true;
        }
      return false;
    };
    for (int i = 0; i < eh->e_phnum && why.empty(); i++) {
      if (ph[i].p_type == PT_INTERP) why = "it names a program interpreter";
      if (ph[i].p_type != PT_DYNAMIC) continue;
      if (!in(ph[i].p_offset, ph[i].p_filesz)) { why = "bad dynamic section"; break; }
      const Elf64_Dyn* d = (const Elf64_Dyn*)(m + ph[i].p_offset);
      size_t nd = ph[i].p_filesz / sizeof(Elf64_Dyn);
      uint64_t rela = 0, relasz = 0, jmprel = 0, pltsz = 0, symtab = 0, strtab = 0, strsz = 0, gnu_hash = 0, hash = 0,
               versym = 0;
      for (size_t k = 0; k < nd && d[k].d_tag != DT_NULL; k++) {
        switch (d[k].d_tag) {
          // whatever their sizes say (a relocation could rewrite a size as the object loads)
          case DT_INIT: case DT_PREINIT_ARRAY: case DT_INIT_ARRAY: case DT_FINI: case DT_FINI_ARRAY:
            why = "it has initialisers (static constructors)";
            break;
          case DT_INIT_ARRAYSZ: case DT_PREINIT_ARRAYSZ:
            if (d[k].d_un.d_val) why = "it has initialisers (static constructors)";
            break;
          case DT_TEXTREL: why = "it has text relocations"; break;
          case DT_RELA: rela = d[k].d_un.d_ptr; break;
          case DT_RELASZ: relasz = d[k].d_un.d_val; break;
          case DT_JMPREL: jmprel = d[k].d_un.d_ptr; break;
          case DT_PLTRELSZ: pltsz = d[k].d_un.d_val; break;
          case DT_SYMTAB: symtab = d[k].d_un.d_ptr; break;
          case DT_STRTAB: strtab = d[k].d_un.d_ptr; break;
          case DT_STRSZ: strsz = d[k].d_un.d_val; break;
          case DT_GNU_HASH: gnu_hash = d[k].d_un.d_ptr; break;
          case DT_HASH: hash = d[k].d_un.d_ptr; break;
          case DT_VERSYM: versym = d[k].d_un.d_ptr; break;
          default: break;
        }
      }
      // What the loader reads while it relocates (the relocation tables, symbols, strings,
      // hashes, versions, the program headers) must lie in segments no relocation can
      // write: a red team rewrote a later relocation into an IFUNC with an earlier one,
      // after a writable note section had made the first segment writable. And no segment
      // is both writable and executable.
      auto writable = [&](uint64_t vaddr, uint64_t len) {
        for (int j = 0; j < eh->e_phnum; j++)
          if (ph[j].p_type == PT_LOAD && (ph[j].p_flags & PF_W) && vaddr < ph[j].p_vaddr + ph[j].p_memsz &&
              vaddr + len > ph[j].p_vaddr)
            return true;
        return false;
      };
      uint64_t phdrs = ~0ull;
      for (int j = 0; j < eh->e_phnum; j++)
        if (ph[j].p_type == PT_LOAD && eh->e_phoff >= ph[j].p_offset && eh->e_phoff < ph[j].p_offset + ph[j].p_filesz)
          phdrs = ph[j].p_vaddr + (eh->e_phoff - ph[j].p_offset);
      for (int j = 0; j < eh->e_phnum && why.empty(); j++)
        if (ph[j].p_type == PT_LOAD && (ph[j].p_flags & PF_W) && (ph[j].p_flags & PF_X))
          why = "a segment is both writable and executable";
      for (auto [addr, size] : {std::pair<uint64_t, uint64_t>{rela, relasz}, {jmprel, pltsz}, {symtab, 24},
                                {strtab, strsz}, {gnu_hash, 16}, {hash, 8}, {versym, 2},
                                {phdrs, uint64_t(eh->e_phnum) * sizeof(Elf64_Phdr)}})
        if (why.empty() && addr && addr != ~0ull && size && writable(addr, size))
          why = "its loader tables lie in a writable segment";
      for (auto [addr, size] : {std::pair<uint64_t, uint64_t>{rela, relasz}, {jmprel, pltsz}}) {
        uint64_t off = 0;
        if (!size || !why.empty()) continue;
        if (!file_off(addr, off) || !in(off, size)) { why = "bad relocations"; break; }
        const Elf64_Rela* r = (const Elf64_Rela*)(m + off);
        uint64_t symoff = 0;
        bool have_syms = symtab && file_off(symtab, symoff);
        // how many dynamic symbols there are (the linker's section header): a relocation
        // naming one past them reads a "symbol" from data earlier relocations may have
        // written (a red team forged a local IFUNC symbol that way)
        uint64_t nsyms = 0;
        if (in(eh->e_shoff, uint64_t(eh->e_shnum) * sizeof(Elf64_Shdr))) {
          const Elf64_Shdr* sh = (const Elf64_Shdr*)(m + eh->e_shoff);
          for (int j = 0; j < eh->e_shnum; j++)
            if (sh[j].sh_type == SHT_DYNSYM) nsyms = sh[j].sh_size / sizeof(Elf64_Sym);
        }
        for (size_t k = 0; k < size / sizeof(Elf64_Rela); k++) {
          // a relocation writes 8 bytes at r_offset: only into the object's own writable
          // segments, never into its dynamic section (read by the loader after relocating)
          // nor anywhere else in the process (the launcher's memory, before the second filter)
          uint64_t at_ = r[k].r_offset;
          bool inside = false, dynamic = false;
          for (int j = 0; j < eh->e_phnum; j++) {
            bool hit = at_ >= ph[j].p_vaddr && at_ <= ph[j].p_vaddr + ph[j].p_memsz && ph[j].p_memsz >= 8 &&
                       at_ - ph[j].p_vaddr <= ph[j].p_memsz - 8;
            if (ph[j].p_type == PT_LOAD && (ph[j].p_flags & PF_W) && hit) inside = true;
            if (ph[j].p_type == PT_DYNAMIC && at_ + 8 > ph[j].p_vaddr && at_ < ph[j].p_vaddr + ph[j].p_memsz)
              dynamic = true;
          }
          if (!inside || dynamic) { why = "a relocation writes outside the object's data"; break; }
          uint64_t sym = ELF64_R_SYM(r[k].r_info), type = ELF64_R_TYPE(r[k].r_info);
#if defined(__x86_64__)
          if (type == R_X86_64_IRELATIVE) { why = "it has IFUNC resolvers"; break; }
          // the types the linker makes for a kernel; none with symbol 0 writes a value of
          // the object's choosing (a module id, a load address), the others name a symbol
          bool bare = type == R_X86_64_RELATIVE || type == R_X86_64_DTPMOD64;
          bool named = type == R_X86_64_64 || type == R_X86_64_GLOB_DAT || type == R_X86_64_JUMP_SLOT ||
                       type == R_X86_64_DTPMOD64 || type == R_X86_64_DTPOFF64 || type == R_X86_64_TPOFF64;
#elif defined(__aarch64__)
          if (type == R_AARCH64_IRELATIVE) { why = "it has IFUNC resolvers"; break; }
          bool bare = type == R_AARCH64_RELATIVE || type == R_AARCH64_TLS_DTPMOD64;
          bool named = type == R_AARCH64_ABS64 || type == R_AARCH64_GLOB_DAT || type == R_AARCH64_JUMP_SLOT ||
                       type == R_AARCH64_TLS_DTPMOD64 || type == R_AARCH64_TLS_DTPREL64 ||
                       type == R_AARCH64_TLS_TPREL64;
#else
          bool bare = false, named = false;
#endif
          if (sym ? !named : !bare) { why = "a relocation of a kind kernels do not have"; break; }
          if (!sym) continue;
          // a relocation against an IFUNC symbol the object defines runs its resolver
          uint64_t at = symoff + sym * sizeof(Elf64_Sym);
          if (!have_syms || sym >= nsyms || !in(at, sizeof(Elf64_Sym))) { why = "bad symbol table"; break; }
          const Elf64_Sym* es = (const Elf64_Sym*)(m + at);
          if (ELF64_ST_TYPE(es->st_info) == STT_GNU_IFUNC && es->st_shndx != SHN_UNDEF) why = "it has IFUNC resolvers";
        }
      }
    }
  }
  munmap((void*)m, n);
  return why;
}

[[noreturn]] void spec_error(const std::string& what) {
  fault_exit("\"kind\": \"spec\", \"what\": " + json_str(what));
}

void read_spec() {
  std::string text;
  char buf[4096];
  for (;;) {
    ssize_t n = read(0, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buf, size_t(n));
  }
  size_t pos = 0;
  std::set<std::string> seen;
  while (pos < text.size()) {
    size_t eol = text.find('\n', pos);
    if (eol == std::string::npos) eol = text.size();
    std::string line = text.substr(pos, eol - pos);
    pos = eol + 1;
    if (line.empty()) continue;
    char key[32] = {0}, name[256] = {0};
    unsigned a = 0, b = 0, c = 0;
    unsigned long off = 0, nb = 0, ptr = 0;
    sscanf(line.c_str(), "%31s", key);
    std::string k = key;
    // every line but `param` at most once: a second `file` (or limit) line is an injection
    if (k != "param" && !seen.insert(k).second) spec_error("repeated spec line: " + k);
    if (k == "file") g_spec.file = line.substr(5);
    else if (k == "grid" && sscanf(line.c_str(), "grid %u %u %u", &a, &b, &c) == 3) { g_spec.gx = a; g_spec.gy = b; g_spec.gz = c; }
    else if (k == "threadgroup" && sscanf(line.c_str(), "threadgroup %u %u %u", &a, &b, &c) == 3) { g_spec.tx = a; g_spec.ty = b; g_spec.tz = c; }
    else if (k == "workers" && sscanf(line.c_str(), "workers %u", &a) == 1) g_spec.workers = int(a);
    else if (k == "order" && (line == "order reverse" || line == "order forward")) g_spec.reverse = line.find("reverse") != std::string::npos;
    else if (k == "sanitize" && sscanf(line.c_str(), "sanitize %u", &a) == 1) g_spec.sanitize = a != 0;
    else if (k == "memlimit" && sscanf(line.c_str(), "memlimit %lu", &off) == 1) g_spec.mem_limit = off;
    else if (k == "cpulimit" && sscanf(line.c_str(), "cpulimit %lu", &off) == 1) g_spec.cpu_limit = off;
    else if (k == "fail_lockdown") g_spec.fail_lockdown = true;
    else if (k == "param" && sscanf(line.c_str(), "param %lu %lu %lu %255s", &off, &nb, &ptr, name) == 4 &&
             line.size() == std::string("param ").size() + std::to_string(off).size() + 1 +
                                std::to_string(nb).size() + 1 + std::to_string(ptr).size() + 1 + strlen(name))
      g_spec.params.push_back(Param{off, nb, ptr, name, nullptr});
    else spec_error("bad spec line: " + line);
  }
}


// Map the buffers. Without the sanitizer: the file, once. With it: each buffer at its own
// address, 128 GiB from the next, so an index off one buffer faults on no-man's land
// and is reported against that buffer (falls back to the one mapping where the address
// space is too small).
void map_buffers(int fd, unsigned long size) {
  if (g_spec.sanitize) {
    const uintptr_t stride = uintptr_t(1) << 37, base = uintptr_t(1) << 45;
    bool ok = true;
    std::vector<std::pair<char*, size_t>> maps;
    for (size_t i = 0; i < g_spec.params.size() && ok; i++) {
      Param& p = g_spec.params[i];
      size_t len = (std::max(p.nbytes, 1UL) + 4095) / 4096 * 4096;
      char* want = (char*)(base + stride * (i + 1));
      char* got = (p.offset % 4096 || p.offset + len > size) ? (char*)MAP_FAILED
                  : (char*)mmap(want, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, off_t(p.offset));
      if (got != want) {
        ok = false;
        if (got != MAP_FAILED) munmap(got, len);
        break;
      }
      maps.push_back({got, len});
      p.base = got;
    }
    if (ok) {
      g_dev_lo = (char*)(base + stride / 2);
      g_dev_hi = (char*)(base + stride * (g_spec.params.size() + 1) + stride / 2);
      return;
    }
    for (auto& [a, len] : maps) munmap(a, len);
  }
  char* all = (char*)mmap(nullptr, size_t(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (all == MAP_FAILED) spec_error("cannot map " + g_spec.file);
  for (Param& p : g_spec.params) p.base = all + p.offset;
  g_dev_lo = all;
  g_dev_hi = all + size;
}

}  // namespace

// argv[1]: the kernel object; argv[2]: the parent's pid (this process dies with it).
int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  if (argc != 3 || getppid() != (pid_t)atol(argv[2])) _exit(9);  // the parent is already gone
  clearenv();  // nothing of the caller's environment (tokens, keys) stays in the kernel's memory
  read_spec();
  int kfd = open(argv[1], O_RDONLY | O_CLOEXEC);
  if (kfd < 0) spec_error(std::string("cannot open the kernel object ") + argv[1]);
  std::string bad = object_problem(kfd);
  if (!bad.empty()) fault_exit("\"kind\": \"object\", \"what\": " + json_str("the kernel object is refused: " + bad));
  int fd = open(g_spec.file.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) spec_error("cannot open " + g_spec.file);
  off_t size = lseek(fd, 0, SEEK_END);
  for (const Param& p : g_spec.params)
    if (p.offset + p.nbytes > (unsigned long)size) spec_error("buffer " + p.name + " lies outside the file");
  map_buffers(fd, (unsigned long)size);
  close(fd);
  for (Param& p : g_spec.params) g_param_ptrs.push_back(p.base + p.pointer);
  // keep stdout, stderr and the object; close everything else (stdin included)
  if (dup2(kfd, 3) < 0) spec_error("cannot keep the kernel object open");
  kfd = 3;
  close(0);
#ifdef SYS_close_range
  if (syscall(SYS_close_range, 4u, ~0u, 0u) != 0)
#endif
    for (int f = 4; f < 65536; f++) close(f);
  install_crash_handlers();

  Lockdown l = lock_down(g_spec.mem_limit, g_spec.cpu_limit, kfd);
  std::string report = std::string("{\"no_new_privs\": ") + (l.no_new_privs ? "true" : "false") +
                       ", \"landlock\": " + (l.landlock ? "true" : "false") +
                       ", \"seccomp\": " + (l.seccomp ? "true" : "false") + ", \"probe\": " +
                       (l.probe ? "true" : "false") + ", \"caps_dropped\": " + (l.caps_dropped ? "true" : "false") +
                       ", \"namespaces\": " + json_str(l.namespaces);
  if (!(l.no_new_privs && l.seccomp && l.probe))
    fault_exit("\"kind\": \"sandbox\", \"what\": " +
               json_str("the kernel process could not lock itself down (no_new_privs and a seccomp "
                        "filter are required); the kernel was not loaded") + ", \"lockdown\": " + report + "}");
  write_all(1, "HLH_LOCKED " + report + "}\n");
  // The object is mapped and relocated here; none of its code runs while it loads (no
  // initialisers, no IFUNC relocations: object_problem).
  void* h = dlopen("/proc/self/fd/3", RTLD_NOW | RTLD_LOCAL);
  if (!h) spec_error(std::string("cannot load the kernel object: ") + dlerror());
  close(kfd);

  const Spec& s = g_spec;
  msl_uint3 ng{(s.gx + s.tx - 1) / s.tx, (s.gy + s.ty - 1) / s.ty, (s.gz + s.tz - 1) / s.tz};
  long total = (long)ng.x * ng.y * ng.z;
  int nw = int(std::max(1L, std::min<long>(s.workers, total)));
  std::atomic<long> next{0};
  std::atomic<int> go{0};
  std::vector<std::thread> threads;
  // The workers wait until the second filter (no open, no exec memory, no further
  // threads) holds on every thread; only then does any kernel code run.
  for (int i = 1; i < nw; i++)
    threads.emplace_back([&] {
      while (go.load() == 0) sched_yield();
      if (go.load() == 1) worker_main(&next, total, ng);
    });
  if (!install_filter(false)) {
    go.store(2);
    fault_exit("\"kind\": \"sandbox\", \"what\": \"the second system-call filter failed\"");
  }
  // Looked up only now: dlsym of an IFUNC symbol runs the object's resolver (kernel code),
  // which must meet the second filter like any kernel code (a red team ran one before it)
  g_kernel = (const msl_kernel_desc*)dlsym(h, "msl_kernel");
  g_kernel_thread = (void (*)(void* const*, const msl_thread_info*))dlsym(h, "msl_kernel_thread");
  if (!g_kernel || !g_kernel_thread) spec_error("the kernel object lacks msl_kernel / msl_kernel_thread");
  Dl_info info;
  if (dladdr((void*)g_kernel_thread, &info)) g_kernel_base = (uintptr_t)info.dli_fbase;
  if ((int)g_spec.params.size() != g_kernel->n_params)
    spec_error("the spec lists " + std::to_string(g_spec.params.size()) + " buffers, the kernel takes " +
               std::to_string(g_kernel->n_params));
  if (g_spec.sanitize && !g_kernel->sanitize) spec_error("sanitize requested but the kernel was built without it");
  go.store(1);
  worker_main(&next, total, ng);
  for (auto& t : threads) t.join();
  std::string warn;
  if (g_warn.exited_before_barrier)
    warn += "{\"kind\": \"barrier-divergence\", \"what\": \"" + std::to_string(g_warn.exited_before_barrier.load()) +
            " threadgroup barriers released while some threads of the group had returned\"}";
  if (g_warn.divergent_barrier)
    warn += std::string(warn.empty() ? "" : ",") + "{\"kind\": \"barrier-divergence\", \"what\": \"" +
            std::to_string(g_warn.divergent_barrier.load()) +
            " threadgroup barriers released with threads waiting at different barrier calls\"}";
  if (!warn.empty()) write_all(2, "HLH_WARN [" + warn + "]\n");
  write_all(1, "HLH_DONE {}\n");
  return 0;
}
