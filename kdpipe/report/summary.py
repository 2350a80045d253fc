"""The table printed at the end of a run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(rows: list[dict], parent: dict[str, float], ui_command: str,
                  console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    table = Table(title="kdpipe: models of this pipeline")
    lm = all("test/ppl" in r for r in rows)  # a language model: perplexity first, next-token accuracy
    columns = ("stage", *(("test ppl",) if lm else ()), "test acc", "params", "nonzero", "size", "FLOPs",
               "p50 ms")
    for col in columns:
        table.add_column(col, justify="right" if col != "stage" else "left")
    for r in rows:
        table.add_row(
            r["stage"] + (" (int8)" if r["kind"] == "onnx" else ""),
            *((f"{r['test/ppl']:.2f}",) if lm else ()),
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
            f"{parent['compression/speedup']:.2f}x faster, "
            f"accuracy drop {parent['compression/acc_drop']:.2f} points"
        )
    final = rows[-1]
    if "exits/test_acc" in final:
        early = 1.0 - final["exits/share_final"]
        console.print(
            f"early exits ({final['stage']}): {100 * early:.0f}% of test inputs leave early, "
            f"{final['exits/speedup']:.2f}x faster per sample at batch 1 "
            f"({final['exits/latency_ms']:.3f} vs {final['exits/full_latency_ms']:.3f} ms), "
            f"test acc {100 * final['exits/test_acc']:.2f}% vs {100 * final['exits/full_test_acc']:.2f}% "
            f"at full depth")
    for note in pitfall_notes(rows):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"open the MLflow UI on this store: [bold]{ui_command}[/bold]")


def pitfall_notes(rows: list[dict]) -> list[str]:
    """What the table shows that a practitioner should not misread: an int8 model slower or
    larger than the fp32 model it was made from (per-op overhead dominates tiny models)."""
    notes = []
    for prev, row in zip(rows, rows[1:], strict=False):
        if row["kind"] != "onnx":
            continue
        if row["latency/p50_ms"] > prev["latency/p50_ms"]:
            notes.append(
                f"the int8 model runs slower than its fp32 source ({row['latency/p50_ms']:.3f} vs "
                f"{prev['latency/p50_ms']:.3f} ms): at {row['model/flops'] / 1e6:.2f} MFLOPs per sample, "
                "per-op overhead and the (de)quantization of inputs cost more than int8 kernels save; "
                "int8 pays off on larger models (docs/compression.md)")
        if row["model/size_bytes"] > prev["model/size_bytes"]:
            notes.append("the int8 file is larger than its source: the source is stored sparse (magnitude "
                         "pruning) or few weights were quantized (quantize=dynamic skips convolutions)")
    return notes


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
