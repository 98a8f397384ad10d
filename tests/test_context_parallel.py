"""Context-parallel forward/backward on real gloo processes against the unsharded model."""

from __future__ import annotations

import pytest

from tests.cp_cases import check_context_parallel
from tests.dist_utils import run_distributed


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_equals_unsharded(cp):
    run_distributed(check_context_parallel, cp, None)


@pytest.mark.distributed
def test_packed_context_parallel_equals_unsharded():
    run_distributed(check_context_parallel, 2, [4, 8, 4])
