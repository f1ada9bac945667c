// The tile math built for the avx2 instruction set (AVX2 + FMA; only called where the CPU has them).
#define FASTCON_ISA avx2
#include "tile_math.h"

namespace fastcon {
namespace avx2 {

TileKernels<float> kernels_f32() { return {stats_tile<float>, grad_tile<float>}; }
TileKernels<double> kernels_f64() { return {stats_tile<double>, grad_tile<double>}; }

}  // namespace avx2
}  // namespace fastcon
