"""`mtp train` at tensor / pipeline / context / data parallel layouts against one process.

Every layout trains the same tiny spec from the same seed and global batches for 5 steps; the
per-step lm loss and every depth's MTP loss, the validation losses, and the final parameters (in
the checkpoint, gathered to full tensors) must agree with the single-process run to 1e-5.
`add_bias_linear: false` and `adam_eps: 1e-6`: tensor parallel reorders sums (~1e-7 relative),
and Adam divides each element by its own gradient size, so a near-zero gradient element (exactly
zero for a key bias) would turn that rounding into a visible parameter difference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.ckpt_helpers import assert_nothing_stored_whole
from tests.cli_helpers import run_mtp
from tests.train_helpers import corpus, metrics, run_train  # noqa: F401

pytestmark = pytest.mark.distributed

BASE = ["model.num_layers=4", "model.add_bias_linear=false", "train.adam_eps=1e-6",
        "train.steps=5", "train.eval_interval=5", "checkpoint.interval=5"]
PACKED = ["data.packed=true", "train.micro_batch_size=1", "data.pad_documents_to=8"]
KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss")
VAL_KEYS = ("val_lm_loss", "val_mtp_1_loss", "val_mtp_2_loss")

LAYOUTS = {  # name: (nproc, overrides)
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "pp2_vpp2": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "pp4_standalone_mtp": (4, ["parallel.pipeline=4", "parallel.layout=Ett|tt|mm|L"]),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "dp2_pp2": (4, ["parallel.pipeline=2"]),
    "dp2_tp2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "cp2": (2, ["parallel.context=2"]),
    "cp4": (4, ["parallel.context=4"]),
    "cp2_dp2": (4, ["parallel.context=2"]),
    "cp2_tp2": (4, ["parallel.context=2", "parallel.tensor=2"]),
    # activation recomputation changes no loss and no parameter
    "tp2_recompute_full": (2, ["parallel.tensor=2", "train.recompute=full"]),
    "pp2_recompute_full": (2, ["parallel.pipeline=2", "train.recompute=full"]),
    "fsdp2_recompute_full": (2, ["parallel.fsdp=true", "train.recompute=full"]),
    "cp2_recompute_selective": (2, ["parallel.context=2", "train.recompute=selective"]),
    # FSDP2 over the data (x context) ranks with tensor / pipeline / context parallel inside
    "fsdp2_tp2": (4, ["parallel.tensor=2", "parallel.fsdp=true"]),
    "fsdp2_pp2": (4, ["parallel.pipeline=2", "parallel.fsdp=true"]),
    "fsdp2_cp2": (2, ["parallel.context=2", "parallel.fsdp=true"]),
    "dp2_tp2_pp2": (8, ["parallel.tensor=2", "parallel.pipeline=2"]),
}
SLOW = {"fsdp2_tp2", "fsdp2_pp2", "fsdp2_cp2", "dp2_tp2_pp2"}
# Workers are forked from the launcher on a CPU machine (`--start-method auto`); this layout
# starts each worker in its own interpreter instead, as on a CUDA machine.
EXEC_LAYOUTS = {"tp2"}
PACKED_LAYOUTS = {"packed_cp2": (2, ["parallel.context=2"]),
                  "packed_cp4": (4, ["parallel.context=4"])}


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = run_dir / "checkpoints" / "step_0000005"
    target = run_dir / "final.pt"
    dcp_to_torch_save(checkpoint, target)
    return torch.load(target, weights_only=True)["model"]


def assert_same_run(run: Path, reference: Path) -> None:
    (train, val), (train_ref, val_ref) = metrics(run), metrics(reference)
    assert [x["step"] for x in train] == [1, 2, 3, 4, 5]
    for ours, theirs in zip(train, train_ref, strict=True):
        for key in KEYS:
            assert abs(ours[key] - theirs[key]) <= 1e-5, (ours["step"], key, ours[key], theirs[key])
    for ours, theirs in zip(val, val_ref, strict=True):
        for key in VAL_KEYS:
            assert abs(ours[key] - theirs[key]) <= 1e-5, (key, ours[key], theirs[key])
    ours, theirs = final_parameters(run), final_parameters(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, corpus):  # noqa: F811
    """The single-process runs every layout is compared with (plain and packed)."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, extra in (("plain", BASE), ("packed", BASE + PACKED)):
        result = run_train(root / name, corpus, *extra)
        assert result.returncode == 0, result.stderr
        runs[name] = root / name
    return runs


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in LAYOUTS])
def test_layout_equals_single_process(name, tmp_path, corpus, reference_runs):  # noqa: F811
    nproc, extra = LAYOUTS[name]
    flags = ("--start-method", "exec") if name in EXEC_LAYOUTS else ()
    result = run_train(tmp_path / name, corpus, *BASE, *extra, nproc=nproc, flags=flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / name, reference_runs["plain"])
    if name.startswith("fsdp2"):  # sharded state saved without a gather
        checkpoint = tmp_path / name / "checkpoints" / "step_0000005"
        assert assert_nothing_stored_whole(checkpoint) > 0


@pytest.mark.parametrize("name", list(PACKED_LAYOUTS))
def test_packed_context_parallel_equals_single_process(name, tmp_path, corpus,  # noqa: F811
                                                       reference_runs):
    nproc, extra = PACKED_LAYOUTS[name]
    result = run_train(tmp_path / name, corpus, *BASE, *PACKED, *extra, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / name, reference_runs["packed"])


def assert_resumes_like_the_continuing_run(first: Path, text: Path, base: list[str],
                                           continuing: tuple[int, list[str]],
                                           others: dict[str, tuple[int, list[str]]],
                                           tmp_path: Path) -> None:
    """Copies of `first` (a run with a step-3 checkpoint) resume for one more step at the
    `continuing` layout and at each of `others` (name: (nproc, overrides)); each other's step-4
    losses equal the continuing run's to 1e-5."""
    resumed = {}
    for name, (nproc, extra) in {"continuing": continuing, **others}.items():
        run_dir = tmp_path / f"resume_{name}"
        shutil.copytree(first, run_dir)
        result = run_train(run_dir, text, *base, "train.steps=4", *extra, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from step_0000003" in result.stdout + result.stderr
        resumed[name] = metrics(run_dir)[0][-1]
    for name in others:
        assert resumed[name]["step"] == 4
        for key in KEYS:
            assert abs(resumed[name][key] - resumed["continuing"][key]) <= 1e-5, (name, key)


@pytest.mark.slow
def test_tp2_pp2_fsdp2_dp2_checkpoint_resumes_at_other_layouts(tmp_path, corpus):  # noqa: F811
    """8 processes (TP2 x PP2 x FSDP2 over DP2, tied output, an MTP stage) write a checkpoint of
    shards only, with one word-embedding tensor (none for the output layer or the MTP copies);
    it passes inspect-ckpt --strict and resumes at TP1 x PP1 without FSDP, at PP4 and at FSDP2
    over DP4 with the next step's losses equal to the continuing run's."""
    three = [*BASE, "model.share_embeddings_and_output_weights=true", "train.steps=3",
             "checkpoint.interval=3"]
    layout = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.fsdp=true"]
    first = tmp_path / "tp2_pp2_fsdp2"
    result = run_train(first, corpus, *three, *layout, nproc=8)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = first / "checkpoints" / "step_0000003"
    assert assert_nothing_stored_whole(checkpoint) > 0
    stored = FileSystemReader(str(checkpoint)).read_metadata()
    keys = [k for k in stored.state_dict_metadata if k.startswith("model.")]
    assert [k for k in keys if "word_embeddings" in k] == ["model.embedding.word_embeddings.weight"]
    assert not [k for k in keys if k.startswith("model.mtp.") and "embedding" in k]
    assert "model.output_layer.weight" not in keys
    inspected = run_mtp("inspect-ckpt", str(first), "--strict")
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    assert_resumes_like_the_continuing_run(
        first, corpus, three, (8, layout),
        {"tp1_pp1": (1, []), "pp4": (4, ["parallel.pipeline=4"]),
         "fsdp2_dp4": (4, ["parallel.fsdp=true"])}, tmp_path)


@pytest.mark.slow
def test_pp2_vpp2_with_8_micro_batches_equals_single_process(tmp_path, corpus):  # noqa: F811
    """Interleaved 1F1B with 8 micro-batches per step (group size 2: four groups)."""
    eight = [*BASE, "train.micro_batch_size=1"]  # global batch 8
    result = run_train(tmp_path / "single", corpus, *eight)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_train(tmp_path / "pp2_vpp2", corpus, *eight, "parallel.pipeline=2",
                       "parallel.virtual_pipeline=2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / "pp2_vpp2", tmp_path / "single")
