"""The `shapes` check: every stored tensor has the shape the spec (or the keys) imply.

With a spec the model is built on the meta device and compared name by name: missing tensors,
unexpected tensors and shape mismatches each fail, named. Without one, shapes are checked against
the hidden and vocab sizes read from the word embedding, and between layers of the same kind
(every decoder layer, every MTP depth): the odd one out is named.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from mtp_cli.inspect.checkpoint import TensorInfo
from mtp_cli.inspect.checks import Check, name_list
from mtp_cli.inspect.layout import Layout
from mtp_cli.inspect.names import canonical

_HIDDEN_NORMS = ("enorm", "hnorm", "final_layernorm", "input_layernorm", "pre_mlp_layernorm",
                 "post_attention_layernorm", "norm")


def _is_copy(name: str, layout: Layout) -> bool:
    part = layout.naming.part_of(name)
    return part.kind == "mtp" and part.rest in layout.naming.copy_tails()


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_shapes_against_spec(tensors: Mapping[str, TensorInfo],
                              expected: Mapping[str, tuple[int, ...]], layout: Layout) -> Check:
    """Names and shapes against the model the spec builds (copies are the tie check's job)."""
    stored = {canonical(name): info for name, info in tensors.items()
              if not _is_copy(name, layout)}
    missing = [n for n in expected if n not in stored]
    unexpected = [info.name for n, info in stored.items() if n not in expected]
    wrong = [(info.name, info.shape, expected[n]) for n, info in stored.items()
             if n in expected and tuple(info.shape) != tuple(expected[n])]
    problems = []
    if wrong:
        problems.append("shape mismatch: " + name_list(
            [f"{name} is {_fmt(got)}, spec says {_fmt(want)}" for name, got, want in wrong], 4))
    if missing:
        problems.append(f"missing {name_list(missing)}")
    if unexpected:
        problems.append(f"not in the spec's model: {name_list(unexpected)}")
    if problems:
        return Check("shapes", False, "; ".join(problems),
                     tensors=[w[0] for w in wrong] + missing + unexpected,
                     details=[{"tensor": n, "shape": list(g), "expected": list(e)}
                              for n, g, e in wrong])
    return Check("shapes", True, f"all {len(expected)} tensors of the spec's model are stored "
                                 "with the spec's shapes")


def _rule_shape(name: str, rest: str, layout: Layout) -> tuple[int, ...] | None:
    """The shape hidden/vocab sizes alone fix for this tensor, if any."""
    h, v = layout.hidden_size, layout.vocab_size
    if h is None:
        return None
    naming = layout.naming
    if name in (naming.embedding_weight, naming.output_weight) or rest in naming.copy_tails():
        return (v, h)
    leaf = rest.rsplit(".", 1)
    if len(leaf) == 2 and leaf[1] in ("weight", "bias"):
        module = leaf[0].rsplit(".", 1)[-1]
        if module == "eh_proj" and leaf[1] == "weight":
            return (h, 2 * h)
        if module in _HIDDEN_NORMS:
            return (h,)
    return None


def _family_outliers(members: dict[tuple[str, int], dict[str, TensorInfo]]
                     ) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(tensor, shape, shape of most others) for members whose shape is not the majority's.

    With no strict majority (two layers that disagree) every side is named.
    """
    by_rest: dict[str, list[TensorInfo]] = {}
    for rests in members.values():
        for rest, info in rests.items():
            by_rest.setdefault(rest, []).append(info)
    outliers = []
    for infos in by_rest.values():
        counts = Counter(tuple(i.shape) for i in infos)
        if len(counts) < 2:
            continue
        (top, top_n), (_, second_n) = counts.most_common(2)
        for info in infos:
            shape = tuple(info.shape)
            if shape == top and top_n > second_n:
                continue
            others = counts.copy()
            others[shape] -= 1
            outliers.append((info.name, shape, max(others, key=lambda s: others[s])))
    return outliers


def check_shapes_inferred(tensors: Mapping[str, TensorInfo], layout: Layout) -> Check:
    """No spec: hidden/vocab rules where they fix a shape, else agreement between layers."""
    naming = layout.naming
    wrong: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    families: dict[tuple[str, int], dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        part = naming.part_of(name)
        rule = _rule_shape(name, part.rest, layout)
        if rule is not None:
            if tuple(info.shape) != rule:
                wrong[name] = (tuple(info.shape), rule)
        elif part.index is not None:
            families.setdefault((part.kind, part.index), {})[part.rest] = info
    for kind in ("decoder", "mtp"):
        members = {k: v for k, v in families.items() if k[0] == kind}
        for name, shape, majority in _family_outliers(members):
            wrong.setdefault(name, (shape, majority))
    basis = f"hidden {layout.hidden_size}, vocab {layout.vocab_size}" \
        if layout.hidden_size else "no word embedding found"
    if wrong:
        items = [f"{n} is {_fmt(g)}, expected {_fmt(e)}" for n, (g, e) in wrong.items()]
        return Check("shapes", False, f"shape mismatch ({basis}, from the keys): "
                     + name_list(items, 4), tensors=list(wrong),
                     details=[{"tensor": n, "shape": list(g), "expected": list(e)}
                              for n, (g, e) in wrong.items()])
    return Check("shapes", True, f"shapes agree with {basis} and between layers of the same "
                                 "kind", note="no spec: sizes inferred from the keys")
