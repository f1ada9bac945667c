// Per-tile row math of every loss, written as plain loops over one row of a
// similarity tile so that the compiler vectorises them. This header is compiled
// once per instruction set (see tile_math_isa.cpp): FASTCON_ISA names the namespace.
// It is the C++ copy of each loss's tile math; the Python definitions in
// fastcon/losses/ say what each slot and parameter is (their order is the order here).
//
// A tile is `rows x cols` similarities s_ij = a_i . c_j / t of anchors i0.. against
// contrast columns k0.., row-major with leading dimension `ld`. The driver has set
// the anchor's own column to -inf, so it drops out of every max and every exp, and a
// column is a positive of row i when it has the anchor's class and a finite s.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "tile_math_api.h"

namespace fastcon {
namespace FASTCON_ISA {

// exp(x) for float without a library call, so the loops vectorise: x = n ln2 + r
// with |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by its degree-7 Taylor
// polynomial (truncation error below float's rounding), 2^n added to the exponent
// bits. Exactly 0 below -87 (the self column's -inf included).
static inline float fast_exp(float x) {
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t tbits, pbits, sbits;
  std::memcpy(&tbits, &t, 4);
  std::memcpy(&sbits, &shifter, 4);
  std::memcpy(&pbits, &p, 4);
  pbits += (tbits - sbits) << 23;
  float out;
  std::memcpy(&out, &pbits, 4);
  return x < -87.0f ? 0.0f : out;
}

// float64 is the checking precision (gradcheck): the library exp.
static inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
static inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Online log-sum-exp state (m, l): the sum is l * e^m. Rescale to a new maximum.
template <typename T>
static inline void lse_rescale(T& m, T& l, T tile_max) {
  if (tile_max > m) {
    l = (m == neg_inf<T>()) ? T(0) : l * std::exp(m - tile_max);
    m = tile_max;
  }
}

// a max still at -inf means the set is empty so far: any finite shift works
template <typename T>
static inline T shift_of(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// ---- statistics ------------------------------------------------------------------------
// Slot k of a row lives in acc[2k] (max or sum) and acc[2k + 1] (sum of exp).

// LSE over every column of the row (the anchor's own column is -inf): SupCon's and focal's dense part
template <typename T>
static inline void lse_all_row(const T* s, int64_t n, T* slot) {
  T mx = neg_inf<T>();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  lse_rescale(slot[0], slot[1], mx);
  const T shift = shift_of(slot[0]);
  T l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < n; ++j) l += fast_exp(s[j] - shift);
  slot[1] += l;
}

// LSE of scale * s over the columns with (cls == cy) == same
template <typename T>
static inline void lse_masked_row(const T* s, const int32_t* cls, int32_t cy, bool same, T scale, int64_t n,
                                  T* slot) {
  T mx = neg_inf<T>();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) {
    const T x = ((cls[j] == cy) == same && s[j] != neg_inf<T>()) ? scale * s[j] : neg_inf<T>();
    mx = x > mx ? x : mx;
  }
  lse_rescale(slot[0], slot[1], mx);
  const T shift = shift_of(slot[0]);
  T l = 0;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < n; ++j) {
    const T e = fast_exp(scale * s[j] - shift);
    l += ((cls[j] == cy) == same && s[j] != neg_inf<T>()) ? e : T(0);
  }
  slot[1] += l;
}

// ---- focal: f(L) = (1-p)^gamma L and f'(L) at one positive, L = log p --------------
template <typename T>
static inline void focal_terms(T log_p, T gamma, T& f, T& fprime) {
  const T p = std::exp(log_p);
  const T one_minus_p = -std::expm1(log_p);
  if (gamma == T(0)) {
    f = log_p;
    fprime = T(1);
    return;
  }
  const T w = std::pow(std::fmax(one_minus_p, T(0)), gamma);
  f = w * log_p;
  // f'(L) = (1-p)^gamma - gamma (1-p)^(gamma-1) p L; the tail vanishes at p = 0 and p = 1
  T tail = 0;
  if (one_minus_p > T(0) && p > T(0))
    tail = gamma * std::pow(std::fmax(one_minus_p, std::numeric_limits<T>::min()), gamma - T(1)) * p * log_p;
  fprime = w - tail;
}

template <typename T>
static void stats_tile(const TileArgs<T>& a) {
  const T b1 = T(1) + T(a.beta), bb = T(a.beta), gamma = T(a.gamma);
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t i = a.i0 + r;
    const T* s = a.s + r * a.ld;
    const int32_t* cls = a.contrast_cls + a.k0;
    const int32_t cy = a.anchor_cls[i];
    T* acc = a.acc + i * kAccStride;
    T* dense = a.dense_base >= 0 ? acc + 2 * a.dense_base : nullptr;
    T* pos = a.pos_base >= 0 ? acc + 2 * a.pos_base : nullptr;
    if (a.kernel_id == 0) {  // SupCon: dense LSE_A(s); positive sum_P s
      if (dense) lse_all_row(s, a.cols, dense);
      if (pos) {
        T ps = 0;
#pragma omp simd reduction(+ : ps)
        for (int64_t j = 0; j < a.cols; ++j) ps += (cls[j] == cy && s[j] != neg_inf<T>()) ? s[j] : T(0);
        pos[0] += ps;
      }
    } else if (a.kernel_id == 1) {  // SCHaNe: dense LSE_N((1+b)s), LSE_N(b s); positive LSE_P(s)
      if (dense) {
        lse_masked_row(s, cls, cy, false, b1, a.cols, dense);
        lse_masked_row(s, cls, cy, false, bb, a.cols, dense + 2);
      }
      if (pos) lse_masked_row(s, cls, cy, true, T(1), a.cols, pos);
    } else {  // focal: dense LSE_A(s); positive sum_P f(L), sum_P f'(L) with the finished LSE
      if (dense) lse_all_row(s, a.cols, dense);
      if (pos) {
        const T lse = a.dense_final[i];
        T fsum = 0, fpsum = 0;
        for (int64_t j = 0; j < a.cols; ++j) {
          if (cls[j] != cy || s[j] == neg_inf<T>()) continue;
          T f, fp;
          focal_terms(s[j] - lse, gamma, f, fp);
          fsum += f;
          fpsum += fp;
        }
        pos[0] += fsum;
        pos[2] += fpsum;
      }
    }
  }
}

// ---- the gradient tile G = w_i dl_i/ds_ij, written over s ------------------------------
template <typename T>
static void grad_tile(const TileArgs<T>& a) {
  const T b1 = T(1) + T(a.beta), bb = T(a.beta), gamma = T(a.gamma);
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t i = a.i0 + r;
    T* s = a.s + r * a.ld;
    const int32_t* cls = a.contrast_cls + a.k0;
    const int32_t cy = a.anchor_cls[i];
    auto param = [&](int k) { return a.params[k * a.A + i]; };
    if (a.kernel_id == 0) {
      // SupCon (lse_all, coef, pos_coef): coef softmax_A(s) - [j in P] pos_coef
      const T lse = param(0), coef = param(1), pc = param(2);
      if (coef == T(0) && pc == T(0)) {
        for (int64_t j = 0; j < a.cols; ++j) s[j] = T(0);
        continue;
      }
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) {
        const T x = s[j];  // one load and no short-circuit: the loop stays vectorised
        const bool positive = (cls[j] == cy) & (x != neg_inf<T>());
        s[j] = coef * fast_exp(x - lse) - (positive ? pc : T(0));
      }
    } else if (a.kernel_id == 1) {
      // SCHaNe (lse_pos, lse_neg_hard, lse_neg_weight, coef):
      // P: -coef softmax_P(s); N: coef [(1+b) softmax_N((1+b)s) - b softmax_N(b s)]
      const T lp = param(0), l1 = param(1), lb = param(2), coef = param(3);
      if (coef == T(0)) {
        for (int64_t j = 0; j < a.cols; ++j) s[j] = T(0);
        continue;
      }
      const T cb1 = coef * b1, cbb = coef * bb;
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) {
        const T x = s[j];
        const T gp = x == neg_inf<T>() ? T(0) : -coef * fast_exp(x - lp);
        const T gn = cb1 * fast_exp(b1 * x - l1) - cbb * fast_exp(bb * x - lb);
        s[j] = cls[j] == cy ? gp : gn;
      }
    } else {
      // focal (lse_all, coef, coef_fsum): -coef_fsum p_ij + [j in P] coef f'(L_ij)
      const T lse = param(0), coef = param(1), cf = param(2);
      if (coef == T(0) && cf == T(0)) {
        for (int64_t j = 0; j < a.cols; ++j) s[j] = T(0);
        continue;
      }
      // the positives (few) first, in place; then every other column in one vectorised loop
      for (int64_t j = 0; j < a.cols; ++j) {
        if (cls[j] != cy || s[j] == neg_inf<T>()) continue;
        const T log_p = s[j] - lse;
        T f, fp;
        focal_terms(log_p, gamma, f, fp);
        s[j] = coef * fp - cf * fast_exp(log_p);
      }
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) {
        const T x = s[j];  // one load and no short-circuit: the loop stays vectorised
        const bool own = x == neg_inf<T>();  // the anchor's own column
        const bool positive = (cls[j] == cy) & !own;
        s[j] = positive ? x : (own ? T(0) : -cf * fast_exp(x - lse));
      }
    }
  }
}

}  // namespace FASTCON_ISA
}  // namespace fastcon
