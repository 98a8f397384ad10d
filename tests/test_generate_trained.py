"""Speculative decoding on a trained tiny checkpoint (MTP heads that really predict): exact in
float64 for every number of draft depths, and in float32 any divergence sits at a near-tie."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.generate.load import load_for_generation
from mtp_cli.generate.teacher import depth_logits, joint_prefix_counts
from tests.generate_helpers import decode, random_model, save_run_dir, tiny_spec, train_in_process

pytestmark = pytest.mark.slow
PROMPTS = [b"import os\nimport sys\n\n\ndef ", b"class ", b"    def __init__(self, ",
           b"        return self."]


def _prompts() -> list[torch.Tensor]:
    return [torch.tensor(list(p), dtype=torch.long) for p in PROMPTS]


@pytest.fixture(scope="module", params=[("rope", 3), ("learned_absolute", 2)],
                ids=["rope-D3", "learned-D2"])
def trained(request, tmp_path_factory):
    """A model trained 250 steps on the embedded corpus, saved as a run directory."""
    position, depths = request.param
    torch.manual_seed(0)
    kwargs = {"depths": depths, "vocab": 320, "seq_length": 64, "position": position}
    model = random_model(std=0.02, dtype=torch.float32, **kwargs)
    train_in_process(model, 320, steps=250, seq_length=48)
    spec = tiny_spec(**kwargs, extra={"init_method_std": 0.02})
    run = save_run_dir(model, spec, tmp_path_factory.mktemp("trained") / "run")
    return model, run, kwargs


def test_trained_checkpoint_loads_and_its_heads_draft_well(trained):
    model, run, kwargs = trained
    loaded = load_for_generation(run, device="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    _, decoder = decode(loaded.model.double(), _prompts(), 40, kwargs["depths"])
    stats = decoder.counts.as_dict()
    assert stats["per_depth"][0]["acceptance_rate"] > 0.3
    assert stats["mean_accepted_length"] > 1.4


def test_float64_speculative_equals_plain_for_every_draft_depth(trained):
    model, _, kwargs = trained
    model64 = random_model(**kwargs)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    plain, _ = decode(model64, _prompts(), 40)
    for k in range(1, kwargs["depths"] + 1):
        out, decoder = decode(model64, _prompts(), 40, k, record=True)
        assert out == plain, k
        assert decoder.counts.drafts_accepted > 0
    # acceptance per round equals the teacher-forced joint-prefix count of the final sequences
    for row, prompt in enumerate(_prompts()):
        sequence = torch.cat([prompt, torch.tensor(out[row])])
        counts = joint_prefix_counts(depth_logits(model64, sequence[None]), sequence[None])[0]
        for rnd in decoder.rounds:
            if rnd.active[row]:
                c = int(rnd.committed[row])
                actual = min(int(rnd.accepted[row]), len(sequence) - c)
                assert actual == min(int(counts[c - 2]), rnd.drafts.shape[1])


def test_float32_divergence_only_at_near_ties(trained):
    model, _, kwargs = trained
    plain, _ = decode(model, _prompts(), 40)
    for k in range(1, kwargs["depths"] + 1):
        out, _ = decode(model, _prompts(), 40, k)
        for row, prompt in enumerate(_prompts()):
            if out[row] == plain[row]:
                continue
            at = next(i for i, (a, b) in enumerate(zip(out[row], plain[row], strict=True)) if a != b)
            prefix = torch.cat([prompt, torch.tensor(plain[row][:at])])
            logits = depth_logits(model, prefix[None])[0][0, -1]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, (k, row, at)
