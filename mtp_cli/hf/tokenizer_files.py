"""Tokenizer files beside exported weights, and the tokenizer an import keeps.

A run on the embedded corpus tokenizes bytes (id i = byte i, 256 = end of document). Its export
gets a `tokenizer.json` that `tokenizers` (and so `AutoTokenizer`) reads as exactly that: a
byte-level BPE with no merges whose vocabulary is the 256 byte symbols in byte order, and
`<|endoftext|>` as id 256. A run with `data.tokenizer` gets that file copied, with the
`tokenizer_config.json` / `special_tokens_map.json` found beside it, each checked first
(`mtp_cli.hf.copied_files`: inside its directory, bounded, parsed as what it claims to be).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtp_cli.data.tokenizer import BYTE_EOD, EOD_CANDIDATES
from mtp_cli.hf.copied_files import (
    SPECIAL_TOKENS_MAP,
    TOKENIZER,
    TOKENIZER_CONFIG,
    allowed_roots,
    read_copied_file,
    read_copied_files,
)

EOD_TOKEN = "<|endoftext|>"
SIDE_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0-255 in byte-level BPE vocabularies: printable
    Latin-1 bytes stand for themselves, the others map to 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer_json() -> dict[str, Any]:
    """tokenizer.json of mtp-cli's byte tokenizer."""
    vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": BYTE_EOD, "content": EOD_TOKEN, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def _tokenizer_config(eos: str) -> dict[str, Any]:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
            "unk_token": None, "pad_token": None, "clean_up_tokenization_spaces": False,
            "model_max_length": 10**30}


def eod_token(tokenizer_json: dict[str, Any]) -> str | None:
    """The end-of-text special token mtp-cli uses as EOD (data.tokenizer's rule), if any."""
    added = {t.get("content") for t in tokenizer_json.get("added_tokens", [])
             if isinstance(t, dict)}
    vocab = tokenizer_json.get("model", {}).get("vocab", {})
    vocab = vocab if isinstance(vocab, dict) else {}
    return next((t for t in EOD_CANDIDATES if t in added or t in vocab), None)


def read_run_tokenizer(tokenizer_path: str | None) -> dict[str, bytes]:
    """{file name: bytes} of a run's tokenizer files (`data.tokenizer`, or the byte tokenizer),
    read and checked before anything is written: the spec names tokenizer.json (wherever a
    link takes it); its side files are copied from its directory only
    (`mtp_cli.hf.copied_files`)."""
    if tokenizer_path is None:
        return {TOKENIZER: json.dumps(byte_tokenizer_json(), ensure_ascii=False).encode(),
                TOKENIZER_CONFIG: json.dumps(_tokenizer_config(EOD_TOKEN), indent=2).encode()}
    source = Path(tokenizer_path)
    files = {TOKENIZER: read_copied_file(source.resolve(), [source.resolve().parent],
                                         TOKENIZER)}
    roots = [*allowed_roots(source.parent), source.resolve().parent]
    files.update({name: read_copied_file(source.parent / name, roots) for name in SIDE_FILES
                  if (source.parent / name).is_symlink() or (source.parent / name).exists()})
    if TOKENIZER_CONFIG not in files:
        eos = eod_token(json.loads(files[TOKENIZER]))
        files[TOKENIZER_CONFIG] = json.dumps(_tokenizer_config(eos), indent=2).encode()
    return files


def read_kept_tokenizer(hf_dir: Path) -> dict[str, bytes]:
    """An imported model's tokenizer.json and side files, checked, read before anything is
    written (`mtp_cli.hf.copied_files`); empty when the model has no tokenizer.json."""
    source = hf_dir / TOKENIZER
    if not (source.is_symlink() or source.exists()):
        return {}
    return read_copied_files(hf_dir, (TOKENIZER, *SIDE_FILES))


def keep_tokenizer(files: dict[str, bytes], run_dir: Path) -> Path | None:
    """Write the files `read_kept_tokenizer` returned into the run directory's `tokenizer/`;
    returns where tokenizer.json went, or None when the model has none."""
    if TOKENIZER not in files:
        return None
    target = run_dir / "tokenizer"
    target.mkdir()
    for name, data in files.items():
        (target / name).write_bytes(data)
    return target / TOKENIZER
