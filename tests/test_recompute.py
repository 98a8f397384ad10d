"""Activation recomputation (`train.recompute`): what runs twice, and nothing else changes."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.errors import SpecError
from mtp_cli.models.attention import DotProductAttention
from mtp_cli.models.transformer_layer import TransformerLayer
from mtp_cli.mtp import MTPRunState
from mtp_cli.parallel.recompute import apply_activation_checkpointing, is_checkpointed

SEQ, VOCAB, DEPTHS, LAYERS = 8, 40, 2, 3


def make_spec(**model):
    return load_spec({"model": {"vocab_size": VOCAB, "hidden_size": 16, "num_layers": LAYERS,
                                "num_attention_heads": 4, "num_query_groups": 2,
                                "seq_length": SEQ, "position_embedding": "rope",
                                "normalization": "RMSNorm", "activation": "swiglu",
                                "hidden_dropout": 0.1, "attention_dropout": 0.1, **model},
                      "mtp": {"num_layers": DEPTHS, "loss_scaling_factor": 0.3}})


def make_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    mask = (torch.rand(2, SEQ, generator=gen) > 0.2).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def step(model, batch, seed: int = 7):
    """Forward and backward with dropout drawn from `seed`: (per-token loss, tracker, grads)."""
    ids, labels, mask = batch
    model.mtp_state = MTPRunState()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    per_token = model(ids, labels=labels, loss_mask=mask)
    ((per_token * mask).sum() / mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return per_token.detach(), model.mtp_state.tracker["values"].clone(), grads


@pytest.fixture
def counts(monkeypatch):
    """Executions of each TransformerLayer's and each attention core's forward, by instance."""
    seen: collections.Counter = collections.Counter()
    for cls in (TransformerLayer, DotProductAttention):
        original = cls.forward

        def counted(self, *args, _original=original, **kwargs):
            seen[self] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    return seen


@pytest.mark.parametrize("mode,layer_runs,core_runs", [
    ("none", 1, 1), ("full", 2, 2), ("selective", 1, 2),
])
def test_forward_counts(counts, mode, layer_runs, core_runs):
    """full: every decoder and MTP transformer layer runs twice (so do their cores); selective:
    only the attention cores run twice."""
    model = build_model(make_spec())
    apply_activation_checkpointing(model, mode)
    step(model, make_batch())
    layers = [*model.decoder.layers.values(),
              *(mtp.transformer_layer for mtp in model.mtp_layers())]
    cores = [layer.self_attention.core_attention for layer in layers]
    assert len(layers) == LAYERS + DEPTHS
    assert [counts[layer] for layer in layers] == [layer_runs] * len(layers)
    assert [counts[core] for core in cores] == [core_runs] * len(cores)
    assert sum(counts.values()) == (layer_runs + core_runs) * len(layers)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_nothing_is_recomputed_in_evaluation(counts, mode):
    model = build_model(make_spec())
    apply_activation_checkpointing(model, mode)
    model.eval()
    with torch.no_grad():
        model(make_batch()[0])
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("tied,repeated", [(False, False), (True, True)])
def test_losses_and_gradients_equal_no_recomputation(mode, tied, repeated):
    """Dropout on: the recomputed forward replays the same masks, so everything is unchanged."""
    spec = make_spec(share_embeddings_and_output_weights=tied)
    spec.mtp.use_repeated_layer = repeated
    plain = build_model(spec)
    recomputed = copy.deepcopy(plain)
    apply_activation_checkpointing(recomputed, mode)
    assert is_checkpointed(next(iter(recomputed.decoder.layers.values()))) == (mode == "full")
    assert not is_checkpointed(next(iter(plain.decoder.layers.values())))
    batch = make_batch(1)
    expected, got = step(plain, batch), step(recomputed, batch)
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=0)
    assert got[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=1e-6, rtol=0, msg=name)
    # dropout really is on: another seed gives other losses
    assert not torch.allclose(step(plain, batch, seed=8)[0], expected[0])


def test_recomputation_is_applied_once():
    model = build_model(make_spec())
    apply_activation_checkpointing(model, "selective")
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(model, "selective")


def test_recompute_setting_is_validated():
    assert make_spec().train.recompute == "none"
    with pytest.raises(SpecError, match="recompute"):
        load_spec({"model": make_spec().model.model_dump(), "train": {"recompute": "some"}})


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_moe_metrics_and_bias_counts_are_recorded_once(mode):
    """The recomputed forward (a router inside a decoder or an MTP layer runs twice under `full`)
    records no second copy of its aux / z losses, token counts or expert-bias counts."""
    from mtp_cli.models.moe.run_state import moe_layer_metrics, moe_routers

    spec = make_spec(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8,
                     moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.01,
                     moe_z_loss_coeff=0.001, moe_router_score_function="sigmoid",
                     moe_router_enable_expert_bias=True, hidden_dropout=0.0,
                     attention_dropout=0.0)
    plain = build_model(spec)
    recomputed = copy.deepcopy(plain)
    apply_activation_checkpointing(recomputed, mode)
    batch = make_batch(2)
    expected, got = step(plain, batch), step(recomputed, batch)
    for name, grad in expected[2].items():
        torch.testing.assert_close(got[2][name], grad, atol=1e-6, rtol=0, msg=name)
    want, have = moe_layer_metrics([plain]), moe_layer_metrics([recomputed])
    assert want.keys() == have.keys() and len(want) == LAYERS + DEPTHS
    for layer, entry in want.items():
        assert entry.keys() == have[layer].keys() == {"seq_load_balancing_loss", "z_loss",
                                                      "tokens_per_expert"}
        for name, value in entry.items():
            torch.testing.assert_close(torch.as_tensor(have[layer][name]),
                                       torch.as_tensor(value), atol=1e-6, rtol=0,
                                       msg=(layer, name))
    for ours, theirs in zip(moe_routers([recomputed]), moe_routers([plain]), strict=True):
        assert torch.equal(ours.local_tokens_per_expert, theirs.local_tokens_per_expert)
        assert ours.local_tokens_per_expert.sum() == 2 * SEQ * 2  # tokens x top-k, counted once
