"""No warnings on the default paths: a bf16 step on CPU (RMSNorm under autocast) and the FSDP2
root's output (a view would make FSDP2 warn on every rank); the fix keeps the numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.models.norms import RMSNorm
from mtp_cli.parallel.data_parallel import _own_output
from mtp_cli.train.step import StepSettings, train_step
from tests.step_helpers import OVERRIDES, batch


def test_a_bf16_step_on_cpu_raises_no_warning():
    spec = load_spec("specs/tiny.yaml", [*OVERRIDES, "train.bf16=true"])
    assert spec.model.normalization == "RMSNorm"
    model = build_model(spec)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    settings = StepSettings(num_microbatches=1, per_token_loss=False, grad_clip=1.0, bf16=True,
                            device=torch.device("cpu"), dp_cp_size=1, dp_cp_group=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), [batch(tokens)],
                         settings)
    assert out.applied and 0 < out.lm_loss < 10


def test_rms_norm_under_bf16_autocast_is_the_fp32_norm_rounded_once():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
    x32 = x.float()
    reference = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=1e-6, rtol=2**-8)  # one rounding
    # the cause, in torch's own norm
    with pytest.warns(UserWarning, match="Mismatch dtype"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.RMSNorm(16)(x)
    plain = torch.randn(2, 16)  # fp32 in, fp32 out: torch's own RMSNorm, untouched
    torch.testing.assert_close(norm(plain), torch.nn.functional.rms_norm(
        plain, (16,), norm.weight, 1e-5), atol=0, rtol=0)


@pytest.mark.parametrize("contiguous", [False, True])
def test_the_fsdp_root_hands_on_a_tensor_of_its_own(contiguous):
    flat = torch.arange(6.0, requires_grad=True)
    output = flat.view(3, 2).transpose(0, 1)
    if contiguous:
        output = output.contiguous()
    owned = _own_output(None, (), output)
    assert owned._base is None
    torch.testing.assert_close(owned, output, atol=0, rtol=0)
    owned.sum().backward()
    assert flat.grad is not None and torch.equal(flat.grad, torch.ones(6))
