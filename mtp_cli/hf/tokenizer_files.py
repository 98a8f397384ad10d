"""Tokenizer files beside exported weights, and the tokenizer an import keeps.

A run on the embedded corpus tokenizes bytes (id i = byte i, 256 = end of document). Its export
gets a `tokenizer.json` that `tokenizers` (and so `AutoTokenizer`) reads as exactly that: a
byte-level BPE with no merges whose vocabulary is the 256 byte symbols in byte order, and
`<|endoftext|>` as id 256. A run with `data.tokenizer` gets that file copied, with the
`tokenizer_config.json` / `special_tokens_map.json` found beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mtp_cli.data.tokenizer import BYTE_EOD, EOD_CANDIDATES

EOD_TOKEN = "<|endoftext|>"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


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


def write_tokenizer(out: Path, tokenizer_path: str | None) -> None:
    """The tokenizer files of a run (`data.tokenizer`, or the byte tokenizer) into `out`."""
    if tokenizer_path is None:
        (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(), ensure_ascii=False))
        (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(EOD_TOKEN),
                                                              indent=2))
        return
    source = Path(tokenizer_path)
    shutil.copyfile(source, out / "tokenizer.json")
    copied = False
    for name in SIDE_FILES:
        if (source.parent / name).is_file():
            shutil.copyfile(source.parent / name, out / name)
            copied = copied or name == "tokenizer_config.json"
    if not copied:
        with open(source, encoding="utf-8") as handle:
            eos = eod_token(json.load(handle))
        (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(eos), indent=2))


def keep_tokenizer(hf_dir: Path, run_dir: Path) -> Path | None:
    """Copy an imported model's tokenizer.json (and its side files) into the run directory;
    returns where tokenizer.json went, or None when the model has none."""
    source = hf_dir / "tokenizer.json"
    if not source.is_file():
        return None
    target = run_dir / "tokenizer"
    target.mkdir()
    shutil.copyfile(source, target / "tokenizer.json")
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, target / name)
    return target / "tokenizer.json"
