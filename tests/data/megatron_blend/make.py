"""Writes reference.json: Megatron-Core 0.19.2's own `build_blending_indices` (helpers.cpp,
compiled) on a few weight sets, the reference of tests/test_data_blend.py.

Run once, by hand (the test suite needs neither a compiler nor pybind11):
    pip download --no-deps --ignore-requires-python megatron-core==0.19.2 -d /tmp/ref
    unzip /tmp/ref/megatron_core-0.19.2-*.whl 'megatron/core/datasets/helpers.cpp' -d /tmp/mc
    pip install --target /tmp/pyb pybind11
    g++ -O2 -shared -fPIC -std=c++17 $(PYTHONPATH=/tmp/pyb python3 -m pybind11 --includes) \\
        /tmp/mc/megatron/core/datasets/helpers.cpp -o /tmp/mc/helpers_cpp$(python3-config --extension-suffix)
    PYTHONPATH=/tmp/mc python3 tests/data/megatron_blend/make.py
Weights are normalised first, as Megatron's `BlendedDataset` receives them.
"""

import json
from pathlib import Path

import helpers_cpp
import numpy

CASES = [[0.3, 0.7], [1, 1], [0.5, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.999, 0.001],
         [1, 2, 3, 5, 7, 11, 13]]
SIZE = 2000

out = []
for weights in CASES:
    normalised = numpy.array(weights, dtype=numpy.float64) / sum(weights)
    dataset_index = numpy.zeros(SIZE, dtype=numpy.int16)
    sample_index = numpy.zeros(SIZE, dtype=numpy.int64)
    helpers_cpp.build_blending_indices(dataset_index, sample_index, normalised, len(weights),
                                       SIZE, False)
    out.append({"weights": weights, "dataset_index": dataset_index.tolist(),
                "sample_index": sample_index.tolist()})
Path(__file__).with_name("reference.json").write_text(json.dumps(out, separators=(",", ":")))
