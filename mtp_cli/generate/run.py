"""`mtp generate` as a function: prompts in, text and statistics out.

    from mtp_cli.generate import load_for_generation, generate
    loaded = load_for_generation(Path("runs/tiny"))
    result = generate(loaded, ["def main("], GenerateOptions(max_new_tokens=64))

With speculation (the model's MTP depths draft, the main model verifies) the same prompts are
then decoded plainly and speculatively in turn, `speedup_repeats` pairs, in the same process, so
the speed-up is measured, not estimated: it is the median of the pairs' ratios (one timing of
each on a loaded machine once showed 3.77x where 1.96x was the ceiling), and `seconds` of each
mode is its median. With greedy decoding the outputs must be identical, and
`identical_to_plain` says whether they were.
"""

from __future__ import annotations

import codecs
import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mtp_cli.data.tokenizer import ByteTokenizer
from mtp_cli.errors import Problem, UserError
from mtp_cli.generate.decode import decode_plain
from mtp_cli.generate.load import LoadedModel
from mtp_cli.generate.sampling import SamplingSettings
from mtp_cli.generate.sequences import Sequences
from mtp_cli.generate.speculative import SpeculativeDecoder
from mtp_cli.generate.stats import SpeculativeCounts, SpeedupTiming, interleaved_speedup
from mtp_cli.generate.streams import check_decode_memory, max_positions

Speculative = Literal["auto", "on", "off"]
MIN_TEMPERATURE = 1e-6  # logits / 1e-320 are inf: softmax gives NaN
PROMPT_BATCH = 64  # prompts decoded together: a prompt file is read in batches of this many
OnText = Callable[[int, str], None]  # (prompt index, new text)


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    speculative: Speculative = "auto"
    draft_depths: int | None = None  # None: every depth the model has
    baseline: bool = True  # also decode plainly, to measure the speed-up
    speedup_repeats: int = 3  # timed (plain, speculative) pairs behind the speed-up's median


@dataclass
class GenerateResult:
    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float
    speculative: dict[str, Any] | None = None
    plain_seconds: float | None = None
    identical_to_plain: bool | None = None
    notes: list[str] = field(default_factory=list)
    timing: SpeedupTiming | None = None  # the interleaved repetitions behind `speedup`

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    def as_dict(self) -> dict[str, Any]:
        tps = self.tokens / self.seconds if self.seconds > 0 else None
        out: dict[str, Any] = {
            "completions": [{"prompt": p, "text": t, "tokens": len(ids)}
                            for p, t, ids in zip(self.prompts, self.texts, self.token_ids,
                                                 strict=True)],
            "tokens": self.tokens, "seconds": self.seconds, "tokens_per_s": tps,
            "speculative": self.speculative,
        }
        if self.plain_seconds is not None:
            plain_tps = self.tokens / self.plain_seconds if self.plain_seconds > 0 else None
            out["plain"] = {"seconds": self.plain_seconds, "tokens_per_s": plain_tps}
            out["speedup"] = self.plain_seconds / self.seconds if self.seconds > 0 else None
            if self.timing is not None:
                out["speedup"] = self.timing.speedup
                out["speedup_repeats"] = len(self.timing.ratios)
                out["speedup_ratios"] = self.timing.ratios
            out["identical_to_plain"] = self.identical_to_plain
        out["notes"] = self.notes
        return out


def check_option_values(options: GenerateOptions) -> None:
    """`UserError` naming the flag of a value out of bounds: checked before a model loads."""
    if options.max_new_tokens < 1:
        raise UserError(problems=[Problem("must be at least 1", key="--max-new-tokens")])
    temperature = options.temperature
    if not math.isfinite(temperature) or temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
        raise UserError(problems=[Problem(
            f"{temperature} is not 0 (greedy) or a temperature of at least {MIN_TEMPERATURE} "
            "(dividing logits by less overflows them)", key="--temperature")])
    if not 0 <= options.seed < 2**64:
        raise UserError(problems=[Problem("must be in 0 .. 2^64 - 1", key="--seed")])
    if not 0 < options.top_p <= 1:
        raise UserError(problems=[Problem("must be in (0, 1]", key="--top-p")])
    if options.speculative not in ("auto", "on", "off"):
        raise UserError(problems=[Problem("must be auto, on or off", key="--speculative")])
    if options.speedup_repeats < 1:
        raise UserError(problems=[Problem("must be at least 1", key="--speedup-repeats")])
    if options.draft_depths is not None and options.draft_depths < 1:
        raise UserError(problems=[Problem("must be at least 1", key="--draft-depths")])


def _check_options(options: GenerateOptions, depths: int) -> int:
    """The number of draft depths to use (0: plain decoding); UserError for bad options."""
    check_option_values(options)
    wanted = options.draft_depths
    if options.speculative == "on" and depths == 0:
        raise UserError(problems=[Problem(
            "the checkpoint has no MTP layers to draft with", key="--speculative on",
            hint="use --speculative off (or auto) for plain decoding")])
    if wanted is not None and wanted > depths and options.speculative != "off":
        raise UserError(problems=[Problem(
            f"{wanted} is more than the checkpoint's {depths} MTP depths", key="--draft-depths")])
    if options.speculative == "off" or depths == 0:
        return 0
    return depths if wanted is None else wanted


def encode_prompts(loaded: LoadedModel, prompts: list[str],
                   where: list[str] | None = None) -> list[torch.Tensor]:
    """Token ids of each prompt; UserError for an empty one or one past the maximum positions.
    `where` names each prompt in messages (`--prompt 2`, `prompts.txt:3`)."""
    if loaded.tokenizer is None:
        raise UserError("the checkpoint's tokenizer is not available, so text cannot be encoded "
                        f"({'; '.join(loaded.notes)})")
    if not prompts:
        raise UserError(problems=[Problem("give at least one prompt", key="--prompt")])
    where = where or [f"--prompt {i + 1}" for i in range(len(prompts))]
    limit = max_positions(loaded.model)
    encoded = []
    for text, name in zip(prompts, where, strict=True):
        ids = loaded.tokenizer.encode(text)
        if len(ids) == 0:
            raise UserError(problems=[Problem("is empty: a prompt needs at least one token",
                                              key=name)])
        if len(ids) > limit:
            raise UserError(problems=[Problem(
                f"is {len(ids)} tokens, longer than the model's maximum positions ({limit})",
                key=name)])
        encoded.append(ids)
    return encoded


class _TextStream:
    """Decodes each row's new ids incrementally (a UTF-8 character may span byte tokens)."""

    def __init__(self, loaded: LoadedModel, batch: int, on_text: OnText | None) -> None:
        self.tokenizer, self.on_text = loaded.tokenizer, on_text
        self.byte_decoders = [codecs.getincrementaldecoder("utf-8")("replace")
                              for _ in range(batch)]
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.sent = [""] * batch

    def __call__(self, row: int, ids: list[int]) -> None:
        if self.on_text is None:
            return
        eod = getattr(self.tokenizer, "eod", None)
        ids = [i for i in ids if i != eod]
        if isinstance(self.tokenizer, ByteTokenizer):
            text = self.byte_decoders[row].decode(bytes(i for i in ids if i < 256))
        else:
            self.ids[row].extend(ids)
            full = self.tokenizer.decode(self.ids[row])
            text, self.sent[row] = full[len(self.sent[row]):], full
        if text:
            self.on_text(row, text)


def decode_text(loaded: LoadedModel, ids: list[int]) -> str:
    """Text of generated ids. Byte ids become UTF-8 text (invalid sequences replaced); ids a
    byte tokenizer never emits (past 255: the vocabulary's padding) and the end-of-document
    token are left out."""
    if isinstance(loaded.tokenizer, ByteTokenizer):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")
    return loaded.tokenizer.decode(ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ids(loaded: LoadedModel, prompt_ids: list[torch.Tensor], options: GenerateOptions,
               draft_depths: int, on_tokens: Callable[[int, list[int]], None] | None = None,
               ) -> tuple[list[list[int]], float, SpeculativeCounts | None]:
    """One decoding of `prompt_ids`: (generated ids per prompt, seconds, speculative counts)."""
    model = loaded.model
    device = model.output_weight().device
    eod = getattr(loaded.tokenizer, "eod", None)
    settings = SamplingSettings(options.temperature, options.top_p)
    generator = torch.Generator(device=device)
    generator.manual_seed(options.seed)
    limit = max_positions(model)  # no row grows past the context the model attends to
    new_tokens = min(options.max_new_tokens, limit)
    check_decode_memory(model, [len(p) for p in prompt_ids], new_tokens, draft_depths)
    seqs = Sequences(prompt_ids, new_tokens, limit, eod, device,
                     scratch=draft_depths + 1, on_tokens=on_tokens)
    _sync(device)
    start = time.perf_counter()
    stats = None
    if draft_depths:
        stats = SpeculativeDecoder(model, seqs, settings, draft_depths, generator).run()
    else:
        decode_plain(model, seqs, settings, generator)
    _sync(device)
    return seqs.generated(), time.perf_counter() - start, stats


def generate(loaded: LoadedModel, prompts: list[str], options: GenerateOptions, *,
             where: list[str] | None = None, on_text: OnText | None = None) -> GenerateResult:
    """Decode `prompts` with the loaded model (see the module doc)."""
    depths = _check_options(options, loaded.mtp_depths)
    where = where or [f"--prompt {i + 1}" for i in range(len(prompts))]
    if not prompts:
        encode_prompts(loaded, prompts, where)  # the refusal of an empty list
    result = GenerateResult(prompts, [], [], 0.0, notes=list(loaded.notes))
    batches = []
    for first in range(0, len(prompts), PROMPT_BATCH):  # memory bounded by one batch
        batch = slice(first, first + PROMPT_BATCH)
        prompt_ids = encode_prompts(loaded, prompts[batch], where[batch])
        stream = _TextStream(loaded, len(prompt_ids), on_text and _shifted(on_text, first))
        ids, seconds, stats = decode_ids(loaded, prompt_ids, options, depths, stream)
        result.token_ids += ids
        result.texts += [decode_text(loaded, x) for x in ids]
        result.seconds += seconds
        if stats is not None:
            batches.append(stats)
        if depths and options.baseline:
            _time_against_plain(loaded, prompt_ids, options, depths, ids, result)
    if batches:
        result.speculative = functools.reduce(SpeculativeCounts.merge, batches).as_dict()
    if result.timing is not None:  # each mode's seconds: the median of its timed runs
        result.seconds = statistics.median(result.timing.speculative)
        result.plain_seconds = statistics.median(result.timing.plain)
    return result


def _time_against_plain(loaded: LoadedModel, prompt_ids: list[list[int]],
                        options: GenerateOptions, depths: int, ids: list[list[int]],
                        result: GenerateResult) -> None:
    """Time one batch's plain and speculative decoding interleaved, `options.speedup_repeats`
    pairs (`interleaved_speedup`), adding each repetition's seconds to the earlier batches'."""
    plain_ids: list[list[int]] = []

    def plain() -> float:
        generated, plain_seconds, _ = decode_ids(loaded, prompt_ids, options, 0)
        plain_ids[:] = generated
        return plain_seconds

    def speculative() -> float:
        return decode_ids(loaded, prompt_ids, options, depths)[1]

    timing = interleaved_speedup(plain, speculative, options.speedup_repeats)
    if result.timing is not None:
        timing = SpeedupTiming([a + b for a, b in zip(result.timing.plain, timing.plain,
                                                      strict=True)],
                               [a + b for a, b in zip(result.timing.speculative,
                                                      timing.speculative, strict=True)])
    result.timing = timing
    if options.temperature == 0:
        result.identical_to_plain = plain_ids == ids and result.identical_to_plain is not False


def _shifted(on_text: OnText, first: int) -> OnText:
    """`on_text` of a batch starting at prompt `first`: rows numbered across batches."""
    return lambda row, text: on_text(first + row, text)


PROMPT_FILE_LIMIT = 16 * 2**20


def collect_prompts(prompts: list[str], prompt_file: Any = None) -> tuple[list[str], list[str]]:
    """The prompts of `--prompt` (repeated) or `--prompt-file` (one per line), and where each
    came from for messages. UserError for both or neither, or an unreadable file."""
    from pathlib import Path

    from mtp_cli.checkpoint.files import read_text

    if prompts and prompt_file is not None:
        raise UserError(problems=[Problem("give --prompt or --prompt-file, not both",
                                          key="--prompt-file")])
    if prompt_file is None:
        if not prompts:
            raise UserError(problems=[Problem("give at least one prompt", key="--prompt",
                                              hint="or --prompt-file FILE, one per line")])
        return list(prompts), [f"--prompt {i + 1}" for i in range(len(prompts))]
    path = Path(prompt_file)
    try:
        text = read_text(path, PROMPT_FILE_LIMIT)
    except OSError as error:
        raise UserError(problems=[Problem(f"cannot be read ({error.strerror or error})",
                                          file=str(path))]) from None
    lines = text.splitlines()
    if not lines:
        raise UserError(problems=[Problem("holds no prompt (one per line)", file=str(path))])
    return lines, [f"{path}:{i + 1}" for i in range(len(lines))]
