"""What evaluation writes: the table of dataset means and the JSON result files."""

from __future__ import annotations

import json
import math

from p3m_jax.common.fileio import atomic_write
from p3m_jax.evaluation import metrics

REPORTED_KEYS = ("SAD", "MSE", "MAD", "SAD_T", "GRAD", "CONN")  # what the papers report


def format_table(results: dict[str, dict]) -> str:
    """A markdown table of dataset means, one row per split."""
    present = {k for result in results.values() for k in result["mean"]}
    # The paper's order first (jitted dicts come back with sorted keys), anything else after.
    keys = [k for k in metrics.METRIC_KEYS + metrics.PRIVACY_KEYS if k in present]
    keys += sorted(present - set(keys))
    lines = ["| split | n | " + " | ".join(keys) + " |", "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for split, result in results.items():
        cells = [
            f"{result['mean'].get(k, math.nan):.4f}" if k.startswith("M") else f"{result['mean'].get(k, math.nan):.2f}"
            for k in keys
        ]
        lines.append(f"| {split} | {result['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, payload) -> None:
    """Writes JSON atomically (temp file in the same folder, then rename)."""
    with atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=True)
