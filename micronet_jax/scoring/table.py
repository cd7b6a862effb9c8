"""The MicroNet table as text: per-layer rows, totals, storage and the three scores.

Printed by `python -m micronet_jax.score`, the final report (`evaluation.scorecard`) and the
test mode; change the layout here and every one of them follows.
"""

from __future__ import annotations

from typing import Any

from micronet_jax.models.architecture import Architecture
from micronet_jax.scoring.counter import MicroNetCount

COLUMNS = ("layer", "share", "params", "mults", "adds", "math ops", "storage", "math (32-bit)")


def conventions_line(opts: dict[str, Any], arch: Architecture, sparsity: str) -> str:
    """One line saying which conventions a table was counted with."""
    parts = [sparsity, "BN as bias" if opts["bn_as_bias"] else "BN not counted"]
    parts.append("upsample counted" if opts["include_upsample"] else "upsample not counted")
    if opts["bits"].quantised:
        parts.append(opts["bits"].describe())
    if arch.exit_head is not None:
        ratio = opts["exit_ratio"] or 0.0
        parts.append(f"exit head after block {arch.exit_head.after_block}, exit ratio {ratio:g}")
    return ", ".join(parts)


def _number(x: float) -> str:
    return f"{round(x):,}" if abs(x - round(x)) < 1e-6 else f"{x:,.1f}"


def format_table(count: MicroNetCount, title: str) -> str:
    """Per-layer rows, totals, 32-bit storage and the three scores."""
    rows = [COLUMNS]
    for layer in count.layers:
        rows.append(
            (
                layer.name,
                f"{layer.share:.4f}",
                _number(layer.params),
                _number(layer.mults),
                _number(layer.adds),
                _number(layer.math_ops),
                f"{layer.storage:,.1f}",
                f"{layer.math_storage:,.1f}",
            )
        )
    rows.append(
        (
            "total",
            "",
            _number(count.params),
            _number(count.mults),
            _number(count.adds),
            _number(count.math_ops),
            f"{count.param_storage:,.1f}",
            f"{count.math_storage:,.1f}",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [title]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    lines += [
        f"masks: {_number(count.mask_bits)} bits; widths: {count.widths}; adds 32-bit",
        f"parameter storage  {count.param_storage:,.1f} (32-bit units)",
        f"math operations    {count.math_storage:,.1f} (32-bit units)",
        f"param score  {count.param_score:.6f}",
        f"math score   {count.math_score:.6f}",
        f"score        {count.score:.6f}",
    ]
    return "\n".join(lines)


def format_comparison(honest: MicroNetCount, published: MicroNetCount) -> str:
    lines = [f"{'':12}  {'actual masks':>12}  {'published':>12}"]
    for name in ("param_score", "math_score", "score"):
        label = name.replace("_", " ")
        lines.append(f"{label:12}  {getattr(honest, name):12.6f}  {getattr(published, name):12.6f}")
    return "\n".join(lines)
