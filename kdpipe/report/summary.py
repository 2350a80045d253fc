"""The table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(rows: list[dict], parent: dict[str, float], ui_command: str, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    table = Table(title="kdpipe: models of this pipeline")
    for col in ("stage", "test acc", "params", "nonzero", "size", "FLOPs", "p50 ms"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for r in rows:
        table.add_row(
            r["stage"] + (" (int8)" if r["kind"] == "onnx" else ""),
            f"{100 * r['test/acc']:.2f}%",
            f"{int(r['model/params']):,}",
            f"{int(r['model/nonzero_params']):,}",
            _bytes(r["model/size_bytes"]),
            f"{r['model/flops'] / 1e6:.2f}M",
            f"{r['latency/p50_ms']:.3f}",
        )
    console.print(table)
    if "compression/ratio" in parent and len(rows) > 1:
        reference = "teacher" if rows[0]["stage"] == "teacher" else rows[0]["stage"]
        console.print(
            f"compression vs {reference}: {parent['compression/ratio']:.2f}x smaller, "
            f"{parent['compression/speedup']:.2f}x faster, accuracy drop {parent['compression/acc_drop']:.2f} points"
        )
    console.print(f"open the MLflow UI on this store: [bold]{ui_command}[/bold]")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
