"""The files scaletrain reads beside its code: `configs/` (device table, cluster files, model
presets, run configs) and the SLURM job template.

In a clone they are the repository's own `configs/` and `slurm/job.sbatch.in`, reached through
the links `scaletrain/configs` and `scaletrain/job.sbatch.in`; an installed wheel carries copies
of them as package data (pyproject.toml), so `pip install .` (not only `-e`) finds them too.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CONFIGS = PACKAGE / "configs"
HARDWARE_FILE = CONFIGS / "hardware.yaml"
CLUSTERS_DIR = CONFIGS / "clusters"
MODELS_DIR = CONFIGS / "models"
SBATCH_TEMPLATE = PACKAGE / "job.sbatch.in"
