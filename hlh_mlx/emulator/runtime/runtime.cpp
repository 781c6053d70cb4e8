// The emulator runtime: runs one dispatch of a compiled Metal kernel body on the CPU.
//
// Process model: the Python side writes every buffer of the dispatch into one file,
// starts this program with a text spec on stdin, and reads the outputs back from the
// file. Each threadgroup runs on one worker OS thread; when the body synchronises
// (barriers, simd_/quad_ functions) each Metal thread is a fiber and a scheduler
// releases barriers and resolves simdgroup exchanges. A kernel that needs neither runs
// its threads as plain calls.
//
// Reporting: success is exit code 0. A sanitizer fault or dispatch error prints one
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
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
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
  std::vector<Param> params;
};
Spec g_spec;
char* g_file_base = nullptr;
unsigned long g_file_size = 0;
std::vector<void*> g_param_ptrs;

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
  fault_exit("\"kind\": " + json_str(kind) + ", \"what\": " + json_str(what) + ", \"pc\": \"" + hex(pc) + "\"" +
             (site ? ", \"site\": " + site_json(site) : std::string()) + ", \"threads\": " + th);
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
  msl_kernel_thread(g_param_ptrs.data(), &t);
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
    msl_kernel_thread(g_param_ptrs.data(), &t);
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
    if (msl_kernel.needs_sync) run_group_fibers(w, g);
    else run_group_direct(w, g);
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
        if (sh.w_phase < w.group_phase)
          sanitizer_fault("uninitialized",
                          "read of threadgroup memory (offset " + std::to_string(b) +
                              ") that no thread of this threadgroup has written",
                          pc, {w.cur});
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
                                ") that another thread reads with no barrier in between",
                            pc, {w.cur, sh.rtid});
        }
        sh.w_phase = w.phase; sh.wtid = me; sh.wsimd = my_simd;
      }
    }
    return;
  }
  if (a >= g_file_base && a < g_file_base + g_file_size) {
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
  if (!g_spec.sanitize && strcmp(kind, "inactive-lanes") == 0) return;  // undefined result, as on the GPU
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

// Kernel code is native code: once the dispatch is set up, allow only the system calls
// that computing, allocating and reporting need. Anything else kills the process.
bool install_syscall_filter() {
#if defined(__x86_64__)
  const unsigned arch = 0xC000003E;  // AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
  const unsigned arch = 0xC00000B7;  // AUDIT_ARCH_AARCH64
#else
  return false;
#endif
  static const long allowed[] = {
      SYS_read, SYS_write, SYS_mmap, SYS_munmap, SYS_mprotect, SYS_madvise, SYS_brk, SYS_futex,
      SYS_exit, SYS_exit_group, SYS_rt_sigreturn, SYS_rt_sigprocmask, SYS_sched_yield, SYS_clock_gettime,
      SYS_gettid, SYS_getpid, SYS_tgkill, SYS_clock_nanosleep, SYS_mremap, SYS_fstat, SYS_newfstatat,
#ifdef SYS_nanosleep
      SYS_nanosleep,
#endif
      SYS_sigaltstack, SYS_set_robust_list, SYS_rseq,
  };
  std::vector<sock_filter> prog;
  prog.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)));
  prog.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0));
  prog.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
  prog.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)));
  for (long nr : allowed) {
    prog.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1));
    prog.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  }
  prog.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
  sock_fprog fp{(unsigned short)prog.size(), prog.data()};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return false;
  return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fp) == 0;
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
    if (k == "file") g_spec.file = line.substr(5);
    else if (k == "grid" && sscanf(line.c_str(), "grid %u %u %u", &a, &b, &c) == 3) { g_spec.gx = a; g_spec.gy = b; g_spec.gz = c; }
    else if (k == "threadgroup" && sscanf(line.c_str(), "threadgroup %u %u %u", &a, &b, &c) == 3) { g_spec.tx = a; g_spec.ty = b; g_spec.tz = c; }
    else if (k == "workers" && sscanf(line.c_str(), "workers %u", &a) == 1) g_spec.workers = int(a);
    else if (k == "order") g_spec.reverse = line.find("reverse") != std::string::npos;
    else if (k == "sanitize" && sscanf(line.c_str(), "sanitize %u", &a) == 1) g_spec.sanitize = a != 0;
    else if (k == "memlimit" && sscanf(line.c_str(), "memlimit %lu", &off) == 1) g_spec.mem_limit = off;
    else if (k == "param" && sscanf(line.c_str(), "param %lu %lu %lu %255s", &off, &nb, &ptr, name) == 4)
      g_spec.params.push_back(Param{off, nb, ptr, name, nullptr});
    else spec_error("bad spec line: " + line);
  }
}

}  // namespace

int main() {
  read_spec();
  if (g_spec.mem_limit) {
    rlimit rl{g_spec.mem_limit, g_spec.mem_limit};
    setrlimit(RLIMIT_AS, &rl);
  }
  if ((int)g_spec.params.size() != msl_kernel.n_params)
    spec_error("the spec lists " + std::to_string(g_spec.params.size()) + " buffers, the kernel takes " +
               std::to_string(msl_kernel.n_params));
  if (g_spec.sanitize && !msl_kernel.sanitize) spec_error("sanitize requested but the kernel was built without it");
  int fd = open(g_spec.file.c_str(), O_RDWR);
  if (fd < 0) spec_error("cannot open " + g_spec.file);
  off_t size = lseek(fd, 0, SEEK_END);
  g_file_size = (unsigned long)size;
  g_file_base = (char*)mmap(nullptr, size_t(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (g_file_base == MAP_FAILED) spec_error("cannot map " + g_spec.file);
  close(fd);
  for (Param& p : g_spec.params) {
    if (p.offset + p.nbytes > g_file_size) spec_error("buffer " + p.name + " lies outside the file");
    p.base = g_file_base + p.offset;
    g_param_ptrs.push_back(p.base + p.pointer);
  }
  install_crash_handlers();

  const Spec& s = g_spec;
  msl_uint3 ng{(s.gx + s.tx - 1) / s.tx, (s.gy + s.ty - 1) / s.ty, (s.gz + s.tz - 1) / s.tz};
  long total = (long)ng.x * ng.y * ng.z;
  int nw = int(std::max(1L, std::min<long>(s.workers, total)));
  std::atomic<long> next{0};
  std::atomic<int> go{0};
  std::vector<std::thread> threads;
  for (int i = 1; i < nw; i++)
    threads.emplace_back([&] {
      while (!go.load()) std::this_thread::yield();
      worker_main(&next, total, ng);
    });
  bool sandboxed = install_syscall_filter();
  go = 1;
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
  write_all(1, std::string("HLH_DONE {\"sandboxed\": ") + (sandboxed ? "true" : "false") + "}\n");
  return 0;
}
