"""Inference: KV-cache decoding and exact self-speculative decoding with the MTP depths.

    kv_cache      the per-stream KV cache (main model, each MTP depth) behind the model's seam
    streams       one forward of the main model or of an MTP depth through its cache
    decode        plain decoding; speculative: draft with the depths, verify, rewind
    sampling      greedy / temperature / top-p; stats: acceptance and timing
    teacher       teacher-forced full-sequence computations (references and eval proxies)
    load          CHECKPOINT (run dir, DCP checkpoint, exported HF directory) -> model
    run           `mtp generate` as a function; eval: `mtp eval`
"""

from mtp_cli.generate.load import LoadedModel, load_for_generation
from mtp_cli.generate.run import GenerateOptions, GenerateResult, generate

__all__ = ["GenerateOptions", "GenerateResult", "LoadedModel", "generate",
           "load_for_generation"]
