// metal:: math, geometric, integer and relational functions for host C++.
//
// Overloads are non-template per type (as Metal declares them), so mixed calls that
// Metal rejects as ambiguous (max(float, int)) are rejected here too, and swizzles
// convert to vectors. half and bfloat compute in float and round once.
// fast:: and precise:: resolve to the same (precise) functions.
#pragma once
#include "msl_types.h"

namespace metal {

template <class T, int N, class F> MSL_INLINE auto vmap_(const vec<T, N>& a, F f) {
  vec<decltype(f(a[0])), N> r;
  for (int i = 0; i < N; i++) r[i] = f(a[i]);
  return r;
}
template <class T, int N, class F> MSL_INLINE auto vmap_(const vec<T, N>& a, const vec<T, N>& b, F f) {
  vec<decltype(f(a[0], b[0])), N> r;
  for (int i = 0; i < N; i++) r[i] = f(a[i], b[i]);
  return r;
}
template <class T, int N, class F>
MSL_INLINE auto vmap_(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c, F f) {
  vec<decltype(f(a[0], b[0], c[0])), N> r;
  for (int i = 0; i < N; i++) r[i] = f(a[i], b[i], c[i]);
  return r;
}

#define MSL_FOR_VEC_N(M, T) M(T, 2) M(T, 3) M(T, 4)

// ---- unary float functions: float via the builtin, half/bfloat through float, vectors per lane
#define MSL_F1_LOW(name, T) \
  MSL_INLINE T name(T x) { return T(name(float(x))); }
#define MSL_F1_VEC(name, T, N) \
  MSL_INLINE vec<T, N> name(const vec<T, N>& x) { return vmap_(x, [](T e) { return name(e); }); }
#define MSL_F1(name, expr)                                                    \
  MSL_INLINE float name(float x) { return expr; }                             \
  MSL_F1_LOW(name, half) MSL_F1_LOW(name, bfloat)                             \
  MSL_F1_VEC(name, float, 2) MSL_F1_VEC(name, float, 3) MSL_F1_VEC(name, float, 4) \
  MSL_F1_VEC(name, half, 2) MSL_F1_VEC(name, half, 3) MSL_F1_VEC(name, half, 4)    \
  MSL_F1_VEC(name, bfloat, 2) MSL_F1_VEC(name, bfloat, 3) MSL_F1_VEC(name, bfloat, 4)

MSL_F1(acos, __builtin_acosf(x))
MSL_F1(acosh, __builtin_acoshf(x))
MSL_F1(asin, __builtin_asinf(x))
MSL_F1(asinh, __builtin_asinhf(x))
MSL_F1(atan, __builtin_atanf(x))
MSL_F1(atanh, __builtin_atanhf(x))
MSL_F1(ceil, __builtin_ceilf(x))
MSL_F1(cos, __builtin_cosf(x))
MSL_F1(cosh, __builtin_coshf(x))
MSL_F1(cospi, __builtin_cosf(x * 3.14159265358979323846f))
MSL_F1(exp, __builtin_expf(x))
MSL_F1(exp2, __builtin_exp2f(x))
MSL_F1(exp10, __builtin_powf(10.0f, x))
MSL_F1(fabs, __builtin_fabsf(x))
MSL_F1(floor, __builtin_floorf(x))
MSL_F1(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSL_F1(log, __builtin_logf(x))
MSL_F1(log2, __builtin_log2f(x))
MSL_F1(log10, __builtin_log10f(x))
MSL_F1(rint, __builtin_rintf(x))
MSL_F1(round, __builtin_roundf(x))
MSL_F1(rsqrt, 1.0f / __builtin_sqrtf(x))
MSL_F1(sin, __builtin_sinf(x))
MSL_F1(sinh, __builtin_sinhf(x))
MSL_F1(sinpi, __builtin_sinf(x * 3.14159265358979323846f))
MSL_F1(sqrt, __builtin_sqrtf(x))
MSL_F1(tan, __builtin_tanf(x))
MSL_F1(tanh, __builtin_tanhf(x))
MSL_F1(tanpi, __builtin_tanf(x * 3.14159265358979323846f))
MSL_F1(trunc, __builtin_truncf(x))
MSL_F1(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MSL_F1(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x != x ? 0.0f : x))))
MSL_F1(abs, __builtin_fabsf(x))

// ---- float predicates -> bool / bool vectors
#define MSL_PRED(name, expr)                                                            \
  MSL_INLINE bool name(float x) { return expr; }                                        \
  MSL_INLINE bool name(half x) { return name(float(x)); }                               \
  MSL_INLINE bool name(bfloat x) { return name(float(x)); }                             \
  MSL_PRED_V(name, float) MSL_PRED_V(name, half) MSL_PRED_V(name, bfloat)
#define MSL_PRED_V(name, T)                                                                     \
  MSL_INLINE bool2 name(const vec<T, 2>& v) { return vmap_(v, [](T e) { return name(e); }); } \
  MSL_INLINE bool3 name(const vec<T, 3>& v) { return vmap_(v, [](T e) { return name(e); }); } \
  MSL_INLINE bool4 name(const vec<T, 4>& v) { return vmap_(v, [](T e) { return name(e); }); }
MSL_PRED(isnan, x != x)
MSL_PRED(isinf, __builtin_isinf(x) != 0)
MSL_PRED(isfinite, __builtin_isfinite(x) != 0)
MSL_PRED(isnormal, __builtin_isnormal(x) != 0)
MSL_PRED(signbit, __builtin_signbit(x) != 0)

// ---- binary float functions
#define MSL_F2_LOW(name, T) \
  MSL_INLINE T name(T x, T y) { return T(name(float(x), float(y))); }
#define MSL_F2_VEC(name, T, N)                                                             \
  MSL_INLINE vec<T, N> name(const vec<T, N>& x, const vec<T, N>& y) {                     \
    return vmap_(x, y, [](T a, T b) { return name(a, b); });                              \
  }
#define MSL_F2(name, expr)                                                    \
  MSL_INLINE float name(float x, float y) { return expr; }                    \
  MSL_F2_LOW(name, half) MSL_F2_LOW(name, bfloat)                             \
  MSL_F2_VEC(name, float, 2) MSL_F2_VEC(name, float, 3) MSL_F2_VEC(name, float, 4) \
  MSL_F2_VEC(name, half, 2) MSL_F2_VEC(name, half, 3) MSL_F2_VEC(name, half, 4)    \
  MSL_F2_VEC(name, bfloat, 2) MSL_F2_VEC(name, bfloat, 3) MSL_F2_VEC(name, bfloat, 4)

MSL_F2(atan2, __builtin_atan2f(x, y))
MSL_F2(copysign, __builtin_copysignf(x, y))
MSL_F2(fdim, __builtin_fdimf(x, y))
MSL_F2(fmax, __builtin_fmaxf(x, y))
MSL_F2(fmin, __builtin_fminf(x, y))
MSL_F2(fmod, __builtin_fmodf(x, y))
MSL_F2(pow, __builtin_powf(x, y))
MSL_F2(powr, __builtin_powf(x, y))
MSL_F2(max, __builtin_fmaxf(x, y))
MSL_F2(min, __builtin_fminf(x, y))
MSL_F2(step, (y < x ? 0.0f : 1.0f))
MSL_F2(nextafter, __builtin_nextafterf(x, y))

// ---- ternary float functions
#define MSL_F3_LOW(name, T) \
  MSL_INLINE T name(T x, T y, T z) { return T(name(float(x), float(y), float(z))); }
#define MSL_F3_VEC(name, T, N)                                                               \
  MSL_INLINE vec<T, N> name(const vec<T, N>& x, const vec<T, N>& y, const vec<T, N>& z) {   \
    return vmap_(x, y, z, [](T a, T b, T c) { return name(a, b, c); });                     \
  }
#define MSL_F3(name, expr)                                                    \
  MSL_INLINE float name(float x, float y, float z) { return expr; }           \
  MSL_F3_LOW(name, half) MSL_F3_LOW(name, bfloat)                             \
  MSL_F3_VEC(name, float, 2) MSL_F3_VEC(name, float, 3) MSL_F3_VEC(name, float, 4) \
  MSL_F3_VEC(name, half, 2) MSL_F3_VEC(name, half, 3) MSL_F3_VEC(name, half, 4)    \
  MSL_F3_VEC(name, bfloat, 2) MSL_F3_VEC(name, bfloat, 3) MSL_F3_VEC(name, bfloat, 4)

MSL_F3(fma, __builtin_fmaf(x, y, z))
MSL_F3(mad, x * y + z)
MSL_F3(clamp, __builtin_fminf(__builtin_fmaxf(x, y), z))
MSL_F3(mix, x + (y - x) * z)
MSL_F3(smoothstep, ([](float e0, float e1, float v) {
         float t = __builtin_fminf(__builtin_fmaxf((v - e0) / (e1 - e0), 0.0f), 1.0f);
         return t * t * (3.0f - 2.0f * t);
       })(x, y, z))
MSL_F3(fmax3, __builtin_fmaxf(__builtin_fmaxf(x, y), z))
MSL_F3(fmin3, __builtin_fminf(__builtin_fminf(x, y), z))
MSL_F3(max3, __builtin_fmaxf(__builtin_fmaxf(x, y), z))
MSL_F3(min3, __builtin_fminf(__builtin_fminf(x, y), z))

// Scalar-edge forms Metal also offers: clamp(v, lo, hi) and mix(a, b, t) with scalar lo/hi/t.
#define MSL_SCALAR_EDGE(T, N)                                                                             \
  MSL_INLINE vec<T, N> clamp(const vec<T, N>& x, T lo, T hi) { return clamp(x, vec<T, N>(lo), vec<T, N>(hi)); } \
  MSL_INLINE vec<T, N> mix(const vec<T, N>& x, const vec<T, N>& y, T t) { return mix(x, y, vec<T, N>(t)); }     \
  MSL_INLINE vec<T, N> step(T e, const vec<T, N>& x) { return step(vec<T, N>(e), x); }
MSL_FOR_VEC_N(MSL_SCALAR_EDGE, float) MSL_FOR_VEC_N(MSL_SCALAR_EDGE, half) MSL_FOR_VEC_N(MSL_SCALAR_EDGE, bfloat)
#undef MSL_SCALAR_EDGE

MSL_INLINE float ldexp(float x, int e) { return __builtin_ldexpf(x, e); }
MSL_INLINE half ldexp(half x, int e) { return half(__builtin_ldexpf(float(x), e)); }
MSL_INLINE float frexp(float x, int& e) { return __builtin_frexpf(x, &e); }
MSL_INLINE float sincos(float x, float& c) { c = __builtin_cosf(x); return __builtin_sinf(x); }
MSL_INLINE half sincos(half x, half& c) { c = half(__builtin_cosf(float(x))); return half(__builtin_sinf(float(x))); }
MSL_INLINE float modf(float x, float& ip) { return __builtin_modff(x, &ip); }

// ---- geometric
#define MSL_GEOM(T, N)                                                                       \
  MSL_INLINE T dot(const vec<T, N>& a, const vec<T, N>& b) {                                \
    float s = 0.0f;                                                                          \
    for (int i = 0; i < N; i++) s += float(a[i]) * float(b[i]);                              \
    return T(s);                                                                             \
  }                                                                                          \
  MSL_INLINE T length_squared(const vec<T, N>& a) { return dot(a, a); }                     \
  MSL_INLINE T length(const vec<T, N>& a) { return T(__builtin_sqrtf(float(dot(a, a)))); }  \
  MSL_INLINE T distance(const vec<T, N>& a, const vec<T, N>& b) { return length(a - b); }   \
  MSL_INLINE vec<T, N> normalize(const vec<T, N>& a) { return a * rsqrt(dot(a, a)); }
MSL_FOR_VEC_N(MSL_GEOM, float) MSL_FOR_VEC_N(MSL_GEOM, half) MSL_FOR_VEC_N(MSL_GEOM, bfloat)
#undef MSL_GEOM
MSL_INLINE float3 cross(const float3& a, const float3& b) {
  return float3(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}
MSL_INLINE half3 cross(const half3& a, const half3& b) {
  return half3(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

// ---- integer functions (scalars per type; vectors per lane)
#define MSL_INT_FNS(T)                                                                               \
  MSL_INLINE T max(T x, T y) { return x > y ? x : y; }                                               \
  MSL_INLINE T min(T x, T y) { return x < y ? x : y; }                                               \
  MSL_INLINE T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                                \
  MSL_INLINE T max3(T x, T y, T z) { return max(max(x, y), z); }                                     \
  MSL_INLINE T min3(T x, T y, T z) { return min(min(x, y), z); }                                     \
  MSL_INLINE T absdiff(T x, T y) { return x > y ? T(x - y) : T(y - x); }                             \
  MSL_INLINE T abs(T x) { if constexpr (std::is_signed_v<T>) return x < 0 ? T(-x) : x; else return x; } \
  MSL_INLINE T popcount(T x) { return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x)); } \
  MSL_INLINE T clz(T x) {                                                                            \
    auto u = (unsigned long long)(std::make_unsigned_t<T>)x;                                         \
    return u == 0 ? T(sizeof(T) * 8) : T(__builtin_clzll(u) - (64 - int(sizeof(T) * 8)));           \
  }                                                                                                  \
  MSL_INLINE T ctz(T x) {                                                                            \
    auto u = (unsigned long long)(std::make_unsigned_t<T>)x;                                         \
    return u == 0 ? T(sizeof(T) * 8) : T(__builtin_ctzll(u));                                        \
  }                                                                                                  \
  MSL_INLINE T mulhi(T x, T y) {                                                                     \
    if constexpr (sizeof(T) == 8) {                                                                  \
      if constexpr (std::is_signed_v<T>) return T(((__int128)x * (__int128)y) >> 64);               \
      else return T(((unsigned __int128)x * (unsigned __int128)y) >> 64);                            \
    } else {                                                                                         \
      return T(((long long)x * (long long)y) >> (sizeof(T) * 8));                                    \
    }                                                                                                \
  }                                                                                                  \
  MSL_INLINE T rotate(T v, T s) {                                                                    \
    constexpr int B = sizeof(T) * 8;                                                                 \
    auto u = (std::make_unsigned_t<T>)v; int k = int((std::make_unsigned_t<T>)s % B);                \
    return k == 0 ? v : T((u << k) | (u >> (B - k)));                                                \
  }                                                                                                  \
  MSL_INT_VEC(T, 2) MSL_INT_VEC(T, 3) MSL_INT_VEC(T, 4)
#define MSL_INT_VEC(T, N)                                                                                          \
  MSL_INLINE vec<T, N> max(const vec<T, N>& x, const vec<T, N>& y) { return vmap_(x, y, [](T a, T b) { return max(a, b); }); } \
  MSL_INLINE vec<T, N> min(const vec<T, N>& x, const vec<T, N>& y) { return vmap_(x, y, [](T a, T b) { return min(a, b); }); } \
  MSL_INLINE vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& l, const vec<T, N>& h) {                    \
    return vmap_(x, l, h, [](T a, T b, T c) { return clamp(a, b, c); });                                       \
  }                                                                                                              \
  MSL_INLINE vec<T, N> clamp(const vec<T, N>& x, T l, T h) { return clamp(x, vec<T, N>(l), vec<T, N>(h)); }     \
  MSL_INLINE vec<T, N> abs(const vec<T, N>& x) { return vmap_(x, [](T a) { return abs(a); }); }                 \
  MSL_INLINE vec<T, N> popcount(const vec<T, N>& x) { return vmap_(x, [](T a) { return popcount(a); }); }       \
  MSL_INLINE vec<T, N> clz(const vec<T, N>& x) { return vmap_(x, [](T a) { return clz(a); }); }                 \
  MSL_INLINE vec<T, N> ctz(const vec<T, N>& x) { return vmap_(x, [](T a) { return ctz(a); }); }
MSL_INT_FNS(char) MSL_INT_FNS(uchar) MSL_INT_FNS(short) MSL_INT_FNS(ushort) MSL_INT_FNS(int)
MSL_INT_FNS(uint) MSL_INT_FNS(long) MSL_INT_FNS(ulong)
#undef MSL_INT_VEC
#undef MSL_INT_FNS

// ---- relational
MSL_INLINE bool all(bool b) { return b; }
MSL_INLINE bool any(bool b) { return b; }
template <int N> MSL_INLINE bool all(const vec<bool, N>& b) { for (int i = 0; i < N; i++) if (!b[i]) return false; return true; }
template <int N> MSL_INLINE bool any(const vec<bool, N>& b) { for (int i = 0; i < N; i++) if (b[i]) return true; return false; }
MSL_INLINE bool all(const bool2& b) { return all<2>(b); }
MSL_INLINE bool all(const bool3& b) { return all<3>(b); }
MSL_INLINE bool all(const bool4& b) { return all<4>(b); }
MSL_INLINE bool any(const bool2& b) { return any<2>(b); }
MSL_INLINE bool any(const bool3& b) { return any<3>(b); }
MSL_INLINE bool any(const bool4& b) { return any<4>(b); }

template <class T, std::enable_if_t<is_scalar_v<T>, int> = 0>
MSL_INLINE T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> MSL_INLINE vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <class T, int N> MSL_INLINE vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) { return c ? b : a; }

namespace fast { using namespace ::metal; }
namespace precise { using namespace ::metal; }

}  // namespace metal
