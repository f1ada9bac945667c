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

  // scratch sized to the problem: small problems allocate (and touch) small buffers
  int64_t tile_rows() const { return std::min(kBlockRows, A); }
  int64_t tile_cols() const { return std::min(kTileCols, K); }
  at::Tensor tile_buffer() const { return at::empty({tile_rows() * tile_cols()}, anchors.options()); }

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
      at::Tensor prod_a = at::empty({tile_rows(), D}, anchors.options());
      at::Tensor prod_c = at::empty({tile_cols(), D}, anchors.options());
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
      const int64_t side = std::min(kSquare, sw.A);  // scratch sized to the problem
      at::Tensor buf = at::empty({side * side}, sw.anchors.options());
      at::Tensor buf_t = at::empty({side * side}, sw.anchors.options());
      for (int64_t g = g0; g < g1; ++g) fn(g, g * nt / groups, (g + 1) * nt / groups, buf, buf_t);
    });
  }

  // A statistics pass: `acc` holds the initial accumulators and receives the merged result.
  void row_pass(T* acc, const std::vector<int64_t>& rules) const {
    const int64_t A = sw.A;
    at::Tensor part;  // one group (small problems): its accumulators are acc itself
    T* partp = acc;
    if (groups > 1) {
      at::Tensor init = at::from_blob(acc, {A, kAccStride}, sw.anchors.options());
      part = init.unsqueeze(0).repeat({groups, 1, 1});
      partp = part.data_ptr<T>();
    }
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
    if (groups == 1) return;
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
      at::Tensor prod = at::empty({std::min(kSquare, sw.A), sw.D}, sw.anchors.options());
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


// ---- the O(N) steps around the sweeps, so that a small problem costs few dispatches -----

// Row r of the batch (view-major: r = v*B + b of a [B, V, D] tensor, or row r of [N, D]).
template <typename S>
const S* batch_row(const at::Tensor& features, int64_t r, int64_t b) {
  const S* base = features.data_ptr<S>();
  if (features.dim() == 3) return base + (r % b) * features.stride(0) + (r / b) * features.stride(1);
  return base + r * features.stride(0);
}

template <typename T, typename S>
void copy_rows(const at::Tensor& src, int64_t first, int64_t count, bool batch, int64_t b, T* x, T* inv,
               bool normalize) {
  const int64_t D = src.size(-1), sd = src.stride(-1);
  at::parallel_for(0, count, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const S* row = batch ? batch_row<S>(src, r, b) : src.data_ptr<S>() + r * src.stride(0);
      T* out = x + (first + r) * D;
      T ss = 0;
      for (int64_t d = 0; d < D; ++d) {
        out[d] = T(row[d * sd]);
        ss += out[d] * out[d];
      }
      if (normalize) {
        const T scale = T(1) / std::max(std::sqrt(ss), T(1e-12));
        inv[first + r] = scale;
        for (int64_t d = 0; d < D; ++d) out[d] *= scale;
      }
    }
  });
}

template <typename T>
void fill_rows(const at::Tensor& features, const c10::optional<at::Tensor>& ref, T* x, T* inv, bool normalize) {
  const int64_t b = features.size(0);
  const int64_t m = features.dim() == 3 ? b * features.size(1) : b;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "fastcon_rows", [&] {
    copy_rows<T, scalar_t>(features, 0, m, true, b, x, inv, normalize);
  });
  if (ref.has_value() && ref->defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref->scalar_type(), "fastcon_ref_rows", [&] {
      copy_rows<T, scalar_t>(*ref, m, ref->size(0), false, 1, x, inv, normalize);
    });
  }
}

// Normalised rows in the compute dtype (contiguous [K, D]), 1/|row|, int32 class ids (ranks
// of the labels; the `unlabelled` last rows share a class no label has) and, for the first
// `num_anchors` rows, |P| and |N|: the other rows of their class and the rows of other classes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prepare(const at::Tensor& features,
                                                                     const c10::optional<at::Tensor>& ref,
                                                                     const at::Tensor& labels, int64_t unlabelled,
                                                                     int64_t num_anchors, bool normalize) {
  TORCH_CHECK(features.device().is_cpu() && (features.dim() == 2 || features.dim() == 3),
              "features must be a [B, V, D] or [N, D] CPU tensor");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1, "labels must be 1-D int64");
  const at::ScalarType dtype = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t D = features.size(-1);
  const int64_t m = features.dim() == 3 ? features.size(0) * features.size(1) : features.size(0);
  const int64_t R = ref.has_value() && ref->defined() ? ref->size(0) : 0;
  const int64_t K = m + R;
  TORCH_CHECK(labels.numel() + unlabelled == K, "labels and unlabelled rows must cover every contrast row");
  TORCH_CHECK(num_anchors >= 0 && num_anchors <= m, "num_anchors out of range");
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto opts = features.options().dtype(dtype);
  at::Tensor x = at::empty({K, D}, opts);
  at::Tensor inv = at::empty({normalize ? K : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastcon_prepare", [&] {
    fill_rows<scalar_t>(features, ref, x.data_ptr<scalar_t>(), normalize ? inv.data_ptr<scalar_t>() : nullptr,
                        normalize);
  });
  const int64_t L = labels.numel();
  at::Tensor y = labels.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  std::vector<int64_t> order(L);
  for (int64_t i = 0; i < L; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return yp[a] < yp[b]; });
  at::Tensor ranks = at::empty({K}, features.options().dtype(at::kInt));
  int32_t* rp = ranks.data_ptr<int32_t>();
  std::vector<int64_t> sizes;  // per class
  int32_t rank = -1;
  for (int64_t i = 0; i < L; ++i) {
    if (i == 0 || yp[order[i]] != yp[order[i - 1]]) {
      ++rank;
      sizes.push_back(0);
    }
    rp[order[i]] = rank;
    ++sizes[rank];
  }
  for (int64_t i = L; i < K; ++i) rp[i] = int32_t(L);
  at::Tensor n_pos = at::empty({num_anchors}, opts);
  at::Tensor n_neg = at::empty({num_anchors}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastcon_counts", [&] {
    scalar_t* pp = n_pos.data_ptr<scalar_t>();
    scalar_t* nn = n_neg.data_ptr<scalar_t>();
    for (int64_t i = 0; i < num_anchors; ++i) {
      const int64_t same = i < L ? sizes[rp[i]] : unlabelled;
      pp[i] = scalar_t(same - 1);
      nn[i] = scalar_t(K - same);
    }
  });
  return {x, inv, ranks, n_pos, n_neg};
}

// The gradient w.r.t. the user's rows from `grad` [n, D] w.r.t. the normalised rows `x`:
// (g - (g . x) x) / |row| (without normalisation: g), times `scale`; the batch rows' part in
// the features' shape and dtype, the ref rows' part (when grad has them and need_ref) in ref's.
std::tuple<at::Tensor, at::Tensor> finish(const at::Tensor& grad, const at::Tensor& x,
                                          const c10::optional<at::Tensor>& inv_norm, const at::Tensor& features,
                                          const c10::optional<at::Tensor>& ref, double scale, bool need_ref) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && x.is_contiguous() && grad.scalar_type() == x.scalar_type(),
              "grad and x must be contiguous and of one dtype");
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t n = grad.size(0), D = grad.size(1);
  const int64_t b = features.size(0);
  const int64_t m = features.dim() == 3 ? b * features.size(1) : b;
  const bool has_inv = inv_norm.has_value() && inv_norm->defined() && inv_norm->numel() > 0;
  const bool with_ref = need_ref && ref.has_value() && ref->defined() && n > m;
  at::Tensor grad_f = at::empty(features.sizes(), features.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_r = with_ref ? at::empty({n - m, D}, ref->options().memory_format(at::MemoryFormat::Contiguous))
                               : at::empty({0}, features.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastcon_finish", [&] {
    using T = scalar_t;
    const T* g = grad.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* inv = has_inv ? inv_norm->data_ptr<T>() : nullptr;
    const T s = T(scale);
    auto store = [&](at::Tensor& out, int64_t first, int64_t count, bool batch) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastcon_store", [&] {
        scalar_t* o = out.data_ptr<scalar_t>();
        at::parallel_for(0, count, 64, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t i = first + r;
            const T* gi = g + i * D;
            const T* xi = xp + i * D;
            scalar_t* dst = batch ? (features.dim() == 3 ? o + (r % b) * out.stride(0) + (r / b) * out.stride(1)
                                                         : o + r * out.stride(0))
                                  : o + r * D;
            if (inv) {
              T radial = 0;
              for (int64_t d = 0; d < D; ++d) radial += gi[d] * xi[d];
              const T f = inv[i] * s;
              for (int64_t d = 0; d < D; ++d) dst[d] = scalar_t((gi[d] - xi[d] * radial) * f);
            } else {
              for (int64_t d = 0; d < D; ++d) dst[d] = scalar_t(gi[d] * s);
            }
          }
        });
      });
    };
    store(grad_f, 0, std::min(n, m), true);
    if (with_ref) store(grad_r, m, n - m, false);
  });
  return {grad_f, grad_r};
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
  m.def(
      "prepare(Tensor features, Tensor? ref, Tensor labels, int unlabelled, int num_anchors, bool normalize) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "finish(Tensor grad, Tensor x, Tensor? inv_norm, Tensor features, Tensor? ref, float scale, "
      "bool need_ref) -> (Tensor, Tensor)");
  m.impl("stats", c10::DispatchKey::CPU, &fastcon::stats);
  m.impl("prepare", c10::DispatchKey::CPU, &fastcon::prepare);
  m.impl("finish", c10::DispatchKey::CPU, &fastcon::finish);
  m.impl("grads", c10::DispatchKey::CPU, &fastcon::grads);
}
