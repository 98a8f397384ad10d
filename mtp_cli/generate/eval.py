"""`mtp eval`: held-out losses per depth, the training-time acceptance proxies side by side, and
the acceptance length of real speculative decoding on prompts from the same data.

Per depth k (row i of depth k predicts token i+k+1; rows whose target runs past the window are
left out):
* `loss`: cross-entropy against the data (what training logs as `mtp_k loss`);
* `top1_vs_labels`: argmax equals the data token (Megatron-Core's `mtp_k_acceptance_rate`);
* `top1_vs_main_greedy`: argmax equals the main model's own greedy token at that position;
* `joint_prefix_rate`: depths 1..k all equal the main model's greedy tokens: what a greedy
  verifier would accept of the drafts, teacher-forced on the data.
Then `acceptance_length`: tokens per round, teacher-forced (1 + mean joint prefix) and measured
by speculative decoding (greedy, every depth) of prompts cut from the split's first windows.

Written to `RUN_DIR/eval/step_NNNNNNN.json` (`step_NNNNNNN.train.json` for `--split train`;
a temporary file renamed into place: a training
job running beside it never sees half a file; no lock is taken).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from mtp_cli.errors import Problem, UserError
from mtp_cli.generate.load import LoadedModel
from mtp_cli.generate.run import GenerateOptions, decode_ids
from mtp_cli.generate.teacher import depth_logits, prefix_counts, shifted
from mtp_cli.report.evals import EVAL_DIR

BATCH = 8
PROMPTS = 8


def eval_path(run_dir: Any, step: int, split: str = "val") -> Any:
    """`eval/step_N.json` for the validation split (what `mtp report` shows), and
    `eval/step_N.train.json` for the training split: one never overwrites the other."""
    from mtp_cli.checkpoint.layout import checkpoint_name

    suffix = "" if split == "val" else f".{split}"
    return run_dir / EVAL_DIR / f"{checkpoint_name(step)}{suffix}.json"


def _windows(loaded: LoadedModel, split: str, tokens: int) -> tuple[Any, int]:
    """The split's windows and how many of them `tokens` asks for (read per batch later:
    `--tokens 10^12` never loads a whole split at once)."""
    from mtp_cli.data.datasets import build_datasets

    if split not in ("val", "train"):
        raise UserError(problems=[Problem(f"{split!r} is not val or train", key="--split")])
    if tokens < 1:
        raise UserError(problems=[Problem("must be at least 1", key="--tokens")])
    train, val = build_datasets(loaded.spec)
    windows = val if split == "val" else train
    if len(windows) == 0:
        raise UserError(problems=[Problem(f"the {split} split holds no window of "
                                          f"{windows.seq_length + 1} tokens", key="--split")])
    count = min(len(windows), max(1, math.ceil(tokens / windows.seq_length)))
    return windows, count


class _Sums:
    def __init__(self, depths: int) -> None:
        self.depths = depths
        self.lm_loss = self.lm_tokens = 0.0
        self.loss = [0.0] * depths
        self.rows = [0] * depths
        self.labels = [0] * depths
        self.greedy = [0] * depths
        self.prefix = [0] * depths
        self.prefix_rows = 0
        self.prefix_total = 0

    def add(self, logits: list[torch.Tensor], labels: torch.Tensor) -> None:
        main = logits[0].float()
        self.lm_loss += float(F.cross_entropy(main.flatten(0, 1), labels.flatten(),
                                              reduction="sum"))
        self.lm_tokens += labels.numel()
        greedy = main.argmax(-1)  # [b, s]: the main model's token i+1 at row i
        s = labels.shape[1]
        matches = []
        for k in range(1, self.depths + 1):
            valid = s - k  # rows 0 .. s-k-1 have a target
            if valid <= 0:
                matches.append(torch.zeros_like(greedy, dtype=torch.bool))
                continue
            depth = logits[k].float()[:, :valid]
            target = labels[:, k:]
            self.loss[k - 1] += float(F.cross_entropy(depth.flatten(0, 1), target.flatten(),
                                                      reduction="sum"))
            self.rows[k - 1] += target.numel()
            drafts = depth.argmax(-1)
            self.labels[k - 1] += int((drafts == target).sum())
            self.greedy[k - 1] += int((drafts == greedy[:, k:]).sum())
            matches.append(logits[k].argmax(-1) == shifted(greedy, k))
        rows = s - self.depths  # rows where every depth has a target
        if rows > 0 and self.depths:  # (a model without MTP has no drafts to count)
            counts = prefix_counts(matches)[:, :rows]
            self.prefix_rows += counts.numel()
            self.prefix_total += int(counts.sum())
            for k in range(1, self.depths + 1):
                self.prefix[k - 1] += int((counts >= k).sum())


def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole else None


@torch.no_grad()
def evaluate(loaded: LoadedModel, *, split: str = "val", tokens: int = 16384,
             write: bool = True) -> dict[str, Any]:
    """Score `loaded` on `tokens` tokens of `split` (module doc); write the result."""
    start = time.perf_counter()
    windows, count = _windows(loaded, split, tokens)
    model, depths = loaded.model, loaded.mtp_depths
    device = model.output_weight().device
    sums = _Sums(depths)
    for first in range(0, count, BATCH):
        chunk = windows.windows(list(range(first, min(first + BATCH, count)))).to(device)
        sums.add(depth_logits(model, chunk[:, :-1]), chunk[:, 1:])
    first_windows = windows.windows(list(range(min(PROMPTS, count))))
    spec_stats = _speculative(loaded, first_windows) if depths else None
    per_depth = spec_stats["per_depth"] if spec_stats else []
    rows = []
    for k in range(depths):
        rows.append({
            "depth": k + 1, "loss": _rate(sums.loss[k], sums.rows[k]),
            "top1_vs_labels": _rate(sums.labels[k], sums.rows[k]),
            "top1_vs_main_greedy": _rate(sums.greedy[k], sums.rows[k]),
            "joint_prefix_rate": _rate(sums.prefix[k], sums.prefix_rows),
            "speculative_acceptance_rate": per_depth[k]["acceptance_rate"],
            "speculative_conditional_acceptance_rate":
                per_depth[k]["conditional_acceptance_rate"],
        })
    mean_prefix = _rate(sums.prefix_total, sums.prefix_rows)
    result: dict[str, Any] = {
        "step": loaded.step, "checkpoint": str(loaded.source), "split": split,
        "tokens": int(sums.lm_tokens), "windows": count,
        "lm_loss": _rate(sums.lm_loss, sums.lm_tokens), "depths": rows,
        "acceptance_length": {
            "teacher_forced": None if mean_prefix is None else 1 + mean_prefix,
            "speculative": spec_stats["mean_accepted_length"] if spec_stats else None,
        },
        "speculative": spec_stats, "seconds": time.perf_counter() - start,
        "time": time.time(), "written": None,
    }
    if write and loaded.run_dir is not None and loaded.step is not None:
        result["written"] = str(_write(loaded, result))
    return result


def _speculative(loaded: LoadedModel, windows: torch.Tensor) -> dict[str, Any]:
    """Greedy speculative decoding (every depth) of the first half of up to PROMPTS windows."""
    half = max(1, (windows.shape[1] - 1) // 2)
    prompts = [windows[i, :half] for i in range(min(PROMPTS, windows.shape[0]))]
    options = GenerateOptions(max_new_tokens=half, speculative="on", baseline=False)
    _, _, stats = decode_ids(loaded, prompts, options, loaded.mtp_depths)
    return stats.as_dict() if stats is not None else {}


def _write(loaded: LoadedModel, result: dict[str, Any]) -> Any:
    from mtp_cli.checkpoint.publish import atomic_write_text

    path = eval_path(loaded.run_dir, loaded.step, result["split"])
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    except OSError as error:
        raise UserError(problems=[Problem(f"cannot write the eval result ({error.strerror})",
                                          file=str(path))]) from None
    return path
