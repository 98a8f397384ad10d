"""An independent model of Megatron-Core's placement arithmetic, for the placement tests.

Written from Megatron-Core's algorithms as they are stated there, not from `mtp_cli`'s code: the
layout string is expanded with two regular-expression passes and indexed as a `[pp_rank][vp]`
table; offsets are sums over earlier (vp, pp) cells; the split without a layout uses the closed
formulas of `get_num_layers_to_build` / `get_transformer_layer_offset`. Deliberately no prefix
sums over a stage list, which is how `mtp_cli.plan.placement` computes them.
"""

from __future__ import annotations

import re


def expand(layout: str) -> list[str]:
    """Stages of a layout string (group repeats first, then single-character repeats)."""
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    if any(c not in "EtmL|" for c in text):
        raise ValueError(f"invalid character in {text!r}")
    return text.split("|")


def table(layout: str, pp: int) -> list[list[str]]:
    """`cells[pp_rank][vp]`, from the virtual-stage-major listing."""
    stages = expand(layout)
    assert len(stages) % pp == 0
    vpp = len(stages) // pp
    return [[stages[vp * pp + rank] for vp in range(vpp)] for rank in range(pp)]


def megatron_accepts(layout: str, pp: int, num_layers: int, depths: int) -> bool:
    """Megatron-Core's `validate_layer_layout` (plus the stage-count check) as a predicate."""
    try:
        stages = expand(layout)
    except ValueError:
        return False
    if len(stages) % pp:
        return False
    cells = table(layout, pp)
    vpp = len(stages) // pp
    flat = "".join(stages)
    if not flat or flat[0] != "E" or flat[-1] != "L":
        return False
    if flat.count("E") != 1 or flat.count("L") != 1 or flat.count("t") != num_layers:
        return False
    if flat.count("m") != depths:
        return False
    if "m" in flat and "t" in flat[flat.index("m"):]:
        return False
    for rank in range(pp):
        if any("m" in cells[rank][vp] for vp in range(vpp - 1)):
            return False
        if "m" in cells[rank][-1] and cells[rank][-1].count("m") != depths:
            return False
    return True


def layout_count(layout: str, pp: int, kind: str, pp_rank: int, vp: int) -> int:
    return table(layout, pp)[pp_rank][vp].count(kind)


def layout_offset(layout: str, pp: int, kind: str, pp_rank: int, vp: int) -> int:
    cells = table(layout, pp)
    total = 0
    for earlier_vp in range(vp + 1):
        for rank in range(pp if earlier_vp < vp else pp_rank):
            total += cells[rank][earlier_vp].count(kind)
    return total


def split_num_layers(n: int, pp: int, vpp: int | None, first: int | None, last: int | None,
                     emb: bool, loss: bool, pp_rank: int, vp: int | None) -> int:
    """`get_num_layers_to_build` without a layout (pipeline > 1 when vpp is set)."""
    if first is not None or last is not None:
        rest, ranks_left = n, pp
        if first is not None:
            rest, ranks_left = rest - first, ranks_left - 1
        if last is not None:
            rest, ranks_left = rest - last, ranks_left - 1
        per_rank = rest // ranks_left if ranks_left > 0 else 0
        if pp_rank == 0 and first is not None:
            per_rank = first
        if pp_rank == pp - 1 and last is not None:
            per_rank = last
    else:
        per_rank = (n + emb + loss) // pp
    count = per_rank // vpp if vpp is not None and pp > 1 else per_rank
    if emb and pp_rank == 0 and (vpp is None or vp == 0):
        count -= 1
    if loss and pp_rank == pp - 1 and (vpp is None or vp == vpp - 1):
        count -= 1
    return count


def split_offset(n: int, pp: int, vpp: int | None, first: int | None, last: int | None,
                 emb: bool, loss: bool, pp_rank: int, vp: int | None) -> int:
    """`get_transformer_layer_offset` without a layout."""
    if pp == 1:
        return 0
    if first is not None or last is not None:
        middle_stages = pp - (first is not None) - (last is not None)
        f, la = first or 0, last or 0
        middle = n - f - la
        middle_rank = pp_rank if first is None else pp_rank - 1
        if vpp is not None:
            chunk_first, chunk_last, chunk_middle = f // vpp, la // vpp, middle // vpp
            total_chunk = chunk_first + chunk_middle + chunk_last
            if pp_rank == 0:
                return vp * total_chunk
            per_middle = chunk_middle // middle_stages if middle_stages else 0
            return vp * total_chunk + chunk_first + middle_rank * per_middle
        per_rank = middle // middle_stages if middle_stages > 0 else 0
        return 0 if pp_rank == 0 else middle_rank * per_rank + f
    total = n + emb + loss
    per_rank = total // pp
    first_stage = pp_rank == 0 and (vpp is None or vp == 0)
    if vpp is not None:
        offset = vp * (total // vpp) + pp_rank * (per_rank // vpp)
    else:
        offset = pp_rank * per_rank
    return offset - 1 if emb and not first_stage else offset


def mtp_count_without_layout(depths: int, pp: int, vpp: int | None, pp_rank: int,
                             vp: int | None) -> int:
    last = pp_rank == pp - 1 and (vpp is None or vp == vpp - 1)
    return depths if last else 0
