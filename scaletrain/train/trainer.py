"""Build everything in a fixed order, then run a short loop: step -> log -> maybe evaluate ->
maybe checkpoint -> maybe stop.

Order: config checks (no processes yet) -> topology -> seed -> model -> DeepSpeed engine ->
data -> resume from a checkpoint -> metrics. The loss reported for a step is the mean over the
whole global batch, so it is the same number whatever the layout.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scaletrain.checkpoint.compat import check_resume, data_identities, run_identity, schedule_note
from scaletrain.checkpoint.manager import CheckpointManager
from scaletrain.checkpoint.manifest import Manifest
from scaletrain.checkpoint.state import TrainState
from scaletrain.config.checks import Resolved, parse_duration
from scaletrain.config.load import dump_yaml
from scaletrain.config.schema import Config
from scaletrain.data import GlobalBatchSampler, build_dataset
from scaletrain.engine.deepspeed import initialize_engine, model_init_context
from scaletrain.errors import ScaletrainError
from scaletrain.fault.guards import LossGuard
from scaletrain.fault.heartbeat import Heartbeat
from scaletrain.fault.signals import StopRequested, StopWatch, die_with_launcher
from scaletrain.logs import get_logger
from scaletrain.models.moe import ExpertParallel
from scaletrain.models.parallel import TensorParallel
from scaletrain.models.registry import build_model
from scaletrain.plan.flops import flops_per_token
from scaletrain.topology.init import Topology, env_world_size, init_topology, seed_everything
from scaletrain.train.metrics import MetricsWriter, device_peak_flops, peak_memory_bytes
from scaletrain.train.preflight import Checked, preflight
from scaletrain.train.run_dir import locked_folders, own_run_dir
from scaletrain.train.schedule import reapply_schedule
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

    def __init__(self, config: Config, topology: Topology, resolved: Resolved) -> None:
        self.config, self.topology, self.resolved = config, topology, resolved
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
        start_step = self._check_resume()
        universal = self.checkpoints.prepare_reshard(self.resume_from)
        if topology.is_main:  # only now: a refused resume leaves the run's config as it was
            text = dump_yaml(config)
            (self.run_dir / f"config.step_{start_step}.yaml").write_text(text)
            (self.run_dir / "config.yaml").write_text(text)
        seed_everything(config.train.seed)
        self.pipelined = resolved.dims.pp > 1
        with model_init_context(config, resolved, topology):
            model = self._build_model()
        self.engine, self.own_clipping = initialize_engine(
            model, config, resolved, topology, universal
        )
        self._build_data()
        self.tokens_per_step = resolved.global_batch * config.train.seq_len
        self.flops_per_token = flops_per_token(
            config.model, config.train.seq_len, resolved.padded_vocab_size
        )
        self.peak_flops = device_peak_flops(topology.device, config.logging.peak_tflops)
        self.guard = LossGuard(config.fault)
        self.stragglers = StragglerReport(
            config.logging.straggler_interval, config.fault.straggler_threshold, topology
        )
        self.step_timer = self.stragglers.timer(0)
        if self.pipelined and self.stragglers.active:
            self.stragglers.instrument_pipeline(self.engine, lambda: self.step_timer)
        f = config.fault
        self.heartbeat = Heartbeat(
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

    def _check_resume(self) -> int:
        """Refuse a checkpoint this config cannot continue (before any weights load); warn
        once about a changed schedule. Returns the step the run starts from."""
        if self.resume_from is None:
            return 0
        manifest = Manifest.read(self.resume_from)
        assert manifest is not None  # select() verified it
        check_resume(manifest, self.config, self.checkpoints.identity or {})
        note = schedule_note(manifest, self.config)
        if note and self.topology.is_main:
            log.warning("%s", note)
        return 0 if self.config.checkpoint.load_weights_only else manifest.step

    def close(self) -> None:
        """Give up the run directory (also done by the kernel when the process dies)."""
        for lock in self.locks:
            lock.release()

    def _build_model(self) -> torch.nn.Module:
        """The model of this config (its family's), or this rank's pipeline stage of it."""
        tp = TensorParallel(self.resolved.dims.tp, self.topology.groups.tp)
        ep = ExpertParallel.of(self.resolved.dims.ep, self.topology.dp_rank)
        model = build_model(
            self.config.model,
            self.resolved.padded_vocab_size,
            tp,
            self.resolved.dims,
            ep,
            self.config.parallel.pipeline_partition,
        )
        if self.config.model.init_from and self.resume_from is None:
            from scaletrain.hf.imports import load_hf_weights

            load_hf_weights(model, self.config.model, self.resolved.padded_vocab_size, tp, ep)
        return model

    def _resume(self) -> None:
        folder = self.resume_from
        state = self.checkpoints.load(self.engine, folder) if folder else None
        if state is not None:
            self.step = state.step
            self.sampler.load_state_dict(state.sampler)
            reapply_schedule(self.engine.lr_scheduler, self.config.optim)

    def rollback(self, reason: str) -> int:
        """Reload the newest good checkpoint; the data sampler keeps going, so the batches
        since that checkpoint are skipped rather than replayed. Returns the step rolled back to."""
        folder = self.checkpoints.newest_good()
        if folder is None:
            raise ScaletrainError(
                f"fault: {reason} at step {self.step} and no checkpoint to roll back to; "
                "set checkpoint.interval or fix the data/learning rate"
            )
        failed_step = self.step
        state = self.checkpoints.load(self.engine, folder, full=True)
        assert state is not None  # a full load always returns the loop state
        self.step = state.step
        self.guard.reset()
        log.warning(
            "%s at step %d: rolled back to %s; the batches since are skipped",
            reason,
            failed_step,
            folder.name,
        )
        return self.step

    def save(self) -> Path:
        start = time.perf_counter()
        self.heartbeat.mark(self.step, 0, "save")
        sampler = self.sampler.state_dict()
        consumed = sampler["consumed_samples"]
        state = TrainState(
            step=self.step,
            consumed_samples=consumed,
            consumed_tokens=consumed * self.config.train.seq_len,
            sampler=sampler,
            skipped_steps=self.engine.skipped_steps,
            lr_schedule={
                "last_epoch": self.engine.lr_scheduler.last_epoch,
                "last_lr": self.engine.lr_scheduler.get_last_lr(),
            },
            loss_scale=self._loss_scale(),
        )
        path = self.checkpoints.save(self.engine, state)
        self.stopwatch.record_save(time.perf_counter() - start)
        return path

    def _build_data(self) -> None:
        c, dims = self.config, self.resolved.dims
        self.train_set = build_dataset(
            c.data.paths, c.data.weights, TRAIN_SPLIT, c.train.seq_len, c.train.seed
        )
        self.val_set = (  # a run that never evaluates may have an empty validation split
            build_dataset(c.data.paths, c.data.weights, VAL_SPLIT, c.train.seq_len, c.train.seed)
            if c.train.eval_interval > 0
            else None
        )
        self.sampler = GlobalBatchSampler(
            len(self.train_set),
            self.resolved.global_batch,
            self.topology.dp_rank,
            dims.dp,
            c.train.seed,
            shuffle=c.data.shuffle,
        )

    def _windows(self, dataset, indices: np.ndarray) -> torch.Tensor:
        batch = np.stack([dataset[int(i)] for i in indices])
        return torch.from_numpy(batch).to(self.topology.device)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over one global batch; returns its metrics."""
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        skipped_before = self.engine.skipped_steps
        beat = functools.partial(self.heartbeat.mark, self.step + 1)
        # The straggler report's phase marks (no-ops unless this step is measured).
        timer = self.step_timer = self.stragglers.timer(self.step + 1)
        with timer.running():
            beat(0, "start")
            with timer.phase("data"):
                windows = self._windows(self.train_set, self.sampler.next_batch())
            if self.pipelined:
                beat(0, "pipeline")  # DeepSpeed's 1F1B schedule: forward, backward and step
                loss = self.engine.train_batch(iter(_pairs(windows, self.resolved.micro_batch)))
            else:
                loss = self._accumulate(windows, beat, timer)
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
        # MoE: the router's numbers of this step (aux loss, tokens per expert, dropped share).
        router = getattr(self.engine.module, "moe_stats", None)
        if router is not None:
            metrics.update(router.collect(self.topology.groups.dp))
        metrics.update(self.stragglers.gather(timer, self.step))
        return metrics

    def _accumulate(self, windows: torch.Tensor, beat, timer: StepTimer) -> torch.Tensor:
        """Forward, backward and step of every micro-batch; the loss averaged over DP."""
        losses = []
        for i, micro in enumerate(windows.split(self.resolved.micro_batch)):
            beat(i, "forward")
            with timer.phase("forward"):
                micro_loss = self.engine(micro)
            beat(i, "backward")
            with timer.phase("backward"):
                self.stragglers.delay(timer.step)
                self.engine.backward(micro_loss)
            beat(i, "step")
            with timer.phase("step"):
                self.engine.step()
            losses.append(micro_loss.detach().float())
        return self.topology.mean_over_dp(torch.stack(losses).mean())

    def _loss_scale(self) -> float | None:
        if self.config.precision.dtype != "fp16":
            return None
        return float(self.engine.optimizer.loss_scale)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` global batches of the validation split."""
        dims, c = self.resolved.dims, self.config
        sampler = GlobalBatchSampler(
            len(self.val_set),
            self.resolved.global_batch,
            self.topology.dp_rank,
            dims.dp,
            c.train.seed,
            shuffle=False,
        )
        self.heartbeat.mark(self.step, 0, "eval")
        self.engine.eval()
        losses = []
        for _ in range(c.train.eval_batches):
            windows = self._windows(self.val_set, sampler.next_batch())
            if self.pipelined:  # the mean over the batch's micro-batches, from the last stage
                pairs = _pairs(windows, c.train.micro_batch)
                losses.append(self.engine.eval_batch(iter(pairs), num_micro_batches=len(pairs)))
            else:
                losses += [self.engine(m).float() for m in windows.split(c.train.micro_batch)]
        self.engine.train()
        return self.topology.mean_over_dp(torch.stack(losses).mean()).item()

    def _eval_due(self) -> bool:
        interval = self.config.train.eval_interval
        last = self.step == self.config.train.steps
        return interval > 0 and (self.step % interval == 0 or last)

    def _checkpoint_or_stop(self, step_time: float) -> None:
        self.stopwatch.record_step(step_time)
        reason = self.stopwatch.agreed_reason(self.topology.device)
        finished = self.step == self.config.train.steps
        save_at_end = finished and self.config.checkpoint.save_at_end
        if reason or save_at_end or self.checkpoints.due(self.step):
            path = self.save()
            if reason:
                self.metrics.close()
                raise StopRequested(
                    f"stopped after step {self.step} ({reason}); checkpoint {path} saved; "
                    "run the same command to resume"
                )

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
            _count_params(self.engine.module),
            self.topology.world_size,
            self.resolved.dims.describe(),
            self.resolved.global_batch,
            self.config.train.seq_len,
            self.config.train.steps,
        )
        metrics: dict[str, float] = {}
        val_loss = None
        try:
            while self.step < self.config.train.steps:
                metrics = self.train_step()
                verdict = self.guard.observe(metrics["loss"], metrics["skipped"])
                if verdict.spike:
                    metrics["loss_spike"] = True
                    log.warning("loss spike at step %d: %.4f", self.step, metrics["loss"])
                if verdict.rollback:
                    metrics["rolled_back_to"] = self.rollback(verdict.rollback)
                elif self._eval_due():
                    val_loss = metrics["val_loss"] = self.evaluate()
                self.metrics.log_step(metrics)
                self._checkpoint_or_stop(metrics["step_time"])
        finally:
            self.stopwatch.restore()
            self.heartbeat.close()
        summary = RunSummary(
            self.step, metrics.get("loss", math.nan), val_loss, metrics.get("tokens_per_sec", 0.0)
        )
        val_text = f"{summary.final_val_loss:.4f}" if summary.final_val_loss is not None else "n/a"
        self.metrics.summary(
            f"done: {summary.steps} steps, final train loss {summary.final_loss:.4f}, "
            f"validation loss {val_text}"
        )
        self.metrics.close()
        self.close()  # the run's last write is done; an exception leaves it to the caller
        return summary


def _pairs(windows: torch.Tensor, micro_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) per micro-batch, as a pipeline's first and last stage read them."""
    return [
        (micro[:, :-1].contiguous(), micro[:, 1:].contiguous())
        for micro in windows.split(micro_batch)
    ]


def _as_float(value) -> float:
    if value is None:
        return math.nan
    return float(value.item() if torch.is_tensor(value) else value)


def _count_params(model: torch.nn.Module) -> str:
    count = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return f"{count / 1e6:.1f}M parameters (this rank)"


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
