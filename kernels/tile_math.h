// Per-tile row math of every loss, written as plain loops over one row of a
// similarity tile so that the compiler vectorises them. This header is compiled
// once per instruction set (see tile_math_*.cpp): FASTCON_ISA names the namespace.
//
// A tile is `rows x cols` similarities s_ij = a_i . c_j / t of anchors i0.. against
// contrast columns k0.., row-major with leading dimension `ld`. The driver has set
// the self column (j == i) to -inf, so it drops out of every max and every exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/tile_math_api.h"

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

// ---- pass 1: streaming row statistics --------------------------------------------
// SupCon / focal accumulators: [m_all, l_all, sum of s over P]; SCHaNe:
// [m_P, l_P, m_N1, l_N1, m_Nb, l_Nb] for s over P, (1+beta)s over N, beta s over N.

template <typename T>
static void stats_tile(const TileArgs<T>& a) {
  const T b1 = T(1) + T(a.beta), bb = T(a.beta);
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* s = a.s + r * a.ld;
    const int32_t* cls = a.cls + a.k0;
    const int32_t cy = a.cls[a.i0 + r];
    T* acc = a.acc + (a.i0 + r) * kAccStride;
    if (a.kind == Kind::schane) {
      T mp = neg_inf<T>(), mn1 = neg_inf<T>(), mnb = neg_inf<T>();
#pragma omp simd reduction(max : mp, mn1, mnb)
      for (int64_t j = 0; j < a.cols; ++j) {
        const T x = s[j];
        const bool same = cls[j] == cy;
        const T xp = same ? x : neg_inf<T>();
        const T xn1 = same ? neg_inf<T>() : b1 * x;
        const T xnb = same ? neg_inf<T>() : bb * x;
        mp = xp > mp ? xp : mp;
        mn1 = xn1 > mn1 ? xn1 : mn1;
        mnb = xnb > mnb ? xnb : mnb;
      }
      lse_rescale(acc[0], acc[1], mp);
      lse_rescale(acc[2], acc[3], mn1);
      lse_rescale(acc[4], acc[5], mnb);
      // a max still at -inf means the set is empty so far: any finite shift works
      const T sp = acc[0] == neg_inf<T>() ? T(0) : acc[0];
      const T sn1 = acc[2] == neg_inf<T>() ? T(0) : acc[2];
      const T snb = acc[4] == neg_inf<T>() ? T(0) : acc[4];
      T lp = 0, ln1 = 0, lnb = 0;
#pragma omp simd reduction(+ : lp, ln1, lnb)
      for (int64_t j = 0; j < a.cols; ++j) {
        const T x = s[j];
        const bool same = cls[j] == cy;
        const T ep = fast_exp(x - sp);
        const T en1 = fast_exp(b1 * x - sn1);
        const T enb = fast_exp(bb * x - snb);
        lp += same ? ep : T(0);
        ln1 += same ? T(0) : en1;
        lnb += same ? T(0) : enb;
      }
      acc[1] += lp;
      acc[3] += ln1;
      acc[5] += lnb;
    } else {
      T mx = neg_inf<T>(), pos_sum = 0;
#pragma omp simd reduction(max : mx) reduction(+ : pos_sum)
      for (int64_t j = 0; j < a.cols; ++j) {
        const T x = s[j];
        mx = x > mx ? x : mx;
        pos_sum += (cls[j] == cy && x != neg_inf<T>()) ? x : T(0);
      }
      lse_rescale(acc[0], acc[1], mx);
      const T shift = acc[0] == neg_inf<T>() ? T(0) : acc[0];
      T l = 0;
#pragma omp simd reduction(+ : l)
      for (int64_t j = 0; j < a.cols; ++j) l += fast_exp(s[j] - shift);
      acc[1] += l;
      acc[2] += pos_sum;
    }
  }
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
  // f'(L) = (1-p)^gamma - gamma (1-p)^(gamma-1) p L; the tail vanishes at p = 1
  T tail = 0;
  if (one_minus_p > T(0))
    tail = gamma * std::pow(std::fmax(one_minus_p, std::numeric_limits<T>::min()), gamma - T(1)) * p * log_p;
  fprime = w - tail;
}

// Focal pass 2 (needs the final row LSE in row_stats[0]): accumulates
// [sum_P f(L), sum_P f'(L)] into acc[3], acc[4]. Only positives carry terms.
template <typename T>
static void focal_tile(const TileArgs<T>& a) {
  const T gamma = T(a.gamma);
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* s = a.s + r * a.ld;
    const int32_t* cls = a.cls + a.k0;
    const int32_t cy = a.cls[a.i0 + r];
    T* acc = a.acc + (a.i0 + r) * kAccStride;
    const T lse = a.row_stats[(a.i0 + r) * kStatStride];
    T fsum = 0, fpsum = 0;
    for (int64_t j = 0; j < a.cols; ++j) {
      if (cls[j] != cy || s[j] == neg_inf<T>()) continue;
      T f, fp;
      focal_terms(s[j] - lse, gamma, f, fp);
      fsum += f;
      fpsum += fp;
    }
    acc[3] += fsum;
    acc[4] += fpsum;
  }
}

// ---- the gradient tile G = mult_i * dl_i/ds_ij, written over s -------------------
// row_stats per row: [c0, c1, c2, coef] (see contrastive.cpp); mult_i = coef_i * w_i.
template <typename T>
static void grad_tile(const TileArgs<T>& a) {
  const T b1 = T(1) + T(a.beta), bb = T(a.beta), gamma = T(a.gamma);
  for (int64_t r = 0; r < a.rows; ++r) {
    T* s = a.s + r * a.ld;
    const int32_t* cls = a.cls + a.k0;
    const int32_t cy = a.cls[a.i0 + r];
    const T* st = a.row_stats + (a.i0 + r) * kStatStride;
    const T mult = a.row_mult[a.i0 + r];
    if (mult == T(0)) {
      for (int64_t j = 0; j < a.cols; ++j) s[j] = T(0);
      continue;
    }
    const T c0 = st[0], c1 = st[1], c2 = st[2];
    if (a.kind == Kind::supcon) {
      // scale * (softmax_A(s)_ij - [j in P(i)] / |P(i)|); c1 = 1 / |P(i)|
      const T pos_share = mult * c1;
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) {
        const T e = mult * fast_exp(s[j] - c0);
        s[j] = e - (cls[j] == cy ? pos_share : T(0));
      }
    } else if (a.kind == Kind::schane) {
      // positives: -softmax_P(s); negatives: (1+beta) softmax_N((1+beta)s) - beta softmax_N(beta s)
      const T mb1 = mult * b1, mbb = mult * bb;
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) {
        const T x = s[j];
        const T gp = -mult * fast_exp(x - c0);
        const T gn = mb1 * fast_exp(b1 * x - c1) - mbb * fast_exp(bb * x - c2);
        s[j] = cls[j] == cy ? gp : gn;
      }
    } else {
      // -scale/K * ([j in P] f'(L_ij) - p_ij * sum_P f'); c1 = sum_P f', coef in mult.
      // Positives keep s for the scalar loop that adds their f' term.
      const T pf = -mult * c1;
#pragma omp simd
      for (int64_t j = 0; j < a.cols; ++j) s[j] = cls[j] == cy ? s[j] : pf * fast_exp(s[j] - c0);
      for (int64_t j = 0; j < a.cols; ++j) {
        if (cls[j] != cy) continue;
        if (s[j] == neg_inf<T>()) {  // the self column
          s[j] = T(0);
          continue;
        }
        const T log_p = s[j] - c0;
        T f, fp;
        focal_terms(log_p, gamma, f, fp);
        s[j] = pf * std::exp(log_p) + mult * fp;
      }
    }
  }
}

}  // namespace FASTCON_ISA
}  // namespace fastcon
