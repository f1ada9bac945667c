// The tile math built for the base instruction set.
#define FASTCON_ISA base
#include "tile_math.h"

namespace fastcon {
namespace base {

TileKernels<float> kernels_f32() { return {stats_tile<float>, grad_tile<float>}; }
TileKernels<double> kernels_f64() { return {stats_tile<double>, grad_tile<double>}; }

}  // namespace base
}  // namespace fastcon
