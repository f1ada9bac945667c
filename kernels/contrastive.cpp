// Fused CPU kernel of the supervised contrastive losses (SupCon, SCHaNe, focal SupCon).
//
// Anchors a_i = z[i] (i < A) against contrast rows c_j = cat(z, ref)[j] (j < K);
// s_ij = a_i . c_j / t, and anchor i is contrast column i ("self").
//
// Work is split into row blocks of kBlockRows anchors and, within a block, tiles
// of kTileCols contrast columns. A tile of s (kBlockRows x kTileCols, 512 KiB in
// float32) is computed by one ATen matmul and consumed while it is in cache:
//   pass 1  s -> online row statistics (masked log-sum-exps, positive sums);
//           focal SupCon needs a second such pass for sum_P f'(log p) before its
//           gradient is known;
//   pass G  s recomputed -> G = dL/ds in place -> dA_block += G Ct_tile and
//           dC_tile += G^T A_block / t.
// So a forward+backward costs four matmul passes (s, s again, G C, G^T A) and
// never holds more than one tile of similarities per thread.
//
// Threads take whole row blocks (at::parallel_for). Row statistics and dA rows
// belong to one block, so they do not depend on the thread count. dC sums over
// row blocks: blocks are cut into a fixed number of contiguous groups (a function
// of the problem size only), each group accumulates its own dC buffer in block
// order, and the buffers are added in group order. The result is bitwise the same
// for any thread count.
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
    sw.row_pass(sw.kernels.stats, accp, nullptr);
    row_loss = at::empty({sw.A}, opts);
    valid = at::empty({sw.A}, opts.dtype(at::kBool));
    stats = at::zeros({sw.A, kStatStride}, opts);
    finalize_rows(sw, accp, n_same.data(), row_loss.data_ptr<T>(), valid.data_ptr<bool>(), stats.data_ptr<T>());
    if (kind == Kind::focal) {
      sw.row_pass(sw.kernels.focal, accp, stats.data_ptr<T>());
      finalize_focal(sw, accp, row_loss.data_ptr<T>(), valid.data_ptr<bool>(), stats.data_ptr<T>());
    }
  }

  at::Tensor grad_z = at::empty({0}, opts), grad_ref = at::empty({0}, opts);
  if (want_grad) {
    at::Tensor mult = stats.select(1, 3).contiguous();
    if (row_weight.has_value() && row_weight->defined()) mult = mult * *row_weight;
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
