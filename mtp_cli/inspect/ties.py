"""Tie checks: the MTP depths use the main model's embedding and output weights.

A checkpoint should store each shared weight once. Some formats store a copy per depth anyway
(Hugging Face DeepSeek-V3 keeps `embed_tokens` and `shared_head.head` in every MTP layer): a copy
equal to the main weight passes with a note; a copy that differs fails, named with its maximum
absolute difference, because loading it would silently untie the heads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mtp_cli.inspect.checkpoint import Checkpoint
from mtp_cli.inspect.checks import Check, name_list
from mtp_cli.inspect.layout import Layout

_ROWS_PER_CHUNK = 4096  # compare huge vocabularies a slice at a time


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, a slice of rows at a time (no full-size temporary); NaN if any."""
    a2, b2 = a.reshape(-1, a.shape[-1]) if a.dim() else a.reshape(1, 1), \
        b.reshape(-1, b.shape[-1]) if b.dim() else b.reshape(1, 1)
    worst = 0.0
    for start in range(0, a2.shape[0], _ROWS_PER_CHUNK):
        stop = start + _ROWS_PER_CHUNK
        diff = (a2[start:stop].double() - b2[start:stop].double()).abs()
        if diff.numel():
            value = diff.max().item()
            if math.isnan(value):
                return value
            worst = max(worst, value)
    return worst


def copy_relations(checkpoint: Checkpoint, layout: Layout) -> list[tuple[str, str]]:
    """(copy, main) for every MTP-depth copy of a main weight stored in the checkpoint."""
    naming = layout.naming
    embedding_tail, output_tail = naming.copy_tails()
    main_output = naming.output_weight if naming.output_weight in checkpoint.tensors \
        else naming.embedding_weight
    relations = []
    for name in checkpoint.tensors:
        part = naming.part_of(name)
        if part.kind != "mtp":
            continue
        if part.rest == embedding_tail:
            relations.append((name, naming.embedding_weight))
        elif part.rest == output_tail:
            relations.append((name, main_output))
    return relations


def _compare(checkpoint: Checkpoint, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One result per (copy, main): equal, differs (with max abs diff), or not comparable."""
    tensors = checkpoint.tensors
    results: list[dict[str, Any]] = []
    readable = [(c, m) for c, m in pairs if m in tensors and tensors[c].shape == tensors[m].shape]
    values: Mapping[str, torch.Tensor] = {}
    if readable:
        values = checkpoint.read(sorted({n for pair in readable for n in pair}))
    for copy, main in pairs:
        result: dict[str, Any] = {"copy": copy, "main": main}
        if main not in tensors:
            result.update(status="main_missing")
        elif tensors[copy].shape != tensors[main].shape:
            result.update(status="shape_mismatch", copy_shape=list(tensors[copy].shape),
                          main_shape=list(tensors[main].shape))
        else:
            diff = max_abs_diff(values[copy], values[main])
            same_dtype = tensors[copy].dtype == tensors[main].dtype
            result.update(status="equal" if diff == 0 and same_dtype else "differs",
                          max_abs_diff=diff)
            if diff == 0 and not same_dtype:
                result["dtype"] = [tensors[copy].dtype, tensors[main].dtype]
        results.append(result)
    return results


def _describe(result: dict[str, Any]) -> str:
    copy, main, status = result["copy"], result["main"], result["status"]
    if status == "main_missing":
        return f"{copy} is stored but the main weight {main} is not"
    if status == "shape_mismatch":
        return f"{copy} has shape {tuple(result['copy_shape'])}, {main} has " \
               f"{tuple(result['main_shape'])}"
    if "dtype" in result:
        return f"{copy} is stored as {result['dtype'][0]}, {main} as {result['dtype'][1]}"
    return f"{copy} differs from {main}: max abs difference {result['max_abs_diff']:.6g}"


def check_mtp_ties(checkpoint: Checkpoint, layout: Layout) -> Check:
    """MTP embedding/output weights are the main model's: no copy, or copies equal to it."""
    naming = layout.naming
    relations = copy_relations(checkpoint, layout)
    main_output = naming.output_weight if naming.output_weight in checkpoint.tensors \
        else naming.embedding_weight
    if not relations:
        if not layout.depths and not layout.present_depths:
            return Check("mtp_ties", True, "no MTP depths: nothing to tie")
        uses = f"{naming.embedding_weight} (embedding and tied output)" \
            if main_output == naming.embedding_weight \
            else f"{naming.embedding_weight} and {main_output}"
        return Check("mtp_ties", True, f"no separate copies stored: every MTP depth uses {uses}")
    results = _compare(checkpoint, relations)
    bad = [r for r in results if r["status"] != "equal"]
    equal = [r["copy"] for r in results if r["status"] == "equal"]
    note = f"stored copies equal to the main weights: {name_list(equal)}" if equal else None
    if bad:
        return Check("mtp_ties", False, "; ".join(_describe(r) for r in bad), note=note,
                     tensors=[r["copy"] for r in bad], details=results)
    return Check("mtp_ties", True, "every stored MTP copy equals the main weight", note=note,
                 tensors=equal, details=results)


def check_output_tie(checkpoint: Checkpoint, layout: Layout) -> Check | None:
    """With a tied spec: the output layer is stored once, as the word embedding."""
    if not layout.tied_output or layout.depth_source != "spec":
        return None
    naming = layout.naming
    if naming.output_weight not in checkpoint.tensors:
        return Check("output_tie", True, f"output layer tied: stored once as "
                                         f"{naming.embedding_weight}")
    result = _compare(checkpoint, [(naming.output_weight, naming.embedding_weight)])[0]
    if result["status"] != "equal":
        return Check("output_tie", False, _describe(result), tensors=[naming.output_weight],
                     details=[result])
    return Check("output_tie", True, "output layer tied",
                 note=f"{naming.output_weight} is stored too, equal to {naming.embedding_weight}",
                 tensors=[naming.output_weight], details=[result])
