// The tile math of one instruction set. Compiled once per set with FASTCON_ISA naming it
// (and so the namespace of tile_math.h): -DFASTCON_ISA=base with no extra flags, and
// -DFASTCON_ISA=avx2 with -mavx2 -mfma, called only where the CPU has both.
#ifndef FASTCON_ISA
#error "compile with -DFASTCON_ISA=base or -DFASTCON_ISA=avx2"
#endif
#include "tile_math.h"

namespace fastcon {
namespace FASTCON_ISA {

TileKernels<float> kernels_f32() { return {stats_tile<float>, grad_tile<float>}; }
TileKernels<double> kernels_f64() { return {stats_tile<double>, grad_tile<double>}; }

}  // namespace FASTCON_ISA
}  // namespace fastcon
