"""Tokenizers: bytes by default, a Hugging Face `tokenizer.json` on request.

The byte tokenizer needs no file and no download and is the same on every machine: token `i` is
byte `i` (0-255) and 256 marks the end of a document (EOD). A `tokenizers` tokenizer is imported
only when `data.tokenizer` names one; its EOD id is its own end-of-text special token when it has
one (`<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>`, `<|eos|>`, looked up in that order), and
otherwise one id past its vocabulary (a new id the tokenizer never emits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from mtp_cli.data.documents import Document
from mtp_cli.errors import UserError

BYTE_EOD = 256
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    eod: int
    vocab_size: int  # ids are < vocab_size (EOD included)
    name: str

    def encode_documents(self, documents: list[Document]) -> list[torch.Tensor]: ...


class ByteTokenizer:
    """ids 0-255 are bytes, 256 is end-of-document. Works on raw bytes: no decoding, no locale."""

    eod = BYTE_EOD
    vocab_size = BYTE_EOD + 1
    name = "bytes"

    def encode(self, data: bytes | str) -> torch.Tensor:
        """Token ids (int64) of `data`; text is encoded as UTF-8 first."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if not raw:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> bytes:
        """Bytes of `ids`; EOD ids are dropped."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(v for v in values if v != self.eod)

    def encode_documents(self, documents: list[Document]) -> list[torch.Tensor]:
        return [self.encode(doc.as_bytes()) for doc in documents]


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json; no special tokens are added."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as exc:
            raise UserError(
                f"data.tokenizer: {path} needs the `tokenizers` package (pip install tokenizers)"
            ) from exc
        self.name = str(path)
        try:
            self._tokenizer = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise UserError(f"data.tokenizer: cannot load {path}: {exc}") from exc
        own_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eod = next((i for t in EOD_CANDIDATES
                    if (i := self._tokenizer.token_to_id(t)) is not None), None)
        self.eod = own_size if eod is None else eod
        self.vocab_size = max(own_size, self.eod + 1)

    def encode(self, text: str) -> torch.Tensor:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int64)

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as lists (`mtp data prepare` writes them without torch)."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tokenizer.decode([v for v in values if v != self.eod])

    def encode_documents(self, documents: list[Document]) -> list[torch.Tensor]:
        """Encode documents in one batch (the Rust side runs them in parallel)."""
        texts = [doc.as_text() for doc in documents]
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [torch.tensor(e.ids, dtype=torch.int64) for e in encodings]


def load_tokenizer(path: str | None, vocab_size: int) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of `data.tokenizer` (None = bytes), checked against `model.vocab_size`."""
    if path is None:
        tokenizer: ByteTokenizer | HFTokenizer = ByteTokenizer()
    else:
        if not Path(path).is_file():
            raise UserError(f"data.tokenizer: {path} does not exist (or is not a file)")
        tokenizer = HFTokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"model.vocab_size ({vocab_size}) is smaller than the vocabulary of tokenizer "
            f"'{tokenizer.name}' ({tokenizer.vocab_size} ids, end-of-document = {tokenizer.eod})"
        )
    return tokenizer
