"""Packed documents (Megatron's THD convention): attention and every MTP roll stop at the
document boundaries, so three packed documents score as the three run alone.

What is exact and what is not: the per-document roll moves integers and is exact. The losses
agree to float32 rounding, not bit for bit: a packed sequence's attention and matmuls sum over
differently shaped tensors, so the kernels may add in another order (differences of ~1e-7 on
some machines, 0 on others). The example prints the largest difference and checks it against
TOLERANCE.

    python examples/packed_documents.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import PackedSeqParams, roll_tensor

SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"
TOLERANCE = 1e-5  # float32 rounding over a few layers, far below any real difference


def main() -> None:
    params = PackedSeqParams.from_lengths([3, 2])
    rolled, _ = roll_tensor(torch.tensor([1, 2, 3, 4, 5]), packed_seq_params=params)
    print(f"roll of [1 2 3 | 4 5] per document: {rolled.tolist()}")  # [2, 3, 0, 5, 0]

    model = build_model(load_spec(SPEC)).eval()
    documents = [torch.tensor([72, 105, 33, 256]), torch.tensor([79, 107, 256]),
                 torch.tensor([89, 101, 115, 33, 256])]
    ids = torch.cat(documents)[None]
    positions = torch.cat([torch.arange(len(d)) for d in documents])[None]
    labels = torch.cat([torch.cat([d[1:], d[-1:]]) for d in documents])[None]
    mask = torch.cat([torch.tensor([1.0] * (len(d) - 1) + [0.0]) for d in documents])[None]
    packed = PackedSeqParams.from_lengths([len(d) for d in documents])
    with torch.no_grad():
        together = model(ids, positions, labels=labels, loss_mask=mask,
                         packed_seq_params=packed)[0]
        alone = torch.cat([model(d[None], torch.arange(len(d))[None],
                                 labels=torch.cat([d[1:], d[-1:]])[None])[0]
                           for d in documents])
    difference = float(((together - alone) * mask[0]).abs().max())
    verdict = "equal to float32 rounding" if difference <= TOLERANCE else "DIFFERENT"
    print(f"max |packed - separate| over loss positions: {difference:.2e} "
          f"(tolerance {TOLERANCE:.0e}: {verdict})")
    if difference > TOLERANCE:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
