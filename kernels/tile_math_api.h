// The interface between the driver (contrastive.cpp) and the per-tile row math
// (tile_math.h), which is compiled once per instruction set and picked at run time.
#pragma once

#include <cstdint>

namespace fastcon {

enum class Kind : int { supcon = 0, schane = 1, focal = 2 };

// Row accumulators of the streaming statistics (pass 1 and focal's pass 2).
constexpr int64_t kAccStride = 8;
// Final per-row statistics the gradient tile needs: [c0, c1, c2, coef].
constexpr int64_t kStatStride = 4;

template <typename T>
struct TileArgs {
  T* s;             // the tile, row-major, `rows x cols`, leading dimension `ld`
  int64_t ld, rows, cols;
  int64_t i0, k0;   // first anchor row and first contrast column of the tile
  const int32_t* cls;   // dense class id of every contrast row (anchors are rows 0..A-1)
  T* acc;           // [A, kAccStride] row accumulators
  const T* row_stats;   // [A, kStatStride] final row statistics
  const T* row_mult;    // [A] coef_i * w_i, the factor of row i's gradient
  Kind kind;
  double beta, gamma;
};

template <typename T>
struct TileKernels {
  void (*stats)(const TileArgs<T>&);  // pass 1: online LSEs and positive sums
  void (*focal)(const TileArgs<T>&);  // focal pass 2: sum_P f(L), sum_P f'(L)
  void (*grad)(const TileArgs<T>&);   // G = row_mult * dl/ds, over the tile
};

namespace base {
TileKernels<float> kernels_f32();
TileKernels<double> kernels_f64();
}  // namespace base
namespace avx2 {
TileKernels<float> kernels_f32();
TileKernels<double> kernels_f64();
}  // namespace avx2

}  // namespace fastcon
