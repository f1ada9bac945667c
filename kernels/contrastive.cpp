// Fused CPU kernel of the supervised contrastive losses (the C++ copy of their tile math
// is tile_math.h; what each statistic and parameter means is in fastcon/losses/*.py).
//
// Anchors a_i (i < A) against contrast rows c_j (j < K); s_ij = a_i . c_j / t, and anchor i
// is contrast column i + self_offset (no column when self_offset < 0).
//
// A tile of s (at most 256 x 512, 512 KiB in float32) is computed by one ATen matmul
// and consumed while it is in cache:
//   stats  s -> the requested parts' row statistics (online log-sum-exps, sums), returned
//          raw ([slots, A]); Python's loss definition finalises them;
//   grads  s recomputed -> G = dL/ds in place from Python's gradient parameters ->
//          dA_block += G Ct_tile and dC_tile += G^T A_block / t.
// No pass holds more than one tile of similarities (and one of scratch) per thread.
//
// General case: row blocks of 256 anchors x column tiles of 512. Symmetric case (the
// anchors are the contrast rows; the common one): s is symmetric, so only the upper
// triangle of 256 x 256 tiles is computed and each tile serves its row block and,
// transposed, its column block (see SymmetricSweep): a forward+backward costs 0.5
// (statistics) + 1.5 (gradient) matmul passes instead of 1 + 3.
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

#include "tile_math_api.h"

namespace fastcon {
namespace {

constexpr int64_t kBlockRows = 256;
constexpr int64_t kTileCols = 512;
// group buffers: at most this many, and at most this many bytes in all.
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
TileKernels<T> pick_kernels() {
#if defined(FASTCON_HAVE_AVX2)
  if (cpu_has_avx2()) return avx2::kernels<T>();
#endif
  return base::kernels<T>();
}

int64_t group_count(int64_t items, int64_t buffer_bytes) {
  return std::max<int64_t>(
      1, std::min({items, kMaxGroups, std::max<int64_t>(2, kGroupBytes / std::max<int64_t>(1, buffer_bytes))}));
}

template <typename T>
struct Sweep {
  at::Tensor anchors;   // [A, D]
  at::Tensor ct;        // [K, D] contrast rows / t
  const int32_t* acls;  // [A]
  const int32_t* ccls;  // [K]
  int64_t A, K, D, self_offset;
  int kernel_id;
  double temperature, beta, gamma;
  TileKernels<T> kernels;
  // the slots of a statistics call
  int64_t dense_base = -1, pos_base = -1;
  const T* dense_final = nullptr;
  const T* params = nullptr;

  TileArgs<T> args(T* s, int64_t rows, int64_t cols, int64_t i0, int64_t k0, T* acc) const {
    return TileArgs<T>{s, cols, rows, cols, i0, k0, acls, ccls, acc, dense_base, pos_base, dense_final, params,
                       A, kernel_id, beta, gamma};
  }

  // Computes every tile s[i0:i1, k0:k0+cols] of a row block into `buf` (the anchors' own
  // columns set to -inf) and hands it to consume(s_tensor, k0, cols).
  template <typename Consume>
  void for_each_tile(int64_t i0, int64_t i1, at::Tensor& buf, Consume&& consume) const {
    const int64_t rows = i1 - i0;
    at::Tensor a = anchors.narrow(0, i0, rows);
    for (int64_t k0 = 0; k0 < K; k0 += kTileCols) {
      const int64_t cols = std::min(kTileCols, K - k0);
      at::Tensor s = buf.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(s, a, ct.narrow(0, k0, cols).t());
      if (self_offset >= 0) {
        T* sp = s.data_ptr<T>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t j = i0 + r + self_offset;
          if (j >= k0 && j < k0 + cols) sp[r * cols + (j - k0)] = -std::numeric_limits<T>::infinity();
        }
      }
      consume(s, k0, cols);
    }
  }

  int64_t num_blocks() const { return (A + kBlockRows - 1) / kBlockRows; }

  at::Tensor tile_buffer() const { return at::empty({kBlockRows * kTileCols}, anchors.options()); }

  // A statistics pass over all tiles, parallel over row blocks.
  void row_pass(T* acc) const {
    at::parallel_for(0, num_blocks(), 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = tile_buffer();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlockRows, i1 = std::min(A, i0 + kBlockRows);
        for_each_tile(i0, i1, buf, [&](at::Tensor& s, int64_t k0, int64_t cols) {
          kernels.stats(args(s.data_ptr<T>(), i1 - i0, cols, i0, k0, acc));
        });
      }
    });
  }

  // Returns (dA [A, D], dC [kc, D]) of the gradient parameters.
  std::tuple<at::Tensor, at::Tensor> grad_pass(int64_t kc) const {
    at::Tensor grad_a = at::zeros({A, D}, anchors.options());
    const int64_t nb = num_blocks();
    const int64_t groups = group_count(nb, kc * D * int64_t(sizeof(T)));
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
            kernels.grad(args(sp, i1 - i0, cols, i0, k0, nullptr));
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
    return {grad_a, sum_groups(grad_c)};
  }

  // the group buffers [groups, n...] added in group order, in parallel over elements
  static at::Tensor sum_groups(const at::Tensor& parts) {
    at::Tensor out = parts[0].clone();
    T* outp = out.data_ptr<T>();
    const T* all = parts.data_ptr<T>();
    const int64_t n = out.numel(), groups = parts.size(0);
    at::parallel_for(0, n, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t g = 1; g < groups; ++g)
        for (int64_t e = e0; e < e1; ++e) outp[e] += all[g * n + e];
    });
    return out;
  }
};

// ---- the symmetric case: the anchors are the contrast rows ------------------------------
// Then s is symmetric and G_KI = f(s_IK^T, statistics of rows K), so only tiles I <= K
// are computed: each off-diagonal tile feeds the row statistics of both its row block and
// (transposed) its column block, and in the gradient pass dz_I += H ct_K and
// dz_K += H^T z_I / t with H = G_IK + G_KI^T. Tiles are cut into a fixed number of
// contiguous groups, each with its own row accumulators and dz buffer, merged in group
// order (thread-count independent).

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
    for (int64_t i0 = 0; i0 < sw.A; i0 += kSquare)
      for (int64_t k0 = i0; k0 < sw.A; k0 += kSquare) tiles.emplace_back(i0, k0);
    groups = group_count(int64_t(tiles.size()), sw.A * sw.D * int64_t(sizeof(T)));
  }

  int64_t extent(int64_t start) const { return std::min(kSquare, sw.A - start); }

  // s[i0.., k0..] into buf (the diagonal -inf on diagonal tiles); returns the tile.
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

  // A statistics pass: `acc` holds the initial accumulators and receives the merged result.
  void row_pass(T* acc, const std::vector<int64_t>& rules) const {
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
        sw.kernels.stats(sw.args(s.data_ptr<T>(), rows, cols, i0, k0, pacc));
        if (i0 != k0) {
          transpose(s.data_ptr<T>(), rows, cols, buf_t.data_ptr<T>());
          sw.kernels.stats(sw.args(buf_t.data_ptr<T>(), cols, rows, k0, i0, pacc));
        }
      }
    });
    at::parallel_for(0, A, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* out = acc + i * kAccStride;
        for (int64_t c = 0; c < kAccStride; ++c) out[c] = partp[i * kAccStride + c];
        for (int64_t g = 1; g < groups; ++g) {
          const T* a = partp + (g * A + i) * kAccStride;
          for (size_t k = 0; k < rules.size(); ++k) {
            if (rules[k] == int64_t(Rule::lse))
              lse_merge(out[2 * k], out[2 * k + 1], a[2 * k], a[2 * k + 1]);
            else
              out[2 * k] += a[2 * k];
          }
        }
      }
    });
  }

  // The gradient pass: dz [A, D] of the gradient parameters.
  at::Tensor grad_pass() const {
    at::Tensor part = at::zeros({groups, sw.A, sw.D}, sw.anchors.options());
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
        sw.kernels.grad(sw.args(hp, rows, cols, i0, k0, nullptr));
        if (i0 != k0) {
          T* gt = buf_t.data_ptr<T>();
          sw.kernels.grad(sw.args(gt, cols, rows, k0, i0, nullptr));
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
    return Sweep<T>::sum_groups(part);
  }
};

template <typename T>
Sweep<T> make_sweep(const at::Tensor& anchors, const at::Tensor& contrast, const at::Tensor& acls,
                    const at::Tensor& ccls, int64_t self_offset, int64_t kernel_id, double temperature, double beta,
                    double gamma) {
  Sweep<T> sw;
  sw.A = anchors.size(0);
  sw.K = contrast.size(0);
  sw.D = anchors.size(1);
  sw.anchors = anchors;
  sw.ct = (contrast * (1.0 / temperature)).contiguous();
  sw.acls = acls.data_ptr<int32_t>();
  sw.ccls = ccls.data_ptr<int32_t>();
  sw.self_offset = self_offset;
  sw.kernel_id = int(kernel_id);
  sw.temperature = temperature;
  sw.beta = beta;
  sw.gamma = gamma;
  sw.kernels = pick_kernels<T>();
  return sw;
}

template <typename T>
at::Tensor stats_typed(const at::Tensor& anchors, const at::Tensor& contrast, const at::Tensor& acls,
                       const at::Tensor& ccls, int64_t self_offset, bool symmetric, int64_t kernel_id,
                       double temperature, double beta, double gamma, const std::vector<int64_t>& dense_rules,
                       const std::vector<int64_t>& positive_rules, const c10::optional<at::Tensor>& dense_final) {
  Sweep<T> sw = make_sweep<T>(anchors, contrast, acls, ccls, self_offset, kernel_id, temperature, beta, gamma);
  std::vector<int64_t> rules(dense_rules);
  rules.insert(rules.end(), positive_rules.begin(), positive_rules.end());
  sw.dense_base = dense_rules.empty() ? -1 : 0;
  sw.pos_base = positive_rules.empty() ? -1 : int64_t(dense_rules.size());
  at::Tensor final_dense;
  if (dense_final.has_value() && dense_final->defined()) {
    final_dense = dense_final->contiguous();
    sw.dense_final = final_dense.data_ptr<T>();
  }
  const int64_t S = int64_t(rules.size());
  at::Tensor acc = at::zeros({sw.A, kAccStride}, anchors.options());
  T* accp = acc.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < sw.A; ++i)
    for (int64_t k = 0; k < S; ++k)
      if (rules[k] == int64_t(Rule::lse)) accp[i * kAccStride + 2 * k] = ninf;
  if (sw.A > 0 && sw.K > 0) {
    if (symmetric)
      SymmetricSweep<T>(sw).row_pass(accp, rules);
    else
      sw.row_pass(accp);
  }
  at::Tensor out = at::empty({S, sw.A}, anchors.options());
  T* o = out.data_ptr<T>();
  for (int64_t k = 0; k < S; ++k)
    for (int64_t i = 0; i < sw.A; ++i) {
      const T* a = accp + i * kAccStride + 2 * k;
      o[k * sw.A + i] = rules[k] == int64_t(Rule::lse) ? (a[0] == ninf ? ninf : a[0] + std::log(a[1])) : a[0];
    }
  return out;
}

void check_common(const at::Tensor& anchors, const at::Tensor& contrast, const at::Tensor& acls,
                  const at::Tensor& ccls, int64_t kernel_id) {
  TORCH_CHECK(anchors.dim() == 2 && anchors.is_contiguous() && anchors.device().is_cpu(),
              "anchors must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(anchors.scalar_type() == at::kFloat || anchors.scalar_type() == at::kDouble,
              "anchors must be float32 or float64, got ", anchors.scalar_type());
  TORCH_CHECK(contrast.dim() == 2 && contrast.is_contiguous() && contrast.scalar_type() == anchors.scalar_type() &&
                  contrast.size(1) == anchors.size(1),
              "contrast must be a contiguous [K, D] tensor of the anchors' dtype");
  TORCH_CHECK(kernel_id >= 0 && kernel_id <= 2, "kernel_id must be 0, 1 or 2 (a loss definition's kernel_id)");
  TORCH_CHECK(acls.scalar_type() == at::kInt && acls.is_contiguous() && acls.numel() == anchors.size(0),
              "anchor_cls must be contiguous int32 with one entry per anchor");
  TORCH_CHECK(ccls.scalar_type() == at::kInt && ccls.is_contiguous() && ccls.numel() == contrast.size(0),
              "contrast_cls must be contiguous int32 with one entry per contrast row");
}

at::Tensor stats(const at::Tensor& anchors, const at::Tensor& contrast, const at::Tensor& acls,
                 const at::Tensor& ccls, int64_t self_offset, bool symmetric, int64_t kernel_id, double temperature,
                 double beta, double gamma, at::IntArrayRef dense_rules, at::IntArrayRef positive_rules,
                 const c10::optional<at::Tensor>& dense_final) {
  check_common(anchors, contrast, acls, ccls, kernel_id);
  TORCH_CHECK(int64_t(dense_rules.size() + positive_rules.size()) <= kMaxSlots, "too many statistic slots");
  TORCH_CHECK(!symmetric || (anchors.size(0) == contrast.size(0) && self_offset == 0),
              "symmetric needs the anchors to be the contrast rows");
  at::AutoDispatchBelowADInplaceOrView guard;  // the tile matmuls run below autograd
  std::vector<int64_t> dr(dense_rules.begin(), dense_rules.end()), pr(positive_rules.begin(), positive_rules.end());
  if (anchors.scalar_type() == at::kFloat)
    return stats_typed<float>(anchors, contrast, acls, ccls, self_offset, symmetric, kernel_id, temperature, beta,
                              gamma, dr, pr, dense_final);
  return stats_typed<double>(anchors, contrast, acls, ccls, self_offset, symmetric, kernel_id, temperature, beta,
                             gamma, dr, pr, dense_final);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> grads_typed(const at::Tensor& anchors, const at::Tensor& contrast,
                                               const at::Tensor& acls, const at::Tensor& ccls, int64_t self_offset,
                                               bool symmetric, int64_t kernel_id, double temperature, double beta,
                                               double gamma, const at::Tensor& params, int64_t contrast_rows) {
  Sweep<T> sw = make_sweep<T>(anchors, contrast, acls, ccls, self_offset, kernel_id, temperature, beta, gamma);
  at::Tensor prm = params.contiguous();
  sw.params = prm.data_ptr<T>();
  if (sw.A == 0 || sw.K == 0)
    return {at::zeros({sw.A, sw.D}, anchors.options()), at::zeros({contrast_rows, sw.D}, anchors.options())};
  if (symmetric) return {SymmetricSweep<T>(sw).grad_pass(), at::empty({0}, anchors.options())};
  return sw.grad_pass(contrast_rows);
}

std::tuple<at::Tensor, at::Tensor> grads(const at::Tensor& anchors, const at::Tensor& contrast,
                                         const at::Tensor& acls, const at::Tensor& ccls, int64_t self_offset,
                                         bool symmetric, int64_t kernel_id, double temperature, double beta,
                                         double gamma, const at::Tensor& params, int64_t contrast_rows) {
  check_common(anchors, contrast, acls, ccls, kernel_id);
  TORCH_CHECK(params.dim() == 2 && params.size(1) == anchors.size(0) && params.scalar_type() == anchors.scalar_type(),
              "params must be [P, A] in the anchors' dtype");
  TORCH_CHECK(contrast_rows >= 0 && contrast_rows <= contrast.size(0), "contrast_rows out of range");
  at::AutoDispatchBelowADInplaceOrView guard;
  if (anchors.scalar_type() == at::kFloat)
    return grads_typed<float>(anchors, contrast, acls, ccls, self_offset, symmetric, kernel_id, temperature, beta,
                              gamma, params, contrast_rows);
  return grads_typed<double>(anchors, contrast, acls, ccls, self_offset, symmetric, kernel_id, temperature, beta,
                             gamma, params, contrast_rows);
}

}  // namespace
}  // namespace fastcon

TORCH_LIBRARY(fastcon_native, m) {
  m.def(
      "stats(Tensor anchors, Tensor contrast, Tensor anchor_cls, Tensor contrast_cls, int self_offset, "
      "bool symmetric, int kernel_id, float temperature, float beta, float gamma, int[] dense_rules, "
      "int[] positive_rules, Tensor? dense_final) -> Tensor");
  m.def(
      "grads(Tensor anchors, Tensor contrast, Tensor anchor_cls, Tensor contrast_cls, int self_offset, "
      "bool symmetric, int kernel_id, float temperature, float beta, float gamma, Tensor params, "
      "int contrast_rows) -> (Tensor, Tensor)");
  m.impl("stats", c10::DispatchKey::CPU, &fastcon::stats);
  m.impl("grads", c10::DispatchKey::CPU, &fastcon::grads);
}
