"""Self-speculative decoding with the MTP depths against plain KV-cache decoding, and plain
decoding against transformers' `generate()` on the exported model.

Models: specs/tiny.yaml trained 300 steps on the embedded corpus (`mtp train`), and a deeper
variant (model.num_layers=12: the main decoder costs well over 8x one MTP depth) trained 400
steps. Prompts: batch 1, the first PROMPT_TOKENS tokens of validation windows, greedy, up to the
model's maximum positions. Per number of draft depths K it reports acceptance per depth
(unconditional and conditional), the mean accepted length (tokens per round), tokens/s plain and
speculative (same prompts, same tokens: checked identical), the measured speed-up and the ideal
one predicted by the measured acceptance and step costs:

    ideal = (mean tokens per round) / (1 + K x draft-step time / plain-step time)

anchored on the plain one-token step (a verify pass slower than a plain step shows as a
shortfall). Target: measured >= 0.85 x ideal. Times are CPU seconds of this process
(`time.process_time`, one thread): the machine is shared, and wall time would charge other
processes' work to whichever run they overlapped; every configuration runs REPEATS times,
interleaved, and the fastest run counts.

Run: `python benchmarks/generate_speedup.py [--tiny-run DIR] [--deep-run DIR] [--work DIR]`
(without the run options it trains both first: several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_cli.data.datasets import build_datasets  # noqa: E402
from mtp_cli.generate.decode import decode_plain  # noqa: E402
from mtp_cli.generate.load import LoadedModel, load_for_generation  # noqa: E402
from mtp_cli.generate.sampling import SamplingSettings  # noqa: E402
from mtp_cli.generate.sequences import Sequences  # noqa: E402
from mtp_cli.generate.speculative import SpeculativeDecoder  # noqa: E402
from mtp_cli.generate.streams import max_positions  # noqa: E402

PROMPT_TOKENS, PROMPTS, REPEATS = 16, 12, 3
GREEDY = SamplingSettings()
CLOCK = time.process_time


def train(run_dir: Path, *overrides: str) -> Path:
    if (run_dir / "checkpoints" / "latest").exists():
        return run_dir
    print(f"training {run_dir} ({' '.join(overrides) or 'specs/tiny.yaml'})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mtp_cli", "train", "specs/tiny.yaml",
                           *overrides, "--run-dir", str(run_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return run_dir


def prompts_of(loaded: LoadedModel) -> list[torch.Tensor]:
    _, val = build_datasets(loaded.spec)
    return [val[i][:PROMPT_TOKENS] for i in range(PROMPTS)]


def _plain(model, prompt: torch.Tensor, new: int) -> tuple[list[int], float]:
    seqs = Sequences([prompt], new, max_positions(model), None, torch.device("cpu"))
    start = CLOCK()
    decode_plain(model, seqs, GREEDY)
    return seqs.generated()[0], CLOCK() - start


def _speculative(model, prompt: torch.Tensor, new: int, k: int):
    seqs = Sequences([prompt], new, max_positions(model), None, torch.device("cpu"),
                     scratch=k + 1)
    decoder = SpeculativeDecoder(model, seqs, GREEDY, k, clock=CLOCK)
    start = CLOCK()
    counts = decoder.run()
    return seqs.generated()[0], CLOCK() - start, counts


def measure(loaded: LoadedModel, label: str) -> list[dict[str, Any]]:
    model, depths = loaded.model, loaded.mtp_depths
    prompts = prompts_of(loaded)
    new = max_positions(model) - PROMPT_TOKENS
    best: dict[str, float] = {}
    counts_of: dict[int, Any] = {}
    outputs: dict[str, list[list[int]]] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    with torch.no_grad():
        for _ in range(REPEATS):
            for name in ["plain", "prefill", *[f"k{k}" for k in range(1, depths + 1)]]:
                total, ids, merged = 0.0, [], None
                for prompt in prompts:
                    if name == "prefill":
                        _, seconds = _plain(model, prompt, 1)
                    elif name == "plain":
                        out, seconds = _plain(model, prompt, new)
                        ids.append(out)
                    else:
                        out, seconds, counts = _speculative(model, prompt, new, int(name[1:]))
                        ids.append(out)
                        merged = counts if merged is None else _merge(merged, counts)
                    total += seconds
                keep(name, total)
                outputs[name] = ids
                if merged is not None and (int(name[1:]) not in counts_of
                                           or best[name] == total):
                    counts_of[int(name[1:])] = merged  # the step costs of the fastest run
    tokens = sum(len(x) for x in outputs["plain"])
    plain_step = (best["plain"] - best["prefill"]) / (tokens - len(prompts))
    rows = []
    for k in range(1, depths + 1):
        stats = counts_of[k].as_dict()
        draft_step = stats["draft_step_seconds"]
        per_round = stats["mean_accepted_length"]
        ideal = per_round / (1 + k * draft_step / plain_step)
        measured = best["plain"] / best[f"k{k}"]
        rows.append({
            "model": label, "K": k, "identical": outputs[f"k{k}"] == outputs["plain"],
            "acceptance": [d["acceptance_rate"] for d in stats["per_depth"][:k]],
            "conditional": [d["conditional_acceptance_rate"] for d in stats["per_depth"][:k]],
            "mean_accepted_length": per_round,
            "plain_tok_s": tokens / best["plain"], "spec_tok_s": tokens / best[f"k{k}"],
            "plain_step_ms": 1e3 * plain_step, "draft_step_ms": 1e3 * draft_step,
            "verify_step_ms": 1e3 * stats["verify_step_seconds"],
            "speedup": measured, "ideal": ideal, "ratio": measured / ideal,
        })
    return rows


def _merge(a, b):
    a.rounds += b.rounds
    a.drafts_accepted += b.drafts_accepted
    for name in ("proposed", "accepted", "accepted_given_previous"):
        setattr(a, name, [x + y for x, y in zip(getattr(a, name), getattr(b, name), strict=True)])
    for name in ("main_forwards", "draft_forwards", "prefill_seconds", "draft_seconds",
                 "verify_seconds"):
        setattr(a, name, getattr(a, name) + getattr(b, name))
    return a


def compare_transformers(run_dir: Path, work: Path) -> dict[str, Any]:
    """Plain greedy decoding: ours against transformers' generate() on the exported model."""
    from transformers import AutoModelForCausalLM

    out = _export(run_dir, work / "hf_export")
    loaded = load_for_generation(run_dir, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = prompts_of(loaded)
    new = max_positions(loaded.model) - PROMPT_TOKENS
    ours_best = theirs_best = float("inf")
    same = True
    with torch.no_grad():
        for _ in range(REPEATS):
            ours_t = theirs_t = 0.0
            for prompt in prompts:
                ids, seconds = _plain(loaded.model, prompt, new)
                ours_t += seconds
                start = CLOCK()
                generated = hf.generate(prompt[None], max_new_tokens=new, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
                theirs_t += CLOCK() - start
                same &= generated[0, len(prompt):].tolist() == ids
            ours_best, theirs_best = min(ours_best, ours_t), min(theirs_best, theirs_t)
    tokens = len(prompts) * new
    return {"architecture": type(hf).__name__, "same_tokens": same,
            "mtp_cli_tok_s": tokens / ours_best, "transformers_tok_s": tokens / theirs_best,
            "ratio": theirs_best / ours_best}


def deepseek_v3_run(work: Path) -> Path:
    """A DeepSeek-V3-shaped tiny model (MLA, MoE from layer 4, 61 layers: transformers finds
    the MTP depth at `model.layers.61`, the released layer count; D = 1), random weights."""
    import yaml

    from mtp_cli.builders.model_builder import build_model
    from mtp_cli.config.loader import load_spec
    from mtp_cli.hf.step0_checkpoint import write_step0_checkpoint

    run = work / "dsv3"
    if (run / "checkpoints" / "latest").exists():
        return run
    data = yaml.safe_load((ROOT / "specs" / "tiny_moe.yaml").read_text())
    data["model"].update(num_layers=61, moe_layer_freq=[0] * 3 + [1] * 58,
                         layernorm_epsilon=1e-6)
    data["mtp"]["num_layers"] = 1
    spec = load_spec(data)
    state = build_model(spec).state_dict()
    write_step0_checkpoint(run, spec, {n: (tuple(t.shape), t.dtype, (lambda t=t: t))
                                       for n, t in state.items()}, {})
    return run


def _export(run_dir: Path, out: Path) -> Path:
    if not out.exists():
        subprocess.run([sys.executable, "-m", "mtp_cli", "export", str(run_dir), "--out",
                        str(out)], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def compare_transformers_mtp(run_dir: Path, work: Path, prompts: int = 4, new: int = 32,
                             repeats: int = 2) -> dict[str, Any]:
    """Plain and MTP-speculative greedy decoding, batch 1, D = 1: mtp-cli against
    transformers' generate() and generate(use_mtp=True) on the exported model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(_export(run_dir, work / "dsv3_hf"),
                                              dtype=torch.float32).eval()
    model = load_for_generation(run_dir, device="cpu").model
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (PROMPT_TOKENS,), generator=g) for _ in range(prompts)]
    best = {name: float("inf") for name in ("ours_plain", "ours_mtp", "hf_plain", "hf_mtp")}
    same = True
    with torch.no_grad():
        for _ in range(repeats):
            took = dict.fromkeys(best, 0.0)
            for prompt in inputs:
                plain, seconds = _plain(model, prompt, new)
                took["ours_plain"] += seconds
                spec, seconds, _ = _speculative(model, prompt, new, 1)
                took["ours_mtp"] += seconds
                for name, extra in (("hf_plain", {}), ("hf_mtp", {"use_mtp": True})):
                    start = CLOCK()
                    out = hf.generate(prompt[None], max_new_tokens=new, do_sample=False,
                                      eos_token_id=None, pad_token_id=0, **extra)
                    took[name] += CLOCK() - start
                    same &= out[0, len(prompt):].tolist() == plain
                same &= spec == plain
            best = {k: min(best[k], took[k]) for k in best}
    tokens = prompts * new
    return {"architecture": type(hf).__name__, "same_tokens": same,
            **{f"{k}_tok_s": tokens / v for k, v in best.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-run", type=Path)
    parser.add_argument("--deep-run", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="generate_speedup_"))
    tiny = args.tiny_run or train(work / "tiny")
    deep = args.deep_run or train(work / "deep", "model.num_layers=12", "train.steps=400")
    rows = []
    for label, run in (("tiny (4 layers, D=2)", tiny), ("deep (12 layers, D=2)", deep)):
        rows += measure(load_for_generation(run, device="cpu"), label)
    hf = compare_transformers(tiny, work)
    mtp = compare_transformers_mtp(deepseek_v3_run(work), work)
    if args.json:
        print(json.dumps({"speculative": rows, "transformers": hf,
                          "transformers_mtp": mtp}, indent=2))
        return
    print(f"{'model':24} K  identical  accept (cond)            len   plain tok/s  spec tok/s"
          "  plain/draft/verify ms  speed-up  ideal  ratio")
    for r in rows:
        acc = " ".join(f"{a:.2f}({c:.2f})" for a, c in zip(r["acceptance"], r["conditional"],
                                                          strict=True))
        print(f"{r['model']:24} {r['K']}  {r['identical']!s:9}  {acc:24} "
              f"{r['mean_accepted_length']:.2f}  {r['plain_tok_s']:11.1f}  "
              f"{r['spec_tok_s']:10.1f}  {r['plain_step_ms']:5.2f}/{r['draft_step_ms']:5.2f}/"
              f"{r['verify_step_ms']:5.2f}      {r['speedup']:5.2f}x  {r['ideal']:5.2f}x  "
              f"{r['ratio']:.2f}")
    print(f"plain decoding vs transformers generate() ({hf['architecture']}, same tokens: "
          f"{hf['same_tokens']}): mtp-cli {hf['mtp_cli_tok_s']:.1f} tok/s, transformers "
          f"{hf['transformers_tok_s']:.1f} tok/s, mtp-cli {hf['ratio']:.2f}x as fast")
    print(f"{mtp['architecture']} (61 layers, MLA + MoE, D=1, random weights; same tokens: "
          f"{mtp['same_tokens']}): plain mtp-cli {mtp['ours_plain_tok_s']:.1f} vs transformers "
          f"{mtp['hf_plain_tok_s']:.1f} tok/s; MTP mtp-cli {mtp['ours_mtp_tok_s']:.1f} vs "
          f"transformers use_mtp {mtp['hf_mtp_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
