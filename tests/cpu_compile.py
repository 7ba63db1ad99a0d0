"""Whether torch's CPU compiler can build the kernels the compiled-path tests ask for on this machine."""

import pytest
from torch._inductor.cpu_vec_isa import pick_vec_isa

#: torch 2.13's inductor, left without a vector instruction set (a CPU without one, or ``ATEN_CPU_CAPABILITY=default``
#: as CI's numerics matrix sets it), still emits ``at::vec`` code for some kernels (an ``arange`` index, a vectorised
#: reduction accumulator), and the C++ build fails inside torch ("'at::vec' has not been declared"). The compiled
#: paths are tested wherever inductor vectorises: natively and in the matrix's avx2 cells.
needs_vectorizing_cpu_compiler = pytest.mark.skipif(
    not pick_vec_isa(),
    reason="torch 2.13's inductor without a CPU vector ISA emits C++ (at::vec) that does not compile",
)
