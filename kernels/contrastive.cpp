// Fused CPU kernel of the supervised contrastive losses (SupCon, SCHaNe, focal SupCon).
//
// Anchors a_i = z[i] (i < A) against contrast rows c_j = cat(z, ref)[j] (j < K);
// s_ij = a_i . c_j / t, and anchor i is contrast column i ("self").
//
// A tile of s (at most 256 x 512, 512 KiB in float32) is computed by one ATen matmul
// and consumed while it is in cache:
//   pass 1  s -> online row statistics (masked log-sum-exps, positive sums);
//           focal SupCon needs a second such pass for sum_P f'(log p) before its
//           gradient is known;
//   pass G  s recomputed -> G = dL/ds in place -> dA_block += G Ct_tile and
//           dC_tile += G^T A_block / t.
// No pass holds more than one tile of similarities (and one of scratch) per thread.
//
// General case (extra contrast rows, or anchors a subset of the rows): row blocks of
// 256 anchors x column tiles of 512; four matmul passes (s, s again, G C, G^T A).
// Symmetric case (no extra rows, every row an anchor; the common one): s is
// symmetric, so only the upper triangle of 256 x 256 tiles is computed and each tile
// serves its row block and, transposed, its column block: two matmul passes in all
// (see SymmetricSweep).
//
// Thread-count independence: row statistics and dA rows of the general case belong to
// one row block, so one thread. Sums over row blocks (dC, and in the symmetric case
// the statistics and dz) go to a fixed number of group buffers (a function of the
// problem size only), each filled in a fixed order and merged in group order.
// Tile products go to scratch and are added by ATen (MKL's beta = 1 gemm was not
// bitwise stable across threading contexts).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "kernels/tile_math_api.h"

namespace fastcon {
namespace {

constexpr int64_t kBlockRows = 256;
constexpr int64_t kTileCols = 512;
// dC group buffers: at most this many, and at most this many bytes in all.
constexpr int64_t kMaxGroups = 16;
constexpr int64_t kGroupBytes = int64_t(64) << 20;

bool cpu_has_avx2() {
#if defined(FASTCON_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename T>
TileKernels<T> pick_kernels();

template <>
TileKernels<float> pick_kernels<float>() {
#if defined(FASTCON_HAVE_AVX2)
  if (cpu_has_avx2()) return avx2::kernels_f32();
#endif
  return base::kernels_f32();
}

template <>
TileKernels<double> pick_kernels<double>() {
#if defined(FASTCON_HAVE_AVX2)
  if (cpu_has_avx2()) return avx2::kernels_f64();
#endif
  return base::kernels_f64();
}

template <typename T>
struct Sweep {
  at::Tensor anchors;   // [A, D]
  at::Tensor ct;        // [K, D] contrast rows / t
  const int32_t* cls;   // [K]
  int64_t A, K, M, D;
  Kind kind;
  double temperature, scale, beta, gamma;
  TileKernels<T> kernels;

  TileArgs<T> args(T* s, int64_t rows, int64_t cols, int64_t i0, int64_t k0, T* acc, const T* stats,
                   const T* mult) const {
    return TileArgs<T>{s, cols, rows, cols, i0, k0, cls, acc, stats, mult, kind, beta, gamma};
  }

  // Computes every tile s[i0:i1, k0:k0+cols] of a row block into `buf` (self
  // column set to -inf) and hands it to consume(s_tensor, k0, cols).
  template <typename Consume>
  void for_each_tile(int64_t i0, int64_t i1, at::Tensor& buf, Consume&& consume) const {
    const int64_t rows = i1 - i0;
    at::Tensor a = anchors.narrow(0, i0, rows);
    for (int64_t k0 = 0; k0 < K; k0 += kTileCols) {
      const int64_t cols = std::min(kTileCols, K - k0);
      at::Tensor s = buf.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(s, a, ct.narrow(0, k0, cols).t());
      T* sp = s.data_ptr<T>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        if (i >= k0 && i < k0 + cols) sp[r * cols + (i - k0)] = -std::numeric_limits<T>::infinity();
      }
      consume(s, k0, cols);
    }
  }

  int64_t num_blocks() const { return (A + kBlockRows - 1) / kBlockRows; }

  at::Tensor tile_buffer() const { return at::empty({kBlockRows * kTileCols}, anchors.options()); }

  // A streaming pass over all tiles, parallel over row blocks, calling `tile_fn`.
  void row_pass(void (*tile_fn)(const TileArgs<T>&), T* acc, const T* stats) const {
    at::parallel_for(0, num_blocks(), 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = tile_buffer();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlockRows, i1 = std::min(A, i0 + kBlockRows);
        for_each_tile(i0, i1, buf, [&](at::Tensor& s, int64_t k0, int64_t cols) {
          tile_fn(args(s.data_ptr<T>(), i1 - i0, cols, i0, k0, acc, stats, nullptr));
        });
      }
    });
  }

  // Pass G: returns (dA [A, D], dC [Kc, D]) of sum_i mult_i * (l_i / coef_i).
  std::tuple<at::Tensor, at::Tensor> grad_pass(const T* stats, const T* mult, int64_t kc) const {
    at::Tensor grad_a = at::zeros({A, D}, anchors.options());
    const int64_t nb = num_blocks();
    const int64_t buffer_bytes = std::max<int64_t>(1, kc * D * int64_t(sizeof(T)));
    const int64_t groups = std::max<int64_t>(
        1, std::min({nb, kMaxGroups, std::max<int64_t>(2, kGroupBytes / buffer_bytes)}));
    at::Tensor grad_c = at::zeros({groups, kc, D}, anchors.options());
    const T inv_t = T(1.0 / temperature);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      at::Tensor buf = tile_buffer();
      at::Tensor prod_a = at::empty({kBlockRows, D}, anchors.options());
      at::Tensor prod_c = at::empty({kTileCols, D}, anchors.options());
      for (int64_t g = g0; g < g1; ++g) {
        at::Tensor dc = grad_c[g];
        const int64_t b_begin = g * nb / groups, b_end = (g + 1) * nb / groups;
        for (int64_t b = b_begin; b < b_end; ++b) {
          const int64_t i0 = b * kBlockRows, i1 = std::min(A, i0 + kBlockRows);
          at::Tensor a = anchors.narrow(0, i0, i1 - i0);
          at::Tensor da = grad_a.narrow(0, i0, i1 - i0);
          for_each_tile(i0, i1, buf, [&](at::Tensor& s, int64_t k0, int64_t cols) {
            T* sp = s.data_ptr<T>();
            kernels.grad(args(sp, i1 - i0, cols, i0, k0, nullptr, stats, mult));
            for (int64_t r = 0; r < i1 - i0; ++r) {
              const int64_t i = i0 + r;
              if (i >= k0 && i < k0 + cols) sp[r * cols + (i - k0)] = T(0);
            }
            at::Tensor pa = prod_a.narrow(0, 0, i1 - i0);
            at::mm_out(pa, s, ct.narrow(0, k0, cols));
            da.add_(pa);
            if (k0 < kc) {
              const int64_t ccols = std::min(cols, kc - k0);
              at::Tensor pc = prod_c.narrow(0, 0, ccols);
              at::mm_out(pc, s.narrow(1, 0, ccols).t(), a);
              dc.narrow(0, k0, ccols).add_(pc, inv_t);
            }
          });
        }
      }
    });
    // add the group buffers in group order, in parallel over elements
    at::Tensor grad_c0 = grad_c[0];
    T* out = grad_c0.data_ptr<T>();
    const T* all = grad_c.data_ptr<T>();
    const int64_t n = kc * D;
    at::parallel_for(0, n, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t g = 1; g < groups; ++g) {
        const T* part = all + g * n;
        for (int64_t e = e0; e < e1; ++e) out[e] += part[e];
      }
    });
    return {grad_a, grad_c0};
  }
};

// ---- the symmetric case: no extra contrast rows and every row an anchor ------------
// Then s is symmetric and G_KI = f(s_IK^T, row statistics of K), so only tiles I <= K
// are computed: each off-diagonal tile feeds the row statistics of both its row block
// and (transposed) its column block, and in the gradient pass dz_I += H ct_K and
// dz_K += H^T z_I / t with H = G_IK + G_KI^T. That halves the similarity products:
// a forward+backward costs 0.5 (statistics) + 1.5 (gradient) matmul passes.
// Tiles are cut into a fixed number of contiguous groups, each with its own row
// accumulators and dz buffer, merged in group order (thread-count independent).

constexpr int64_t kSquare = 256;

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t b = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += b)
    for (int64_t c0 = 0; c0 < cols; c0 += b)
      for (int64_t r = r0; r < std::min(rows, r0 + b); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + b); ++c) dst[c * rows + r] = src[r * cols + c];
}

// h += g^T for h [rows x cols], g [cols x rows]
template <typename T>
void add_transposed(T* h, int64_t rows, int64_t cols, const T* g) {
  constexpr int64_t b = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += b)
    for (int64_t c0 = 0; c0 < cols; c0 += b)
      for (int64_t r = r0; r < std::min(rows, r0 + b); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + b); ++c) h[r * cols + c] += g[c * rows + r];
}

template <typename T>
void lse_merge(T& m, T& l, T m2, T l2) {
  if (m2 == -std::numeric_limits<T>::infinity()) return;
  if (m == -std::numeric_limits<T>::infinity()) {
    m = m2;
    l = l2;
    return;
  }
  const T mx = std::max(m, m2);
  l = l * std::exp(m - mx) + l2 * std::exp(m2 - mx);
  m = mx;
}

template <typename T>
struct SymmetricSweep {
  const Sweep<T>& sw;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (i0, k0), i0 <= k0, row-major order
  int64_t groups;

  explicit SymmetricSweep(const Sweep<T>& s) : sw(s) {
    for (int64_t i0 = 0; i0 < sw.M; i0 += kSquare)
      for (int64_t k0 = i0; k0 < sw.M; k0 += kSquare) tiles.emplace_back(i0, k0);
    const int64_t buffer_bytes = std::max<int64_t>(1, sw.M * sw.D * int64_t(sizeof(T)));
    groups = std::max<int64_t>(1, std::min({int64_t(tiles.size()), kMaxGroups,
                                            std::max<int64_t>(2, kGroupBytes / buffer_bytes)}));
  }

  int64_t extent(int64_t start) const { return std::min(kSquare, sw.M - start); }

  // s[i0.., k0..] into buf (self column -inf on diagonal tiles); returns the tile.
  at::Tensor similarity(int64_t i0, int64_t k0, at::Tensor& buf) const {
    const int64_t rows = extent(i0), cols = extent(k0);
    at::Tensor s = buf.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(s, sw.anchors.narrow(0, i0, rows), sw.ct.narrow(0, k0, cols).t());
    if (i0 == k0) {
      T* sp = s.data_ptr<T>();
      for (int64_t r = 0; r < rows; ++r) sp[r * cols + r] = -std::numeric_limits<T>::infinity();
    }
    return s;
  }

  template <typename Fn>
  void for_each_group(Fn&& fn) const {
    const int64_t nt = int64_t(tiles.size());
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      at::Tensor buf = at::empty({kSquare * kSquare}, sw.anchors.options());
      at::Tensor buf_t = at::empty({kSquare * kSquare}, sw.anchors.options());
      for (int64_t g = g0; g < g1; ++g) fn(g, g * nt / groups, (g + 1) * nt / groups, buf, buf_t);
    });
  }

  // A statistics pass (tile_fn = stats or focal). `acc` holds the initial accumulators
  // and receives the merged result; `focal_sums` says which pass it is.
  void row_pass(void (*tile_fn)(const TileArgs<T>&), T* acc, const T* stats, bool focal_sums) const {
    const int64_t A = sw.A;
    at::Tensor init = at::from_blob(acc, {A, kAccStride}, sw.anchors.options());
    at::Tensor part = init.unsqueeze(0).repeat({groups, 1, 1});
    T* partp = part.data_ptr<T>();
    for_each_group([&](int64_t g, int64_t t0, int64_t t1, at::Tensor& buf, at::Tensor& buf_t) {
      T* pacc = partp + g * A * kAccStride;
      for (int64_t t = t0; t < t1; ++t) {
        const auto [i0, k0] = tiles[t];
        const int64_t rows = extent(i0), cols = extent(k0);
        at::Tensor s = similarity(i0, k0, buf);
        tile_fn(sw.args(s.data_ptr<T>(), rows, cols, i0, k0, pacc, stats, nullptr));
        if (i0 != k0) {
          transpose(s.data_ptr<T>(), rows, cols, buf_t.data_ptr<T>());
          tile_fn(sw.args(buf_t.data_ptr<T>(), cols, rows, k0, i0, pacc, stats, nullptr));
        }
      }
    });
    at::parallel_for(0, A, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* out = acc + i * kAccStride;
        const T* first = partp + i * kAccStride;
        for (int64_t c = 0; c < kAccStride; ++c) out[c] = first[c];
        for (int64_t g = 1; g < groups; ++g) {
          const T* a = partp + (g * A + i) * kAccStride;
          if (focal_sums) {
            out[3] += a[3];
            out[4] += a[4];
          } else if (sw.kind == Kind::schane) {
            lse_merge(out[0], out[1], a[0], a[1]);
            lse_merge(out[2], out[3], a[2], a[3]);
            lse_merge(out[4], out[5], a[4], a[5]);
          } else {
            lse_merge(out[0], out[1], a[0], a[1]);
            out[2] += a[2];
          }
        }
      }
    });
  }

  // The gradient pass: dz [M, D] of sum_i mult_i * (l_i / coef_i).
  at::Tensor grad_pass(const T* stats, const T* mult) const {
    at::Tensor part = at::zeros({groups, sw.M, sw.D}, sw.anchors.options());
    const T inv_t = T(1.0 / sw.temperature);
    for_each_group([&](int64_t g, int64_t t0, int64_t t1, at::Tensor& buf, at::Tensor& buf_t) {
      at::Tensor dz = part[g];
      at::Tensor prod = at::empty({kSquare, sw.D}, sw.anchors.options());
      for (int64_t t = t0; t < t1; ++t) {
        const auto [i0, k0] = tiles[t];
        const int64_t rows = extent(i0), cols = extent(k0);
        at::Tensor h = similarity(i0, k0, buf);
        T* hp = h.data_ptr<T>();
        if (i0 != k0) transpose(hp, rows, cols, buf_t.data_ptr<T>());
        sw.kernels.grad(sw.args(hp, rows, cols, i0, k0, nullptr, stats, mult));
        if (i0 == k0) {
          for (int64_t r = 0; r < rows; ++r) hp[r * cols + r] = T(0);
        } else {
          T* gt = buf_t.data_ptr<T>();
          sw.kernels.grad(sw.args(gt, cols, rows, k0, i0, nullptr, stats, mult));
          add_transposed(hp, rows, cols, gt);
        }
        at::Tensor p_i = prod.narrow(0, 0, rows);
        at::mm_out(p_i, h, sw.ct.narrow(0, k0, cols));
        dz.narrow(0, i0, rows).add_(p_i);
        at::Tensor p_k = prod.narrow(0, 0, cols);
        at::mm_out(p_k, h.t(), sw.anchors.narrow(0, i0, rows));
        dz.narrow(0, k0, cols).add_(p_k, inv_t);
      }
    });
    at::Tensor out = part[0];
    T* outp = out.data_ptr<T>();
    const T* all = part.data_ptr<T>();
    const int64_t n = sw.M * sw.D;
    at::parallel_for(0, n, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t g = 1; g < groups; ++g)
        for (int64_t e = e0; e < e1; ++e) outp[e] += all[g * n + e];
    });
    return out.clone();
  }
};

// Turns the pass-1 accumulators into the row loss, validity and the row
// statistics [c0, c1, c2, coef] of the gradient tile (all 0 at invalid rows).
template <typename T>
void finalize_rows(const Sweep<T>& sw, const T* acc, const int64_t* n_same, T* loss, bool* valid, T* stats) {
  const int64_t K = sw.K;
  for (int64_t i = 0; i < sw.A; ++i) {
    const T* a = acc + i * kAccStride;
    T* st = stats + i * kStatStride;
    const int64_t n_pos = n_same[i] - 1, n_neg = K - n_same[i];
    st[0] = st[1] = st[2] = st[3] = T(0);
    loss[i] = T(0);
    if (sw.kind == Kind::schane) {
      valid[i] = n_pos > 0 && n_neg > 0;
      if (!valid[i]) continue;
      const T lse_p = a[0] + std::log(a[1]);
      const T lse_n1 = a[2] + std::log(a[3]);
      const T lse_nb = a[4] + std::log(a[5]);
      const T u = std::log(T(n_neg)) + std::log(T(n_pos)) + lse_n1 - lse_nb - lse_p;
      loss[i] = u > T(0) ? u + std::log1p(std::exp(-u)) : std::log1p(std::exp(u));  // softplus
      st[0] = lse_p;
      st[1] = lse_n1;
      st[2] = lse_nb;
      st[3] = T(1) / (T(1) + std::exp(-u));  // sigmoid(u) = d softplus / du
    } else {
      valid[i] = n_pos > 0;
      if (!valid[i]) continue;
      const T lse = a[0] + std::log(a[1]);
      st[0] = lse;
      if (sw.kind == Kind::supcon) {
        loss[i] = T(-sw.scale) * (a[2] / T(n_pos) - lse);
        st[1] = T(1) / T(n_pos);
        st[3] = T(sw.scale);
      }
    }
  }
}

// Focal SupCon after its second pass: loss and [lse, sum_P f', -, coef].
template <typename T>
void finalize_focal(const Sweep<T>& sw, const T* acc, T* loss, const bool* valid, T* stats) {
  const T coef = T(-sw.scale) / T(sw.K);
  for (int64_t i = 0; i < sw.A; ++i) {
    if (!valid[i]) continue;
    const T* a = acc + i * kAccStride;
    loss[i] = coef * a[3];
    stats[i * kStatStride + 1] = a[4];
    stats[i * kStatStride + 3] = coef;
  }
}

template <typename T>
std::vector<at::Tensor> sweep_typed(const at::Tensor& z, const c10::optional<at::Tensor>& ref, const at::Tensor& cls,
                                    int64_t num_anchors, Kind kind, double temperature, double scale, double beta,
                                    double gamma, const c10::optional<at::Tensor>& saved_stats,
                                    const c10::optional<at::Tensor>& row_weight, bool want_grad, bool need_ref_grad) {
  const bool has_ref = ref.has_value() && ref->defined();
  at::Tensor contrast = has_ref ? at::cat({z, *ref}, 0) : z;
  Sweep<T> sw;
  sw.M = z.size(0);
  sw.K = contrast.size(0);
  sw.D = z.size(1);
  sw.A = num_anchors;
  sw.anchors = z.narrow(0, 0, num_anchors);
  sw.ct = (contrast * (1.0 / temperature)).contiguous();
  sw.cls = cls.data_ptr<int32_t>();
  sw.kind = kind;
  sw.temperature = temperature;
  sw.scale = scale;
  sw.beta = beta;
  sw.gamma = gamma;
  sw.kernels = pick_kernels<T>();
  const auto opts = z.options();
  const bool symmetric = !has_ref && num_anchors == sw.M && sw.M > 0;
  at::Tensor row_loss = at::empty({0}, opts), valid = at::empty({0}, opts.dtype(at::kBool)), stats;

  if (saved_stats.has_value() && saved_stats->defined()) {
    stats = *saved_stats;
  } else {
    // |{j : y_j = y_i}| over all contrast rows, self included, from class counts
    const int64_t num_classes = sw.K ? cls.max().item<int32_t>() + 1 : 0;
    std::vector<int64_t> count(num_classes, 0), n_same(sw.A);
    for (int64_t j = 0; j < sw.K; ++j) ++count[sw.cls[j]];
    for (int64_t i = 0; i < sw.A; ++i) n_same[i] = count[sw.cls[i]];

    at::Tensor acc = at::zeros({sw.A, kAccStride}, opts);
    T* accp = acc.data_ptr<T>();
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < sw.A; ++i) {
      accp[i * kAccStride] = ninf;
      accp[i * kAccStride + 2] = kind == Kind::schane ? ninf : T(0);
      accp[i * kAccStride + 4] = kind == Kind::schane ? ninf : T(0);
    }
    if (symmetric)
      SymmetricSweep<T>(sw).row_pass(sw.kernels.stats, accp, nullptr, false);
    else
      sw.row_pass(sw.kernels.stats, accp, nullptr);
    row_loss = at::empty({sw.A}, opts);
    valid = at::empty({sw.A}, opts.dtype(at::kBool));
    stats = at::zeros({sw.A, kStatStride}, opts);
    finalize_rows(sw, accp, n_same.data(), row_loss.data_ptr<T>(), valid.data_ptr<bool>(), stats.data_ptr<T>());
    if (kind == Kind::focal) {
      if (symmetric)
        SymmetricSweep<T>(sw).row_pass(sw.kernels.focal, accp, stats.data_ptr<T>(), true);
      else
        sw.row_pass(sw.kernels.focal, accp, stats.data_ptr<T>());
      finalize_focal(sw, accp, row_loss.data_ptr<T>(), valid.data_ptr<bool>(), stats.data_ptr<T>());
    }
  }

  at::Tensor grad_z = at::empty({0}, opts), grad_ref = at::empty({0}, opts);
  if (want_grad) {
    at::Tensor mult = stats.select(1, 3).contiguous();
    if (row_weight.has_value() && row_weight->defined()) mult = mult * *row_weight;
    if (symmetric) {
      grad_z = SymmetricSweep<T>(sw).grad_pass(stats.data_ptr<T>(), mult.data_ptr<T>());
      return {row_loss, valid, stats, grad_z, grad_ref};
    }
    const int64_t kc = (has_ref && need_ref_grad) ? sw.K : sw.M;
    auto [grad_a, grad_c] = sw.grad_pass(stats.data_ptr<T>(), mult.data_ptr<T>(), kc);
    grad_z = grad_c.narrow(0, 0, sw.M).clone();
    grad_z.narrow(0, 0, sw.A).add_(grad_a);
    if (has_ref && need_ref_grad) grad_ref = grad_c.narrow(0, sw.M, sw.K - sw.M).clone();
  }
  return {row_loss, valid, stats, grad_z, grad_ref};
}

std::vector<at::Tensor> sweep(const at::Tensor& z, const c10::optional<at::Tensor>& ref, const at::Tensor& cls,
                              int64_t num_anchors, int64_t kind, double temperature, double scale, double beta,
                              double gamma, const c10::optional<at::Tensor>& saved_stats,
                              const c10::optional<at::Tensor>& row_weight, bool want_grad, bool need_ref_grad) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && z.device().is_cpu(), "z must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, "z must be float32 or float64, got ",
              z.scalar_type());
  TORCH_CHECK(num_anchors >= 0 && num_anchors <= z.size(0), "num_anchors out of range");
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (supcon), 1 (schane) or 2 (focal)");
  TORCH_CHECK(cls.scalar_type() == at::kInt && cls.is_contiguous(), "cls must be contiguous int32");
  if (ref.has_value() && ref->defined()) {
    TORCH_CHECK(ref->scalar_type() == z.scalar_type() && ref->is_contiguous() && ref->dim() == 2 &&
                    ref->size(1) == z.size(1),
                "ref must be a contiguous [R, D] tensor of z's dtype");
  }
  TORCH_CHECK(cls.numel() == z.size(0) + ((ref.has_value() && ref->defined()) ? ref->size(0) : 0),
              "cls must have one entry per contrast row");
  // the tile matmuls run below autograd
  at::AutoDispatchBelowADInplaceOrView guard;
  if (z.scalar_type() == at::kFloat)
    return sweep_typed<float>(z, ref, cls, num_anchors, Kind(kind), temperature, scale, beta, gamma, saved_stats,
                              row_weight, want_grad, need_ref_grad);
  return sweep_typed<double>(z, ref, cls, num_anchors, Kind(kind), temperature, scale, beta, gamma, saved_stats,
                             row_weight, want_grad, need_ref_grad);
}

}  // namespace
}  // namespace fastcon

TORCH_LIBRARY(fastcon, m) {
  m.def(
      "sweep(Tensor z, Tensor? ref, Tensor cls, int num_anchors, int kind, float temperature, float scale, "
      "float beta, float gamma, Tensor? stats, Tensor? row_weight, bool want_grad, bool need_ref_grad) -> Tensor[]");
  m.impl("sweep", &fastcon::sweep);
}
