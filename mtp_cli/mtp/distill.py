"""`mtp.distill`: the MTP depths learn the main model's own next-token distribution.

After the main model is fine-tuned alone (the MTP tensors frozen, or dropped by the tool), its
depths still draft for the old model and speculative decoding accepts fewer of their tokens.
Healing trains the depths (main model frozen, `mtp.detach_heads`) towards what the main model
now predicts, not only towards the data: depth k at row i predicts token i+k+1, which the main
model predicts at row i+k, so depth k adds

    w * KL( softmax(z_main[i+k] / T).detach() || softmax(z_k[i] / T) )

to its per-token cross-entropy, before `mtp.loss_scaling_factor` / D and the token
normalisation (Megatron-LM's closed PR #5340 described distillation from shifted base-model
logits). The main logits are rolled exactly like depth k's labels (`roll_tensor`, cumulatively,
packed documents rolling on their own, context-parallel shards exchanging their boundaries), so
the depth's loss mask zeroes the same rows: a row whose target lies past its document's end has
a zero-filled teacher and no loss. What greedy speculative decoding accepts is the main model's
argmax, so matching its distribution is what raises acceptance; the data term keeps the depths
honest where the main model is unsure.

No T^2 factor (Hinton's, which keeps gradient sizes comparable across temperatures) is applied:
the term is exactly `w * KL` at temperature T, so scale `mtp.distill_weight` by T^2 yourself
when raising the temperature.

Tensor parallel: the logits are this rank's vocabulary shard `[s, b, V/tp]`; the softmax
statistics (max, sum of exponentials) and the KL's sum over the vocabulary are reduced over the
head's group through its `ModelComm`, so the full logits are never gathered. The gradient of the
KL with respect to a rank's student logits is `(q - p) / T` on that rank's shard. Chunked heads
(`train.loss.chunked`) never hold the logits: the spec refuses `chunked: true` with distillation
and `auto` chunks nothing while distilling (`mtp_cli.builders.model_builder.loss_settings_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mtp_cli.mtp.roll import roll_tensor
from mtp_cli.nn.comm import Group, ModelComm, comm_for
from mtp_cli.nn.packed import PackedSeqParams


def sharded_log_softmax(logits: torch.Tensor, group: Group, comm: ModelComm) -> torch.Tensor:
    """fp32 log-softmax of `[..., V_local]` logits whose vocabulary is split over `group`."""
    logits = logits.float()
    top = logits.max(dim=-1).values
    top = comm.all_reduce(top, group, "max")
    shifted = logits - top.unsqueeze(-1)
    sum_exp = comm.all_reduce(shifted.exp().sum(dim=-1), group)
    return shifted - sum_exp.log().unsqueeze(-1)


class _ShardedKL(torch.autograd.Function):
    """Per-row `KL(softmax(teacher / T) || softmax(student / T))` over a vocab-sharded last
    dimension; the gradient reaches the student logits only."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, group, comm):  # type: ignore[override]
        log_q = sharded_log_softmax(student.float() / temperature, group, comm)
        log_p = sharded_log_softmax(teacher.detach().float() / temperature, group, comm)
        p = log_p.exp()
        kl = comm.all_reduce((p * (log_p - log_q)).sum(dim=-1), group)
        ctx.save_for_backward(log_q, p)
        ctx.temperature, ctx.input_dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        log_q, p = ctx.saved_tensors
        grad = (log_q.exp() - p) * (grad_kl.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.input_dtype), None, None, None, None


def sharded_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
               group: Group = None, comm: ModelComm | None = None) -> torch.Tensor:
    """`KL(softmax(teacher/T) || softmax(student/T))` per row of `[..., V_local]` logits (fp32);
    the vocabulary may be split over `group` (every rank gets the same values)."""
    comm = comm_for(group, comm)
    if group is not None and comm.size(group) == 1:
        group = None
    return _ShardedKL.apply(student, teacher, float(temperature), group, comm)


@dataclass
class MTPDistillation:
    """One micro-batch's distillation: the main model's logits, rolled one more row per depth.

    `head` is the model's output head (`OutputHead` or the vocab-parallel one: `local_logits`,
    `loss_and_hits_from_logits`, `group`, `comm`); `head_weight` the output weight the depths
    use (detached under `mtp.detach_heads`).
    """

    weight: float
    temperature: float
    head: Any
    head_weight: torch.Tensor
    teacher: torch.Tensor  # [s, b, V_local] main logits, rolled as far as the last depth

    @classmethod
    def start(cls, settings: Any, head: Any, weight: torch.Tensor, head_weight: torch.Tensor,
              hidden: torch.Tensor, depths: int) -> MTPDistillation | None:
        """None unless `settings.mtp_distill` (a `LossSettings`); else the teacher logits of
        the main rows of `hidden` `[(1+D)*s, b, h]` (no gradient)."""
        if not getattr(settings, "mtp_distill", False) or depths == 0:
            return None
        if not hasattr(head, "loss_and_hits_from_logits"):
            raise ValueError("mtp.distill needs the full logits of the output head; chunked "
                             "losses never hold them (set train.loss.chunked: false)")
        with torch.no_grad():
            main = hidden.chunk(1 + depths, dim=0)[0]
            teacher = head.local_logits(main.detach(), weight.detach())
        return cls(settings.mtp_distill_weight, settings.mtp_distill_temperature, head,
                   head_weight, teacher)

    def depth_losses(self, hidden: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     cp_group: Group, packed_seq_params: PackedSeqParams | None,
                     comm: ModelComm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next depth's unmasked per-token cross-entropy `[b, s]`, argmax hits and KL
        `[b, s]` against the main logits rolled once more (as its labels just were)."""
        self.teacher, _ = roll_tensor(self.teacher, -1, 0, cp_group, packed_seq_params,
                                      comm=comm)
        logits = self.head.local_logits(hidden, self.head_weight)
        loss, hits = self.head.loss_and_hits_from_logits(logits, labels, mask)
        kl = sharded_kl(logits, self.teacher, self.temperature, self.head.group, self.head.comm)
        return loss, hits, kl.transpose(0, 1)
