"""Layouts of a world size: names like `tp2pp2dp1z0`, their enumeration and their validation.

A layout fixes tp, pp, dp, ep and the ZeRO stage. Which layouts exist is not decided here:
every candidate is handed to `check_config`, and only those it accepts are run, so that a rule
added to the checks (or one removed when a feature arrives) changes the list by itself.

Candidates for N ranks: every tp * pp * dp = N; ep > 1 (each divisor of dp) only when the model
has experts; ZeRO stages 0-3 when dp > 1. At dp == 1 ZeRO shards nothing, so only stage 0 and the
config's own stage are tried (not four copies of one run); both can still differ, because in
bf16/fp16 DeepSpeed's stage 0 accumulates gradients in the low precision and its ZeRO stages in
fp32.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from scaletrain.config.checks import Resolved, check_config
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
_NAME = re.compile(r"tp(\d+)pp(\d+)dp(\d+)(?:ep(\d+))?(?:z(\d+))?")


@dataclass(frozen=True, order=True)
class Layout:
    """One way to split the world: the degrees and the ZeRO stage."""

    tp: int
    pp: int
    dp: int
    ep: int = 1
    zero: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        ep = f"ep{self.ep}" if self.ep > 1 else ""
        return f"tp{self.tp}pp{self.pp}dp{self.dp}{ep}z{self.zero}"

    def apply(self, config: Config) -> Config:
        """A copy of the config with this layout's parallel section."""
        out = copy.deepcopy(config)
        p = out.parallel
        p.tp, p.pp, p.dp, p.ep, p.zero_stage = self.tp, self.pp, self.dp, self.ep, self.zero
        return out


@dataclass(frozen=True)
class Rejected:
    """A candidate the config checks refused, with their one-line reason."""

    layout: Layout
    reason: str


def parse_layout(name: str, default_zero: int) -> Layout:
    """`tp2pp1dp2`, `tp1pp1dp4ep2z2`, ...; without `z` the stage is `default_zero`."""
    match = _NAME.fullmatch(name.strip())
    if match is None:
        raise ConfigError(
            "--layouts",
            f"{name!r} is not a layout name; write tp<T>pp<P>dp<D>[ep<E>][z<stage>], "
            "e.g. tp2pp1dp2 or tp1pp1dp4ep2z2",
        )
    tp, pp, dp, ep, zero = match.groups()
    stage = int(zero) if zero is not None else default_zero
    return Layout(int(tp), int(pp), int(dp), int(ep or 1), stage)


def parse_layouts(text: str, default_zero: int) -> list[Layout]:
    """A comma-separated list of names, duplicates removed, in the order given."""
    names = [part for part in text.split(",") if part.strip()]
    if not names:
        raise ConfigError("--layouts", "is empty; give comma-separated names like tp2pp1dp2")
    return list(dict.fromkeys(parse_layout(n, default_zero) for n in names))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(world_size: int, num_experts: int, zero_stage: int = 0) -> list[Layout]:
    """Every layout of `world_size` ranks worth asking the config checks about (sorted);
    `zero_stage` is the config's own stage (tried at dp 1 besides stage 0)."""
    out = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            eps = _divisors(dp) if num_experts > 0 else [1]
            stages = ZERO_STAGES if dp > 1 else sorted({0, zero_stage})
            out += [Layout(tp, pp, dp, ep, z) for ep in eps for z in stages]
    return sorted(out)


def validate(config: Config, layout: Layout, world_size: int) -> Resolved:
    """`check_config` for the config with this layout; ConfigError names the layout."""
    if layout.world_size != world_size:
        raise ConfigError(
            "--layouts",
            f"{layout.name}: tp * pp * dp = {layout.world_size}, but --world-size is {world_size}",
        )
    try:
        return check_config(layout.apply(config), world_size)
    except ConfigError as err:
        raise ConfigError(err.field, f"{err.message} (layout {layout.name})") from None


def enumerate_layouts(config: Config, world_size: int) -> tuple[list[Layout], list[Rejected]]:
    """The candidates the config checks accept, and the rejected ones with the reason."""
    accepted, rejected = [], []
    for layout in candidates(world_size, config.model.num_experts, config.parallel.zero_stage):
        try:
            check_config(layout.apply(config), world_size)
        except ConfigError as err:
            rejected.append(Rejected(layout, f"{err.field}: {err.message}"))
        else:
            accepted.append(layout)
    return accepted, rejected
