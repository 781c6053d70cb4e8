// The interface between a compiled kernel (kernel TU) and the emulator runtime
// (runtime.cpp). Plain C types only: the two sides are compiled separately; the kernel
// is a shared object the launcher loads after locking itself down (runtime.cpp), and
// finds msl_kernel / msl_kernel_thread in with dlsym.
#pragma once
#include <stdint.h>

extern "C" {

struct msl_uint3 { uint32_t x, y, z; };

// Everything a thread can ask about itself; the kernel entry picks what the body names.
struct msl_thread_info {
  msl_uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid,
      threadgroups_per_grid, threads_per_grid, threads_per_threadgroup, dispatch_threads_per_threadgroup,
      grid_origin, grid_size;
  uint32_t simdgroup_index_in_threadgroup, simdgroups_per_threadgroup, thread_index_in_simdgroup,
      thread_index_in_threadgroup, thread_index_in_quadgroup, quadgroup_index_in_threadgroup,
      quadgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width,
      dispatch_quadgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup;
};

// A resolved simdgroup exchange: the active lanes that called the same operation at the
// same place, in lane order, each with its input, output and auxiliary argument.
struct msl_simd_ctx {
  int n;
  const int* lane;          // lane index within the simdgroup (0..31)
  const void* const* in;
  void* const* out;
  const uint32_t* aux;
  int simd_size;            // live threads of this simdgroup (< 32 in a partial one)
};
typedef void (*msl_resolver)(const msl_simd_ctx*);

// What the kernel TU exports.
struct msl_kernel_desc {
  int n_params;
  int needs_sync;       // body uses barriers / simd / quad ops: run threads as fibers
  int sanitize;         // compiled with access instrumentation
};
extern const msl_kernel_desc msl_kernel;
void msl_kernel_thread(void* const* params, const msl_thread_info* t);

// What the runtime exports to the kernel.
enum { MSL_BARRIER_THREADGROUP = 0, MSL_BARRIER_SIMDGROUP = 1 };
void msl_rt_barrier(int kind, const void* site);
void msl_rt_simd(const void* in, void* out, uint32_t aux, msl_resolver fn, const void* site);
uint32_t msl_rt_lane(void);
// One per threadgroup declaration site: the first thread of a group to reach the
// declaration carves its storage out of the group's threadgroup memory.
struct msl_tg_slot { uint64_t group; void* ptr; };
void* msl_rt_tg_alloc(msl_tg_slot* slot, unsigned long bytes, unsigned long align);
void msl_rt_atomic_access(const void* addr, unsigned long size);
void msl_rt_fault(const char* kind, const char* what);
}
