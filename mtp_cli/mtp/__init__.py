"""Multi-token prediction, with the public names of Megatron-Core's module."""

from mtp_cli.mtp.autoscaler import MTPLossAutoScaler
from mtp_cli.mtp.layer import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_block_spec,
    get_mtp_layer_spec,
    get_mtp_layer_spec_for_backend,
)
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.mtp.loss import MTPLossSettings, process_mtp_loss
from mtp_cli.mtp.roll import roll_tensor
from mtp_cli.mtp.tying import tie_output_layer_state_dict, tie_word_embeddings_state_dict
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.plan.placement import get_mtp_layer_offset, get_mtp_num_layers_to_build

__all__ = [
    "MTPLossAutoScaler",
    "MTPLossLoggingHelper",
    "MTPLossSettings",
    "MultiTokenPredictionBlock",
    "MultiTokenPredictionBlockSubmodules",
    "MultiTokenPredictionLayer",
    "MultiTokenPredictionLayerSubmodules",
    "PackedSeqParams",
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
