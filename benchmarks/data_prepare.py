"""`mtp data prepare` throughput against Megatron-LM's `tools/preprocess_data.py`.

    python3 benchmarks/data_prepare.py [--mb 200] [--workers 1 2] [--megatron-lm DIR]

Generates a JSONL corpus of about `--mb` MB (the standard library's `.py` files, one document
each, cycled), trains a byte-level BPE tokenizer (8,192 ids, `<|endoftext|>`) on its first
8 MB and saves it as a transformers tokenizer directory, then times, each in a fresh process and
with `--append-eod`:
- `python3 -m mtp_cli data prepare CORPUS --tokenizer DIR/tokenizer.json --workers W`;
- Megatron-LM's `tools/preprocess_data.py --tokenizer-type HuggingFaceTokenizer
  --tokenizer-model DIR --workers W` (through `megatron_preprocess_shim.py`, which bridges its
  Python 3.12 and triton imports on this machine), when `--megatron-lm` names a checkout.
MB/s is input bytes over the wall time of the whole command (start-up included); tokens/s the
same for tokens. Last, each Megatron output is compared byte for byte with ours (same tokenizer,
same EOD rule, so the files should be identical).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, megabytes: int) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    written, target, cycle = 0, megabytes * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for file in files:
                text = file.read_text(encoding="utf-8", errors="replace")
                line = json.dumps({"text": f"# {cycle}\n{text}"}) + "\n"
                out.write(line)
                written += len(line.encode())
                if written >= target:
                    break
            cycle += 1
    return written


def make_tokenizer(corpus: Path, directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(exist_ok=True)
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > 8_000_000:
                break
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "model_max_length": 1 << 30}))


def timed(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "TOKENIZERS_PARALLELISM":
           os.environ.get("TOKENIZERS_PARALLELISM", "true")}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def count_tokens(prefix: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from mtp_cli.data.indexed import read_indexed_dataset

    return int(read_indexed_dataset(prefix)[1].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--megatron-lm", type=Path, help="a Megatron-LM checkout (tools/ and "
                                                         "megatron/)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = work / "corpus.jsonl", work / "tokenizer"
    if not corpus.exists():
        make_corpus(corpus, args.mb)
    size = corpus.stat().st_size
    if not (tokenizer / "tokenizer.json").exists():
        make_tokenizer(corpus, tokenizer)
    print(f"corpus {corpus}: {size / 1e6:,.1f} MB; tokenizer {tokenizer} (BPE, 8,192 ids); "
          f"{os.cpu_count()} CPU(s)")
    print(f"{'tool':<34}{'workers':>8}{'seconds':>10}{'MB/s':>9}{'tokens/s':>14}")
    rows = []
    for workers in args.workers:
        prefix = work / f"mtp_{workers}"
        seconds, stdout = timed([sys.executable, "-m", "mtp_cli", "data", "prepare", str(corpus),
                                 "--tokenizer", str(tokenizer / "tokenizer.json"), "--out",
                                 str(prefix), "--workers", str(workers), "--append-eod",
                                 "--overwrite", "--json"])
        tokens = json.loads(stdout[stdout.index("{"):])["tokens"]
        rows.append(("mtp data prepare", workers, seconds, tokens, prefix))
    if args.megatron_lm is not None:
        shim = ROOT / "benchmarks" / "megatron_preprocess_shim.py"
        for workers in args.workers:
            prefix = work / f"megatron_{workers}"
            seconds, _ = timed([sys.executable, str(shim), str(args.megatron_lm), "--input",
                                str(corpus), "--output-prefix", str(prefix), "--tokenizer-type",
                                "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer),
                                "--workers", str(workers), "--append-eod"])
            out = work / f"megatron_{workers}_text_document"
            rows.append(("Megatron-LM preprocess_data.py", workers, seconds, count_tokens(out),
                         out))
    for tool, workers, seconds, tokens, _ in rows:
        print(f"{tool:<34}{workers:>8}{seconds:>10.1f}{size / 1e6 / seconds:>9.2f}"
              f"{tokens / seconds:>14,.0f}")
    reference = rows[0][4]
    for tool, workers, _, _, prefix in rows[1:]:
        same = all(Path(f"{prefix}{s}").read_bytes() == Path(f"{reference}{s}").read_bytes()
                   for s in (".bin", ".idx"))
        print(f"{tool} ({workers} workers) .bin/.idx {'identical to' if same else 'DIFFER from'}"
              f" {reference.name}")


if __name__ == "__main__":
    main()
