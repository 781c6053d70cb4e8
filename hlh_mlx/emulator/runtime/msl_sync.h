// Barriers, simdgroup and quadgroup functions, atomics and simdgroup_matrix.
//
// Every cross-thread operation parks the calling thread (a fiber) in the runtime with
// its operand; the runtime resolves it once every live lane of the simdgroup is parked,
// over the lanes that called it at the same place (Metal's active-lane rule). The place
// is the source line of the call (__builtin_LINE() as a default argument), which
// survives the optimizer duplicating a call into several branches.
#pragma once
#include "msl_math.h"
#include "msl_rt_api.h"

#define MSL_NOINLINE __attribute__((noinline))
#ifdef MSL_SANITIZE
#define MSL_NO_TSAN __attribute__((no_sanitize("thread")))
#else
#define MSL_NO_TSAN
#endif

namespace metal {

// ---------------------------------------------------------------- barriers
enum class mem_flags : uint32_t { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
                                  mem_threadgroup_imageblock = 8, mem_object_data = 16 };
MSL_INLINE constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint32_t(a) | uint32_t(b)); }

// A call site: the line in the kernel source, and whether it is in the header.
#define MSL_SITE const char* msl_file_ = __builtin_FILE(), int msl_line_ = __builtin_LINE()
#define MSL_SITE_ARG msl_site_(msl_file_, msl_line_)
MSL_INLINE const void* msl_site_(const char* file, int line) {
  return (const void*)(uintptr_t)((file[0] == 'h' ? 0u : 1u << 24) | unsigned(line));
}
MSL_INLINE void threadgroup_barrier(mem_flags = mem_flags::mem_none, MSL_SITE) {
  msl_rt_barrier(MSL_BARRIER_THREADGROUP, MSL_SITE_ARG);
}
MSL_INLINE void simdgroup_barrier(mem_flags = mem_flags::mem_none, MSL_SITE) {
  msl_rt_barrier(MSL_BARRIER_SIMDGROUP, MSL_SITE_ARG);
}

// ---------------------------------------------------------------- resolvers
// W is the width of the partition (32 for simd_, 4 for quad_): lanes exchange only
// with active lanes of their own simdgroup or quadgroup.
template <int W> struct seg_ {
  const msl_simd_ctx* c;
  int lo, hi;  // [lo, hi) indices into c->lane of one partition
};
template <int W, class F> MSL_INLINE void for_each_seg_(const msl_simd_ctx* c, F f) {
  int i = 0;
  while (i < c->n) {
    int j = i + 1;
    while (j < c->n && c->lane[j] / W == c->lane[i] / W) j++;
    f(seg_<W>{c, i, j});
    i = j;
  }
}
template <class T> MSL_INLINE const T& in_(const msl_simd_ctx* c, int k) { return *static_cast<const T*>(c->in[k]); }
template <class T> MSL_INLINE T& out_(const msl_simd_ctx* c, int k) { return *static_cast<T*>(c->out[k]); }
// index into the partition of the active lane with the given lane id, or -1
template <int W> MSL_INLINE int find_lane_(const seg_<W>& s, int lane) {
  for (int k = s.lo; k < s.hi; k++) if (s.c->lane[k] == lane) return k;
  return -1;
}

struct op_sum_ { template <class T> static MSL_INLINE T f(const T& a, const T& b) { return a + b; } };
struct op_prod_ { template <class T> static MSL_INLINE T f(const T& a, const T& b) { return a * b; } };
struct op_min_ { template <class T> static MSL_INLINE T f(const T& a, const T& b) { return min(a, b); } };
struct op_max_ { template <class T> static MSL_INLINE T f(const T& a, const T& b) { return max(a, b); } };
struct op_and_ { template <class T> static MSL_INLINE T f(const T& a, const T& b) { return a & b; } };
struct op_or_ { template <class T> static MSL_INLINE T f(const T& a, const T& b) { return a | b; } };
struct op_xor_ { template <class T> static MSL_INLINE T f(const T& a, const T& b) { return a ^ b; } };

template <class T, class Op, int W> void reduce_(const msl_simd_ctx* c) {
  for_each_seg_<W>(c, [&](seg_<W> s) {
    T acc = in_<T>(c, s.lo);
    for (int k = s.lo + 1; k < s.hi; k++) acc = Op::f(acc, in_<T>(c, k));
    for (int k = s.lo; k < s.hi; k++) out_<T>(c, k) = acc;
  });
}
template <class T, class Op, int W, bool Inclusive> void prefix_(const msl_simd_ctx* c) {
  for_each_seg_<W>(c, [&](seg_<W> s) {
    T acc = in_<T>(c, s.lo);
    out_<T>(c, s.lo) = Inclusive ? acc : T(std::is_same_v<Op, op_prod_> ? 1 : 0);
    for (int k = s.lo + 1; k < s.hi; k++) {
      if (Inclusive) { acc = Op::f(acc, in_<T>(c, k)); out_<T>(c, k) = acc; }
      else { out_<T>(c, k) = acc; acc = Op::f(acc, in_<T>(c, k)); }
    }
  });
}
// Shuffles: aux carries the lane argument; Mode picks how the source lane is found.
enum shuf_mode_ { SH_IDX, SH_UP, SH_DOWN, SH_XOR, SH_ROT_UP, SH_ROT_DOWN, SH_FIRST };
template <class T, int W, int Mode> void shuffle_(const msl_simd_ctx* c) {
  for_each_seg_<W>(c, [&](seg_<W> s) {
    int base = c->lane[s.lo] / W * W;
    for (int k = s.lo; k < s.hi; k++) {
      int l = c->lane[k] - base, a = int(c->aux[k]), src;
      switch (Mode) {
        case SH_IDX: src = a % W; break;
        case SH_UP: src = l - a; if (src < 0) src = l; break;
        case SH_DOWN: src = l + a; if (src >= W) src = l; break;
        case SH_XOR: src = (l ^ a) % W; break;
        case SH_ROT_UP: src = ((l - a) % W + W) % W; break;
        case SH_ROT_DOWN: src = (l + a) % W; break;
        default: src = c->lane[s.lo] - base; break;  // SH_FIRST
      }
      int j = find_lane_<W>(s, base + src);
      out_<T>(c, k) = in_<T>(c, j < 0 ? k : j);  // an inactive source lane: undefined; we keep our own
    }
  });
}
template <class T> struct fill_pair_ { T data, fill; };
template <class T, int W, bool Up> void shuffle_fill_(const msl_simd_ctx* c) {
  for_each_seg_<W>(c, [&](seg_<W> s) {
    int base = c->lane[s.lo] / W * W;
    for (int k = s.lo; k < s.hi; k++) {
      int l = c->lane[k] - base, d = int(c->aux[k]);
      int src = Up ? l - d : l + d;
      bool from_fill = Up ? src < 0 : src >= W;
      if (from_fill) src = Up ? src + W : src - W;
      int j = find_lane_<W>(s, base + src);
      const auto& p = in_<fill_pair_<T>>(c, j < 0 ? k : j);
      out_<T>(c, k) = from_fill ? p.fill : p.data;
    }
  });
}
template <class T, msl_resolver R> MSL_INLINE T xchg_(const T& x, uint32_t aux, const void* site) {
  T in = x, out;
  msl_rt_simd(&in, &out, aux, R, site);
  return out;
}
struct simd_vote {
  typedef uint64_t vote_t;
  vote_t v, active_;
  MSL_INLINE explicit constexpr simd_vote(vote_t v_ = 0, vote_t a = ~vote_t(0)) : v(v_), active_(a) {}
  MSL_INLINE explicit constexpr operator vote_t() const { return v; }
  MSL_INLINE bool all() const { return (v & active_) == active_; }
  MSL_INLINE bool any() const { return v != 0; }
};
struct vote_pair_ { uint64_t v, active; };
template <int W> void ballot_pair_(const msl_simd_ctx* c) {
  for_each_seg_<W>(c, [&](seg_<W> s) {
    uint64_t mask = 0, act = 0;
    for (int k = s.lo; k < s.hi; k++) {
      act |= uint64_t(1) << (c->lane[k] % W);
      if (in_<bool>(c, k)) mask |= uint64_t(1) << (c->lane[k] % W);
    }
    for (int k = s.lo; k < s.hi; k++) out_<vote_pair_>(c, k) = vote_pair_{mask, act};
  });
}
typedef simd_vote quad_vote;

// ---------------------------------------------------------------- simd_ and quad_ functions
#define MSL_GROUP_FNS(P, W)                                                                                 \
  template <class A> MSL_INLINE vec_t<A> P##_sum(const A& x, MSL_SITE) { return xchg_<vec_t<A>, reduce_<vec_t<A>, op_sum_, W>>(x, 0, MSL_SITE_ARG); } \
  template <class A> MSL_INLINE vec_t<A> P##_product(const A& x, MSL_SITE) { return xchg_<vec_t<A>, reduce_<vec_t<A>, op_prod_, W>>(x, 0, MSL_SITE_ARG); } \
  template <class A> MSL_INLINE vec_t<A> P##_min(const A& x, MSL_SITE) { return xchg_<vec_t<A>, reduce_<vec_t<A>, op_min_, W>>(x, 0, MSL_SITE_ARG); } \
  template <class A> MSL_INLINE vec_t<A> P##_max(const A& x, MSL_SITE) { return xchg_<vec_t<A>, reduce_<vec_t<A>, op_max_, W>>(x, 0, MSL_SITE_ARG); } \
  template <class A> MSL_INLINE vec_t<A> P##_and(const A& x, MSL_SITE) { return xchg_<vec_t<A>, reduce_<vec_t<A>, op_and_, W>>(x, 0, MSL_SITE_ARG); } \
  template <class A> MSL_INLINE vec_t<A> P##_or(const A& x, MSL_SITE) { return xchg_<vec_t<A>, reduce_<vec_t<A>, op_or_, W>>(x, 0, MSL_SITE_ARG); } \
  template <class A> MSL_INLINE vec_t<A> P##_xor(const A& x, MSL_SITE) { return xchg_<vec_t<A>, reduce_<vec_t<A>, op_xor_, W>>(x, 0, MSL_SITE_ARG); } \
  template <class A> MSL_INLINE vec_t<A> P##_prefix_inclusive_sum(const A& x, MSL_SITE) {                              \
    return xchg_<vec_t<A>, prefix_<vec_t<A>, op_sum_, W, true>>(x, 0, MSL_SITE_ARG); }                                        \
  template <class A> MSL_INLINE vec_t<A> P##_prefix_exclusive_sum(const A& x, MSL_SITE) {                              \
    return xchg_<vec_t<A>, prefix_<vec_t<A>, op_sum_, W, false>>(x, 0, MSL_SITE_ARG); }                                       \
  template <class A> MSL_INLINE vec_t<A> P##_prefix_inclusive_product(const A& x, MSL_SITE) {                          \
    return xchg_<vec_t<A>, prefix_<vec_t<A>, op_prod_, W, true>>(x, 0, MSL_SITE_ARG); }                                       \
  template <class A> MSL_INLINE vec_t<A> P##_prefix_exclusive_product(const A& x, MSL_SITE) {                          \
    return xchg_<vec_t<A>, prefix_<vec_t<A>, op_prod_, W, false>>(x, 0, MSL_SITE_ARG); }                                      \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle(const A& x, ushort lane, MSL_SITE) {                              \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_IDX>>(x, lane, MSL_SITE_ARG); }                                        \
  template <class A> MSL_INLINE vec_t<A> P##_broadcast(const A& x, ushort lane, MSL_SITE) {                            \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_IDX>>(x, lane, MSL_SITE_ARG); }                                        \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle_up(const A& x, ushort d, MSL_SITE) {                              \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_UP>>(x, d, MSL_SITE_ARG); }                                            \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle_down(const A& x, ushort d, MSL_SITE) {                            \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_DOWN>>(x, d, MSL_SITE_ARG); }                                          \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle_xor(const A& x, ushort m, MSL_SITE) {                             \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_XOR>>(x, m, MSL_SITE_ARG); }                                           \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle_rotate_up(const A& x, ushort d, MSL_SITE) {                       \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_ROT_UP>>(x, d, MSL_SITE_ARG); }                                        \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle_rotate_down(const A& x, ushort d, MSL_SITE) {                     \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_ROT_DOWN>>(x, d, MSL_SITE_ARG); }                                      \
  template <class A> MSL_INLINE vec_t<A> P##_broadcast_first(const A& x, MSL_SITE) {                                   \
    return xchg_<vec_t<A>, shuffle_<vec_t<A>, W, SH_FIRST>>(x, 0, MSL_SITE_ARG); }                                            \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle_and_fill_up(const A& x, const A& f, ushort d, MSL_SITE) {         \
    fill_pair_<vec_t<A>> p{vec_t<A>(x), vec_t<A>(f)}; vec_t<A> out;                                          \
    msl_rt_simd(&p, &out, d, shuffle_fill_<vec_t<A>, W, true>, MSL_SITE_ARG); return out; }                                  \
  template <class A> MSL_INLINE vec_t<A> P##_shuffle_and_fill_down(const A& x, const A& f, ushort d, MSL_SITE) {       \
    fill_pair_<vec_t<A>> p{vec_t<A>(x), vec_t<A>(f)}; vec_t<A> out;                                          \
    msl_rt_simd(&p, &out, d, shuffle_fill_<vec_t<A>, W, false>, MSL_SITE_ARG); return out; }                                 \
  MSL_INLINE simd_vote P##_ballot(bool b, MSL_SITE) {                                                                  \
    vote_pair_ out; msl_rt_simd(&b, &out, 0, ballot_pair_<W>, MSL_SITE_ARG); return simd_vote(out.v, out.active); }          \
  MSL_INLINE bool P##_all(bool b, MSL_SITE) { return xchg_<bool, reduce_<bool, op_and_, W>>(b, 0, MSL_SITE_ARG); }                      \
  MSL_INLINE bool P##_any(bool b, MSL_SITE) { return xchg_<bool, reduce_<bool, op_or_, W>>(b, 0, MSL_SITE_ARG); }                       \
  MSL_INLINE simd_vote P##_active_threads_mask(MSL_SITE) {                                                           \
    bool t = true; vote_pair_ out; msl_rt_simd(&t, &out, 0, ballot_pair_<W>, MSL_SITE_ARG); return simd_vote(out.v, out.active); } \
  MSL_INLINE bool P##_is_first(MSL_SITE) {                                                                           \
    uint32_t l = msl_rt_lane() % W;                                                                          \
    return xchg_<uint32_t, shuffle_<uint32_t, W, SH_FIRST>>(l, 0, MSL_SITE_ARG) == l; }
MSL_GROUP_FNS(simd, 32)
MSL_GROUP_FNS(quad, 4)
#undef MSL_GROUP_FNS

// ---------------------------------------------------------------- atomics
// Threadgroups run on several OS threads at once, so device atomics are real host
// atomics. Floats use a compare-and-swap loop on their bits.
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release,
                    memory_order_acq_rel, memory_order_seq_cst };
enum memory_scope { memory_scope_device, memory_scope_threadgroup, memory_scope_simdgroup };
template <class T> struct atomic { T v_; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;
typedef atomic<long> atomic_long;
template <class T> struct id_ { typedef T type; };

#ifdef MSL_SANITIZE
#define MSL_ATOMIC_CHECK(p) msl_rt_atomic_access((const void*)(p), sizeof(*(p)))
#else
#define MSL_ATOMIC_CHECK(p) ((void)0)
#endif

template <class T> struct atomic_bits_ {
  typedef std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t,
          std::conditional_t<sizeof(T) == 2, uint16_t, uint8_t>>> type;
};
template <class T, class F> MSL_NO_TSAN inline T atomic_rmw_(atomic<T>* o, F f) {
  typedef typename atomic_bits_<T>::type B;
  B* p = reinterpret_cast<B*>(&o->v_);
  B old = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    B nw = __builtin_bit_cast(B, T(f(__builtin_bit_cast(T, old))));
    if (__atomic_compare_exchange_n(p, &old, nw, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return __builtin_bit_cast(T, old);
  }
}
template <class T> MSL_NO_TSAN inline T atomic_load_explicit(const atomic<T>* o, memory_order) {
  MSL_ATOMIC_CHECK(o);
  typedef typename atomic_bits_<T>::type B;
  return __builtin_bit_cast(T, __atomic_load_n(reinterpret_cast<const B*>(&o->v_), __ATOMIC_SEQ_CST));
}
template <class T> MSL_NO_TSAN inline void atomic_store_explicit(atomic<T>* o, typename id_<T>::type v, memory_order) {
  MSL_ATOMIC_CHECK(o);
  typedef typename atomic_bits_<T>::type B;
  __atomic_store_n(reinterpret_cast<B*>(&o->v_), __builtin_bit_cast(B, v), __ATOMIC_SEQ_CST);
}
template <class T> MSL_NO_TSAN inline T atomic_exchange_explicit(atomic<T>* o, typename id_<T>::type v, memory_order) {
  MSL_ATOMIC_CHECK(o);
  return atomic_rmw_(o, [v](T) { return v; });
}
template <class T>
MSL_NO_TSAN inline bool atomic_compare_exchange_weak_explicit(atomic<T>* o, T* expected, typename id_<T>::type desired,
                                                             memory_order, memory_order) {
  MSL_ATOMIC_CHECK(o);
  typedef typename atomic_bits_<T>::type B;
  B e = __builtin_bit_cast(B, *expected);
  bool ok = __atomic_compare_exchange_n(reinterpret_cast<B*>(&o->v_), &e, __builtin_bit_cast(B, desired), false,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  *expected = __builtin_bit_cast(T, e);
  return ok;
}
template <class T>
MSL_NO_TSAN inline bool atomic_compare_exchange_strong_explicit(atomic<T>* o, T* e, typename id_<T>::type d,
                                                               memory_order a, memory_order b) {
  return atomic_compare_exchange_weak_explicit(o, e, d, a, b);
}
#define MSL_ATOMIC_RMW(name, expr)                                                                              \
  template <class T> MSL_NO_TSAN inline T atomic_fetch_##name##_explicit(atomic<T>* o, typename id_<T>::type v, \
                                                                         memory_order) {                        \
    MSL_ATOMIC_CHECK(o);                                                                                        \
    return atomic_rmw_(o, [v](T a) { return expr; });                                                          \
  }                                                                                                             \
  template <class T> MSL_NO_TSAN inline T atomic_fetch_##name##_explicit(atomic<T>* o, typename id_<T>::type v, \
                                                                         memory_order, memory_scope) {          \
    MSL_ATOMIC_CHECK(o);                                                                                        \
    return atomic_rmw_(o, [v](T a) { return expr; });                                                          \
  }
MSL_ATOMIC_RMW(add, a + v)
MSL_ATOMIC_RMW(sub, a - v)
MSL_ATOMIC_RMW(and, a & v)
MSL_ATOMIC_RMW(or, a | v)
MSL_ATOMIC_RMW(xor, a ^ v)
MSL_ATOMIC_RMW(min, (v < a ? v : a))
MSL_ATOMIC_RMW(max, (v > a ? v : a))
#undef MSL_ATOMIC_RMW

// ---------------------------------------------------------------- simdgroup_matrix
// Each lane holds two elements of the 8x8 matrix, at Apple's layout: lane l holds row
// (qid & 4) + (l / 2) % 4 and columns c, c + 1 with c = (qid & 2) * 2 + (l % 2) * 2,
// qid = l / 4. Loads and stores are per lane; multiply_accumulate exchanges the matrices.
MSL_INLINE void sg_coord_(uint32_t l, int& row, int& col) {
  int qid = int(l) / 4;
  row = (qid & 4) + (int(l) / 2) % 4;
  col = (qid & 2) * 2 + (int(l) % 2) * 2;
}
template <class T, int R, int C> struct simdgroup_matrix {
  static_assert(R == 8 && C == 8, "the emulator implements 8x8 simdgroup matrices");
  vec<T, 2> e_;
  MSL_INLINE simdgroup_matrix() {}
  MSL_INLINE explicit simdgroup_matrix(T diag) {  // a diagonal matrix, as Metal's constructor
    int r, c; sg_coord_(msl_rt_lane(), r, c);
    e_[0] = (r == c) ? diag : T(0);
    e_[1] = (r == c + 1) ? diag : T(0);
  }
  MSL_INLINE vec<T, 2>& thread_elements() { return e_; }
  MSL_INLINE const vec<T, 2>& thread_elements() const { return e_; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int R, int C> MSL_INLINE simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  m.e_ = vec<T, 2>(v);
  return m;
}
template <class T, class U>
MSL_INLINE void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const U* src, ulong elements_per_row = 8,
                               ulong2 origin = ulong2(0), bool transpose = false) {
  int r, c; sg_coord_(msl_rt_lane(), r, c);
  for (int k = 0; k < 2; k++) {
    long row = transpose ? c + k : r, col = transpose ? r : c + k;
    d.e_[k] = T(src[(long(origin.y) + row) * long(elements_per_row) + long(origin.x) + col]);
  }
}
template <class T, class U>
MSL_INLINE void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, U* dst, ulong elements_per_row = 8,
                                ulong2 origin = ulong2(0), bool transpose = false) {
  int r, c; sg_coord_(msl_rt_lane(), r, c);
  for (int k = 0; k < 2; k++) {
    long row = transpose ? c + k : r, col = transpose ? r : c + k;
    dst[(long(origin.y) + row) * long(elements_per_row) + long(origin.x) + col] = U(m.e_[k]);
  }
}
template <class T> struct mma_in_ { vec<T, 2> a, b, c; };
template <class T> void mma_(const msl_simd_ctx* x) {
  if (x->n != 32) msl_rt_fault("inactive-lanes", "simdgroup_multiply_accumulate needs all 32 lanes of the simdgroup");
  float A[8][8] = {}, B[8][8] = {}, Cm[8][8] = {};
  for (int k = 0; k < x->n; k++) {
    int r, c; sg_coord_(uint32_t(x->lane[k]), r, c);
    const auto& p = in_<mma_in_<T>>(x, k);
    for (int e = 0; e < 2; e++) {
      A[r][c + e] = float(p.a[e]); B[r][c + e] = float(p.b[e]); Cm[r][c + e] = float(p.c[e]);
    }
  }
  for (int k = 0; k < x->n; k++) {
    int r, c; sg_coord_(uint32_t(x->lane[k]), r, c);
    vec<T, 2> d;
    for (int e = 0; e < 2; e++) {
      float s = Cm[r][c + e];
      for (int i = 0; i < 8; i++) s += A[r][i] * B[i][c + e];
      d[e] = T(s);
    }
    out_<vec<T, 2>>(x, k) = d;
  }
}
template <class T, class TA, class TB, class TC>
MSL_INLINE void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                              const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c,
                                              MSL_SITE) {
  mma_in_<float> in{vec<float, 2>(a.e_), vec<float, 2>(b.e_), vec<float, 2>(c.e_)};
  vec<float, 2> out;
  msl_rt_simd(&in, &out, 0, mma_<float>, MSL_SITE_ARG);
  d.e_ = vec<T, 2>(out);
}
template <class T, class TA, class TB>
MSL_INLINE void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                   const simdgroup_matrix<TB, 8, 8>& b, MSL_SITE) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, 8, 8>(T(0)), msl_file_, msl_line_);
}

}  // namespace metal
