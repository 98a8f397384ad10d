"""`mtp.distill`: depth k's KL from the main model's logits, against a hand-written KL.

The reference takes the hidden states from the model's own decoder and MTP block (their maths is
pinned by test_mtp_loss.py), then writes out everything distillation adds by hand: the logits
`h @ W.T`, the main logits shifted k rows within each document (zero past its end), the masked
KL `sum p (log p - log q)` at temperature T normalised by the depth's tokens, and the objective
`L_main + (λ/D) Σ_k sum(mask_k (CE_k + w KL_k)) / N_k` whose gradients the model's must equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtp_cli import build_model, load_spec
from mtp_cli.builders.model_builder import loss_settings_for
from mtp_cli.errors import SpecError
from mtp_cli.mtp import MTPLossLoggingHelper, PackedSeqParams
from mtp_cli.mtp.distill import sharded_kl

LAMBDA = 0.3
VOCAB = 40
SEQ = 12


def make_spec(depths: int = 2, mtp: dict | None = None, freeze: list[str] | None = None):
    model = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
             "num_query_groups": 2, "seq_length": SEQ, "position_embedding": "rope",
             "normalization": "RMSNorm", "activation": "swiglu", "add_bias_linear": False,
             "init_method_std": 0.2}  # a wide init: distributions far from uniform
    return load_spec({"model": model, "train": {"freeze": freeze or []},
                      "mtp": {"num_layers": depths, "loss_scaling_factor": LAMBDA,
                              **(mtp or {})}})


def make_batch(seed: int, batch_size: int, lengths: list[int] | None):
    """ids, positions, labels, mask (some zeros, and each document's last row), packing."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (batch_size, SEQ), generator=generator)
    mask = (torch.rand(batch_size, SEQ, generator=generator) > 0.25).float()
    lengths = lengths or [SEQ]
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(batch_size, SEQ)
    ends = torch.tensor(lengths).cumsum(0) - 1
    mask[:, ends] = 0.0  # a document's last row predicts nothing
    params = PackedSeqParams.from_lengths(lengths) if len(lengths) > 1 else None
    return ids, positions, labels, mask, params, lengths


def shift_in_documents(tensor: torch.Tensor, k: int, lengths: list[int]) -> torch.Tensor:
    """`tensor[:, i + k]` along dim 1 within each document, zero past the document's end."""
    out = torch.zeros_like(tensor)
    start = 0
    for n in lengths:
        if k < n:
            out[:, start:start + n - k] = tensor[:, start + k:start + n]
        start += n
    return out


def hand_objective(model, batch, weight: float, temperature: float):
    """(objective, per-depth masked KL means) written out by hand (module docstring)."""
    ids, positions, labels, mask, params, lengths = batch
    depths = model.stage.mtp_depths_in_loss
    rotary = model.rotary_pos_emb(positions)
    h0 = model.decoder(model.embedding(ids, positions), None, rotary, params)
    stacked = model.mtp(ids, positions, h0, None, embedding=model.embedding,
                        rotary_pos_emb=rotary, packed_seq_params=params)
    hiddens = stacked.chunk(1 + depths, dim=0)
    w_out = model.output_weight()
    main_logits = (hiddens[0] @ w_out.T).float().transpose(0, 1)  # [b, s, V]
    main = F.cross_entropy(main_logits.transpose(1, 2), labels, reduction="none")
    objective = (main * mask).sum() / mask.sum()
    teacher_all = main_logits.detach()
    kl_means = []
    for k in range(1, depths + 1):
        student = (hiddens[k] @ w_out.T).float().transpose(0, 1)  # [b, s, V]
        teacher = shift_in_documents(teacher_all, k, lengths)
        labels_k = shift_in_documents(labels, k, lengths)
        mask_k = shift_in_documents(mask, k, lengths)
        log_p = torch.log_softmax(teacher / temperature, dim=-1)
        log_q = torch.log_softmax(student / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [b, s]
        ce = F.cross_entropy(student.transpose(1, 2), labels_k, reduction="none")
        n_k = mask_k.sum().clamp(min=1)
        kl_means.append((kl * mask_k).sum().detach() / n_k)
        objective = objective + LAMBDA / depths * ((ce + weight * kl) * mask_k).sum() / n_k
    return objective, torch.stack(kl_means)


def model_objective(model, batch):
    """The model's masked-mean main loss (MTP terms join in backward) and its tracker."""
    ids, positions, labels, mask, params, _ = batch
    MTPLossLoggingHelper.reset()
    per_token = model(ids, positions, labels=labels, loss_mask=mask, packed_seq_params=params)
    tracker = {k: v.clone() for k, v in MTPLossLoggingHelper.tracker.items()
               if isinstance(v, torch.Tensor)}
    return per_token, (per_token * mask).sum() / mask.sum(), tracker


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("lengths", [None, [5, 7]], ids=["masked", "packed"])
@pytest.mark.parametrize(("weight", "temperature"), [(1.0, 1.0), (0.7, 2.0)])
def test_distill_equals_hand_written_kl(lengths, weight, temperature):
    """Tracker KL per depth and every gradient of the objective equal the hand-written ones,
    with masked rows and (packed) a document boundary the teacher must not cross."""
    spec = make_spec(mtp={"distill": True, "distill_weight": weight,
                          "distill_temperature": temperature})
    model = build_model(spec).train()
    assert model.loss_settings.mtp_distill
    batch = make_batch(seed=3, batch_size=1 if lengths else 2, lengths=lengths)
    _, loss, tracker = model_objective(model, batch)
    expected, kl_means = hand_objective(model, batch, weight, temperature)
    assert torch.all(kl_means > 1e-3)  # a real divergence, not a vanishing term
    torch.testing.assert_close(tracker["distill"], kl_means, atol=1e-6, rtol=1e-5)
    assert tracker["distill_count"].tolist() == [1.0, 1.0]
    for got, want in zip(grads(model, loss), grads(model, expected), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_boundary_matters_for_the_reference():
    """The packed case is not vacuous: the rows whose teacher would lie past their document's
    end are exactly the rows the per-document roll masks, and counting them (one unpacked
    sequence) changes the KL the model must match."""
    spec = make_spec(mtp={"distill": True})
    model = build_model(spec).train()
    batch = make_batch(seed=3, batch_size=1, lengths=[5, 7])
    _, _, packed = model_objective(model, batch)
    _, across = hand_objective(model, (*batch[:4], None, [SEQ]), 1.0, 1.0)
    assert not torch.allclose(packed["distill"], across, atol=1e-4)


def test_gradient_reaches_only_the_mtp_parameters_when_the_main_model_is_frozen():
    spec = make_spec(mtp={"distill": True, "detach_heads": True},
                     freeze=["embedding", "decoder", "output_layer"])
    model = build_model(spec).train()
    _, loss, _ = model_objective(model, make_batch(seed=5, batch_size=2, lengths=None))
    loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("mtp."):
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
        else:
            assert param.grad is None or torch.count_nonzero(param.grad) == 0, name


def test_kl_gradient_never_reaches_the_main_model_through_the_teacher():
    """Trainable main model, detached heads: distillation changes the MTP gradients only (the
    teacher logits are detached), so the main parameters' gradients equal distill off's."""
    batch = make_batch(seed=6, batch_size=2, lengths=None)
    results = []
    for distill in (False, True):
        model = build_model(make_spec(mtp={"distill": distill, "detach_heads": True})).train()
        _, loss, _ = model_objective(model, batch)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        results.append(dict(zip(names, grads(model, loss), strict=True)))
    off, on = results
    for name in off:
        if name.startswith("mtp."):
            assert not torch.allclose(on[name], off[name]), name
        else:
            torch.testing.assert_close(on[name], off[name], atol=0, rtol=0, msg=name)


def test_distill_off_and_weight_zero_are_bit_identical():
    """Off (the default) computes what it computed before; on with w = 0 adds exactly nothing:
    same per-token losses, tracker and gradients, bit for bit."""
    batch = make_batch(seed=8, batch_size=2, lengths=None)
    runs = []
    for mtp in ({}, {"distill": True, "distill_weight": 0.0}):
        model = build_model(make_spec(mtp=mtp)).train()
        per_token, loss, tracker = model_objective(model, batch)
        runs.append((per_token, tracker, grads(model, loss)))
    (off_loss, off_tracker, off_grads), (zero_loss, zero_tracker, zero_grads) = runs
    assert "distill" not in off_tracker and "distill" in zero_tracker
    assert torch.equal(off_loss, zero_loss)
    for name in ("values", "correct", "total"):
        assert torch.equal(off_tracker[name], zero_tracker[name]), name
    for got, want in zip(zero_grads, off_grads, strict=True):
        assert torch.equal(got, want)


def test_distill_metric_is_logged_per_depth_beside_the_unchanged_names():
    model = build_model(make_spec(mtp={"distill": True})).train()
    batch = make_batch(seed=9, batch_size=2, lengths=None)
    MTPLossLoggingHelper.reset()
    model(*batch[:2], labels=batch[2], loss_mask=batch[3])
    kl = MTPLossLoggingHelper.tracker["distill"].clone()
    metrics = MTPLossLoggingHelper.track_mtp_metrics(1)
    assert {"mtp_1 loss", "mtp_2 loss", "mtp_1_acceptance_rate"} <= metrics.keys()
    assert metrics["mtp_1_distill"] == pytest.approx(float(kl[0]))
    assert metrics["mtp_2_distill"] == pytest.approx(float(kl[1]))
    MTPLossLoggingHelper.reset()
    model = build_model(make_spec()).train()
    model(*batch[:2], labels=batch[2], loss_mask=batch[3])
    assert not any(k.endswith("_distill") for k in MTPLossLoggingHelper.track_mtp_metrics(1))
    MTPLossLoggingHelper.reset()


def test_validation_forward_computes_no_distillation():
    model = build_model(make_spec(mtp={"distill": True})).eval()
    model.track_mtp_in_eval = True
    batch = make_batch(seed=9, batch_size=2, lengths=None)
    MTPLossLoggingHelper.reset()
    with torch.no_grad():
        model(*batch[:2], labels=batch[2], loss_mask=batch[3])
    assert "values" in MTPLossLoggingHelper.tracker
    assert "distill" not in MTPLossLoggingHelper.tracker
    MTPLossLoggingHelper.reset()


def test_sharded_kl_equals_kl_div_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 2, 9, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 2, 9, generator=generator)
    for temperature in (1.0, 0.5):
        kl = sharded_kl(student, teacher, temperature)
        expected = F.kl_div(torch.log_softmax(student / temperature, -1),
                            torch.log_softmax(teacher / temperature, -1),
                            reduction="none", log_target=True).sum(-1)
        torch.testing.assert_close(kl, expected)
        got = torch.autograd.grad(kl.sum(), student)[0]
        want = torch.autograd.grad(expected.sum(), student)[0]
        torch.testing.assert_close(got, want)


def test_spec_rules_and_chunked_auto():
    with pytest.raises(SpecError) as error:
        load_spec({"model": {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2,
                             "num_attention_heads": 4, "seq_length": SEQ},
                   "mtp": {"distill": True}, "train": {"loss": {"chunked": True}}})
    assert error.value.problems[0].key == "train.loss.chunked"
    assert "mtp.distill" in error.value.problems[0].message
    with pytest.raises(SpecError) as error:
        make_spec(depths=0, mtp={"distill": True})
    assert error.value.problems[0].key == "mtp.distill"
    settings = loss_settings_for(make_spec(mtp={"distill": True, "distill_weight": 0.5,
                                                "distill_temperature": 2.0}))
    assert (settings.chunked, settings.mtp_distill) == (False, True)
    assert (settings.mtp_distill_weight, settings.mtp_distill_temperature) == (0.5, 2.0)
    assert loss_settings_for(make_spec()).chunked == "auto"


def test_metrics_lines_average_the_distill_term_over_the_interval():
    from mtp_cli.train.metrics import IntervalMetrics

    totals = IntervalMetrics()
    totals.add(2.0, 0.1, {"mtp_1_acceptance_rate": 50.0, "mtp_1_distill": 0.25})
    totals.add(2.0, 0.1, {"mtp_1_acceptance_rate": 40.0, "mtp_1_distill": 0.75})
    line = totals.averages(1, {})
    assert line["mtp_1_distill"] == pytest.approx(0.5)
    assert line["mtp_1_acceptance_rate"] == pytest.approx(45.0)
    assert "mtp_1_distill" not in IntervalMetrics().averages(1, {})
