"""tie_*_state_dict: one tensor per logical weight, and a drifted copy refuses to be saved."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.mtp import tie_output_layer_state_dict, tie_word_embeddings_state_dict
from mtp_cli.mtp.tying import TiedCopyMismatchError


def test_output_copy_is_stored_under_the_embedding_key():
    main = torch.randn(8, 4)
    state = {"output_layer.weight": main.clone(), "decoder.final_layernorm.weight": torch.ones(4)}
    tie_output_layer_state_dict(state, main)
    assert set(state) == {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"}
    assert torch.equal(state["embedding.word_embeddings.weight"], main)


def test_mtp_stage_copy_is_stored_once_under_the_main_key():
    main = torch.randn(8, 4)
    state = {"embedding.word_embeddings.weight": main.clone(), "mtp.layers.0.eh_proj.weight":
             torch.zeros(4, 8)}
    tie_word_embeddings_state_dict(state, main, "embedding.word_embeddings.weight")
    assert sorted(state) == ["embedding.word_embeddings.weight", "mtp.layers.0.eh_proj.weight"]


@pytest.mark.parametrize("tie", [tie_output_layer_state_dict, tie_word_embeddings_state_dict])
def test_a_drifted_copy_is_refused(tie):
    main = torch.randn(8, 4)
    drifted = main.clone()
    drifted[3, 1] += 1e-3
    key = "output_layer.weight" if tie is tie_output_layer_state_dict else \
        "embedding.word_embeddings.weight"
    with pytest.raises(TiedCopyMismatchError, match=r"max \|diff\| 0\.001"):
        tie({key: drifted}, main)
