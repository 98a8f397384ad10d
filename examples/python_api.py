"""The Python API: load a spec, build the model, one forward/backward, read the MTP losses.

    python examples/python_api.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossLoggingHelper

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"


def main() -> None:
    spec = load_spec(SPEC, ["mtp.num_layers=3"])  # overrides typed by the schema
    model = build_model(spec)  # the whole model on the CPU, initialised from train.seed
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, spec.model.seq_length + 1), generator=generator)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]
    loss_mask = torch.ones_like(labels, dtype=torch.float32)

    per_token = model(input_ids, None, labels=labels, loss_mask=loss_mask)  # [b, s]
    lm_loss = (per_token * loss_mask).sum() / loss_mask.sum()
    lm_loss.backward()  # the MTP terms ride along through MTPLossAutoScaler

    depth_losses = MTPLossLoggingHelper.tracker["values"].tolist()
    print(f"lm loss {lm_loss.item():.4f}")
    for depth, value in enumerate(depth_losses, start=1):
        print(f"mtp_{depth} loss {value:.4f}")
    grad = model.mtp.layers["2"].eh_proj.weight.grad
    print(f"depth-3 eh_proj gradient norm {grad.norm():.3e}")


if __name__ == "__main__":
    main()
