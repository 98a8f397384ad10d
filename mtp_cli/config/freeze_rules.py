"""`train.freeze`: which parameters stay fixed, decided from their global names alone.

An entry without glob characters is a part (`embedding`, `decoder`, `output_layer`, `mtp`) or a
dotted prefix of parameter names (`decoder.layers.0`, `mtp.layers.1.eh_proj.weight`); an entry
with `*`, `?` or `[` is an `fnmatch` pattern on whole parameter names (`decoder.layers.*.mlp.*`).
Names are the single-process model's, so every pipeline stage, tensor shard and copy of a weight
decides the same way: a stage's copy of the word embedding is named like it, and a tied output
layer (`output_layer.weight` on a pipeline's loss stage) is frozen exactly when the embedding is,
since it is the same logical weight. No torch here: the schema checks entries statically, the
model builder applies them (`mtp_cli.builders.freeze`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

PARTS = ("embedding", "decoder", "output_layer", "mtp")
WORD_EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_WEIGHT = "output_layer.weight"
_GLOB_CHARS = frozenset("*?[")


def is_glob(entry: str) -> bool:
    return any(c in _GLOB_CHARS for c in entry)


def entry_matches(entry: str, name: str) -> bool:
    """Whether one `train.freeze` entry names parameter `name`."""
    if is_glob(entry):
        return fnmatch.fnmatchcase(name, entry)
    return name == entry or name.startswith(entry + ".")


def is_frozen(name: str, entries: Iterable[str], *, tied: bool) -> bool:
    """Whether parameter `name` stays fixed; a tied output weight follows the embedding."""
    entries = list(entries)
    if tied and name == OUTPUT_WEIGHT:
        name = WORD_EMBEDDING
    return any(entry_matches(entry, name) for entry in entries)


def freeze_problem(entries: list[str], *, tied: bool, mtp_layers: int) -> str | None:
    """What is wrong with `train.freeze` without knowing every parameter name, or None: a
    non-glob entry must start with a part, `mtp` needs MTP layers, and a tied output layer
    cannot be frozen apart from the embedding."""
    for entry in entries:
        if not entry or entry != entry.strip():
            return f"{entry!r} is not a part name, dotted prefix or glob pattern"
        if is_glob(entry):
            continue
        part = entry.split(".", 1)[0]
        if part not in PARTS:
            return (f"{entry!r} names no part: a part ({', '.join(PARTS)}), a dotted prefix of "
                    "parameter names, or a glob pattern (with * ? [)")
        if part == "mtp" and mtp_layers == 0:
            return f"{entry!r}: the model has no MTP layers (mtp.num_layers is 0)"
        if tied and part == "output_layer" and not is_frozen(WORD_EMBEDDING, entries, tied=False):
            return ("output_layer is the word embedding (model.share_embeddings_and_output_"
                    "weights: true): freeze 'embedding' to keep both fixed")
    return None


def unmatched_entries(entries: Iterable[str], names: Iterable[str], *, tied: bool) -> list[str]:
    """Entries that name no parameter of a model whose parameter names are `names`."""
    names = list(names)
    if tied:
        names.append(OUTPUT_WEIGHT)
    return [e for e in entries if not any(entry_matches(e, n) for n in names)]
