"""Static report of the shipped Triton kernels (no GPU needed): registers, spills, tensor-core
instructions, pipelining and instructions per similarity element, compiled for sm_90 and sm_80.

    python benchmarks/triton_static.py [--quick]

writes ``benchmarks/results/triton_static.csv`` and prints the summary; see
:mod:`fastcon.bench.triton_static` and ``benchmarks/README.md`` for the criteria and the model.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastcon.bench.triton_static import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
