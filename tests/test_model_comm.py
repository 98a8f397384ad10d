"""Model code is single-device code: no torch.distributed under models/ and mtp/, collectives
only through the `ModelComm` injected at the model's seams."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import roll_tensor
from mtp_cli.nn import comm as comm_module
from mtp_cli.nn.comm import LOCAL_COMM, LocalComm, ParallelGroups, comm_for

PACKAGE = Path(__file__).resolve().parents[1] / "mtp_cli"


def distributed_references(source: str) -> list[str]:
    """Every import of, or attribute access to, torch.distributed in `source` (with line)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name == "torch.distributed" or a.name.startswith("torch.distributed.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "torch.distributed" or module.startswith("torch.distributed."):
                found.append(f"{node.lineno}: from {module} import ...")
            elif module == "torch" and any(a.name == "distributed" for a in node.names):
                found.append(f"{node.lineno}: from torch import distributed")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist\n",
    "import torch.distributed.checkpoint\n",
    "from torch.distributed import ProcessGroup\n",
    "from torch.distributed.tensor import DTensor\n",
    "from torch import distributed\n",
    "import torch\nx = torch.distributed.get_rank()\n",
    "import torch\ndef f(group: torch.distributed.ProcessGroup): ...\n",
])
def test_the_walk_finds_every_way_of_reaching_torch_distributed(snippet):
    assert distributed_references(snippet)


@pytest.mark.parametrize("package", ["nn", "models", "mtp", "gpt"])
def test_model_packages_never_reference_torch_distributed(package):
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files
    offences = {str(f.relative_to(PACKAGE)): refs for f in files
                if (refs := distributed_references(f.read_text()))}
    assert offences == {}


def test_comm_for_gives_local_comm_without_a_group_and_the_installed_one_with():
    assert comm_for(None) is LOCAL_COMM
    own = LocalComm()
    assert comm_for("any handle", own) is own
    from mtp_cli.parallel.comm import DIST_COMM  # installs itself on import

    assert comm_for(object()) is DIST_COMM


def test_comm_for_a_group_with_no_comm_installed_fails_instead_of_importing_one(monkeypatch):
    """The seam never reaches up to `mtp_cli.parallel` by itself: parallel/ installs it."""
    monkeypatch.setattr(comm_module, "_group_comm", None)
    assert comm_for(None) is LOCAL_COMM
    with pytest.raises(RuntimeError, match="none is installed"):
        comm_for(object())
    own = LocalComm()
    comm_module.install_group_comm(own)
    assert comm_for(object()) is own


class FakeContextParallel(LocalComm):
    """Rank 0 of a two-member group, in one process: the far side sends zeros back.

    Records what the model asks of it, so the test sees every collective go through the seam.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def size(self, group):
        return 2

    def all_reduce(self, tensor, group, op="sum"):
        self.calls.append(("all_reduce", group))
        return tensor

    def exchange_with_neighbours(self, to_prev, to_next, group):
        self.calls.append(("exchange_with_neighbours", group))
        return torch.zeros_like(to_prev), None


def test_model_collectives_go_through_the_injected_comm_only():
    """With a context-parallel group handle and a comm that simulates its other member, the MTP
    rolls exchange boundaries and the loss sums reduce through that comm, with torch.distributed
    never initialised: the model itself calls no collective."""
    assert not dist.is_initialized()
    spec = load_spec({"model": {"vocab_size": 32, "hidden_size": 16, "num_layers": 1,
                                "num_attention_heads": 2, "seq_length": 8},
                      "mtp": {"num_layers": 2}})
    model = build_model(spec)
    comm = FakeContextParallel()
    model.groups = ParallelGroups(cp_group="cp", comm=comm)
    assert all(layer.comm is comm and layer.cp_group == "cp" for layer in model.mtp_layers())
    ids = torch.randint(0, 32, (2, 8))
    model(ids, labels=ids, loss_mask=torch.ones(2, 8)).sum().backward()
    exchanges = [c for c in comm.calls if c[0] == "exchange_with_neighbours"]
    reductions = [c for c in comm.calls if c[0] == "all_reduce"]
    # per depth: ids and positions in the layer, labels and mask in the loss
    assert len(exchanges) == 2 * 2 + 2 * 2
    assert len(reductions) == 1 + 2 * 2  # main tokens; per depth: tokens and loss sum
    assert {group for _, group in comm.calls} == {"cp"}


def test_roll_with_a_comm_fills_the_chunk_end_from_the_neighbour():
    """`roll_tensor(..., cp_group, comm=...)` takes the next chunk's first element from the comm."""

    class Neighbour(FakeContextParallel):
        def exchange_with_neighbours(self, to_prev, to_next, group):
            return torch.full_like(to_prev, 99), None

    rolled, _ = roll_tensor(torch.tensor([[1, 2, 7, 8]]), cp_group="cp", comm=Neighbour())
    assert rolled.tolist() == [[2, 99, 8, 0]]  # rank 0: A's end from rank 1, B ends the sequence
