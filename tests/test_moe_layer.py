"""The MoE layer against a token-by-token reference: every token's top-k experts weighted by
its routing weights, plus the shared expert (dropless); experts keyed by global index, and the
dispatcher seam computing only the experts it is given."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import yaml

from mtp_cli import build_model, load_spec
from mtp_cli.builders.module_trees import resolved_module_trees
from mtp_cli.models.moe.dispatcher import LocalTokenDispatcher
from mtp_cli.models.moe.layer import MoELayer
from tests.cli_helpers import SPECS

MODEL = {"vocab_size": 32, "hidden_size": 8, "num_layers": 2, "num_attention_heads": 2,
         "seq_length": 6, "normalization": "RMSNorm", "activation": "swiglu",
         "position_embedding": "rope", "add_bias_linear": False, "num_moe_experts": 4,
         "moe_router_topk": 2, "moe_ffn_hidden_size": 6, "moe_shared_expert_intermediate_size": 5,
         "moe_router_score_function": "sigmoid", "moe_router_topk_scaling_factor": 1.7}


def _moe_layer() -> MoELayer:
    model = build_model(load_spec({"model": MODEL, "mtp": {"num_layers": 0}}))
    layer = model.decoder.layers["0"].mlp
    assert isinstance(layer, MoELayer)
    return layer.eval()


def _swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def test_moe_layer_equals_token_by_token_reference():
    layer = _moe_layer()
    hidden = torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = layer(hidden)
        probs, routing_map = layer.router(hidden)
    flat = hidden.reshape(-1, 8)
    experts = layer.experts.local_experts
    shared = layer.shared_experts
    for t in range(flat.shape[0]):
        want = _swiglu(flat[t], shared.linear_fc1.weight, shared.linear_fc2.weight)
        chosen = routing_map[t].nonzero().flatten().tolist()
        assert len(chosen) == 2  # dropless: both choices computed
        for e in chosen:
            expert = experts[str(e)]
            want = want + probs[t, e] * _swiglu(flat[t], expert.linear_fc1.weight,
                                                expert.linear_fc2.weight)
        torch.testing.assert_close(out.reshape(-1, 8)[t], want, atol=1e-6, rtol=1e-5)


def test_experts_are_named_by_global_index_and_the_dispatcher_is_the_seam():
    layer = _moe_layer()
    names = [n for n in layer.state_dict() if ".linear_fc1." in n and "local_experts" in n]
    assert names == [f"experts.local_experts.{e}.linear_fc1.weight" for e in range(4)]
    hidden = torch.randn(6, 2, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs, routing_map = layer.router(hidden)
        flat = hidden.reshape(-1, 8)
        halves = []
        for indices in ([0, 1], [2, 3]):  # what two expert-parallel ranks would compute
            dispatcher = LocalTokenDispatcher(indices)
            sent = dispatcher.dispatch(flat, probs, routing_map)
            assert sum(sent.tokens_per_expert) == int(routing_map[:, indices].sum())
            outputs = [layer.experts.local_experts[str(e)](chunk, per_token_scale=w)
                       for e, chunk, w in zip(indices, sent.tokens.split(sent.tokens_per_expert),
                                              sent.probs.split(sent.tokens_per_expert),
                                              strict=True)]
            halves.append(dispatcher.combine(torch.cat(outputs), sent, flat.shape[0]))
        routed = layer(hidden) - layer.shared_experts(hidden)
    torch.testing.assert_close(halves[0] + halves[1], routed.reshape(-1, 8), atol=1e-6, rtol=0)


def test_moe_mla_tree_round_trips_and_the_mtp_layer_follows_the_last_decoder_layer():
    data = yaml.safe_load((SPECS / "tiny_moe.yaml").read_text())
    spec = load_spec(data)
    fed_back = load_spec({**data, "modules": resolved_module_trees(spec)})
    assert resolved_module_trees(fed_back) == resolved_module_trees(spec)
    shapes = {n: t.shape for n, t in build_model(spec, "meta").state_dict().items()}
    assert shapes == {n: t.shape for n, t in build_model(fed_back, "meta").state_dict().items()}
    model = build_model(spec, "meta")
    assert isinstance(model.mtp.layers["0"].transformer_layer.mlp, MoELayer)
    assert not isinstance(model.decoder.layers["0"].mlp, MoELayer)
    data["model"]["moe_layer_freq"] = [1, 1, 1, 0]  # last decoder layer dense: so are the MTP's
    model = build_model(load_spec(data), "meta")
    assert isinstance(model.decoder.layers["0"].mlp, MoELayer)
    assert not isinstance(model.mtp.layers["1"].transformer_layer.mlp, MoELayer)
    router = build_model(spec, "meta").mtp.layers["1"].transformer_layer.mlp.router
    assert router.is_mtp_layer and router.layer_number == 4 + 2
