"""`data.synthetic`: generated tasks where the answer to "does MTP help?" is known to be
learnable, with no download and the same documents for a seed on every machine.

Every task writes plain ASCII bytes (ids 0-127 of the byte tokenizer; any byte vocabulary of at
least 257 ids, such as specs/tiny.yaml's 320, takes them), one document per generated text,
end-of-document between documents. The held-out split is generated apart from the training one
and, where problems could repeat, never shares a problem with it:

* `induction` (Gloeckle et al. 2024's motivation for MTP at small scale): the first half of a
  document is uniform random letters (ln(alphabet) nats per token, unlearnable); the second half
  is spans of 4-12 letters copied from random places of the first half. Its held-out loss
  measures in-context copying (induction heads): only the first letter of a copied span is
  uncertain once the model copies. Held out: another random stream (a repeat of 30 random
  letters is vanishingly rare).
* `addition`: lines `a+b=c` with addends of 1..`digits` digits; the sum's digits are determined
  by the problem, so its loss measures carrying. Held out: the problems with
  `(31 a + 17 b) mod 20 = 0`, never generated for training.
* `sorting`: lines `letters=sorted letters` (3-10 letters); the output is determined by the
  input, so its loss measures the sort. Held out: the letter multisets whose CRC-32 is 0 mod 20.

Random draws come from `random.Random("<seed>:<task>:<split>")`: seeded by string, which Python
hashes with SHA-512, never by PYTHONHASHSEED, so every process and machine draws the same.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable

import torch

from mtp_cli.config.schema import SyntheticConfig
from mtp_cli.data.windows import TokenStream

LETTERS = string.ascii_lowercase + string.ascii_uppercase
HELD_OUT_EVERY = 20  # one problem in 20 is held out (addition, sorting)
SPAN = (4, 12)  # copied span lengths (induction), inclusive
SORT_LETTERS = (3, 10)

Generator = Callable[[random.Random, SyntheticConfig, int, bool], bytes]


def induction_document(rng: random.Random, config: SyntheticConfig, length: int,
                       held_out: bool) -> bytes:
    """`length` letters: `length // 2` random ones, then spans copied from them."""
    letters = LETTERS[:config.alphabet]
    half = max(1, length // 2)
    first = rng.choices(letters, k=half)
    second: list[str] = []
    while len(second) < length - half:
        size = min(rng.randint(*SPAN), half)
        start = rng.randrange(half - size + 1)
        second += first[start:start + size]
    return "".join(first + second[:length - half]).encode("ascii")


def _addition_held_out(a: int, b: int) -> bool:
    return (31 * a + 17 * b) % HELD_OUT_EVERY == 0


def _addend(rng: random.Random, digits: int) -> int:
    size = rng.randint(1, digits)
    return rng.randrange(10 ** (size - 1) if size > 1 else 0, 10 ** size)


def addition_line(rng: random.Random, config: SyntheticConfig, held_out: bool) -> str:
    while True:  # rejection: a split only ever sees its own problems
        a, b = _addend(rng, config.digits), _addend(rng, config.digits)
        if _addition_held_out(a, b) == held_out:
            return f"{a}+{b}={a + b}\n"


def _sorting_held_out(letters: str) -> bool:
    return zlib.crc32("".join(sorted(letters)).encode("ascii")) % HELD_OUT_EVERY == 0


def sorting_line(rng: random.Random, config: SyntheticConfig, held_out: bool) -> str:
    alphabet = LETTERS[:config.alphabet]
    while True:
        letters = "".join(rng.choices(alphabet, k=rng.randint(*SORT_LETTERS)))
        if _sorting_held_out(letters) == held_out:
            return f"{letters}={''.join(sorted(letters))}\n"


def _lines_document(line: Callable[[random.Random, SyntheticConfig, bool], str]) -> Generator:
    def document(rng: random.Random, config: SyntheticConfig, length: int,
                 held_out: bool) -> bytes:
        """Whole lines while they fit in `length` bytes (at least one line)."""
        text = line(rng, config, held_out)
        while True:
            more = line(rng, config, held_out)
            if len(text) + len(more) > length:
                return text.encode("ascii")
            text += more
    return document


GENERATORS: dict[str, Generator] = {
    "induction": induction_document,
    "addition": _lines_document(addition_line),
    "sorting": _lines_document(sorting_line),
}


def document_length(config: SyntheticConfig, seq_length: int) -> int:
    """Tokens per document: `length`, or one window's worth (seq_length - 1 and its EOD)."""
    return config.length if config.length is not None else max(1, seq_length - 1)


def synthetic_documents(config: SyntheticConfig, seq_length: int, split: str) -> list[bytes]:
    """The documents of `split` ("train" or "val"), deterministic by `config.seed`."""
    held_out = split == "val"
    count = config.val_documents if held_out else config.documents
    rng = random.Random(f"{config.seed}:{config.task}:{split}")
    length = document_length(config, seq_length)
    generate = GENERATORS[config.task]
    return [generate(rng, config, length, held_out) for _ in range(count)]


def synthetic_stream(config: SyntheticConfig, seq_length: int, split: str,
                     eod: int) -> TokenStream:
    """`synthetic_documents` as one EOD-separated token stream."""
    documents = synthetic_documents(config, seq_length, split)
    lengths = torch.tensor([len(d) for d in documents], dtype=torch.int64)
    flat = torch.frombuffer(bytearray(b"".join(documents)), dtype=torch.uint8)
    return TokenStream.from_documents(flat, lengths, eod)


def describe(config: SyntheticConfig) -> str:
    """One phrase for the launcher's data line."""
    return f"the synthetic {config.task} task (seed {config.seed})"
