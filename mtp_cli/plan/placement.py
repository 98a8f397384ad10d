"""Pipeline placement: which (pp_rank, vp_stage) holds which decoder and MTP layers.

Stages are counted in layer order, `stage = vp_stage * pipeline + pp_rank`, the order Megatron's
layout strings list them. A placement comes from one of:

- `parallel.layout` (see `mtp_cli.plan.layout`), checked against Megatron-Core's rules: one `E`,
  first; one `L`, last; `t` count = model.num_layers; `m` count = mtp.num_layers (D); no `t`
  after the first `m`; all `m` in one stage, the last virtual stage of its pipeline rank. The
  number of stages must be a multiple of pipeline; virtual_pipeline = stages / pipeline.
- no layout: decoder layers split evenly over pipeline x virtual stages, with
  `num_layers_in_first/last_pipeline_stage` for uneven first/last ranks (the rest spread evenly)
  or `account_for_embedding/loss_in_pipeline_split` (the embedding/loss counts as one layer).
  The D MTP layers sit on the last rank's last virtual stage, with the loss.

The public functions take the validated `RunSpec` and the ranks as arguments (never global state)
and return what Megatron-Core's functions of the same names return for that rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtp_cli.errors import SpecError
from mtp_cli.plan.layout import LayoutError, ParsedLayout, Token, parse_layout
from mtp_cli.plan.stages import Stage, StagePlan

if TYPE_CHECKING:
    from mtp_cli.config.schema import ParallelConfig, RunSpec


class PlacementError(SpecError):
    """A placement rule broken by the spec; `field` is the dotted key at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(message)


# --- resolution ---------------------------------------------------------------------------------
def build_stage_plan(spec: RunSpec) -> StagePlan:
    """Every stage of a validated spec (its layout, or the even/uneven split); raises
    `PlacementError` (with the key at fault) when the spec breaks a placement rule."""
    par = spec.parallel
    num_layers, depths = spec.model.num_layers, spec.mtp.num_layers
    if par.layout is not None:
        _reject_split_options_with_layout(par)
        layout = _parse(par.layout)
        virtual = _layout_virtual_size(layout, par)
        _check_layout_rules(layout, par.pipeline, virtual, num_layers, depths)
        counts = [(sum(t.kind == "t" for t in s), sum(t.kind == "m" for t in s),
                   any(t.kind == "E" for t in s), any(t.kind == "L" for t in s))
                  for s in layout.stages]
        return _plan(par.pipeline, virtual, counts, num_layers, depths, from_layout=True)
    virtual = par.virtual_pipeline or 1
    per_stage = _split_without_layout(num_layers, par)
    last = len(per_stage) - 1
    counts = [(n, depths if i == last else 0, i == 0, i == last) for i, n in enumerate(per_stage)]
    return _plan(par.pipeline, virtual, counts, num_layers, depths, from_layout=False)


def _plan(pipeline: int, virtual: int, counts: list[tuple[int, int, bool, bool]],
          num_layers: int, depths: int, *, from_layout: bool) -> StagePlan:
    """Stages from per-stage (decoder layers, MTP layers, embedding, loss), in layer order."""
    stages, decoder_offset, mtp_offset = [], 0, 0
    last_rank = pipeline - 1
    for index, (decoder, mtp, embedding, loss) in enumerate(counts):
        vp_stage, pp_rank = divmod(index, pipeline)
        numbers = tuple(range(decoder_offset + 1, decoder_offset + decoder + 1))
        holds_last_layer = bool(numbers) and numbers[-1] == num_layers
        stages.append(Stage(
            decoder_layers=numbers,
            mtp_layers=mtp,
            # Megatron-Core counts MTP offsets only with a layout and pipeline > 1.
            mtp_layer_offset=mtp_offset if from_layout and pipeline > 1 else 0,
            embedding=embedding,
            loss=loss,
            final_layernorm=holds_last_layer if depths > 0 else loss,
            mtp_depths_in_loss=depths if loss else 0,
            pp_rank=pp_rank,
            vp_stage=vp_stage if virtual > 1 else None,
            standalone_mtp=mtp > 0 and pp_rank != last_rank,
            decoder_offset=decoder_offset,
        ))
        decoder_offset += decoder
        mtp_offset += mtp
    return StagePlan(pipeline, virtual if virtual > 1 else None, depths, tuple(stages),
                     from_layout)


def _parse(text: str) -> ParsedLayout:
    try:
        return parse_layout(text)
    except LayoutError as error:
        raise PlacementError("parallel.layout", error.describe()) from None


def _reject_split_options_with_layout(par: ParallelConfig) -> None:
    for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                 "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
        if getattr(par, name):
            raise PlacementError(f"parallel.{name}",
                                 f"{name} cannot be combined with parallel.layout (the layout "
                                 f"already places every layer)")


def _layout_error(layout: ParsedLayout, position: int, rule: str, detail: str) -> PlacementError:
    return PlacementError("parallel.layout",
                          LayoutError(layout.text, position, rule, detail).describe())


def _layout_virtual_size(layout: ParsedLayout, par: ParallelConfig) -> int:
    """virtual_pipeline = stages / pipeline; it must agree with parallel.virtual_pipeline."""
    num_stages, end = len(layout.stages), len(layout.text)
    if num_stages % par.pipeline:
        raise _layout_error(layout, end, "stage count is a multiple of pipeline",
                            f"the layout has {num_stages} stages, not a multiple of "
                            f"parallel.pipeline ({par.pipeline})")
    derived = num_stages // par.pipeline
    if par.virtual_pipeline is not None and par.virtual_pipeline != derived:
        raise _layout_error(layout, end, "virtual_pipeline = stages / pipeline",
                            f"parallel.virtual_pipeline is {par.virtual_pipeline} but the layout's "
                            f"{num_stages} stages over pipeline {par.pipeline} give {derived}")
    return derived


def _check_layout_rules(layout: ParsedLayout, pipeline: int, virtual: int, num_layers: int,
                        depths: int) -> None:
    """Megatron-Core's `validate_layer_layout`, pointing at the character at fault. The MTP rules
    run split-stage first, so `...tm|tm|L` reports the split (as the reference explains it)."""
    tokens, end = layout.tokens(), len(layout.text)
    first_stage, last_stage = layout.stages[0], layout.stages[-1]
    if not first_stage or first_stage[0].kind != "E":
        where = first_stage[0].position if first_stage else 0  # 0: the '|' closing it
        found = f"'{first_stage[0].kind}'" if first_stage else "an empty first stage"
        raise _layout_error(layout, where, "one E, first",
                            f"the layout must open with E (the embedding), found {found}")
    if not last_stage or last_stage[-1].kind != "L":
        where = last_stage[-1].position if last_stage else end
        found = f"'{last_stage[-1].kind}'" if last_stage else "an empty last stage"
        raise _layout_error(layout, where, "one L, last",
                            f"the layout must close with L (the loss), found {found}")
    for kind, rule, name in (("E", "one E, first", "embedding"), ("L", "one L, last", "loss")):
        found = [t for t in tokens if t.kind == kind]
        if len(found) > 1:
            extra = found[1] if kind == "E" else found[0]
            raise _layout_error(layout, extra.position, rule,
                                f"{kind} (the {name}) appears {len(found)} times; exactly one")
    _check_count(layout, tokens, "t", num_layers, "t count = model.num_layers",
                 "decoder layers 't'", "model.num_layers")
    _check_count(layout, tokens, "m", depths, "m count = mtp.num_layers",
                 "MTP layers 'm'", "mtp.num_layers")
    _check_mtp_rules(layout, tokens, pipeline, virtual, depths)


def _check_mtp_rules(layout: ParsedLayout, tokens: list[Token], pipeline: int, virtual: int,
                     depths: int) -> None:
    """All m in one stage; no t after the first m; that stage the last virtual one of its rank."""
    with_m = [i for i, stage in enumerate(layout.stages) if any(t.kind == "m" for t in stage)]
    if not with_m:
        return
    first_m = {i: next(t for t in layout.stages[i] if t.kind == "m") for i in with_m}
    if len(with_m) > 1:
        second = with_m[1]
        raise _layout_error(layout, first_m[second].position, "all m in one stage",
                            f"MTP layers are split over stages {with_m[0]} and {second}; all "
                            f"{depths} must sit in one stage")
    stage = with_m[0]
    start = sum(len(s) for s in layout.stages[:stage]) + layout.stages[stage].index(first_m[stage])
    late_t = next((t for t in tokens[start:] if t.kind == "t"), None)
    if late_t is not None:
        raise _layout_error(layout, late_t.position, "no t after the first m",
                            f"decoder layer after the first MTP layer (column "
                            f"{first_m[stage].position + 1}); decoder layers come first")
    vp_stage, pp_rank = divmod(stage, pipeline)
    if vp_stage != virtual - 1:
        raise _layout_error(layout, first_m[stage].position,
                            "the m stage is the last virtual stage of its rank",
                            f"the MTP layers are in stage {stage} = (pp_rank {pp_rank}, vp_stage "
                            f"{vp_stage}); they must be in vp_stage {virtual - 1} of their rank")


def _check_count(layout: ParsedLayout, tokens: list[Token], kind: str, expected: int, rule: str,
                 what: str, key: str) -> None:
    found = [t for t in tokens if t.kind == kind]
    if len(found) == expected:
        return
    where = found[expected].position if len(found) > expected else len(layout.text)
    raise _layout_error(layout, where, rule,
                        f"the layout has {len(found)} {what} but {key} is {expected}")


def _split_without_layout(num_layers: int, par: ParallelConfig) -> list[int]:
    """Decoder layers per stage (layer order) without a layout; raises when it does not divide."""
    pp, vpp = par.pipeline, par.virtual_pipeline or 1
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    embedding = int(par.account_for_embedding_in_pipeline_split)
    loss = int(par.account_for_loss_in_pipeline_split)
    if (first is not None or last is not None) and (embedding or loss):
        raise PlacementError("parallel.account_for_embedding_in_pipeline_split"
                             if embedding else "parallel.account_for_loss_in_pipeline_split",
                             "account_for_embedding/loss_in_pipeline_split cannot be combined "
                             "with num_layers_in_first/last_pipeline_stage")
    if first is not None or last is not None:
        per_rank = _uneven_ranks(num_layers, pp, first, last)
    else:
        total = num_layers + embedding + loss
        if total % pp:
            raise PlacementError("parallel.pipeline", _even_hint(
                f"model.num_layers ({num_layers}){_plus(embedding, loss)} = {total} does not "
                f"divide evenly over pipeline {pp}"))
        per_rank = [total // pp] * pp
    for rank, count in enumerate(per_rank):
        if count % vpp:
            raise PlacementError("parallel.virtual_pipeline", _even_hint(
                f"pipeline rank {rank} holds {count} layers, which do not divide evenly over "
                f"virtual_pipeline {vpp}"))
    per_stage = [per_rank[rank] // vpp for _ in range(vpp) for rank in range(pp)]
    per_stage[0] -= embedding  # never below 0: every stage got at least one layer above
    per_stage[-1] -= loss
    return per_stage


def _uneven_ranks(num_layers: int, pp: int, first: int | None, last: int | None) -> list[int]:
    """Layers per pipeline rank with a fixed first and/or last rank, the rest spread evenly."""
    if pp == 1:
        raise PlacementError("parallel.num_layers_in_first_pipeline_stage"
                             if first is not None else "parallel.num_layers_in_last_pipeline_stage",
                             "num_layers_in_first/last_pipeline_stage need parallel.pipeline > 1")
    middle_ranks = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    field = ("parallel.num_layers_in_first_pipeline_stage" if first is not None
             else "parallel.num_layers_in_last_pipeline_stage")
    fixed = f"{first or 0} + {last or 0}" if first and last else f"{first or last}"
    if middle_layers < 0 or (middle_ranks == 0 and middle_layers != 0):
        raise PlacementError(field, f"the first/last stages take {fixed} layers but "
                                    f"model.num_layers is {num_layers}")
    if middle_ranks and middle_layers % middle_ranks:
        raise PlacementError(field, f"the {middle_layers} layers left after the first/last "
                                    f"stages do not divide evenly over the {middle_ranks} "
                                    f"middle pipeline ranks")
    middle = middle_layers // middle_ranks if middle_ranks else 0
    ranks = [middle] * pp
    if first is not None:
        ranks[0] = first
    if last is not None:
        ranks[-1] = last
    return ranks


def _plus(embedding: int, loss: int) -> str:
    return (" + 1 (embedding)" if embedding else "") + (" + 1 (loss)" if loss else "")


def _even_hint(message: str) -> str:
    return (f"{message}; set parallel.num_layers_in_first_pipeline_stage / "
            f"num_layers_in_last_pipeline_stage or a parallel.layout")


# --- rank queries -------------------------------------------------------------------------------
def _stage_of(spec: RunSpec, vp_stage: int | None, pp_rank: int | None) -> Stage:
    plan = build_stage_plan(spec)
    return plan.stage(_check_rank(plan, pp_rank), _check_vp(plan, vp_stage))


def _check_rank(plan: StagePlan, pp_rank: int | None) -> int:
    if pp_rank is None:
        if plan.pipeline > 1:
            raise ValueError("pp_rank must be passed when parallel.pipeline > 1")
        return 0
    if not 0 <= pp_rank < plan.pipeline:
        raise ValueError(f"pp_rank {pp_rank} is outside pipeline size {plan.pipeline}")
    return pp_rank


def _check_vp(plan: StagePlan, vp_stage: int | None) -> int | None:
    if plan.virtual_pipeline is None:
        return None  # like Megatron: vp_stage is ignored without virtual pipeline stages
    if vp_stage is None:
        raise ValueError("vp_stage must be passed if virtual pipeline is enabled")
    if not 0 <= vp_stage < plan.virtual_pipeline:
        raise ValueError(f"vp_stage {vp_stage} is outside virtual pipeline size "
                         f"{plan.virtual_pipeline}")
    return vp_stage


def get_mtp_num_layers_to_build(config: RunSpec, vp_stage: int | None = None,
                                pp_rank: int | None = None) -> int:
    """MTP layers on (pp_rank, vp_stage): the stage's `m` count with a layout; without one, D on
    the last rank's last virtual stage and 0 elsewhere."""
    return _stage_of(config, vp_stage, pp_rank).mtp_layers


def get_mtp_layer_offset(config: RunSpec, vp_stage: int | None = None,
                         pp_rank: int | None = None) -> int:
    """0-based index of the stage's first MTP layer: the `m` count of earlier stages with a
    layout and pipeline > 1; 0 otherwise (as in Megatron-Core, no rank is needed then)."""
    if config.parallel.pipeline == 1 or config.parallel.layout is None:
        return 0
    return _stage_of(config, vp_stage, pp_rank).mtp_layer_offset


def get_num_layers_to_build(config: RunSpec, vp_stage: int | None = None,
                            pp_rank: int | None = None) -> int:
    """Decoder layers on (pp_rank, vp_stage)."""
    return len(_stage_of(config, vp_stage, pp_rank).decoder_layers)


def get_transformer_layer_offset(config: RunSpec, vp_stage: int | None = None,
                                 pp_rank: int | None = None) -> int:
    """0-based global index of the stage's first decoder layer (its layer number is offset + 1)."""
    return _stage_of(config, vp_stage, pp_rank).decoder_offset


def get_decoder_layer_numbers(config: RunSpec, vp_stage: int | None = None,
                              pp_rank: int | None = None) -> list[int]:
    """The stage's global, 1-based decoder layer numbers."""
    return list(_stage_of(config, vp_stage, pp_rank).decoder_layers)


def validate_placement(spec: RunSpec) -> int | None:
    """Check the spec's placement; returns the virtual pipeline size a layout implies (or None)."""
    plan = build_stage_plan(spec)
    return plan.virtual_pipeline if plan.from_layout else None
