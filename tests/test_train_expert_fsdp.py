"""Expert parallel under FSDP2, end to end (gloo, real processes).

`mtp train` of the MLA + MoE model with two MTP depths at EP2 x FSDP2 over four processes: the
dense weights are FSDP2-sharded over all four data-parallel ranks, each MoE layer's routed
experts over the two ranks that hold the same experts (expert data parallel 2). Step by step it
gives the single-process run's lm loss, each MTP depth's loss and the aux losses, and the same
final parameters, to 1e-5, and the same clipped gradient norm. Its checkpoint stores every
expert under its global index and global shape as the two expert-data-parallel ranks' row
blocks (no gather), and resumes on one process without FSDP with the continuing run's next
steps. Two processes (EP2 x FSDP2, expert data parallel 1) give the single-process run too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.ckpt_helpers import tiles
from tests.expert_helpers import assert_same_ep_run, train_ep
from tests.train_helpers import metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EXPERTS = 8  # tiny_moe.yaml's routed experts


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep_fsdp")
    train_ep(root / "single", nproc=1, expert=1)
    train_ep(root / "ep2fsdp", 4, 2, "parallel.fsdp=true")
    return root


def _assert_same_norms(reference: Path, run_dir: Path) -> None:
    """The clipped gradient norm counts every logical weight once: each expert row once over
    both expert groups, the dense FSDP2 rows once over data parallel."""
    for a, b in zip(metrics(reference)[0], metrics(run_dir)[0], strict=True):
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)


def test_ep2_fsdp2_over_dp4_gives_the_single_process_run(runs):
    assert_same_ep_run(runs / "single", runs / "ep2fsdp")
    _assert_same_norms(runs / "single", runs / "ep2fsdp")


def test_ep2_fsdp2_on_two_processes_gives_the_single_process_run(runs, tmp_path):
    """Expert data parallel 1: each expert's FSDP2 unit spans one rank (its reduction is a
    copy), the dense weights still shard over both."""
    train_ep(tmp_path / "ep2", 2, 2, "parallel.fsdp=true")
    assert_same_ep_run(runs / "single", tmp_path / "ep2")
    _assert_same_norms(runs / "single", tmp_path / "ep2")


def test_the_experts_are_stored_as_their_replicas_row_blocks_under_global_names(runs):
    """Each expert weight and Adam moment: global shape, two row blocks (one per expert-data-
    parallel rank) that tile it, none full-size, each written by the rank holding it (no
    gather); every expert index of every MoE layer."""
    checkpoint = runs / "ep2fsdp/checkpoints/step_0000005"
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    experts = {key: entry for key, entry in metadata.state_dict_metadata.items()
               if ".local_experts." in key and isinstance(entry, TensorStorageMetadata)
               and (key.startswith("model.") or key.endswith((".exp_avg", ".exp_avg_sq")))}
    weights = [k for k in experts if k.startswith("model.")]
    # layer 2 (MoE) and the two MoE MTP layers, each: 8 experts x (fc1, fc2)
    assert len(weights) == 3 * EXPERTS * 2, sorted(weights)
    assert {int(k.split(".local_experts.")[1].split(".")[0]) for k in weights} == \
        set(range(EXPERTS))
    assert len(experts) == 3 * len(weights)
    for key, entry in experts.items():
        shape = list(entry.size)
        boxes = [(list(c.offsets), list(c.sizes)) for c in entry.chunks]
        assert shape[0] in (64, 128) and shape[1] in (64, 128), (key, shape)  # whole expert
        assert len(boxes) == 2 and all(sizes != shape for _, sizes in boxes), (key, boxes)
        assert tiles(boxes, shape), key
        # written by the rank that holds the rows: expert-data-parallel rank `row block` of
        # the expert's block (global rank = edp rank x EP + ep rank)
        expert = int(key.split(".local_experts.")[1].split(".")[0])
        written = [(index, stored) for index, stored in metadata.storage_data.items()
                   if index.fqn == key]
        assert len(written) == 2, (key, written)
        for index, stored in written:
            block = [o for o, _ in boxes].index(list(index.offset))
            owner = block * 2 + expert // (EXPERTS // 2)
            assert stored.relative_path.startswith(f"__{owner}_"), (key, index, stored)


def test_an_ep2_fsdp2_checkpoint_resumes_on_one_process(runs, tmp_path):
    run_dir = tmp_path / "ep1"
    shutil.copytree(runs / "ep2fsdp", run_dir)
    (run_dir / "checkpoints/latest").write_text("step_0000003\n")
    train_ep(run_dir, nproc=1, expert=1)
    assert_same_ep_run(runs / "single", run_dir)
    _assert_same_norms(runs / "single", run_dir)
