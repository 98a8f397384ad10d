"""The reference module's surface: a subclass overriding one step of the MTP layer works as in
Megatron-Core; `_get_mtp_block_submodules`, `_roll_tensor_packed_seq`, `SUPPORTED_ATTN_MASK`."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from mtp_cli import load_spec
from mtp_cli.builders.init import initialize_parameters
from mtp_cli.builders.model_builder import build_model, loss_settings_for
from mtp_cli.builders.module_trees import build_specs
from mtp_cli.errors import SpecError
from mtp_cli.gpt import GPTModel
from mtp_cli.mtp import (
    SUPPORTED_ATTN_MASK,
    MTPRunState,
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    PackedSeqParams,
    _get_mtp_block_submodules,
    _roll_tensor_packed_seq,
    get_mtp_block_spec,
    roll_tensor,
)
from mtp_cli.nn.module_spec import ModuleSpec
from mtp_cli.parallel.recompute import apply_activation_checkpointing

DEPTHS, SEQ, VOCAB = 2, 8, 32


class HiddenFirstMTPLayer(MultiTokenPredictionLayer):
    """The paper's order, `cat([hnorm(h), enorm(e)])`, by overriding `_concat_embeddings` only."""

    calls = 0

    def _concat_embeddings(self, hidden_states, decoder_input):
        type(self).calls += 1
        return self.eh_proj(torch.cat((self.hnorm(hidden_states), self.enorm(decoder_input)), -1))


def make_spec():
    return load_spec({"model": {"vocab_size": VOCAB, "hidden_size": 16, "num_layers": 1,
                                "num_attention_heads": 2, "seq_length": SEQ},
                      "mtp": {"num_layers": DEPTHS}})


def model_with_layer(spec, layer_class=None, block_spec_form=False) -> GPTModel:
    layer_spec, mtp_layer_spec, norm_spec = build_specs(spec)
    if layer_class is not None:
        mtp_layer_spec = dataclasses.replace(mtp_layer_spec, module=layer_class)
    block = get_mtp_block_spec(mtp_layer_spec, DEPTHS)
    if block_spec_form:
        block = ModuleSpec(MultiTokenPredictionBlock, submodules=block)
    model = GPTModel(spec.model, layer_spec, norm_spec, block, mtp=spec.mtp,
                     loss_settings=loss_settings_for(spec))
    initialize_parameters(model, spec)
    model.mtp_state = MTPRunState()
    return model


def run(model):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    mask = torch.ones(2, SEQ)
    per_token = model(tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask)
    (per_token * mask).sum().div(mask.sum()).backward()
    return per_token.detach(), model.mtp_state.tracker["values"].clone()


def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """`[W_e | W_h]` -> `[W_h | W_e]`: eh_proj on the other concatenation order."""
    return torch.cat(weight.chunk(2, dim=1)[::-1], dim=1)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_overriding_concat_embeddings_is_used_in_forward(recompute):
    """With eh_proj's column halves swapped, the hidden-first subclass computes exactly what the
    stock layer computes: the override ran at every depth (also on the recomputation path)."""
    spec = make_spec()
    stock, custom = model_with_layer(spec), model_with_layer(spec, HiddenFirstMTPLayer)
    with torch.no_grad():
        for k in range(DEPTHS):
            custom.mtp.layers[str(k)].eh_proj.weight.copy_(
                swap_halves(stock.mtp.layers[str(k)].eh_proj.weight))
    apply_activation_checkpointing(custom, recompute)
    HiddenFirstMTPLayer.calls = 0
    stock_loss, stock_mtp = run(stock)
    custom_loss, custom_mtp = run(custom)
    assert HiddenFirstMTPLayer.calls == DEPTHS * (2 if recompute == "full" else 1)
    torch.testing.assert_close(custom_loss, stock_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(custom_mtp, stock_mtp, atol=1e-6, rtol=0)
    for k in range(DEPTHS):
        grad = custom.mtp.layers[str(k)].eh_proj.weight.grad
        torch.testing.assert_close(swap_halves(grad), stock.mtp.layers[str(k)].eh_proj.weight.grad,
                                   atol=1e-6, rtol=0)
    # and the order matters: the same weights in the stock layer give other losses
    with torch.no_grad():
        for k in range(DEPTHS):
            stock.mtp.layers[str(k)].eh_proj.weight.copy_(custom.mtp.layers[str(k)].eh_proj.weight)
    assert not torch.allclose(run(stock)[1], custom_mtp)


def test_a_spec_file_can_name_the_subclass():
    """`modules.mtp_layer: import:...` (with --allow-imports) builds the subclass in place of
    the stock layer, with the same submodules."""
    slots = {"enorm": "backend.layer_norm", "hnorm": "backend.layer_norm",
             "eh_proj": "backend.column_parallel_linear", "layer_norm": "backend.layer_norm"}
    mapping = {"model": make_spec().model.model_dump(), "mtp": {"num_layers": DEPTHS},
               "modules": {"mtp_layer": {
                   "module": "import:tests.test_mtp_layer_surface:HiddenFirstMTPLayer",
                   "submodules": slots}}}
    spec = load_spec(mapping, allow_imports=True)
    model = build_model(spec, allow_imports=True)
    assert [type(layer) for layer in model.mtp_layers()] == [HiddenFirstMTPLayer] * DEPTHS
    model.mtp_state = MTPRunState()
    HiddenFirstMTPLayer.calls = 0
    run(model)
    assert HiddenFirstMTPLayer.calls == DEPTHS
    stock = build_model(make_spec())
    assert model.state_dict().keys() == stock.state_dict().keys()


def test_mtp_block_submodules_from_either_form():
    layer = ModuleSpec(MultiTokenPredictionLayer)
    submodules = MultiTokenPredictionBlockSubmodules(layer_specs=[layer, layer])
    assert _get_mtp_block_submodules(None, submodules) is submodules
    for module in (MultiTokenPredictionBlock, "MultiTokenPredictionBlock"):
        spec = ModuleSpec(module, submodules=submodules)
        assert _get_mtp_block_submodules(None, spec) is submodules
    with pytest.raises(TypeError, match="MultiTokenPredictionBlock"):
        _get_mtp_block_submodules(None, ModuleSpec(MultiTokenPredictionLayer, submodules=submodules))
    with pytest.raises(TypeError):
        _get_mtp_block_submodules(None, [layer])


def test_model_builds_the_same_from_a_block_module_spec():
    spec = make_spec()
    plain, from_spec = model_with_layer(spec), model_with_layer(spec, block_spec_form=True)
    assert plain.state_dict().keys() == from_spec.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                  from_spec.state_dict().values(), strict=True))
    torch.testing.assert_close(run(plain)[1], run(from_spec)[1], atol=0, rtol=0)


def reference_packed_roll(tensor: torch.Tensor, boundaries: list[int]) -> torch.Tensor:
    """Each document `[a, b)` shifted left by one with its last slot zeroed (by hand)."""
    out = tensor.clone()
    for a, b in itertools.pairwise(boundaries):
        if b > a:
            out[..., a:b - 1] = tensor[..., a + 1:b]
            out[..., b - 1] = 0
    return out


@pytest.mark.parametrize("boundaries", [[0, 3, 5], [0, 0, 1, 1, 4], [0, 6, 7, 12], [0, 12]])
def test_roll_tensor_packed_seq_equals_roll_tensor_on_packed_input(boundaries):
    gen = torch.Generator().manual_seed(len(boundaries))
    tensor = torch.randint(1, 100, (3, boundaries[-1]), generator=gen)
    params = PackedSeqParams(cu_seqlens_q=torch.tensor(boundaries, dtype=torch.int32))
    packed, packed_sum = _roll_tensor_packed_seq(tensor, -1, -1, params)
    rolled, rolled_sum = roll_tensor(tensor, -1, -1, None, params)
    expected = reference_packed_roll(tensor, boundaries)
    assert torch.equal(packed, expected) and torch.equal(rolled, expected)
    assert int(packed_sum) == int(rolled_sum) == int(expected.sum())


def test_roll_tensor_packed_seq_keeps_the_reference_restrictions():
    params = PackedSeqParams(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="last dimension"):
        _roll_tensor_packed_seq(torch.zeros(4, 2), -1, 0, params)
    with pytest.raises(ValueError, match="shifts=-1"):
        _roll_tensor_packed_seq(torch.zeros(4), 1, -1, params)


def test_supported_attention_masks_are_the_reference_ones():
    assert sorted(SUPPORTED_ATTN_MASK) == ["causal", "no_mask", "padding", "padding_causal"]


def test_unsupported_mtp_attention_mask_is_refused():
    spec = make_spec()
    _, mtp_layer_spec, _ = build_specs(spec)
    layer = mtp_layer_spec.submodules.transformer_layer
    attention = layer.submodules.self_attention
    layer.submodules.self_attention = dataclasses.replace(
        attention, params={**attention.params, "attn_mask_type": "arbitrary"})
    with pytest.raises(ValueError, match="'arbitrary' attention mask"):
        MultiTokenPredictionLayer(spec.model, mtp_layer_spec.submodules)
    mapping = {"model": spec.model.model_dump(), "mtp": {"num_layers": 1}, "modules": {
        "decoder_layer": {"module": "TransformerLayer", "submodules": {
            "input_layernorm": "backend.layer_norm", "pre_mlp_layernorm": "backend.layer_norm",
            "mlp": {"module": "MLP", "submodules": {
                "linear_fc1": "backend.column_parallel_linear",
                "linear_fc2": "backend.row_parallel_linear"}},
            "self_attention": {"module": "SelfAttention", "params": {"attn_mask_type": "arbitrary"},
                               "submodules": {"linear_qkv": "backend.column_parallel_linear",
                                              "core_attention": "backend.core_attention",
                                              "linear_proj": "backend.row_parallel_linear"}}}}}}
    with pytest.raises(SpecError, match="attn_mask_type"):
        load_spec(mapping)
    mapping["mtp"]["num_layers"] = 0  # without MTP the decoder may use any mask
    build_model(load_spec(mapping), "meta")
