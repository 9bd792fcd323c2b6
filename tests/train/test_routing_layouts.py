"""The routing options train the same model on every layout: EP=2 (4 ranks, dp4) and
TP=2 x EP=2 (4 ranks) against one rank, fp32, 6 steps of tiny-moe with 8 experts.

One world of one rank trains the references (and deepseek stopped after step 6 and resumed:
the bias comes back from the checkpoint), one world of four trains both layouts of every
option in turn (`moe_layouts_run.py`, as scaletest's worker does). The options:
- deepseek: top-4, sigmoid scores, 1 shared expert, aux-loss-free bias (scaletrain's gate),
  12 steps from a bias that favours expert 0 (nearly every token picks it: max / mean load
  1.96 of at most 2.0), at lr 1e-4: at tiny's lr 3e-3 Adam moves the router's logits by more
  per step than the bias can follow (measured: the load ratio climbs to 2.0 at rates 0.02 and
  0.05), as the bias rate must stay large against the router's drift in real runs too;
- topk: top-4 softmax with 1 shared expert (DeepSpeed's `topkgating`);
- top1: top-1 renormalised to 1 (scaletrain's gate; DeepSpeed's weights by the raw probability).
Capacity factors are experts / top_k: nothing is dropped, so every layout routes alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.distributed import TINY, assert_losses_close, read_metrics, torchrun

pytestmark = pytest.mark.slow

SCRIPT = "tests/train/moe_layouts_run.py"
REL = 1e-5
KEYS = ("loss", "moe_aux_loss", "grad_norm", "val_loss")
EIGHT = (
    "model.num_experts=8",
    "model.moe_capacity_factor=2.0",
    "model.moe_eval_capacity_factor=2.0",
)
OPTIONS = {
    "deepseek": (
        *EIGHT,
        "model.moe_top_k=4",
        "model.moe_score_function=sigmoid",
        "model.moe_shared_experts=1",
        "model.moe_router_bias_update_rate=0.01",
        "optim.lr=1e-4",
        "optim.min_lr=1e-5",
        "train.steps=12",
    ),
    "topk": (*EIGHT, "model.moe_top_k=4", "model.moe_shared_experts=1"),
    "top1": (
        "model.moe_top_k=1",
        "model.moe_top1_normalize=true",
        "model.moe_capacity_factor=4.0",
        "model.moe_eval_capacity_factor=4.0",
    ),
}
LAYOUTS = {
    "ep2": ("parallel.ep=2", "parallel.zero_stage=1"),
    "tp2ep2": ("parallel.tp=2", "parallel.ep=2", "parallel.zero_stage=2"),
}
FAVOUR = [0.1, 0, 0, 0, 0, 0, 0, 0]  # sigmoid scores ~0.5: expert 0 is in nearly every top-4
# max / mean load from step 7 on (measured on one rank: 1.38, 1.27, 1.24, 1.40, 1.33, 1.25).
BALANCED_BY, WITHIN = 1.5, 7


@pytest.fixture(scope="module")
def runs(stdlib_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every option on one rank, then on both 4-rank layouts: name -> run dir."""
    root = tmp_path_factory.mktemp("routing")
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = "tiny-moe"
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    dirs: dict[str, Path] = {}
    for nproc, layouts in ((1, {"ref": ()}), (4, LAYOUTS)):
        specs = []
        for option, overrides in OPTIONS.items():
            for layout, parallel in layouts.items():
                name = f"{option}-{layout}"
                dirs[name] = root / name
                base = [f"data.paths=[{stdlib_data}]", f"train.run_dir={dirs[name]}"]
                spec = {"config": str(config), "overrides": [*base, *overrides, *parallel]}
                if option == "deepseek":
                    spec["score_bias"] = FAVOUR
                specs.append(spec)
        if nproc == 1:  # stopped after step 6, then the same run resumed (bias not set again)
            dirs["resumed"] = root / "resumed"
            base = [f"data.paths=[{stdlib_data}]", f"train.run_dir={dirs['resumed']}"]
            resumed = {"config": str(config), "overrides": [*base, *OPTIONS["deepseek"]]}
            specs += [{**resumed, "score_bias": FAVOUR, "stop_after": 6}, resumed]
        plan = root / f"plan-{nproc}.json"
        plan.write_text(json.dumps({"runs": specs}))
        torchrun(nproc, SCRIPT, str(plan), timeout=1200)
    return dirs


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_matches_one_rank(runs: dict[str, Path], option: str, layout: str) -> None:
    got, want = read_metrics(runs[f"{option}-{layout}"]), read_metrics(runs[f"{option}-ref"])
    assert [m["step"] for m in want] == list(range(1, 13 if option == "deepseek" else 7))
    for key in KEYS:
        assert_losses_close(got, want, REL, key=key)
    for g, w in zip(got, want, strict=True):
        assert g["moe_expert_tokens"] == w["moe_expert_tokens"]
        assert g["moe_dropped_fraction"] == 0.0
        # The bias each step routed with: exactly the same on every layout.
        assert g.get("moe_router_bias") == w.get("moe_router_bias")


def test_the_bias_balances_the_favoured_router_alike_on_every_layout(
    runs: dict[str, Path],
) -> None:
    """From a bias that puts expert 0 in nearly every token's top-4 (load ratio > 1.9 of at
    most 2), updates of 0.01 bring max / mean load below BALANCED_BY by step WITHIN, and it
    stays there; every rank of every layout ends with the same biases (bit for bit)."""
    ref = read_metrics(runs["deepseek-ref"])
    ratios = [m["moe_max_load_ratio"] for m in ref]
    assert ratios[0] > 1.9
    assert max(ratios[WITHIN - 1 :]) < BALANCED_BY, ratios
    assert ref[0]["moe_router_bias"] == [pytest.approx(FAVOUR)] * 2  # what step 1 routed with
    final = {}
    for name in ("deepseek-ref", "deepseek-ep2", "deepseek-tp2ep2"):
        for path in sorted(runs[name].glob("score_bias.*.json")):
            final[f"{name}/{path.name}"] = json.loads(path.read_text())
    assert len(final) == 1 + 4 + 4
    first = next(iter(final.values()))
    assert all(biases == first for biases in final.values()), final
    assert first["0"][0] < FAVOUR[0]


def test_a_resumed_run_routes_with_the_saved_bias_bit_for_bit(runs: dict[str, Path]) -> None:
    """deepseek stopped after step 6 and resumed: steps 7-12 equal the uninterrupted run's
    exactly (loss, gradient norm, loads, the bias they routed with), although the resumed
    process never set the favoured starting bias: it came back from the checkpoint."""
    want = read_metrics(runs["deepseek-ref"])
    got = {m["step"]: m for m in read_metrics(runs["resumed"])}
    assert sorted(got) == list(range(1, 13))
    keys = ("loss", "grad_norm", "moe_expert_tokens", "moe_router_bias", "moe_max_load_ratio")
    for w in want:
        assert {k: got[w["step"]][k] for k in keys} == {k: w[k] for k in keys}
    assert want[6]["moe_router_bias"] != [[0.0] * 8] * 2
