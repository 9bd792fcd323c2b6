"""The run configuration: one dataclass per YAML section, every field documented.

The schema only describes values. The rules that tie fields together (layout versus world
size, heads versus TP, batch arithmetic, ...) live in `checks.py` so that they can run
before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """A Llama-style decoder. Sizes follow the Hugging Face Llama names where they exist."""

    vocab_size: int | None = None
    """Tokenizer vocabulary size; null reads it from the first data set's metadata.json."""
    make_vocab_size_divisible_by: int = 128
    """The embedding and head are padded to a multiple of this; it must be a multiple of
    parallel.tp, so that every TP degree pads to the same size and starts from the same weights."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of decoder blocks."""
    num_heads: int = 4
    """Attention (query) heads; divisible by parallel.tp."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; null means num_heads (plain multi-head)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; null means 8/3 * hidden_size rounded up to a multiple of 64."""
    max_seq_len: int = 2048
    """Longest sequence the rotary tables are built for; train.seq_len may not exceed it."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections are scaled by
    1/sqrt(2 * num_layers) as in GPT-2 / Megatron."""
    num_experts: int = 0
    """Experts per MoE layer (Mixtral-style SwiGLU experts on DeepSpeed's MoE layer); 0 is a
    dense model."""
    moe_top_k: int = 2
    """Experts each token is routed to, 1 to 8: 1 (Switch), 2 (Mixtral), 8 (DeepSeek-V3); the
    gates of the chosen experts are renormalised to sum to 1 for top-k > 1."""
    moe_top1_normalize: bool = False
    """Top-1 only: false weights the expert's output by its raw softmax probability (Switch
    style, DeepSpeed's top-1 gate); true renormalises that weight to 1 (as Mixtral-style
    top-k renormalises the chosen gates)."""
    moe_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over the experts, or an independent sigmoid per expert whose
    chosen top-k weights are renormalised to sum to 1 (DeepSeek-V3)."""
    moe_shared_experts: int = 0
    """Always-active experts (of the routed experts' size) added to the routed output of
    every MoE block (DeepSeek-V3: 1); TP-split like the dense MLP, replicated over EP."""
    moe_router_bias_update_rate: float = 0.0
    """Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the router
    scores only to choose the top-k experts, after every optimizer step moved by
    rate * sign(mean load - expert load) from the step's global token counts; 0 is off."""
    moe_capacity_factor: float = 1.25
    """Training: each expert takes at most capacity_factor * top_k * tokens / num_experts
    tokens of a micro-batch (at least moe_min_capacity); the rest are dropped (they pass
    through the residual only). Ignored when moe_drop_tokens is false."""
    moe_eval_capacity_factor: float = 2.0
    """The same for evaluation, where dropping tokens distorts the measured loss."""
    moe_min_capacity: int = 4
    """Lower bound of an expert's capacity, whatever the capacity factor gives."""
    moe_drop_tokens: bool = True
    """Drop tokens beyond an expert's capacity; false sizes the capacity to the busiest
    expert (rounded up to a multiple of parallel.tp) so that nothing is dropped, as HF Mixtral."""
    moe_aux_loss_coeff: float = 0.01
    """Weight of the load-balancing loss (mean over MoE layers) added to the LM loss in
    backward; the reported loss stays the LM loss."""
    moe_z_loss_coeff: float = 0.0
    """Weight of the router z-loss, mean(logsumexp(router logits)^2), which keeps the router
    logits small (ST-MoE); 0 disables it."""
    moe_layer_freq: int = 1
    """Every n-th decoder block is MoE (blocks 0, n, 2n, ...), the others dense, like
    Megatron's moe_layer_freq; 1 makes every block MoE."""
    activation_checkpointing: Literal["none", "full", "every_n"] = "none"
    """Recompute decoder blocks in the backward pass instead of keeping their activations:
    none, full (every block) or every_n (every activation_checkpointing_every-th block)."""
    activation_checkpointing_every: int = 2
    """every_n only: recompute blocks 0, n, 2n, ...; the others keep their activations."""
    init_from: str | None = None
    """hf:<local folder>: start from a Hugging Face Llama or Mixtral folder (its weights and,
    for every model field left at its default, its config.json; see docs/hf.md); null starts
    from random weights."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    def padded_vocab_size(self, vocab_size: int) -> int:
        """The embedding rows: independent of TP so that TP=1 and TP=N start identically."""
        multiple = self.make_vocab_size_divisible_by
        return -(-vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """How the ranks are split. tp * pp * dp equals the world size."""

    tp: int = 1
    """Tensor-parallel degree (megatron-core column/row parallel layers)."""
    pp: int = 1
    """Pipeline-parallel degree: the layers are split into pp stages run by DeepSpeed's
    pipeline engine (1F1B over the step's micro-batches); needs zero_stage 0 or 1."""
    pipeline_partition: Literal["uniform", "parameters"] = "uniform"
    """How layers are assigned to pipeline stages: uniform gives every stage the same number
    of decoder blocks (num_layers divisible by pp; the embedding joins the first stage, the
    head the last), parameters balances the weights per stage, embedding and head included."""
    dp: int | None = None
    """Data-parallel degree; null derives it as world_size / (tp * pp)."""
    ep: int = 1
    """Expert-parallel degree: the experts of each MoE layer are split over groups of ep
    data-parallel ranks (ep divides dp and num_experts); tokens reach their expert by
    all-to-all. Dense weights stay replicated over dp as before."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3; shards optimizer state (1), gradients (2), parameters (3)
    over the data-parallel ranks."""


@dataclass
class PrecisionConfig:
    """Numeric format of weights and activations; the master weights stay fp32."""

    dtype: Dtype = "fp32"
    """One of fp32, bf16, fp16 (fp16 uses dynamic loss scaling unless loss_scale > 0)."""
    loss_scale: float = 0.0
    """fp16 only: a fixed loss scale, or 0 for dynamic loss scaling."""
    initial_scale_power: int = 16
    """fp16 dynamic scaling starts at 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16: steps without overflow before the scale doubles."""
    hysteresis: int = 2
    """fp16: overflows tolerated before the scale is lowered."""
    min_loss_scale: float = 1.0
    """fp16: the dynamic scale never drops below this."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to min_lr."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay (train.steps)."""
    warmup_steps: int = 100
    """Linear warmup length in optimizer steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices; norms are not decayed."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass
class TrainConfig:
    """Batch arithmetic and the length of the run: global = micro * grad_accum * dp."""

    micro_batch: int = 4
    """Sequences per rank per forward pass."""
    global_batch: int | None = None
    """Sequences per optimizer step over all data-parallel ranks; null derives it."""
    grad_accum: int | None = None
    """Micro-batches per optimizer step on each rank; null derives it from global_batch."""
    seq_len: int = 256
    """Tokens per training sequence."""
    steps: int = 100
    """Optimizer steps to run."""
    eval_interval: int = 50
    """Evaluate on the validation split every N steps (and at the last step); 0 disables."""
    eval_batches: int = 4
    """Global batches of the validation split per evaluation."""
    seed: int = 1234
    """Seed for weights, data order and everything random."""
    run_dir: str = "runs/default"
    """Where metrics.jsonl, the resolved config and (later) checkpoints go."""
    deterministic: bool = False
    """Pin one intra-op thread per rank so that identical runs give identical bits on CPU."""
    time_limit: str | None = None
    """Wall-clock budget ("HH:MM:SS", "D-HH:MM:SS" or seconds): save and exit before it ends."""
    task: Literal["pretrain", "sft", "classify"] = "pretrain"
    """pretrain: next-token loss on every token; sft: on response tokens only, from data
    prepared with --format chat|prompt-response; classify: a label per sequence from its last
    real token, from data prepared with --format classify (docs/finetuning.md)."""


@dataclass
class DataConfig:
    """Prepared token data sets (see `scaletrain data prepare`)."""

    paths: list[str] = field(default_factory=list)
    """Folders written by `scaletrain data prepare`; several are blended by weights."""
    weights: list[float] | None = None
    """Blend weights, one per path; null weighs the paths equally."""
    shuffle: bool = True
    """Shuffle training samples each epoch (the order depends only on train.seed)."""


@dataclass
class CheckpointConfig:
    """Sharded, atomic checkpoints and how a run resumes from them."""

    interval: int = 0
    """Save every N steps; 0 saves only at the end, on a signal and at the time limit."""
    interval_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save; 0 disables."""
    dir: str | None = None
    """Where checkpoints go; null means <train.run_dir>/checkpoints."""
    keep_last: int = 3
    """Keep the newest K checkpoints (at least 1)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of M, forever; 0 keeps none extra."""
    resume: str = "auto"
    """auto (newest complete checkpoint, if any), none (start fresh), or a checkpoint folder."""
    save_at_end: bool = True
    """Save a checkpoint after the last step."""
    load_weights_only: bool = False
    """Take only the model weights from the resumed checkpoint (fresh optimizer, step 0)."""
    allow_external_pickle: bool = False
    """Fully unpickle checkpoint files that weights-only loading refuses (unpickling can run code
    from the file: only for checkpoints you trust); every other file is read weights-only."""
    async_save: bool = False
    """The loop waits only while a save copies the state into host memory; a background thread
    writes, checksums and publishes it (one save in flight; stops and the end wait for it)."""


@dataclass
class FaultConfig:
    """What the run does about bad steps, hangs and interruptions."""

    max_consecutive_skips: int = 3
    """After this many skipped (non-finite) steps in a row, roll back to the last checkpoint;
    0 never rolls back."""
    spike_zscore: float = 0.0
    """Flag a loss more than this many standard deviations above the recent mean; 0 disables."""
    spike_window: int = 50
    """Steps of loss history the spike detector compares against."""
    spike_action: Literal["log", "rollback"] = "log"
    """What a spike does: only log it, or roll back to the last checkpoint."""
    collective_timeout_minutes: float = 10.0
    """A rank without progress for this long (stuck in a collective, a save, ...) exits with
    code 124 instead of hanging the job; also the process-group timeout."""
    heartbeat_seconds: float = 60.0
    """Rank 0 names the ranks whose heartbeat is older than this when a step hangs; 0 disables."""
    straggler_threshold: float = 1.2
    """The straggler report (`logging.straggler_interval`) names a rank whose compute time
    (time outside collectives) exceeds the median of its peers' (the ranks of its pipeline
    stage) by more than this factor."""


@dataclass
class LoggingConfig:
    """Where metrics go; everything is written by rank 0 only."""

    interval: int = 1
    """Print a progress line every N steps when stdout is a log file (a terminal gets a live
    progress bar instead); metrics.jsonl gets every step."""
    jsonl: bool = True
    """Write <run_dir>/metrics.jsonl, one JSON object per step."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_API_KEY is set)."""
    wandb_project: str = "scaletrain"
    """Weights & Biases project name."""
    tensorboard: bool = False
    """Write TensorBoard event files under <run_dir>/tensorboard (every numeric key of
    metrics.jsonl as a scalar; `tensorboard --logdir <run_dir>/tensorboard`)."""
    straggler_interval: int = 0
    """Every N steps time each rank's phases (data, forward, backward, optimizer step; time
    inside collectives apart) with torch.profiler, gather them to rank 0 and report a rank
    slower than `fault.straggler_threshold` x its peers; 0 disables (no timing at all)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU; null looks the GPU up in `configs/hardware.yaml`
    (fp32 or bf16 peak by `precision.dtype`) or measures the device once."""


@dataclass
class FinetuneConfig:
    """LoRA adapters on the model's tensor-parallel linear layers (docs/finetuning.md#lora)."""

    lora_rank: int = 0
    """Rank r of each adapter (W + alpha / r * B A); 0 turns LoRA off. With r > 0 every base
    weight is frozen (no gradient, no optimizer state) and only the adapters train."""
    lora_alpha: float = 16.0
    """The adapters' scale numerator: the update is lora_alpha / lora_rank * B A."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input during training (0 = none)."""
    lora_targets: list[str] = field(default_factory=lambda: ["qkv", "out", "gate_up", "down"])
    """Which linear layers get an adapter: any of qkv, out (attention), gate_up, down (MLP); an
    MoE model takes qkv and out only (its MLPs are experts)."""


@dataclass
class Config:
    """One training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Number format and loss scaling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch sizes, steps, evaluation, seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    fault: FaultConfig = field(default_factory=FaultConfig)
    """Guards against bad steps and hangs."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress output."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """LoRA fine-tuning (off unless finetune.lora_rank > 0)."""
