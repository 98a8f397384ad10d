"""The workers' OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE`), set before torch
loads OpenMP.

GNU OpenMP (libgomp, which torch's CPU kernels and MKL use) spins a thread that waits at a
barrier for about 300,000 iterations (a few milliseconds) before it sleeps, but only 100 once it
manages more threads than there are CPUs. A single-process run starts in the first mode; at its
first checkpoint gloo's worker threads run a parallel copy inside DCP's `gather`, libgomp gives
them threads of their own, and from then on it spins 100 times. On a loaded machine the first
mode spends the step waiting (measured on 2 busy cores: 10-16 s per step before the checkpoint,
0.02-0.4 s after it). Passive waiting is the same before and after, and what the run did after
its first checkpoint anyway.

libgomp reads the variable once, when torch is imported, and a forked worker inherits what the
launcher read: so `mtp train` sets it before anything imports torch. A user's own
`OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is left as it is.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"


def prefer_passive_openmp() -> None:
    """`OMP_WAIT_POLICY=PASSIVE` for this process and its workers, unless the user set the
    wait policy or libgomp's spin count. Call it before the first `import torch`."""
    if WAIT_POLICY not in os.environ and SPIN_COUNT not in os.environ:
        os.environ[WAIT_POLICY] = "PASSIVE"
