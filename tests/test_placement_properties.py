"""Property tests: random layouts and splits against an independent model of Megatron-Core.

Valid layouts are generated from a random placement and written with random repeats, groups and
commas; every stage is then compared with `tests.placement_reference` (regex expansion, [pp][vp]
table, Megatron's offset loops and closed formulas). Random, mostly invalid, layouts must be
accepted exactly when Megatron-Core accepts them (but for the two documented stricter cases).
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mtp_cli.errors import SpecError
from mtp_cli.mtp import get_mtp_layer_offset, get_mtp_num_layers_to_build
from mtp_cli.plan.layout import parse_layout
from mtp_cli.plan.placement import (
    build_stage_plan,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)
from tests import placement_reference as ref
from tests.placement_helpers import make_spec

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def write_compressed(stages: list[str], draw) -> str:
    """Stages -> a layout string using x*n runs, (...)*n groups of equal stages, and commas."""
    pieces, i = [], 0
    while i < len(stages):
        run = 1
        while i + run < len(stages) and stages[i + run] == stages[i]:
            run += 1
        last = i + run == len(stages)
        body = "".join(_runs(stages[i], draw))
        if run > 1 and stages[i] and draw(st.booleans()):
            pieces.append(f"({body}|)*{run}" if not last else f"({body}|)*{run - 1}{body}")
        else:
            pieces.append("|".join([body] * run) + ("" if last else "|"))
        i += run
    text = "".join(pieces)
    if draw(st.booleans()):  # commas are cosmetic, but never inside a count
        cut = draw(st.integers(0, len(text)))
        if not (text[cut - 1:cut].isdigit() or text[cut:cut + 1].isdigit()):
            text = text[:cut] + "," + text[cut:]
    return text


def _runs(stage: str, draw) -> list[str]:
    out = []
    for kind, group in itertools.groupby(stage):
        n = len(list(group))
        out.append(f"{kind}*{n}" if n > 1 and draw(st.booleans()) else kind * n)
    return out


@st.composite
def valid_layouts(draw):
    """(num_layers, D, pipeline, stages) obeying every rule; MTP anywhere the rules allow."""
    pp = draw(st.integers(1, 4))
    vpp = draw(st.integers(1, 3))
    n_stages = pp * vpp
    depths = draw(st.integers(0, 3))
    num_layers = draw(st.integers(1, 12))
    # the MTP stage: the last virtual stage of some rank (without MTP: t may fill every stage)
    mtp_stage = (vpp - 1) * pp + draw(st.integers(0, pp - 1)) if depths else n_stages - 1
    cuts = sorted(draw(st.lists(st.integers(0, num_layers), min_size=mtp_stage,
                                max_size=mtp_stage)))
    bounds = [0, *cuts, num_layers]
    stages = ["t" * (b - a) for a, b in itertools.pairwise(bounds)] + [""] * (n_stages - 1 - mtp_stage)
    stages[0] = "E" + stages[0]
    stages[mtp_stage] += "m" * depths
    stages[-1] += "L"
    return num_layers, depths, pp, stages


@SETTINGS
@given(valid_layouts(), st.data())
def test_valid_layouts_match_megatron_everywhere(case, data) -> None:
    num_layers, depths, pp, stages = case
    layout = write_compressed(stages, data.draw)
    assert ref.expand(layout) == stages
    assert ref.megatron_accepts(layout, pp, num_layers, depths)
    spec = make_spec(num_layers, depths, pp, layout)
    vpp = len(stages) // pp
    plan = build_stage_plan(spec)
    placed = [n for entry in plan.stages for n in entry.decoder_layers]
    assert placed == list(range(1, num_layers + 1))  # every layer once, in order
    for vp, rank in itertools.product(range(vpp), range(pp)):
        vp_arg = vp if vpp > 1 else None
        entry = plan.stage(rank, vp_arg)
        assert get_mtp_num_layers_to_build(spec, vp_arg, rank) == ref.layout_count(
            layout, pp, "m", rank, vp) == entry.mtp_layers
        mtp_offset = ref.layout_offset(layout, pp, "m", rank, vp) if pp > 1 else 0
        assert get_mtp_layer_offset(spec, vp_arg, rank) == mtp_offset == entry.mtp_layer_offset
        assert get_num_layers_to_build(spec, vp_arg, rank) == ref.layout_count(
            layout, pp, "t", rank, vp)
        # Megatron-Core returns 0 for every stage when pipeline == 1 (even with virtual
        # stages); the plan numbers the layers of each virtual stage globally instead.
        assert get_transformer_layer_offset(spec, vp_arg, rank) == ref.layout_offset(
            layout, pp, "t", rank, vp)
        if entry.mtp_layers:
            assert entry.mtp_layers == depths and vp == vpp - 1
            assert entry.standalone_mtp == (rank != pp - 1)
        assert entry.embedding == (vp == 0 and rank == 0)
        assert entry.loss == (vp == vpp - 1 and rank == pp - 1)
    assert sum(e.mtp_layers for e in plan.stages) == depths


@st.composite
def random_layouts(draw):
    stages = draw(st.lists(st.text(alphabet="EtmL", max_size=4), min_size=1, max_size=6))
    return draw(st.integers(0, 4)), draw(st.integers(0, 2)), draw(st.integers(1, 3)), stages


@SETTINGS
@given(random_layouts())
def test_acceptance_matches_megatron(case) -> None:
    num_layers, depths, pp, stages = case
    assume(num_layers >= 1)
    layout = "|".join(stages)
    megatron = ref.megatron_accepts(layout, pp, num_layers, depths)
    try:
        make_spec(num_layers, depths, pp, layout)
        accepted = True
    except SpecError as error:
        accepted = False
        assert "[rule: " in error.render()
    stricter = not stages[0] or not stages[-1]  # E must open stage 0, L close the last stage
    if stricter and len(stages) % pp == 0:
        assert not accepted
    else:
        assert accepted == megatron


@SETTINGS
@given(st.lists(st.text(alphabet="EtmL", max_size=5), min_size=1, max_size=8), st.data())
def test_parser_expands_like_megatrons_regexes(stages, data) -> None:
    assume(stages != [""])  # the empty layout is an error here (Megatron fails later on it)
    layout = write_compressed(stages, data.draw)
    assert ref.expand(layout) == stages
    assert ["".join(t.kind for t in s) for s in parse_layout(layout).stages] == stages


@st.composite
def splits(draw):
    pp = draw(st.integers(1, 4))
    vpp = draw(st.sampled_from([None, 2, 3])) if pp > 1 else None
    num_layers = draw(st.integers(1, 24))
    mode = draw(st.sampled_from(["even", "uneven", "account"]))
    first = last = None
    emb = loss = False
    if mode == "uneven" and pp > 1:
        first = draw(st.sampled_from([None, 1, 2, 3, 4, 6]))
        last = draw(st.sampled_from([None, 1, 2, 3, 4, 6]))
    elif mode == "account":
        emb, loss = draw(st.booleans()), draw(st.booleans())
    return num_layers, draw(st.integers(0, 2)), pp, vpp, first, last, emb, loss


def megatron_split_valid(n, pp, vpp, first, last, emb, loss) -> bool:
    """TransformerConfig's checks, with the totals required to add up (as we require)."""
    v = vpp or 1
    if first is not None or last is not None:
        rest = n - (first or 0) - (last or 0)
        middle = pp - (first is not None) - (last is not None)
        if rest < 0 or (middle == 0 and rest) or (middle and rest % middle):
            return False
        return all(x is None or x % v == 0 for x in (first, last)) and (
            not middle or (rest // middle) % v == 0)
    total = n + emb + loss
    return total % pp == 0 and (total // pp) % v == 0


@SETTINGS
@given(splits())
def test_split_without_layout_matches_megatron(case) -> None:
    n, depths, pp, vpp, first, last, emb, loss = case
    parallel = {"virtual_pipeline": vpp, "num_layers_in_first_pipeline_stage": first,
                "num_layers_in_last_pipeline_stage": last,
                "account_for_embedding_in_pipeline_split": emb,
                "account_for_loss_in_pipeline_split": loss}
    valid = megatron_split_valid(n, pp, vpp, first, last, emb, loss)
    try:
        spec = make_spec(n, depths, pp, **parallel)
    except SpecError:
        assert not valid
        return
    assert valid
    placed = []
    for vp, rank in itertools.product(range(vpp or 1), range(pp)):
        args = (n, pp, vpp, first, last, emb, loss, rank, vp if vpp else None)
        count = get_num_layers_to_build(spec, vp if vpp else None, rank)
        offset = get_transformer_layer_offset(spec, vp if vpp else None, rank)
        assert count == ref.split_num_layers(*args)
        assert offset == ref.split_offset(*args)
        placed += range(offset + 1, offset + count + 1)
        assert get_mtp_num_layers_to_build(spec, vp if vpp else None, rank) == \
            ref.mtp_count_without_layout(depths, pp, vpp, rank, vp)
        assert get_mtp_layer_offset(spec, vp if vpp else None, rank) == 0
    assert placed == list(range(1, n + 1))
