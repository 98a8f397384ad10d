"""The MTP loss step against an explicit objective written out here with plain torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtp_cli import build_model, load_spec
from mtp_cli.models import output as output_module
from mtp_cli.mtp import MTPLossAutoScaler, MTPLossLoggingHelper

LAMBDA = 0.3


def make_spec(depths: int, mtp: dict | None = None, **model_overrides):
    model = {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
             "num_query_groups": 2, "seq_length": 12, **model_overrides}
    return load_spec({"model": model, "mtp": {"num_layers": depths,
                                              "loss_scaling_factor": LAMBDA, **(mtp or {})}})


def batch(seed: int = 0, batch_size: int = 2, seq: int = 12, vocab: int = 50):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (batch_size, seq + 1), generator=generator)
    mask = (torch.rand(batch_size, seq, generator=generator) > 0.2).float()
    positions = torch.arange(seq).expand(batch_size, seq)
    return tokens[:, :-1], positions, tokens[:, 1:], mask


def shift_left(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """tensor[:, i + k], zero past the end: k MTP rolls, written independently."""
    out = torch.zeros_like(tensor)
    if k < tensor.shape[1]:
        out[:, : tensor.shape[1] - k] = tensor[:, k:]
    return out


def explicit_objective(model, ids, positions, labels, mask, *, per_token_mode: bool):
    """L_main + (λ/D) Σ_k sum(L_k)/max(N_k,1) (per-token: L_main summed, MTP x N0)."""
    depths = model.stage.mtp_depths_in_loss
    rotary = model.rotary_pos_emb(positions) if model.rotary_pos_emb is not None else None
    hidden = model.decoder(model.embedding(ids, positions), None, rotary, None)
    weight = model.output_weight()

    def per_token_ce(h, target):
        logits = (h @ weight.T).float()  # [s, b, V]
        return F.cross_entropy(logits.permute(1, 2, 0), target, reduction="none")  # [b, s]

    main = per_token_ce(hidden, labels)
    n0 = mask.sum()
    objective = (main * mask).sum() if per_token_mode else (main * mask).sum() / n0
    h = hidden
    for k in range(1, depths + 1):
        layer = model.mtp.layer_for_depth(k - 1)
        embedded = model.embedding(shift_left(ids, k), shift_left(positions, k))
        x = torch.cat([layer.enorm(embedded), layer.hnorm(h)], dim=-1)
        x = layer.transformer_layer(layer.eh_proj(x), None, rotary, None)
        h = layer.final_layernorm(x)
        mask_k = shift_left(mask, k)
        loss_k = (per_token_ce(h, shift_left(labels, k)) * mask_k).sum()
        n_k = mask_k.sum().clamp(min=1)
        term = loss_k * n0 / n_k if per_token_mode else loss_k / n_k
        objective = objective + LAMBDA / depths * term
    return main, objective


def model_path_gradients(model, ids, positions, labels, mask, *, per_token_mode: bool):
    per_token = model(ids, positions, labels=labels, loss_mask=mask)
    loss = (per_token * mask).sum()
    if not per_token_mode:
        loss = loss / mask.sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return per_token, grads


@pytest.mark.parametrize("per_token_mode", [False, True])
@pytest.mark.parametrize("depths", [1, 2, 3])
def test_autoscaler_gradients_equal_explicit_objective(depths, per_token_mode):
    spec = make_spec(depths, position_embedding="rope", normalization="RMSNorm",
                     activation="swiglu")
    spec.train.calculate_per_token_loss = per_token_mode
    model = build_model(spec)
    ids, positions, labels, mask = batch()
    per_token, grads = model_path_gradients(model, ids, positions, labels, mask,
                                            per_token_mode=per_token_mode)
    main, objective = explicit_objective(model, ids, positions, labels, mask,
                                         per_token_mode=per_token_mode)
    expected = torch.autograd.grad(objective, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(per_token, main, atol=1e-6, rtol=0)  # main loss alone
    for (name, _), ours, reference in zip(model.named_parameters(), grads, expected,
                                          strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5, msg=name)


def test_loss_scale_multiplies_the_mtp_term_only():
    spec = make_spec(2)
    model = build_model(spec)
    ids, positions, labels, mask = batch(1)
    main_only = build_model(make_spec(0))
    MTPLossAutoScaler.set_loss_scale(torch.tensor(0.0))
    _, grads_scaled_out = model_path_gradients(model, ids, positions, labels, mask,
                                               per_token_mode=False)
    _, grads_no_mtp = model_path_gradients(main_only, ids, positions, labels, mask,
                                           per_token_mode=False)
    main_grads = dict(zip([n for n, _ in main_only.named_parameters()], grads_no_mtp,
                          strict=True))
    for (name, _), grad in zip(model.named_parameters(), grads_scaled_out, strict=True):
        if name in main_grads:
            torch.testing.assert_close(grad, main_grads[name], atol=1e-7, rtol=0)
        else:  # MTP-only parameters see nothing at scale 0
            assert grad is None or torch.count_nonzero(grad) == 0
    MTPLossAutoScaler.set_loss_scale(0.5)
    _, half = model_path_gradients(model, ids, positions, labels, mask, per_token_mode=False)
    MTPLossAutoScaler.set_loss_scale(1.0)
    _, full = model_path_gradients(model, ids, positions, labels, mask, per_token_mode=False)
    eh_proj = next(i for i, (n, _) in enumerate(model.named_parameters()) if "eh_proj" in n)
    torch.testing.assert_close(half[eh_proj] * 2, full[eh_proj], atol=1e-7, rtol=1e-5)


def test_all_masked_depth_gives_finite_output_and_zero_mtp_gradients():
    model = build_model(make_spec(1))
    ids, positions, labels, _ = batch(2)
    mask = torch.zeros_like(labels, dtype=torch.float32)
    mask[:, 0] = 1.0  # after one roll nothing is left for depth 1
    per_token = model(ids, positions, labels=labels, loss_mask=mask)
    ((per_token * mask).sum() / mask.sum()).backward()
    assert torch.isfinite(per_token).all()
    for name, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), name
        if name.startswith("mtp."):
            assert torch.count_nonzero(param.grad) == 0, name
    assert MTPLossLoggingHelper.tracker["values"].tolist() == [0.0]
    assert MTPLossLoggingHelper.tracker["total"].tolist() == [0.0]


def test_acceptance_counts_equal_a_hand_count():
    """A zero output weight makes every logit equal, so the top-1 guess is id 0."""
    model = build_model(make_spec(2))
    with torch.no_grad():
        model.output_layer.weight.zero_()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = torch.tensor([[0, 3, 0, 0, 4, 0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]])
    model(ids, torch.arange(6)[None], labels=labels, loss_mask=mask)
    # depth 1: labels [3,0,0,4,0,0], mask [1,1,0,1,1,0] -> hits at positions 1 = 1 ... count:
    #   pos0 3 no, pos1 0 yes, pos2 masked, pos3 4 no, pos4 0 yes -> 2 of 4
    # depth 2: labels [0,0,4,0,0,0], mask [1,0,1,1,0,0] -> pos0 yes, pos2 no, pos3 yes -> 2 of 3
    assert MTPLossLoggingHelper.tracker["correct"].tolist() == [2.0, 2.0]
    assert MTPLossLoggingHelper.tracker["total"].tolist() == [4.0, 3.0]


def test_log_interval_accumulates_instead_of_overwriting(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    totals: dict[str, float] = {}
    seen = []
    for iteration, values in enumerate([[1.0, 2.0], [3.0, 5.0]], start=1):
        for depth, value in enumerate(values):
            MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(value), depth, 2)
            MTPLossLoggingHelper.save_acceptance_to_tracker(
                torch.tensor(1.0 + depth), torch.tensor(4.0), depth, 2)
        seen.append(MTPLossLoggingHelper.track_mtp_metrics(iteration, writer,
                                                            total_loss_dict=totals))
    writer.close()
    assert totals == {"mtp_1 loss": 4.0, "mtp_2 loss": 7.0}
    assert seen[1]["mtp_2_acceptance_rate"] == 50.0
    assert seen[1]["mtp_1_cumulative_acceptance_rate"] == 25.0
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("mtp_2 loss")] == [2.0, 5.0]
    assert "mtp_1_cumulative_acceptance_rate" in events.Tags()["scalars"]
    assert MTPLossLoggingHelper.tracker["values"].tolist() == [0.0, 0.0]  # cleaned


def test_tracker_averages_micro_batches():
    for value in (1.0, 3.0):
        MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(value), 0, 1)
    assert MTPLossLoggingHelper.track_mtp_metrics(1)["mtp_1 loss"] == 2.0


def test_labels_default_to_next_tokens_when_not_given():
    model = build_model(make_spec(2))
    ids, positions, _, _ = batch(3)
    logits = model(ids, positions)
    assert logits.shape == (2, 12, 50)
    from_logits = MTPLossLoggingHelper.tracker["values"].clone()
    MTPLossLoggingHelper.clean_loss_in_tracker()
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    mask = torch.ones_like(ids, dtype=torch.float32)
    mask[:, -1] = 0
    model(ids, positions, labels=labels, loss_mask=mask)
    torch.testing.assert_close(from_logits, MTPLossLoggingHelper.tracker["values"])


def test_use_repeated_layer_builds_one_layer_used_at_every_depth():
    model = build_model(make_spec(3, {"use_repeated_layer": True}))
    assert list(model.mtp.layers.keys()) == ["0"]
    single = build_model(make_spec(1))
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in single.parameters())
    ids, positions, labels, mask = batch(4)
    model(ids, positions, labels=labels, loss_mask=mask).sum().backward()
    assert len(MTPLossLoggingHelper.tracker["values"]) == 3
    assert torch.count_nonzero(model.mtp.layers["0"].eh_proj.weight.grad) > 0


def test_detach_heads_leaves_main_gradients_equal_to_a_run_without_mtp():
    detached = build_model(load_spec({
        "model": {"vocab_size": 50, "hidden_size": 32, "num_layers": 2,
                  "num_attention_heads": 4, "seq_length": 12,
                  "share_embeddings_and_output_weights": True},
        "mtp": {"num_layers": 2, "detach_heads": True}}))
    plain = build_model(load_spec({
        "model": {"vocab_size": 50, "hidden_size": 32, "num_layers": 2,
                  "num_attention_heads": 4, "seq_length": 12,
                  "share_embeddings_and_output_weights": True},
        "mtp": {"num_layers": 0}}))
    ids, positions, labels, mask = batch(5)
    for model in (detached, plain):
        ((model(ids, positions, labels=labels, loss_mask=mask) * mask).sum()).backward()
    main_grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, param in detached.named_parameters():
        if name in main_grads:
            torch.testing.assert_close(param.grad, main_grads[name], atol=1e-7, rtol=0,
                                       msg=name)
        else:
            assert name.startswith("mtp.") and torch.count_nonzero(param.grad) > 0, name


@pytest.mark.parametrize("position_embedding", ["rope", "learned_absolute"])
def test_packed_batch_equals_documents_run_separately(monkeypatch, position_embedding):
    """Three packed documents give the per-token losses of the three run alone (every depth)."""
    recorded: list[torch.Tensor] = []
    original = output_module.token_loss_and_hits

    def recording(hidden, labels, mask, *, weight):
        loss, hits = original(hidden, labels, mask, weight=weight)
        recorded.append((loss * mask).detach())
        return loss, hits

    monkeypatch.setattr(output_module, "token_loss_and_hits", recording)
    model = build_model(make_spec(2, position_embedding=position_embedding))
    generator = torch.Generator().manual_seed(7)
    documents = [torch.randint(1, 50, (n,), generator=generator) for n in (5, 4, 3)]

    def labels_and_mask(doc):
        labels = torch.cat([doc[1:], torch.zeros(1, dtype=doc.dtype)])
        mask = torch.ones(len(doc))
        mask[-1] = 0.0  # the last position of a document predicts nothing
        return labels, mask

    separate_main, separate_mtp = [], []
    for doc in documents:
        labels, mask = labels_and_mask(doc)
        recorded.clear()
        main = model(doc[None], torch.arange(len(doc))[None], labels=labels[None],
                     loss_mask=mask[None])
        separate_main.append(main[0] * mask)
        separate_mtp.append([r[0] for r in recorded])

    from mtp_cli.mtp import PackedSeqParams

    ids = torch.cat(documents)[None]
    positions = torch.cat([torch.arange(len(d)) for d in documents])[None]
    pairs = [labels_and_mask(d) for d in documents]
    labels = torch.cat([p[0] for p in pairs])[None]
    mask = torch.cat([p[1] for p in pairs])[None]
    recorded.clear()
    params = PackedSeqParams.from_lengths([len(d) for d in documents])
    main = model(ids, positions, labels=labels, loss_mask=mask, packed_seq_params=params)
    torch.testing.assert_close(main[0] * mask[0], torch.cat(separate_main), atol=1e-6, rtol=0)
    for depth in range(2):
        expected = torch.cat([losses[depth] for losses in separate_mtp])
        torch.testing.assert_close(recorded[depth][0], expected, atol=1e-6, rtol=0)
