#!/usr/bin/env bash
# The numerically sensitive tests (pytest -m numerics) again under the CPU kernels other machines run, and with
# 1 and 2 threads. ATen picks its vectorised kernels per CPU (ATEN_CPU_CAPABILITY caps them: `default` has no
# SIMD, `avx2` is what a CPU without AVX-512 runs); MKL picks its own (MKL_CBWR pins them: COMPATIBLE is its
# generic code, AVX2 its AVX2 code); the thread count splits the reductions. Each changes the order of the sums,
# so this is the nearest one machine gets to another CPU: the tolerances (tests/tolerances.py) must hold in all.
# Arguments go to pytest. Set NUMERICS_MATRIX to run other "capability:mkl:threads" cells.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
matrix=${NUMERICS_MATRIX:-"default:COMPATIBLE:1 default:COMPATIBLE:2 avx2:AVX2:1 avx2:AVX2:2"}
# idle OpenMP threads sleep instead of spinning: on a runner whose cores are busy, spinning threads made the
# 2-thread runs ten times slower (the split of the sums, and so the results, does not depend on it)
export OMP_WAIT_POLICY=PASSIVE
for cell in $matrix; do
  IFS=: read -r capability mkl threads <<< "$cell"
  export ATEN_CPU_CAPABILITY=$capability MKL_CBWR=$mkl INTACTKV_TEST_THREADS=$threads
  # inductor builds its C++ kernels with -march=native whatever ISA it vectorizes for: on an Intel Xeon with AVX-512
  # and AMX (torch 2.13, gcc 12) the compiled static-cache step's avx2 kernels built so decoded zeros or crashed;
  # built for x86-64-v3, an AVX2 CPU's own target, they pass
  if [ "$capability" = avx2 ]; then export TORCHINDUCTOR_CPP_MARCH=x86-64-v3; else unset TORCHINDUCTOR_CPP_MARCH; fi
  used=$(.venv/bin/python -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
  echo "numerics: ATen $used kernels (asked: $capability), MKL_CBWR=$mkl, $threads thread(s)"
  .venv/bin/python -m pytest -q -p no:cacheprovider -m numerics tests "$@"
done
