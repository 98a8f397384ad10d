"""Writes the Megatron-Core-made indexed datasets that tests/test_data_megatron_indexed.py reads.

Run once, by hand (not by the test suite), with Megatron-Core 0.19.2 on the path:
    pip install --no-deps --ignore-requires-python --target /tmp/mcore megatron-core==0.19.2
    PYTHONPATH=/tmp/mcore python3 tests/data/megatron_indexed/make.py
It writes `uint16.{bin,idx}` (dtype code 8) and `int32.{bin,idx}` (code 4, the builder's
default) here with `IndexedDatasetBuilder`, the class `tools/preprocess_data.py` uses: DOCUMENTS
one document each, then (not in the `single_*` files) one document of two sequences via
`add_document`.
"""

import sys
import types
from pathlib import Path

import numpy
import torch

# `megatron.core`'s __init__ imports the whole library (triton, ...); the datasets package needs
# none of it, so its parent packages are stood in for by empty modules found on the same path
# and `megatron.core.utils` (parallel state, ...) by the one logging helper it needs.
for package in ("megatron", "megatron.core"):
    module = types.ModuleType(package)
    module.__path__ = [str(Path(p, *package.split("."))) for p in sys.path if p]
    sys.modules[package] = module
utils = types.ModuleType("megatron.core.utils")  # only `log_single_rank` is used from it
utils.log_single_rank = lambda logger, level, message: logger.log(level, message)
sys.modules["megatron.core.utils"] = utils
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

HERE = Path(__file__).parent
DOCUMENTS = [[5, 6, 7], [300, 1], [9, 9, 9, 9, 256], [42], [60000, 2, 3]]
LAST = [[11, 12], [13, 14, 15]]  # one document of two sequences

for name, dtype in (("uint16", numpy.uint16), ("int32", numpy.int32),
                    ("single_uint16", numpy.uint16), ("single_int32", numpy.int32)):
    builder = IndexedDatasetBuilder(str(HERE / f"{name}.bin"), dtype=dtype)
    for document in DOCUMENTS:
        builder.add_item(torch.tensor(document))
        builder.end_document()
    if not name.startswith("single"):
        builder.add_document(torch.tensor(LAST[0] + LAST[1]), [len(LAST[0]), len(LAST[1])])
    builder.finalize(str(HERE / f"{name}.idx"))
