"""Multi-token prediction, with the public names of Megatron-Core's module."""

from mtp_cli.mtp.autoscaler import MTPLossAutoScaler
from mtp_cli.mtp.block import MultiTokenPredictionBlock, _get_mtp_block_submodules
from mtp_cli.mtp.layer import (
    SUPPORTED_ATTN_MASK,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_block_spec,
    get_mtp_layer_spec,
    get_mtp_layer_spec_for_backend,
)
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.mtp.loss import LossSettings, MTPLossSettings, process_mtp_loss
from mtp_cli.mtp.roll import _roll_tensor_packed_seq, roll_tensor
from mtp_cli.mtp.run_state import MTPRunState
from mtp_cli.mtp.tying import tie_output_layer_state_dict, tie_word_embeddings_state_dict
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.plan.placement import get_mtp_layer_offset, get_mtp_num_layers_to_build

__all__ = [
    "SUPPORTED_ATTN_MASK",
    "LossSettings",
    "MTPLossAutoScaler",
    "MTPLossLoggingHelper",
    "MTPLossSettings",
    "MTPRunState",
    "MultiTokenPredictionBlock",
    "MultiTokenPredictionBlockSubmodules",
    "MultiTokenPredictionLayer",
    "MultiTokenPredictionLayerSubmodules",
    "PackedSeqParams",
    "_get_mtp_block_submodules",
    "_roll_tensor_packed_seq",
    "get_mtp_block_spec",
    "get_mtp_layer_offset",
    "get_mtp_layer_spec",
    "get_mtp_layer_spec_for_backend",
    "get_mtp_num_layers_to_build",
    "process_mtp_loss",
    "roll_tensor",
    "tie_output_layer_state_dict",
    "tie_word_embeddings_state_dict",
]
