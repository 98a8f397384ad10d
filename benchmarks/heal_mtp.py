"""Healing MTP heads after fine-tuning (`mtp.distill`), end to end on specs/tiny.yaml (D = 2).

1. Pretrain specs/tiny.yaml (the default corpus: the standard library's Python sources).
2. Fine-tune the main model alone on another corpus: the standard library's docstrings, parsed
   with `ast` from the same files (English prose, no code; built here as JSONL, one document per
   module). The MTP depths are frozen and λ = 0, as when an SFT tool drops or ignores them.
   Route: `mtp export` -> `mtp import` (a fresh optimizer, the new data and freeze list).
3. Heal: main model frozen, `mtp.detach_heads`, the same steps on the fine-tune corpus, once with
   `mtp.distill: true` and once without.
4. Measure the four models on the fine-tune corpus: `mtp eval` (held-out split: teacher-forced
   agreement of each depth with the main model's greedy token, the joint prefix rate, and
   speculative decoding of prompts cut from the split) and `mtp generate` (speculative decoding
   of prompts from modules held out of the corpus, greedy and sampled at T = 1, where acceptance
   is the overlap of the drafting and the main distributions: a tiny model's greedy
   continuations soon fall into loops that any head predicts), through their library functions
   in this process (the CLI commands print the same numbers).

Run: `python benchmarks/heal_mtp.py [--out runs/heal]` (~15 min on 2 shared CPU cores; one
thread per process, since spinning thread pools on a shared machine cost 10x).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 16  # modules whose docstrings give the decoding prompts, never trained on
PROMPT_CHARS = 40
NEW_TOKENS = 96
SAMPLING = 1.0  # the sampled decoding's temperature: acceptance = the overlap of distributions
TRAIN = ["train.micro_batch_size=2", "train.global_batch_size=16", "train.eval_interval=0",
         "checkpoint.interval=0", "data.tokenizer=null"]
MAIN = "train.freeze=[embedding,decoder,output_layer]"


def docstring_documents() -> list[tuple[str, str]]:
    """(module path, its docstrings joined) for every standard-library source file, sorted."""
    from mtp_cli.data.corpus import STDLIB_EXCLUDED_DIRS

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: str(p.relative_to(stdlib))):
        parts = path.relative_to(stdlib).parts
        if any(p in STDLIB_EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(
            n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
        texts = [t for n in nodes if (t := ast.get_docstring(n))]
        if texts:
            docs.append((str(path.relative_to(stdlib)), "\n\n".join(texts) + "\n"))
    return docs


def write_corpus(out: Path) -> tuple[Path, list[str]]:
    """The fine-tune corpus (JSONL) and prompts from the held-out modules' docstrings."""
    docs = docstring_documents()
    held, kept = docs[-HELD_OUT:], docs[:-HELD_OUT]
    corpus = out / "docstrings.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for _, text in kept:
            f.write(json.dumps({"text": text}) + "\n")
    prompts = [text.split("\n", 1)[0][:PROMPT_CHARS] for _, text in held]
    size = sum(len(t) for _, t in kept)
    print(f"fine-tune corpus: {len(kept)} modules' docstrings, {size / 1e6:.2f} MB -> {corpus}; "
          f"prompts from {', '.join(name for name, _ in held)}")
    return corpus, prompts


def mtp(*args: str) -> None:
    """One `mtp` command in a child process (one thread), its last lines shown."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mtp_cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-2:]
    print(f"$ mtp {' '.join(args)}  ({time.perf_counter() - started:.0f} s)")
    for line in tail:
        print(f"    {line}")
    if done.returncode:
        raise SystemExit(f"mtp {args[0]} failed ({done.returncode})")


def import_run(source: Path, out: Path, overrides: list[str]) -> None:
    """`mtp export` a run's latest checkpoint once, then `mtp import` it with `overrides`."""
    hf = source.with_name(source.name + "_hf")
    if not hf.exists():
        mtp("export", str(source), "--out", str(hf))
    mtp("import", str(hf), "--out", str(out), *TRAIN, *overrides)


def measure(checkpoint: Path, prompts: list[str], tokens: int) -> dict[str, Any]:
    """`mtp eval` and `mtp generate` figures of one checkpoint (module doc, step 4)."""
    from mtp_cli.generate.eval import evaluate
    from mtp_cli.generate.load import load_for_generation
    from mtp_cli.generate.run import GenerateOptions, generate

    loaded = load_for_generation(checkpoint, "cpu")
    result = evaluate(loaded, split="val", tokens=tokens, write=False)
    row = {
        "lm_loss": result["lm_loss"],
        "vs_greedy": [d["top1_vs_main_greedy"] for d in result["depths"]],
        "joint": [d["joint_prefix_rate"] for d in result["depths"]],
        "eval_spec": [d["speculative_acceptance_rate"] for d in result["depths"]],
        "eval_length": result["acceptance_length"]["speculative"],
    }
    for name, temperature in (("greedy", 0.0), ("sampled", SAMPLING)):
        options = GenerateOptions(max_new_tokens=NEW_TOKENS, temperature=temperature, seed=1,
                                  speculative="on", baseline=False)
        stats = generate(loaded, prompts, options).speculative
        row[name] = [d["acceptance_rate"] for d in stats["per_depth"]]
        row[f"{name}_length"] = stats["mean_accepted_length"]
    return row


def last_metrics(run: Path) -> dict[str, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in lines[-1].items() if k.startswith("mtp_")}


def _pct(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{100 * v:5.1f}" for v in values)


def tables(rows: dict[str, dict[str, Any]]) -> str:
    """`mtp eval`'s and `mtp generate`'s figures, one row per model."""
    head_eval = (f"{'mtp eval (held-out split)':<26} {'lm loss':>7}  {'top1 = main greedy':>18}  "
                 f"{'joint prefix':>13}  {'spec. decoding':>14} {'len':>5}")
    head_gen = (f"{'mtp generate (16 prompts)':<26} {'greedy accept':>14} {'len':>5}  "
                f"{f'T={SAMPLING:g} accept':>14} {'len':>5}")
    lines = [head_eval, "-" * len(head_eval)]
    for name, r in rows.items():
        lines.append(f"{name:<26} {r['lm_loss']:7.3f}  {_pct(r['vs_greedy']):>18}  "
                     f"{_pct(r['joint']):>13}  {_pct(r['eval_spec']):>14} "
                     f"{r['eval_length']:5.2f}")
    lines += ["", head_gen, "-" * len(head_gen)]
    for name, r in rows.items():
        lines.append(f"{name:<26} {_pct(r['greedy']):>14} {r['greedy_length']:5.2f}  "
                     f"{_pct(r['sampled']):>14} {r['sampled_length']:5.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    corpus, prompts = write_corpus(out)
    base, finetune = out / "base", out / "finetune"
    mtp("train", "specs/tiny.yaml", "--run-dir", str(base), f"train.steps={args.pretrain}",
        "train.eval_interval=0", "checkpoint.interval=0")
    import_run(base, finetune, [f"data.path={corpus}", "train.freeze=[mtp]",
                                "mtp.loss_scaling_factor=0", f"train.steps={args.finetune}",
                                "train.lr=2e-3", "train.min_lr=2e-4", "train.warmup_steps=10"])
    mtp("train", str(finetune / "spec.yaml"), "--run-dir", str(finetune))
    heal = {flag: out / f"heal_distill_{flag}" for flag in ("true", "false")}
    for flag, run_dir in heal.items():
        import_run(finetune, run_dir, [
            f"data.path={corpus}", MAIN, "mtp.detach_heads=true", f"mtp.distill={flag}",
            "mtp.loss_scaling_factor=1", f"train.steps={args.heal}", "train.lr=3e-3",
            "train.min_lr=3e-4", "train.warmup_steps=10"])
        mtp("train", str(run_dir / "spec.yaml"), "--run-dir", str(run_dir))
    for flag, run_dir in heal.items():
        print(f"heal distill={flag}: last metrics line {last_metrics(run_dir)}")
    models = {
        "before fine-tune": finetune / "checkpoints" / "step_0000000",  # base weights
        "after fine-tune": finetune,
        "after heal, distill on": heal["true"],
        "after heal, distill off": heal["false"],
    }
    rows = {}
    for name, path in models.items():
        started = time.perf_counter()
        rows[name] = measure(path, prompts, args.eval_tokens)
        print(f"measured {name} ({time.perf_counter() - started:.0f} s)")
    print("\nPer depth (d1 / d2, %) on the fine-tune corpus; len = tokens per verify round")
    print(tables(rows))
    (out / "heal_results.json").write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "heal")
    parser.add_argument("--pretrain", type=int, default=300, help="pretraining steps")
    parser.add_argument("--finetune", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--heal", type=int, default=150, help="healing steps (each variant)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    run(args)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
