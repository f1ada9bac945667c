// The interface between the driver (contrastive.cpp) and the per-tile row math
// (tile_math.h), which is compiled once per instruction set and picked at run time.
//
// The loss ids, the statistic slots and the gradient parameters follow the Python loss
// definitions (fastcon/losses/*.py): `kernel_id`, `dense_slots` + `positive_slots`
// (statistics, in that order) and `param_slots`. Python passes each slot's merge rule.
#pragma once

#include <cstdint>

namespace fastcon {

// Statistic slots of one call: the dense part's slots (when computed), then the positive
// part's. Each slot has two accumulators: (running max, sum of exp) for a log-sum-exp,
// (sum, unused) for a sum.
constexpr int64_t kMaxSlots = 4;
constexpr int64_t kAccStride = 2 * kMaxSlots;
enum class Rule : int { lse = 0, sum = 1 };

template <typename T>
struct TileArgs {
  T* s;                    // the tile, row-major, `rows x cols`, leading dimension `ld`
  int64_t ld, rows, cols;
  int64_t i0, k0;          // first anchor row and first contrast column of the tile
  const int32_t* anchor_cls;    // class id of every anchor row
  const int32_t* contrast_cls;  // class id of every contrast row
  T* acc;                  // [A, kAccStride] row accumulators
  int64_t dense_base;      // first slot of the dense part in acc (-1: not computed)
  int64_t pos_base;        // first slot of the positive part in acc (-1: not computed)
  const T* dense_final;    // [dense slots, A] finished dense statistics (a positive-only call)
  const T* params;         // [param slots, A] gradient parameters
  int64_t A;               // anchors: the stride of dense_final and params
  int kernel_id;
  double beta, gamma;
};

template <typename T>
struct TileKernels {
  void (*stats)(const TileArgs<T>&);  // statistics of the requested parts
  void (*grad)(const TileArgs<T>&);   // G = w_i dl_i/ds_ij over the tile, in place
};

// One per instruction set (tile_math_isa.cpp), for T = float and double.
namespace base {
template <typename T>
TileKernels<T> kernels();
}  // namespace base
namespace avx2 {
template <typename T>
TileKernels<T> kernels();
}  // namespace avx2

}  // namespace fastcon
