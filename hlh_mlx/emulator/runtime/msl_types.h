// Metal Shading Language scalar and vector types for host C++.
//
// half is the compiler's _Float16 (rounded after every operation, as on the GPU);
// bfloat is a 16-bit struct that computes in float and rounds to nearest even.
// Vectors are vec<T, N> with Metal's sizes and alignments (sizeof(float3) == 16),
// swizzles (generated members, see swizzle.inc), component-wise operators and
// Metal's constructors. Conversions between element types are explicit, as in Metal.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <type_traits>
#include <utility>

#define MSL_INLINE inline __attribute__((always_inline))

namespace metal {

typedef _Float16 half;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

// ---------------------------------------------------------------- bfloat
struct bfloat {
  uint16_t bits_;
  bfloat() = default;
  MSL_INLINE constexpr bfloat(float f) : bits_(round_(f)) {}
  MSL_INLINE constexpr bfloat(double f) : bfloat(float(f)) {}
  MSL_INLINE constexpr bfloat(half f) : bfloat(float(f)) {}
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  MSL_INLINE constexpr bfloat(I i) : bfloat(float(i)) {}
  MSL_INLINE constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits_) << 16); }
  static constexpr bfloat from_bits(uint16_t b) { bfloat r{}; r.bits_ = b; return r; }
  static constexpr uint16_t round_(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return uint16_t(u >> 16);
  }
  MSL_INLINE bfloat operator-() const { return from_bits(bits_ ^ 0x8000); }
  MSL_INLINE bfloat operator+() const { return *this; }
#define MSL_BF_OP(op)                                                                      \
  friend MSL_INLINE bfloat operator op(bfloat a, bfloat b) { return bfloat(float(a) op float(b)); } \
  friend MSL_INLINE float operator op(bfloat a, float b) { return float(a) op b; }           \
  friend MSL_INLINE float operator op(float a, bfloat b) { return a op float(b); }           \
  friend MSL_INLINE double operator op(bfloat a, double b) { return double(float(a)) op b; } \
  friend MSL_INLINE double operator op(double a, bfloat b) { return a op double(float(b)); } \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                      \
  friend MSL_INLINE bfloat operator op(bfloat a, I b) { return a op bfloat(b); }             \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                      \
  friend MSL_INLINE bfloat operator op(I a, bfloat b) { return bfloat(a) op b; }             \
  MSL_INLINE bfloat& operator op##=(bfloat b) { return *this = *this op b; }                 \
  MSL_INLINE bfloat& operator op##=(float b) { return *this = bfloat(float(*this) op b); }
  MSL_BF_OP(+)
  MSL_BF_OP(-)
  MSL_BF_OP(*)
  MSL_BF_OP(/)
#undef MSL_BF_OP
#define MSL_BF_CMP(op)                                                                   \
  friend MSL_INLINE bool operator op(bfloat a, bfloat b) { return float(a) op float(b); } \
  friend MSL_INLINE bool operator op(bfloat a, float b) { return float(a) op b; }         \
  friend MSL_INLINE bool operator op(float a, bfloat b) { return a op float(b); }         \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                   \
  friend MSL_INLINE bool operator op(bfloat a, I b) { return float(a) op float(b); }
  MSL_BF_CMP(==)
  MSL_BF_CMP(!=)
  MSL_BF_CMP(<)
  MSL_BF_CMP(>)
  MSL_BF_CMP(<=)
  MSL_BF_CMP(>=)
#undef MSL_BF_CMP
  MSL_INLINE bfloat& operator++() { return *this = *this + bfloat(1.0f); }
  MSL_INLINE bfloat& operator--() { return *this = *this - bfloat(1.0f); }
};
static_assert(sizeof(bfloat) == 2, "bfloat must be 16 bits");

// ---------------------------------------------------------------- traits
template <class T> struct is_msl_scalar : std::is_arithmetic<T> {};
template <> struct is_msl_scalar<half> : std::true_type {};
template <> struct is_msl_scalar<bfloat> : std::true_type {};
template <class T> inline constexpr bool is_scalar_v = is_msl_scalar<std::remove_cv_t<T>>::value;
template <class T> inline constexpr bool is_float_v =
    std::is_floating_point_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>;

template <class T, int N> struct vec;
template <class T, int N, int... I> struct swz;

template <class T> struct vec_traits { static constexpr int n = 1; using elem = T; using type = T; };
template <class T, int N> struct vec_traits<vec<T, N>> { static constexpr int n = N; using elem = T; using type = vec<T, N>; };
template <class T, int N, int... I> struct vec_traits<swz<T, N, I...>> {
  static constexpr int n = sizeof...(I); using elem = T; using type = vec<T, sizeof...(I)>;
};
template <class A> using vec_t = typename vec_traits<std::remove_cv_t<std::remove_reference_t<A>>>::type;
template <class A> using elem_t = typename vec_traits<std::remove_cv_t<std::remove_reference_t<A>>>::elem;
template <class A> inline constexpr int ncomp_v = vec_traits<std::remove_cv_t<std::remove_reference_t<A>>>::n;

// Metal: a 3-component vector has the size and alignment of the 4-component one.
template <class T, int N> inline constexpr size_t vec_align_v = sizeof(T) * (N == 3 ? 4 : N);

// ---------------------------------------------------------------- swizzle proxy
// A swizzle is a member of the vector's storage union: it aliases the N components
// and reads/writes the I... of them. It is kept minimal (thousands are instantiated);
// its operators are the namespace-scope templates below, which convert it to a vector.
template <class T, int N, int... I> struct swz {
  static constexpr int K = sizeof...(I);
  using V = vec<T, K>;
  T s_[N];
  MSL_INLINE operator V() const { return V(s_[I]...); }
  MSL_INLINE swz& operator=(const V& o) { int j = 0; ((s_[I] = o[j++]), ...); return *this; }
  MSL_INLINE swz& operator=(const swz& o) { return *this = V(o); }
};
template <class A> struct is_swz : std::false_type {};
template <class T, int N, int... I> struct is_swz<swz<T, N, I...>> : std::true_type {};
template <class A> inline constexpr bool is_swz_v = is_swz<std::remove_cv_t<std::remove_reference_t<A>>>::value;
template <class A> MSL_INLINE decltype(auto) unswz_(const A& a) {
  if constexpr (is_swz_v<A>) return vec_t<A>(a); else return (a);
}
#define MSL_SWZ_BINOP(op)                                                                       \
  template <class A, class B, std::enable_if_t<is_swz_v<A> || is_swz_v<B>, int> = 0>           \
  MSL_INLINE auto operator op(const A& a, const B& b) { return unswz_(a) op unswz_(b); }
MSL_SWZ_BINOP(+) MSL_SWZ_BINOP(-) MSL_SWZ_BINOP(*) MSL_SWZ_BINOP(/) MSL_SWZ_BINOP(%)
MSL_SWZ_BINOP(&) MSL_SWZ_BINOP(|) MSL_SWZ_BINOP(^) MSL_SWZ_BINOP(<<) MSL_SWZ_BINOP(>>)
MSL_SWZ_BINOP(==) MSL_SWZ_BINOP(!=) MSL_SWZ_BINOP(<) MSL_SWZ_BINOP(>) MSL_SWZ_BINOP(<=) MSL_SWZ_BINOP(>=)
MSL_SWZ_BINOP(&&) MSL_SWZ_BINOP(||)
#undef MSL_SWZ_BINOP
#define MSL_SWZ_ASSIGN(op)                                                                      \
  template <class S, class B, std::enable_if_t<is_swz_v<S>, int> = 0>                          \
  MSL_INLINE S& operator op##=(S& s, const B& b) { s = vec_t<S>(vec_t<S>(s) op unswz_(b)); return s; }
MSL_SWZ_ASSIGN(+) MSL_SWZ_ASSIGN(-) MSL_SWZ_ASSIGN(*) MSL_SWZ_ASSIGN(/) MSL_SWZ_ASSIGN(%)
MSL_SWZ_ASSIGN(&) MSL_SWZ_ASSIGN(|) MSL_SWZ_ASSIGN(^) MSL_SWZ_ASSIGN(<<) MSL_SWZ_ASSIGN(>>)
#undef MSL_SWZ_ASSIGN
template <class S, std::enable_if_t<is_swz_v<S>, int> = 0> MSL_INLINE auto operator-(const S& s) { return -vec_t<S>(s); }
template <class S, std::enable_if_t<is_swz_v<S>, int> = 0> MSL_INLINE auto operator~(const S& s) { return ~vec_t<S>(s); }
template <class S, std::enable_if_t<is_swz_v<S>, int> = 0> MSL_INLINE auto operator!(const S& s) { return !vec_t<S>(s); }

// ---------------------------------------------------------------- vector storage
template <class T, int N> struct vec_storage;
template <class T> struct vec_storage<T, 2> {
  union {
    T v_[2];
    struct { T x, y; };
    struct { T r, g; };
    MSL_SWIZZLES_2
  };
};
template <class T> struct vec_storage<T, 3> {
  union {
    T v_[3];
    struct { T x, y, z; };
    struct { T r, g, b; };
    MSL_SWIZZLES_3
  };
};
template <class T> struct vec_storage<T, 4> {
  union {
    T v_[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    MSL_SWIZZLES_4
  };
};

template <class T, int N> struct alignas(vec_align_v<T, N>) vec : vec_storage<T, N> {
  using vec_storage<T, N>::v_;
  using value_type = T;
  static constexpr int size = N;

  MSL_INLINE vec() {}
  MSL_INLINE vec(const vec& o) { for (int i = 0; i < N; i++) v_[i] = o.v_[i]; }
  MSL_INLINE vec& operator=(const vec& o) { for (int i = 0; i < N; i++) v_[i] = o.v_[i]; return *this; }
  // broadcast: float4(1.0f), and the implicit scalar operand of float4 * 2.0f
  MSL_INLINE vec(const T& s) { for (int i = 0; i < N; i++) v_[i] = s; }
  template <class S, std::enable_if_t<is_scalar_v<S> && !std::is_same_v<S, T>, int> = 0>
  MSL_INLINE vec(const S& s) { for (int i = 0; i < N; i++) v_[i] = T(s); }
  // float4(a, b, c, d), float4(float2, float2), float4(float3, w), ...
  template <class A0, class A1, class... A,
            std::enable_if_t<(ncomp_v<A0> + ncomp_v<A1> + (0 + ... + ncomp_v<A>)) == N, int> = 0>
  MSL_INLINE vec(const A0& a0, const A1& a1, const A&... a) {
    int i = 0;
    put_(i, a0); put_(i, a1); (put_(i, a), ...);
  }
  // explicit element-type conversion: float4(half4), float2(h.xy)
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>
  MSL_INLINE explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; i++) v_[i] = T(o[i]); }
  template <class U, int M, int... I, std::enable_if_t<sizeof...(I) == N && !std::is_same_v<U, T>, int> = 0>
  MSL_INLINE explicit vec(const swz<U, M, I...>& s) : vec(vec<U, N>(s)) {}

  MSL_INLINE T& operator[](int i) { return v_[i]; }
  MSL_INLINE const T& operator[](int i) const { return v_[i]; }

 private:
  template <class A> MSL_INLINE void put_(int& i, const A& a) {
    if constexpr (ncomp_v<A> == 1 && is_scalar_v<A>) {
      v_[i++] = T(a);
    } else {
      vec_t<A> t(a);
      for (int k = 0; k < ncomp_v<A>; k++) v_[i++] = T(t[k]);
    }
  }

 public:
  MSL_INLINE vec operator-() const { vec r; for (int i = 0; i < N; i++) r[i] = -v_[i]; return r; }
  MSL_INLINE vec operator+() const { return *this; }
  MSL_INLINE vec operator~() const { vec r; for (int i = 0; i < N; i++) r[i] = ~v_[i]; return r; }
  MSL_INLINE vec<bool, N> operator!() const { vec<bool, N> r; for (int i = 0; i < N; i++) r[i] = !v_[i]; return r; }
  MSL_INLINE vec& operator++() { for (int i = 0; i < N; i++) ++v_[i]; return *this; }
  MSL_INLINE vec& operator--() { for (int i = 0; i < N; i++) --v_[i]; return *this; }
#define MSL_VEC_OP(op)                                                                              \
  friend MSL_INLINE vec operator op(const vec& a, const vec& b) {                                  \
    vec r; for (int i = 0; i < N; i++) r[i] = T(a[i] op b[i]); return r;                           \
  }                                                                                                 \
  MSL_INLINE vec& operator op##=(const vec& b) { for (int i = 0; i < N; i++) v_[i] = T(v_[i] op b[i]); return *this; }
  MSL_VEC_OP(+) MSL_VEC_OP(-) MSL_VEC_OP(*) MSL_VEC_OP(/)
  MSL_VEC_OP(%) MSL_VEC_OP(&) MSL_VEC_OP(|) MSL_VEC_OP(^) MSL_VEC_OP(<<) MSL_VEC_OP(>>)
#undef MSL_VEC_OP
#define MSL_VEC_CMP(op)                                                                             \
  friend MSL_INLINE vec<bool, N> operator op(const vec& a, const vec& b) {                         \
    vec<bool, N> r; for (int i = 0; i < N; i++) r[i] = a[i] op b[i]; return r;                     \
  }
  MSL_VEC_CMP(==) MSL_VEC_CMP(!=) MSL_VEC_CMP(<) MSL_VEC_CMP(>) MSL_VEC_CMP(<=) MSL_VEC_CMP(>=)
  MSL_VEC_CMP(&&) MSL_VEC_CMP(||)
#undef MSL_VEC_CMP
};

// Metal's % is only for integers; the float fmod is metal::fmod.
#define MSL_VEC_TYPES(T, name)                                                         \
  typedef vec<T, 2> name##2; typedef vec<T, 3> name##3; typedef vec<T, 4> name##4;
MSL_VEC_TYPES(float, float) MSL_VEC_TYPES(half, half) MSL_VEC_TYPES(bfloat, bfloat)
MSL_VEC_TYPES(int, int) MSL_VEC_TYPES(uint, uint) MSL_VEC_TYPES(short, short)
MSL_VEC_TYPES(ushort, ushort) MSL_VEC_TYPES(char, char) MSL_VEC_TYPES(uchar, uchar)
MSL_VEC_TYPES(bool, bool) MSL_VEC_TYPES(long, long) MSL_VEC_TYPES(ulong, ulong)
#undef MSL_VEC_TYPES
static_assert(sizeof(float3) == 16 && alignof(float3) == 16, "Metal float3 is 16 bytes");
static_assert(sizeof(half3) == 8 && sizeof(float4) == 16, "Metal vector sizes");

// Packed vectors: the components without the padding (packed_float3 is 12 bytes).
template <class T, int N> struct packed_vec {
  T v_[N];
  MSL_INLINE packed_vec() {}
  MSL_INLINE packed_vec(const vec<T, N>& o) { for (int i = 0; i < N; i++) v_[i] = o[i]; }
  template <class... A, std::enable_if_t<sizeof...(A) == N, int> = 0>
  MSL_INLINE packed_vec(const A&... a) : v_{T(a)...} {}
  MSL_INLINE operator vec<T, N>() const { vec<T, N> r; for (int i = 0; i < N; i++) r[i] = v_[i]; return r; }
  MSL_INLINE T& operator[](int i) { return v_[i]; }
  MSL_INLINE const T& operator[](int i) const { return v_[i]; }
};
#define MSL_PACKED(T, name)                                                                       \
  typedef packed_vec<T, 2> packed_##name##2; typedef packed_vec<T, 3> packed_##name##3;          \
  typedef packed_vec<T, 4> packed_##name##4;
MSL_PACKED(float, float) MSL_PACKED(half, half) MSL_PACKED(bfloat, bfloat) MSL_PACKED(int, int)
MSL_PACKED(uint, uint) MSL_PACKED(short, short) MSL_PACKED(ushort, ushort) MSL_PACKED(char, char)
MSL_PACKED(uchar, uchar)
#undef MSL_PACKED

// ---------------------------------------------------------------- numeric_limits, as_type
template <class T> struct numeric_limits;
#define MSL_INT_LIMITS(T, lo, hi)                                         \
  template <> struct numeric_limits<T> {                                  \
    static constexpr bool is_specialized = true;                          \
    static constexpr T min() { return lo; }                              \
    static constexpr T lowest() { return lo; }                           \
    static constexpr T max() { return hi; }                              \
  };
MSL_INT_LIMITS(bool, false, true)
MSL_INT_LIMITS(char, -128, 127)
MSL_INT_LIMITS(signed char, -128, 127)
MSL_INT_LIMITS(uchar, 0, 255)
MSL_INT_LIMITS(short, -32768, 32767)
MSL_INT_LIMITS(ushort, 0, 65535)
MSL_INT_LIMITS(int, (-2147483647 - 1), 2147483647)
MSL_INT_LIMITS(uint, 0u, 4294967295u)
MSL_INT_LIMITS(long, (-9223372036854775807L - 1), 9223372036854775807L)
MSL_INT_LIMITS(ulong, 0ul, 18446744073709551615ul)
MSL_INT_LIMITS(long long, (-9223372036854775807LL - 1), 9223372036854775807LL)
MSL_INT_LIMITS(unsigned long long, 0ull, 18446744073709551615ull)
#undef MSL_INT_LIMITS
#define MSL_FLOAT_LIMITS(T, BITS_T, minb, maxb, infb, nanb, epsb)                           \
  template <> struct numeric_limits<T> {                                                    \
    static constexpr bool is_specialized = true;                                            \
    static constexpr T min() { return __builtin_bit_cast(T, (BITS_T)minb); }               \
    static constexpr T max() { return __builtin_bit_cast(T, (BITS_T)maxb); }               \
    static constexpr T lowest() { return -max(); }                                          \
    static constexpr T infinity() { return __builtin_bit_cast(T, (BITS_T)infb); }          \
    static constexpr T quiet_NaN() { return __builtin_bit_cast(T, (BITS_T)nanb); }         \
    static constexpr T epsilon() { return __builtin_bit_cast(T, (BITS_T)epsb); }           \
  };
MSL_FLOAT_LIMITS(float, uint32_t, 0x00800000u, 0x7f7fffffu, 0x7f800000u, 0x7fc00000u, 0x34000000u)
MSL_FLOAT_LIMITS(half, uint16_t, 0x0400u, 0x7bffu, 0x7c00u, 0x7e00u, 0x1400u)
MSL_FLOAT_LIMITS(double, uint64_t, 0x0010000000000000ull, 0x7fefffffffffffffull, 0x7ff0000000000000ull,
                 0x7ff8000000000000ull, 0x3cb0000000000000ull)
#undef MSL_FLOAT_LIMITS
template <> struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }
};

// Reinterpret the bits of a value (sizes must match), as Metal's as_type<T>.
template <class To, class From> MSL_INLINE To as_type(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To to;
  __builtin_memcpy((void*)&to, (const void*)&from, sizeof(To));
  return to;
}

}  // namespace metal

// Metal half literals: 1.0h
constexpr metal::half operator""h(long double v) { return (metal::half)v; }
constexpr metal::half operator""h(unsigned long long v) { return (metal::half)v; }
