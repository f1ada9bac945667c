// The tile math of one instruction set. Compiled once per set with FASTCON_ISA naming it
// (and so the namespace of tile_math.h): -DFASTCON_ISA=base with no extra flags, and
// -DFASTCON_ISA=avx2 with -mavx2 -mfma, called only where the CPU has both.
#ifndef FASTCON_ISA
#error "compile with -DFASTCON_ISA=base or -DFASTCON_ISA=avx2"
#endif
#include "tile_math.h"

namespace fastcon {
namespace FASTCON_ISA {

template <typename T>
TileKernels<T> kernels() {
  return {stats_tile<T>, grad_tile<T>};
}

template TileKernels<float> kernels<float>();
template TileKernels<double> kernels<double>();

}  // namespace FASTCON_ISA
}  // namespace fastcon
