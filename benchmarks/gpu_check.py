"""The GPU check of issue 24, one command, no arguments (under 8 minutes on one H100):

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke     # a 2-step miniature of every stage, on CPU

Training stages (`mtp train`, one process, bf16, metrics read from metrics.jsonl: tokens/s and
`mfu` as medians of the steps after the first two, peak memory as the largest `peak_memory_mb`):

* gpt_125m, `backend=local`, packed documents off and on (on: micro-batches of 1, global 8);
* gpt_125m, `backend=te`, off and on, where Transformer Engine imports;
* gpt_125m, `train.compile=true` with `backend=local`, where the schema has `train.compile`;
* specs/gpt_1b.yaml in its own settings (fewer steps);
* a 2-step run with `--nproc 1` (on CUDA the worker's process group is nccl).

In-process checks on the device:

* max |logit difference| of the local and the TE model on the same weights (bf16);
* packed-document attention (`packed_causal_attention`, whatever kernel it picks on the device)
  against the dense-mask reference in bf16 and against the float32 reference, and their times.

Every stage runs even when one fails; the summary table says which failed and why, and the exit
code is 1 if any did. `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# gpt_125m at a global batch that keeps 20 steps to seconds on an H100 (the spec's 256 x 1024
# tokens would take minutes per stage)
GPT_125M = ("specs/gpt_125m.yaml", ["train.global_batch_size=64"])
# packed documents (THD) take micro-batches of one sequence; a smaller global batch keeps the
# step count of micro-batches as it is
PACKED = ["data.packed=true", "train.micro_batch_size=1", "train.global_batch_size=8"]
# the CPU miniature: tiny dimensions of the same specs, float32
SMOKE_DIMS = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.ffn_hidden_size=128", "model.seq_length=64", "model.vocab_size=320",
              "train.micro_batch_size=2", "train.global_batch_size=4", "train.bf16=false"]


@dataclass
class Stage:
    name: str
    spec: str
    overrides: list[str]
    steps: int
    skip: str | None = None  # why the stage does not run here
    result: dict[str, Any] = field(default_factory=dict)


def transformer_engine_imports() -> str | None:
    """None when Transformer Engine imports, otherwise why not."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:  # a broken CUDA install raises anything at import
        return f"transformer_engine does not import ({type(error).__name__})"
    return None


def has_compile_key() -> bool:
    from mtp_cli.config.train_config import TrainConfig

    return "compile" in TrainConfig.model_fields


def training_stages(smoke: bool, steps: int) -> list[Stage]:
    """The `mtp train` stages of the check (module docstring); smoke: 2 steps on tiny dims."""
    te_missing = transformer_engine_imports()
    spec, base = GPT_125M
    if smoke:
        base, steps = SMOKE_DIMS, 2
    big_steps = 2 if smoke else max(steps // 2, 5)
    packed = [*base, *PACKED]
    stages = [Stage("125m local", spec, base, steps),
              Stage("125m local packed", spec, packed, steps),
              Stage("125m te", spec, [*base, "model.backend=te"], steps, skip=te_missing),
              Stage("125m te packed", spec, [*packed, "model.backend=te"], steps,
                    skip=te_missing)]
    stages.append(Stage("125m local compile", spec, [*base, "train.compile=true"], steps,
                        skip=None if has_compile_key() else "the schema has no train.compile"))
    stages.append(Stage("1b default", "specs/gpt_1b.yaml", SMOKE_DIMS if smoke else [],
                        big_steps))
    stages.append(Stage("nccl 2 steps" if torch.cuda.is_available() else "gloo 2 steps", spec,
                        base, 2))
    return stages


def metrics_summary(metrics: Path) -> dict[str, Any]:
    """tokens/s and MFU (medians of the steps after the first two), peak memory (largest)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    steady = rows[2:] or rows

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"steps": len(rows), "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"),
            "tflops_per_device": median("tflops_per_device"),
            "peak_memory_mb": max((r.get("peak_memory_mb") or 0) for r in rows) if rows else None,
            "lm_loss_last": rows[-1]["lm_loss"] if rows else None}


def run_training(stage: Stage, root: Path, timeout: float) -> None:
    """One `mtp train` of `stage` into `root/<name>`; fills `stage.result`."""
    run_dir = root / stage.name.replace(" ", "_")
    command = [sys.executable, "-m", "mtp_cli", "train", stage.spec, *stage.overrides,
               f"train.steps={stage.steps}", "train.log_interval=1", "checkpoint.interval=0",
               "train.eval_interval=0", "logging.tensorboard=false", "--run-dir", str(run_dir),
               "--nproc", "1"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    stage.result["wall_s"] = time.perf_counter() - started
    if done.returncode:
        stage.result["error"] = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]
        return
    stage.result.update(metrics_summary(run_dir / "metrics.jsonl"))


def device_and_dtype(smoke: bool) -> tuple[torch.device, torch.dtype]:
    if smoke or not torch.cuda.is_available():
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16


def logit_difference(smoke: bool) -> dict[str, Any]:
    """max |logits local - logits te| on the same weights and tokens."""
    missing = transformer_engine_imports()
    if missing is not None:
        return {"skipped": missing}
    from mtp_cli import build_model, load_spec

    device, dtype = device_and_dtype(smoke)
    spec_path, base = GPT_125M
    local_spec = load_spec(spec_path, [*base, "model.backend=local"])
    te_spec = load_spec(spec_path, [*base, "model.backend=te"])
    torch.manual_seed(0)
    local = build_model(local_spec, device).to(dtype).eval()
    te = build_model(te_spec, device).to(dtype).eval()
    loaded = te.load_state_dict(local.state_dict(), strict=False)
    unloaded = [k for k in loaded.missing_keys if not k.endswith("_extra_state")]
    tokens = torch.randint(0, local_spec.model.vocab_size, (2, 512), device=device)
    with torch.no_grad():
        diff = (local(tokens).float() - te(tokens).float()).abs().max().item()
    return {"max_abs_logit_diff": diff, "te_keys_not_loaded": unloaded[:5],
            "unexpected_keys": list(loaded.unexpected_keys)[:5]}


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of `fn` (after one warm-up), synchronised on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def packed_attention_check(smoke: bool) -> dict[str, Any]:
    """The packed-document path on the device against the dense mask, bf16 and float32."""
    import torch.nn.functional as F

    from mtp_cli.models.attention import packed_causal_attention, packed_document_mask
    from mtp_cli.nn.packed import PackedSeqParams

    device, dtype = device_and_dtype(smoke)
    seq, heads, dim = (256, 4, 32) if smoke else (4096, 16, 64)
    bounds = torch.tensor([0, seq // 8, seq // 2, seq // 2 + 1, seq], dtype=torch.int32)
    params = PackedSeqParams(cu_seqlens_q=bounds, cu_seqlens_kv=bounds)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=generator).to(device) for _ in range(3))
    mask = ~packed_document_mask(seq, params, device)  # True = attend
    sdpa = F.scaled_dot_product_attention
    reference = sdpa(q, k, v, attn_mask=mask)  # float32, dense mask
    ql, kl, vl = (x.to(dtype) for x in (q, k, v))
    packed = packed_causal_attention(ql, kl, vl, params, sdpa)
    dense = sdpa(ql, kl, vl, attn_mask=mask)
    packed_s = timed(lambda: packed_causal_attention(ql, kl, vl, params, sdpa), device)
    dense_s = timed(lambda: sdpa(ql, kl, vl, attn_mask=mask), device)
    return {"dtype": str(dtype).removeprefix("torch."), "seq": seq,
            "max_abs_packed_vs_dense": (packed.float() - dense.float()).abs().max().item(),
            "max_abs_packed_vs_fp32_reference": (packed.float() - reference).abs().max().item(),
            "max_abs_dense_vs_fp32_reference": (dense.float() - reference).abs().max().item(),
            "packed_over_dense_time": packed_s / dense_s}


def guarded(check: Callable[[bool], dict[str, Any]], smoke: bool) -> dict[str, Any]:
    """A check's figures, or the error it raised (the other stages still run)."""
    try:
        return check(smoke)
    except Exception as error:
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {error}"[:200]}


def print_table(stages: list[Stage]) -> None:
    print(f"{'stage':22s} {'steps':>5s} {'tokens/s':>11s} {'MFU':>7s} {'peak MB':>9s} "
          f"{'wall s':>7s}  status")
    for stage in stages:
        r = stage.result
        status = f"skipped: {stage.skip}" if stage.skip else r.get("error", "ok")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{stage.name:22s} {r.get('steps', 0):5d} {r.get('tokens_per_s') or 0:11.0f} "
              f"{mfu:>7s} {r.get('peak_memory_mb') or 0:9.0f} {r.get('wall_s', 0):7.1f}  {status}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a 2-step miniature of every stage on CPU (tests the script)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the gpt_125m stages")
    parser.add_argument("--timeout", type=float, default=240.0, help="per stage, seconds")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or --cpu-smoke for the CPU miniature")
        return 2
    started = time.perf_counter()
    device = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"torch {torch.__version__} on {device}", flush=True)
    stages = training_stages(args.cpu_smoke, args.steps)
    with tempfile.TemporaryDirectory() as root:
        for stage in stages:
            if stage.skip is None:
                print(f"running {stage.name} ...", flush=True)
                run_training(stage, Path(root), args.timeout)
    checks = {"logits_local_vs_te": guarded(logit_difference, args.cpu_smoke),
              "packed_attention": guarded(packed_attention_check, args.cpu_smoke)}
    print_table(stages)
    for name, figures in checks.items():
        print(f"{name}: {json.dumps(figures)}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "checks": checks, "stages": [
            {"name": s.name, "skip": s.skip, **s.result} for s in stages]}, indent=2) + "\n")
    failed = [s for s in stages if "error" in s.result] + [
        c for c in checks.values() if "error" in c]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
