"""The run spec: one YAML file, validated by these Pydantic models.

The schema is the documentation: every field carries a description and its bounds, `extra="forbid"`
turns typos into errors, and `mtp schema` exports the JSON Schema for editors. Defaults follow
Megatron-Core's `TransformerConfig` so that a spec reads like the Megatron arguments users know.

The schema checks what each key may hold and fills the defaults; the rules that tie keys together
(divisibility, what runs with what, the layout) are in `mtp_cli.plan.rules`, which the loader runs.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, model_validator

from mtp_cli.config.attention_fields import AttentionFields
from mtp_cli.config.base import NonNegativeInt, PositiveInt, StrictModel, rule_error
from mtp_cli.config.moe_fields import MoEFields
from mtp_cli.config.train_config import LossConfig, TrainConfig  # noqa: F401  (re-exported)


class ModelConfig(StrictModel, AttentionFields, MoEFields):
    """The GPT decoder: dense or mixture-of-experts layers, GQA or multi-latent attention.
    Defaults are Megatron-Core's."""

    # the attention and MoE keys are declared in config/attention_fields.py and moe_fields.py

    vocab_size: PositiveInt = Field(description="Vocabulary size (rows of the embedding).")
    hidden_size: PositiveInt = Field(description="Model width h.")
    num_layers: PositiveInt = Field(description="Decoder layers N (MTP layers not included).")
    num_attention_heads: PositiveInt = Field(description="Query heads.")
    seq_length: PositiveInt = Field(description="Tokens per training sample.")
    num_query_groups: PositiveInt | None = Field(
        default=None, description="Key/value heads (grouped-query attention); default: heads."
    )
    ffn_hidden_size: PositiveInt | None = Field(
        default=None, description="MLP inner width; default 4 x hidden_size."
    )
    kv_channels: PositiveInt | None = Field(
        default=None, description="Per-head width; default hidden_size / num_attention_heads."
    )
    max_position_embeddings: PositiveInt | None = Field(
        default=None, description="Rows of the learned position table; default seq_length."
    )
    normalization: Literal["LayerNorm", "RMSNorm"] = Field(
        default="LayerNorm", description="Norm of every layer, MTP's enorm/hnorm and the final norm."
    )
    activation: Literal["gelu", "swiglu"] = Field(
        default="gelu", description="MLP activation; swiglu doubles linear_fc1 (gate, then up)."
    )
    position_embedding: Literal["rope", "learned_absolute", "none"] = Field(
        default="learned_absolute",
        description="rope (rotary, per head), learned_absolute (a table of "
        "max_position_embeddings rows) or none.",
    )
    rotary_base: Annotated[float, Field(gt=0)] = Field(default=10000.0, description="RoPE base.")
    add_bias_linear: bool = Field(default=True, description="Biases on every linear layer.")
    add_qkv_bias: bool = Field(
        default=False, description="Bias on linear_qkv even when add_bias_linear is false."
    )
    share_embeddings_and_output_weights: bool = Field(
        default=False, description="Tie the output layer to the word embedding."
    )
    init_method_std: Annotated[float, Field(gt=0)] = Field(
        default=0.02, description="Standard deviation of the normal initialisation of weights."
    )
    layernorm_epsilon: Annotated[float, Field(gt=0)] = Field(
        default=1e-5, description="Epsilon added to the variance in every norm."
    )
    hidden_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.0, description="Dropout on the embedding and after attention and MLP."
    )
    attention_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.0, description="Dropout on the attention probabilities."
    )
    backend: Literal["local", "te"] = Field(
        default="local", description="local = plain PyTorch; te = Transformer Engine (CUDA)."
    )

    _given: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="after")
    def _fill_defaults(self) -> ModelConfig:
        self._given = frozenset(self.model_fields_set)  # before the defaults below join it
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.moe_ffn_hidden_size is None and self.num_moe_experts is not None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.kv_channels is None and self.multi_latent_attention:
            self.kv_channels = self.qk_head_dim + self.qk_pos_emb_head_dim
        if self.kv_channels is None:  # heads must divide hidden_size (`mtp_cli.plan.rules`)
            self.kv_channels = self.hidden_size // self.num_attention_heads
        return self

    @property
    def given_keys(self) -> frozenset[str]:
        """The keys the spec sets (the rules of `mtp_cli.plan.rules` tell them from defaults)."""
        return self._given


class LossWeightStep(StrictModel):
    """One piece of a piecewise-constant MTP loss weight (DeepSeek-V3: 0.3, then 0.1)."""

    until_tokens: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="Applies while tokens seen < until_tokens; omit on the last."
    )
    value: Annotated[float, Field(ge=0)] = Field(description="λ while this piece applies.")


class DepthWeightStep(StrictModel):
    """One piece of a per-depth weight schedule, by fraction of `train.steps` done."""

    until_fraction: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="Applies while steps done / train.steps < this; omit last."
    )
    weights: list[Annotated[float, Field(ge=0)]] = Field(
        description="w_1..w_k of depths 1..k; depths past the list get 0 (off)."
    )


class MTPConfig(StrictModel):
    """Multi-token prediction: D sequential depths after the main decoder."""

    num_layers: NonNegativeInt = Field(default=1, description="MTP depths D (0 = no MTP).")
    loss_scaling_factor: Annotated[float, Field(ge=0)] | list[LossWeightStep] = Field(
        default=0.1,
        description="λ: a number, or steps [{until_tokens: 10e12, value: 0.3}, {value: 0.1}].",
    )
    depth_weights: list[Annotated[float, Field(ge=0)]] | list[DepthWeightStep] | None = Field(
        default=None,
        description="Per-depth loss weights w_k (objective L + λ/D Σ w_k L_k; default all 1): "
        "a list, or steps by fraction of training [{until_fraction: 0.33, weights: [1, 0.5, "
        "0.25]}, {until_fraction: 0.67, weights: [1, 0.5]}, {weights: [1]}].",
    )
    use_repeated_layer: bool = Field(
        default=False, description="Build one MTP layer and apply it at every depth."
    )
    detach_heads: bool = Field(
        default=False,
        description="Train the MTP heads without gradients into the main model.",
    )
    distill: bool = Field(
        default=False,
        description="Depth k also learns the main model's distribution: adds distill_weight x "
        "KL(main softmax at row i+k, detached || depth k's at row i) to its cross-entropy "
        "(healing the heads after fine-tuning the main model).",
    )
    distill_weight: Annotated[float, Field(ge=0)] = Field(
        default=1.0, description="w of mtp.distill's KL term (before loss_scaling_factor / D)."
    )
    distill_temperature: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="Softmax temperature T of mtp.distill (no T^2 factor)."
    )
    hsm: bool = Field(
        default=False,
        description="Megatron-LM's mtp_hsm (PR #6566): in training, each token at depth k >= 2 "
        "takes its input uniformly from the main state and depths 1..k-1 (needs D >= 2).",
    )
    separate_grad_norm: bool = Field(
        default=False,
        description="Megatron-LM #4116: the MTP parameters get their own gradient norm, "
        "clipped to train.grad_clip apart from the rest; both norms logged.",
    )

    @model_validator(mode="after")
    def _check_schedule(self) -> MTPConfig:
        if isinstance(self.loss_scaling_factor, list):
            steps = self.loss_scaling_factor
            if not steps:
                raise rule_error("loss_scaling_factor", "the schedule needs at least one step")
            if steps[-1].until_tokens is not None:
                raise rule_error(
                    "loss_scaling_factor", "the last step must have no until_tokens bound"
                )
            bounds = [s.until_tokens for s in steps[:-1]]
            if any(b is None for b in bounds):
                raise rule_error(
                    "loss_scaling_factor", "every step but the last needs until_tokens"
                )
            if any(a >= b for a, b in itertools.pairwise(bounds)):
                raise rule_error("loss_scaling_factor", "until_tokens must increase")
        return self

    @model_validator(mode="after")
    def _check_depth_weights(self) -> MTPConfig:
        steps = self.depth_weights
        if not isinstance(steps, list) or not steps or not isinstance(steps[0], DepthWeightStep):
            return self
        if steps[-1].until_fraction is not None:
            raise rule_error("depth_weights", "the last step must have no until_fraction bound")
        bounds = [s.until_fraction for s in steps[:-1]]
        if any(b is None for b in bounds):
            raise rule_error("depth_weights", "every step but the last needs until_fraction")
        if any(a >= b for a, b in itertools.pairwise(bounds)):  # type: ignore[operator]
            raise rule_error("depth_weights", "until_fraction must increase")
        return self

    def depth_weights_at(self, fraction_done: float) -> tuple[float, ...] | None:
        """The per-depth weights in force after `fraction_done` of training (None: all 1)."""
        steps = self.depth_weights
        if steps is None:
            return None
        if not steps or not isinstance(steps[0], DepthWeightStep):
            return tuple(float(w) for w in steps)  # type: ignore[arg-type]
        for step in steps:
            assert isinstance(step, DepthWeightStep)
            if step.until_fraction is None or fraction_done < step.until_fraction:
                return tuple(float(w) for w in step.weights)
        return None  # unreachable: the last step has no bound

    def loss_scale_at(self, tokens_seen: float) -> float:
        """λ in force after `tokens_seen` training tokens."""
        if not isinstance(self.loss_scaling_factor, list):
            return float(self.loss_scaling_factor)
        for step in self.loss_scaling_factor:
            if step.until_tokens is None or tokens_seen < step.until_tokens:
                return float(step.value)
        return float(self.loss_scaling_factor[-1].value)


class ParallelConfig(StrictModel):
    """The parallel layout. Data-parallel size = world size / (tensor x pipeline x context)."""

    tensor: PositiveInt = Field(default=1, description="Tensor-parallel size.")
    pipeline: PositiveInt = Field(default=1, description="Pipeline-parallel size.")
    virtual_pipeline: PositiveInt | None = Field(
        default=None, description="Virtual stages per pipeline rank (interleaved schedule)."
    )
    microbatch_group_size_per_vp_stage: PositiveInt | None = Field(
        default=None,
        description="Interleaved schedule: micro-batches each virtual stage runs back to back "
        "(default: pipeline); pipeline <= it <= micro-batches per step, and micro-batches per "
        "step mod it is 0 or at least pipeline.",
    )
    context: PositiveInt = Field(default=1, description="Context-parallel size.")
    expert: PositiveInt = Field(
        default=1, description="Expert-parallel size: routed experts split over this many ranks "
        "of data x context parallel (all-to-all token dispatch); must divide num_moe_experts.")
    expert_tensor: PositiveInt = Field(
        default=1, description="Expert tensor-parallel size (Megatron's "
        "expert_tensor_parallel_size): 1 keeps every routed expert whole under tensor parallel, "
        "as DeepSeek-V3 trained; equal to tensor splits each expert over the tensor ranks "
        "(linear_fc1 column-, linear_fc2 row-parallel); other sizes are not run.")
    layout: str | None = Field(
        default=None,
        description="pipeline_model_parallel_layout: E, t, m, L, '|' between stages, x*n, "
        "(...)*n; stages virtual-stage-major, e.g. 'Etttt|tttt|m|L' or 'Et|(tt|)*30mL'.",
    )
    num_layers_in_first_pipeline_stage: PositiveInt | None = Field(
        default=None, description="Decoder layers on the first pipeline rank (uneven split)."
    )
    num_layers_in_last_pipeline_stage: PositiveInt | None = Field(
        default=None, description="Decoder layers on the last pipeline rank (uneven split)."
    )
    account_for_embedding_in_pipeline_split: bool = Field(
        default=False, description="Count the embedding as one layer when splitting evenly."
    )
    account_for_loss_in_pipeline_split: bool = Field(
        default=False, description="Count the loss as one layer when splitting evenly."
    )
    sequence_parallel: bool = Field(default=False, description="Megatron sequence parallel (TP).")
    fsdp: bool = Field(default=False, description="FSDP2 (fully_shard) instead of DDP.")


class SyntheticConfig(StrictModel):
    """A generated task instead of a corpus (mtp_cli/data/synthetic.py): no download, the same
    documents for a seed on every machine, a held-out split generated apart."""

    task: Literal["induction", "addition", "sorting"] = Field(
        description="induction: random letters whose second half copies spans of the first; "
        "addition: 'a+b=c' lines; sorting: 'letters=sorted letters' lines.",
    )
    documents: PositiveInt = Field(default=20000, description="Training documents.")
    val_documents: PositiveInt = Field(default=1000, description="Held-out documents.")
    length: PositiveInt | None = Field(
        default=None, description="Tokens per document (default model.seq_length - 1: one "
        "document and its end-of-document token per window).",
    )
    seed: NonNegativeInt = Field(default=1234, description="Generator seed (not train.seed).")
    alphabet: Annotated[int, Field(ge=2, le=52)] = Field(
        default=26, description="Letters drawn from (induction, sorting): a-z then A-Z.",
    )
    digits: Annotated[int, Field(ge=1, le=9)] = Field(
        default=4, description="Most digits of each addend (addition).",
    )


class BlendEntry(StrictModel):
    """One dataset of `data.blend`."""

    path: str = Field(description="Anything `data.path` accepts (a .bin/.idx prefix, ...).")
    weight: Annotated[float, Field(gt=0)] = Field(
        description="Relative weight (the weights are normalised to sum to 1).")


def _megatron_blend(value: Any) -> Any:
    """Megatron's `"0.3 A 0.7 B"` string as `[{path: A, weight: 0.3}, ...]`."""
    if not isinstance(value, str):
        return value
    words = value.split()
    if not words or len(words) % 2:
        raise ValueError(f"expected 'WEIGHT PATH WEIGHT PATH ...', got {value!r}")
    entries = []
    for weight, path in zip(words[::2], words[1::2], strict=True):
        try:
            entries.append({"path": path, "weight": float(weight)})
        except ValueError:
            raise ValueError(f"{weight!r} is not a weight (expected 'WEIGHT PATH ...')") from None
    return entries


class DataConfig(StrictModel):
    """Training data. No path: the Python standard library's sources, byte-tokenized."""

    path: str | None = Field(
        default=None,
        description="Text file, directory, JSONL ('text' field) or Megatron .bin/.idx prefix.",
    )
    blend: Annotated[list[BlendEntry] | None, BeforeValidator(_megatron_blend)] = Field(
        default=None, min_length=1,
        description="Weighted datasets instead of `path`: [{path, weight}, ...] or Megatron's "
        "'0.3 A 0.7 B'. Samples follow Megatron's largest-shortfall rule.",
    )
    allow_data_change: bool = Field(
        default=False,
        description="Resume even though the data files or the blend changed since the "
        "checkpoint: the data stream restarts from its first sample.",
    )
    packed: bool = Field(
        default=False, description="Document boundaries reach attention and the MTP rolls."
    )
    tokenizer: str | None = Field(
        default=None, description="A tokenizer.json (needs `tokenizers`); default: bytes."
    )
    pad_documents_to: PositiveInt | None = Field(
        default=None,
        description="Packed: pad every document to a multiple of this (default 2 x context "
        "when context > 1). Use 2 x the largest context size to train at several context "
        "sizes on identical tokens.",
    )
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.05, description="Share of documents held out for validation."
    )
    synthetic: SyntheticConfig | None = Field(
        default=None, description="A generated task (induction, addition, sorting) instead of "
        "a corpus; byte tokens, its own held-out split (val_fraction unused).",
    )


class CheckpointConfig(StrictModel):
    """DCP checkpoints under run_dir/checkpoints/step_NNNNNNN/."""

    interval: NonNegativeInt = Field(default=100, description="Steps between saves; 0 = end only.")
    keep_last: PositiveInt | None = Field(
        default=None, description="Prune all but the newest k (by step; never newer than latest)."
    )
    checksums: bool = Field(
        default=False,
        description="Record a SHA-256 of every checkpoint file in meta.json; checked on resume.",
    )


class LoggingConfig(StrictModel):
    """Where metrics go besides metrics.jsonl."""

    tensorboard: bool = Field(default=True, description="Event files under run_dir/tb/.")
    wandb_project: str | None = Field(default=None, description="W&B project, when installed.")


class ModuleSpecConfig(StrictModel):
    """ModuleSpec overrides: `{module: NAME, params: {...}, submodules: {...}}` trees."""

    decoder_layer: dict[str, Any] | None = Field(
        default=None, description="Spec of every decoder layer (default: TransformerLayer)."
    )
    mtp_layer: dict[str, Any] | None = Field(
        default=None, description="Spec of every MTP layer (default: MultiTokenPredictionLayer)."
    )


class RunSpec(StrictModel):
    """A whole run: the model, its MTP depths, the parallel layout and the training set-up."""

    model: ModelConfig = Field(description="The GPT decoder (required).")
    mtp: MTPConfig = Field(
        default_factory=MTPConfig, description="Multi-token prediction depths and loss weight."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="Tensor, pipeline and context parallel sizes and the pipeline layout.",
    )
    modules: ModuleSpecConfig = Field(
        default_factory=ModuleSpecConfig,
        description="ModuleSpec trees replacing the decoder and MTP layers.",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Optimisation, batch sizes and validation."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Training data.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="When checkpoints are written and kept."
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig, description="TensorBoard and W&B besides metrics.jsonl."
    )

    _source: Any = PrivateAttr(default=None)

    @property
    def source(self) -> Any:
        """Where the spec was read from (`mtp_cli.config.loader.SpecSource`), so that a rule
        checked later (against the world size) can name the file and line of its key."""
        return self._source
