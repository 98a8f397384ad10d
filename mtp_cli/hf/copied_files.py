"""Files copied byte for byte from a model directory into another (the tokenizer and its side
files: `mtp import` into the run directory, `mtp export` into the Hugging Face directory),
read without trusting them.

A copy must carry the model's file and nothing else: a `tokenizer_config.json` linked to
`/proc/self/environ` or a key file would put the user's secrets into a model ready to publish.
So each file is read once, as bytes, and those bytes are what is written, after: its path,
links resolved, lies inside the model directory (or, for a Hugging Face hub snapshot
`.../snapshots/REV/`, in the hub's `.../blobs/` beside it, where the hub keeps every file of a
snapshot); it is a regular file of bounded size; it parses as what its name says
(tokenizer.json through `tokenizers`, the JSON configs as objects whose known keys have their
types). Any failure names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtp_cli.checkpoint.files import read_bounded_bytes
from mtp_cli.errors import Problem, UserError

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_LIMIT = 256 * 2**20  # bytes; the largest released tokenizer.json files are ~35 MB
CONFIG_LIMIT = 32 * 2**20  # bytes; chat templates and added-token tables, a few MB at most

_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
               "mask_token")
_STR_KEYS = ("tokenizer_class", "padding_side", "truncation_side")
_BOOL_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy",
              "clean_up_tokenization_spaces", "do_lower_case")


def _refuse(path: Path, message: str) -> UserError:
    return UserError(problems=[Problem(message, file=str(path),
                                       hint="copying it would carry another file into the "
                                            "model; replace it with the model's own file")])


def allowed_roots(directory: Path) -> list[Path]:
    """Where the files of model directory `directory` may live once links are resolved: the
    directory itself, and a hub snapshot's `blobs/`."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def _is_token(value: Any) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, dict) and isinstance(value.get("content"), str))


def _check_known_keys(path: Path, config: dict[str, Any]) -> None:
    """The keys transformers reads from tokenizer_config.json / special_tokens_map.json have
    their types (unknown keys pass: they are the model's own)."""
    for key, value in config.items():
        ok = True
        if key in _TOKEN_KEYS:
            ok = _is_token(value)
        elif key == "additional_special_tokens":
            ok = isinstance(value, list) and all(_is_token(v) and v is not None for v in value)
        elif key in _STR_KEYS:
            ok = value is None or isinstance(value, str)
        elif key == "chat_template":
            ok = value is None or isinstance(value, str) or (isinstance(value, list) and all(
                isinstance(v, dict) and isinstance(v.get("template"), str) for v in value))
        elif key in _BOOL_KEYS:
            ok = value is None or isinstance(value, bool)
        elif key == "model_max_length":
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        elif key in ("added_tokens_decoder", "auto_map"):
            ok = isinstance(value, dict)
        elif key == "model_input_names":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            raise _refuse(path, f"{key}: {json.dumps(value)[:60]} is not what a tokenizer "
                                "config holds there")


def _parse_json(path: Path, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _refuse(path, f"does not parse as JSON ({str(error)[:80]})") from None
    if not isinstance(value, dict):
        raise _refuse(path, "holds no JSON object")
    return value


def _check_tokenizer(path: Path, data: bytes) -> None:
    _parse_json(path, data)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError(problems=[Problem("a tokenizer is copied only once `tokenizers` "
                                          "(pip install tokenizers) has read it",
                                          file=str(path))]) from None
    try:
        Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception on bad files
        raise _refuse(path, f"is not a tokenizer `tokenizers` reads ({str(error)[:80]})") \
            from None


def read_copied_file(path: Path, roots: list[Path], name: str | None = None) -> bytes:
    """The bytes of `path`, to be written as `name` (default: its own), checked as the module
    doc says; `UserError` naming `path`."""
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise _refuse(path, f"links to {resolved}, outside {roots[0]}")
    name = name or path.name
    limit = TOKENIZER_LIMIT if name == TOKENIZER else CONFIG_LIMIT
    data = read_bounded_bytes(resolved, limit)
    if name == TOKENIZER:
        _check_tokenizer(path, data)
    else:
        _check_known_keys(path, _parse_json(path, data))
    return data


def read_copied_files(directory: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """{name: checked bytes} of those of `names` present (a link counts, even a dangling one)
    in model directory `directory`."""
    roots = allowed_roots(directory)
    return {name: read_copied_file(directory / name, roots) for name in names
            if (directory / name).is_symlink() or (directory / name).exists()}
