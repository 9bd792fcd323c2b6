"""Build everything in a fixed order, then run a short loop of steps; after each step its
callbacks (scaletrain.train.callbacks) guard, maybe evaluate, log, maybe checkpoint, maybe stop.

Order: config checks (no processes yet) -> topology -> seed -> model -> DeepSpeed engine ->
data -> resume from a checkpoint -> metrics. The loss reported for a step is the mean over the
whole global batch, so it is the same number whatever the layout.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaletrain.checkpoint.compat import data_identities, run_identity
from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.config.checks import Resolved, parse_duration
from scaletrain.config.load import dump_yaml
from scaletrain.config.schema import Config
from scaletrain.data import GlobalBatchSampler, build_dataset
from scaletrain.engine.deepspeed import initialize_engine, model_init_context
from scaletrain.fault.guards import GuardCallback, LossGuard
from scaletrain.fault.heartbeat import Heartbeat, HeartbeatCallback
from scaletrain.fault.signals import StopWatch, die_with_launcher
from scaletrain.logs import get_logger
from scaletrain.plan.flops import flops_per_token
from scaletrain.topology.init import Topology, env_world_size, init_topology, seed_everything
from scaletrain.train import callbacks as cb
from scaletrain.train.build import build_run_model, count_params
from scaletrain.train.classify import classify_dataset, evaluate_classifier
from scaletrain.train.loop_state import lora_base_of_run, resume_step, train_state
from scaletrain.train.metrics import MetricsWriter, device_peak_flops, peak_memory_bytes
from scaletrain.train.preflight import Checked, preflight
from scaletrain.train.run_dir import locked_folders, own_run_dir
from scaletrain.train.schedule import reapply_schedule
from scaletrain.train.sft import micro_batches, pipeline_pairs, split_batch
from scaletrain.train.straggler import StepTimer, StragglerReport

log = get_logger(__name__)

TRAIN_SPLIT, VAL_SPLIT = "train", "val"


@dataclass
class RunSummary:
    """What a finished run reports (rank 0 holds the same numbers as every rank)."""

    steps: int
    final_loss: float
    final_val_loss: float | None
    tokens_per_sec: float


class Trainer:
    """Owns the engine, the data and the metrics of one run."""

    def __init__(
        self,
        config: Config,
        topology: Topology,
        resolved: Resolved,
        callbacks: list[cb.Callback] | None = None,
    ) -> None:
        """`callbacks` join the built-in ones (scaletrain.train.callbacks) by priority."""
        self.config, self.topology, self.resolved = config, topology, resolved
        self.extra_callbacks = callbacks or []
        self.run_dir = Path(config.train.run_dir)
        # Before anything is written: one run per run directory (rank 0 holds the locks).
        self.locks = own_run_dir(locked_folders(config), topology.rank, topology.world_size)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        config, topology, resolved = self.config, self.topology, self.resolved
        # Picked before the engine exists: one saved with another layout is loaded through
        # DeepSpeed's universal format, which is chosen when the engine is built.
        self.checkpoints = CheckpointManager(config, topology)
        self.checkpoints.identity = run_identity(
            config, resolved, data_identities(config.data.paths)
        )
        self.resume_from = self.checkpoints.select()
        identity = self.checkpoints.identity or {}
        start_step = resume_step(self.resume_from, config, identity, topology.is_main)
        self.checkpoints.lora_base = lora_base_of_run(self.resume_from, config)
        universal = self.checkpoints.prepare_reshard(self.resume_from)
        if topology.is_main:  # only now: a refused resume leaves the run's config as it was
            text = dump_yaml(config)
            (self.run_dir / f"config.step_{start_step}.yaml").write_text(text)
            (self.run_dir / "config.yaml").write_text(text)
        seed_everything(config.train.seed)
        self.pipelined = resolved.dims.pp > 1
        with model_init_context(config, resolved, topology):
            model = build_run_model(
                config, resolved, topology, self.resume_from, self.checkpoints.lora_base
            )
        self.engine, self.own_clipping = initialize_engine(
            model, config, resolved, topology, universal
        )
        self._build_data()
        self.tokens_per_step = resolved.global_batch * config.train.seq_len
        self.flops_per_token = flops_per_token(
            config.model, config.train.seq_len, resolved.padded_vocab_size
        )
        self.peak_flops = device_peak_flops(
            topology.device, config.logging.peak_tflops, config.precision.dtype
        )
        self.stragglers = StragglerReport(
            config.logging.straggler_interval, config.fault.straggler_threshold, topology
        )
        self.step_timer = self.stragglers.timer(0)
        if self.pipelined and self.stragglers.active:
            self.stragglers.instrument_pipeline(self.engine, lambda: self.step_timer)
        f = config.fault
        heartbeat = Heartbeat(
            topology.rank,
            topology.world_size,
            f.heartbeat_seconds,
            60 * f.collective_timeout_minutes,
        )
        limit = config.train.time_limit
        self.stopwatch = StopWatch(parse_duration(limit) if limit else None)
        self.step = 0
        self._resume()
        self.metrics = MetricsWriter(
            config, self.run_dir, config.train.steps, topology.is_main, resumed_step=self.step
        )
        builtin = [HeartbeatCallback(heartbeat), cb.StragglerCallback(self.stragglers)]
        builtin += [GuardCallback(LossGuard(f)), cb.EvalCallback(), cb.MetricsCallback()]
        builtin.append(cb.CheckpointCallback())
        self.callbacks = cb.Callbacks(self, builtin + self.extra_callbacks)

    def close(self) -> None:
        """Give up the run directory (also done by the kernel when the process dies)."""
        for lock in self.locks:
            lock.release()

    def _resume(self) -> None:
        folder = self.resume_from
        state = self.checkpoints.load(self.engine, folder) if folder else None
        if state is not None:
            self.step = state.step
            self.sampler.load_state_dict(state.sampler)
            reapply_schedule(self.engine.lr_scheduler, self.config.optim)

    def save(self) -> Path:
        start = time.perf_counter()
        self.callbacks.on_save(self.step)
        sampler, seq_len = self.sampler.state_dict(), self.config.train.seq_len
        state = train_state(self.step, sampler, self.engine, seq_len, self._loss_scale())
        path = self.checkpoints.save(self.engine, state)
        # A stop waits for an async save's whole write: the time limit must allow for it.
        blocked = time.perf_counter() - start
        self.stopwatch.record_save(max(blocked, self.checkpoints.last_write_seconds))
        return path

    def _build_data(self) -> None:
        c, dims = self.config, self.resolved.dims
        mask = c.train.task == "sft"  # samples carry the loss mask (scaletrain.train.sft)
        if c.train.task == "classify":  # (tokens, label) samples (scaletrain.train.classify)
            build = functools.partial(classify_dataset, c)
        else:
            build = functools.partial(
                build_dataset,
                c.data.paths,
                c.data.weights,
                seq_len=c.train.seq_len,
                seed=c.train.seed,
                loss_mask=mask,
            )
        self.train_set = build(TRAIN_SPLIT)
        # A run that never evaluates may have an empty validation split.
        self.val_set = build(VAL_SPLIT) if c.train.eval_interval > 0 else None
        self.eval_metrics: dict[str, float] = {}
        self.sampler = GlobalBatchSampler(
            len(self.train_set),
            self.resolved.global_batch,
            self.topology.dp_rank,
            dims.dp,
            c.train.seed,
            shuffle=c.data.shuffle,
        )

    def _windows(self, dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's token windows and, for SFT, its loss weights (`split_batch`)."""
        batch = np.stack([dataset[int(i)] for i in indices])
        batch = torch.from_numpy(batch).to(self.topology.device)
        return split_batch(batch, self.resolved.micro_batch, self.topology)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over one global batch; returns its metrics."""
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        skipped_before = self.engine.skipped_steps
        # The straggler report's phase marks (no-ops unless this step is measured).
        timer = self.step_timer = self.stragglers.timer(self.step + 1)
        router = getattr(self.engine.module, "moe_stats", None)
        if router is not None:  # the router losses are scaled in backward as the loss is
            gas = self.engine.gradient_accumulation_steps()
            router.backward_scale = (self._loss_scale() or 1.0) / gas
        with timer.running():
            self.callbacks.on_step_start(timer.step)
            with timer.phase("data"):
                windows, weights = self._windows(self.train_set, self.sampler.next_batch())
            if self.pipelined:
                # DeepSpeed's 1F1B schedule: forward, backward and step
                self.callbacks.on_micro_batch(timer.step, 0, "pipeline")
                pairs = pipeline_pairs(windows, self.resolved.micro_batch, weights)
                loss = self.engine.train_batch(iter(pairs))
            else:
                loss = self._accumulate(windows, weights, timer)
            loss = loss.item()  # the mean over the global batch, on every rank
        if self.own_clipping is not None:
            grad_norm = self.own_clipping.finish_step()
        else:
            grad_norm = _as_float(self.engine.get_global_grad_norm())
        elapsed = time.perf_counter() - start
        self.step += 1
        tokens_per_sec = self.tokens_per_step / elapsed
        metrics = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec,
            "mfu": self.flops_per_token
            * tokens_per_sec
            / (self.peak_flops * self.topology.world_size),
            "peak_mem_bytes": peak_memory_bytes(self.topology.device),
            "step_time": elapsed,
            "skipped_steps": self.engine.skipped_steps,
            "skipped": self.engine.skipped_steps > skipped_before,
        }
        if self.config.precision.dtype == "fp16":
            metrics["loss_scale"] = self._loss_scale()
        # MoE: the router's numbers of this step (aux loss, tokens per expert, dropped share),
        # summed over the pipeline stages: every stage joins, with or without MoE blocks.
        if router is not None:
            groups = self.topology.groups
            stepped = not metrics["skipped"]
            metrics.update(router.collect(groups.dp, groups.pp, self.topology.device, stepped))
        return metrics

    def _accumulate(
        self, windows: torch.Tensor, weights: torch.Tensor | None, timer: StepTimer
    ) -> torch.Tensor:
        """Forward, backward and step of every micro-batch; the loss averaged over DP."""
        losses = []
        for i, micro in enumerate(micro_batches(windows, weights, self.resolved.micro_batch)):
            with self._phase(timer, i, "forward"):
                micro_loss = self.engine(*micro)
            with self._phase(timer, i, "backward"):
                self.engine.backward(micro_loss)
            with self._phase(timer, i, "step"):
                self.engine.step()
            losses.append(micro_loss.detach().float())
        return self.topology.mean_over_dp(torch.stack(losses).mean())

    @contextlib.contextmanager
    def _phase(self, timer: StepTimer, micro: int, phase: str) -> Iterator[None]:
        """One timed phase of a micro-batch, announced to the callbacks as it starts."""
        with timer.phase(phase):
            self.callbacks.on_micro_batch(timer.step, micro, phase)
            yield

    def _loss_scale(self) -> float | None:
        if self.config.precision.dtype != "fp16":
            return None
        return float(self.engine.optimizer.loss_scale)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` global batches of the validation split (a
        classifier's also sets val_accuracy and val_f1 in `eval_metrics`)."""
        dims, c = self.resolved.dims, self.config
        if c.train.task == "classify":
            self.callbacks.on_eval(self.step)
            self.engine.eval()
            self.eval_metrics = evaluate_classifier(
                self.engine, self.val_set, c, self.resolved.global_batch, self.topology
            )
            self.engine.train()
            return self.eval_metrics.pop("val_loss")
        sampler = GlobalBatchSampler(
            len(self.val_set),
            self.resolved.global_batch,
            self.topology.dp_rank,
            dims.dp,
            c.train.seed,
            shuffle=False,
        )
        self.callbacks.on_eval(self.step)
        self.engine.eval()
        losses = []
        for _ in range(c.train.eval_batches):
            windows, weights = self._windows(self.val_set, sampler.next_batch())
            if self.pipelined:  # the mean over the batch's micro-batches, from the last stage
                pairs = pipeline_pairs(windows, c.train.micro_batch, weights)
                losses.append(self.engine.eval_batch(iter(pairs), num_micro_batches=len(pairs)))
            else:
                micro = micro_batches(windows, weights, c.train.micro_batch)
                losses += [self.engine(*m).float() for m in micro]
        self.engine.train()
        return self.topology.mean_over_dp(torch.stack(losses).mean()).item()

    def run(self) -> RunSummary:
        if self.step >= self.config.train.steps:
            self.metrics.summary(
                f"nothing to do: {self.run_dir} is complete at step {self.step} (train.steps); "
                "set checkpoint.resume=none or a new train.run_dir to train again"
            )
            self.metrics.close()
            self.close()
            return RunSummary(self.step, math.nan, None, 0.0)
        log.info(
            "training %s on %d rank(s) [%s], global batch %d x %d tokens, %d steps",
            count_params(self.engine.module),
            self.topology.world_size,
            self.resolved.dims.describe(),
            self.resolved.global_batch,
            self.config.train.seq_len,
            self.config.train.steps,
        )
        metrics: dict[str, float] = {}
        try:
            while self.step < self.config.train.steps:
                metrics = self.train_step()
                self.callbacks.on_step_end(metrics)  # guard -> evaluate -> log -> save / stop
            self.callbacks.on_train_end()
        finally:
            self.callbacks.on_close()
        # The last step is never rolled back, so it was evaluated when any step is.
        summary = RunSummary(
            self.step,
            metrics.get("loss", math.nan),
            metrics.get("val_loss"),
            metrics.get("tokens_per_sec", 0.0),
        )
        val_text = f"{summary.final_val_loss:.4f}" if summary.final_val_loss is not None else "n/a"
        self.metrics.summary(
            f"done: {summary.steps} steps, final train loss {summary.final_loss:.4f}, "
            f"validation loss {val_text}"
        )
        self.metrics.close()
        self.close()  # the run's last write is done; an exception leaves it to the caller
        return summary


def _as_float(value) -> float:
    if value is None:
        return math.nan
    return float(value.item() if torch.is_tensor(value) else value)


def train(config: Config, checked: Checked | None = None) -> RunSummary:
    """Check, bring up the ranks, train, tear down. The entry point of `scaletrain train`
    (which runs `preflight` itself before importing this module: refusals stay cheap)."""
    resolved = (checked or preflight(config, env_world_size())).resolved
    die_with_launcher()
    if config.train.deterministic:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    topology = init_topology(resolved.dims, config.fault.collective_timeout_minutes)
    try:
        trainer = Trainer(config, topology, resolved)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        topology.destroy()
