"""The sweep report: the pipeline runs of one experiment (optionally one sweep) read back from the
tracking store, as tables and plots, logged as the artefacts of a summary run.

Runs that differ only by `seed` are one configuration measured several times: the summary table
gives mean ± std over them, and the temperature plot draws that std as error bars. The size and
latency plots mark the Pareto front (no other configuration is both smaller/faster and more
accurate), which is the set of models worth shipping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the report runs in callbacks and on machines with no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from kdpipe.errors import ConfigError  # noqa: E402
from kdpipe.report.tables import fmt, markdown_table  # noqa: E402
from kdpipe.tracking.naming import SWEEP_TAG  # noqa: E402
from kdpipe.tracking.store import RUN_TYPE_TAG  # noqa: E402

SUMMARY_RUN_TYPE = "sweep_report"
METRICS = ["test/acc", "test/ece", "model/params", "model/nonzero_params", "model/size_bytes", "model/flops",
           "latency/p50_ms", "compression/ratio", "compression/acc_drop", "compression/speedup"]
# Params that never make two runs different configurations.
_NOT_CONFIG = {"seed", "run_name", "tracking.uri", "tracking.experiment", "tracking.artifact_location",
               "optimized_metric", "reuse"}
TEMPERATURE = "distill.temperature"
# A group is labelled by the keys that define it; these read as the option they name
# (`distill.scheme=kd` -> `distill=kd`), and these are abbreviated.
_OPTION_LEAVES = ("name", "scheme", "method", "mode", "_target_")
_ABBREVIATIONS = {TEMPERATURE: "T", "distill.alpha": "alpha"}


@dataclass
class SweepReport:
    folder: Path
    files: list[Path] = field(default_factory=list)
    runs: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    run_id: str | None = None


def load_runs(experiment: str, sweep: str | None = None) -> pd.DataFrame:
    """FINISHED pipeline runs of `experiment` (of one sweep when `sweep` is given), one row each,
    with columns `run_id`, `run_name`, `sweep`, `params.<key>` and the final metrics."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in MlflowClient().search_experiments())
        raise ConfigError(f"no experiment named {experiment!r} in {mlflow.get_tracking_uri()}; "
                          f"experiments there: {', '.join(names) or 'none'}")
    query = f"tags.`{RUN_TYPE_TAG}` = 'pipeline' and attributes.status = 'FINISHED'"
    if sweep:
        query += f" and tags.`{SWEEP_TAG}` = '{sweep}'"
    df = mlflow.search_runs(experiment_ids=[exp.experiment_id], filter_string=query,
                            order_by=["attributes.start_time ASC"])
    if df.empty:
        known = mlflow.search_runs(experiment_ids=[exp.experiment_id],
                                   filter_string=f"tags.`{RUN_TYPE_TAG}` = 'pipeline'")
        col = f"tags.{SWEEP_TAG}"
        sweeps = sorted(known[col].dropna().unique()) if col in known else []
        where = f" with {SWEEP_TAG}={sweep!r}" if sweep else ""
        raise ConfigError(f"no FINISHED pipeline run in experiment {experiment!r}{where}; "
                          f"sweeps there: {', '.join(sweeps) or 'none'}")
    out = pd.DataFrame({"run_id": df["run_id"], "run_name": df.get("tags.mlflow.runName"),
                        "sweep": df.get(f"tags.{SWEEP_TAG}")})
    params = df[[c for c in df.columns if c.startswith("params.")]]
    out = pd.concat([out, params], axis=1)
    for m in METRICS:
        out[m] = df.get(f"metrics.{m}")
    return out.reset_index(drop=True)


def varying_params(runs: pd.DataFrame) -> list[str]:
    """The config keys (without `params.`) whose value differs between runs; of keys that hold
    the same values (`distill.terms.kd.temperature` interpolates `distill.temperature`) the shortest."""
    cols = [c for c in runs.columns if c.startswith("params.") and runs[c].astype(str).nunique() > 1]
    kept: dict[tuple, str] = {}
    for col in sorted(cols, key=lambda c: (c.count("."), c)):
        kept.setdefault(tuple(runs[col].astype(str)), col)
    chosen = set(kept.values())
    return [c[len("params."):] for c in cols if c in chosen]


def defining_keys(summary: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The fewest of `keys` whose values tell the rows of `summary` apart, keys that name a config
    option (`distill.scheme`) first, then the shortest: the others follow from them (the scheme
    decides `distill.terms.nckd.weight`; `distill.terms.kd.temperature` copies `distill.temperature`)."""
    ranked = sorted(keys, key=lambda k: (not _names_option(k), k.count("."), keys.index(k)))
    chosen: list[str] = []

    def distinct(cols: list[str]) -> int:
        return len(summary[cols].astype(str).drop_duplicates()) if cols else 1

    for key in ranked:
        if distinct(chosen) == len(summary):
            break
        if distinct([*chosen, key]) > distinct(chosen):
            chosen.append(key)
    return chosen


def _names_option(key: str) -> bool:
    return "." in key and key.rsplit(".", 1)[1] in _OPTION_LEAVES


def group_label(row: pd.Series, keys: Sequence[str]) -> str:
    """`distill=kd`, `T=4`, `quantize=dynamic, sparsity=0.5`: the values that define a group."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    parts = []
    for key, leaf in zip(keys, leaves, strict=True):
        value = row[key]
        if pd.isna(value) or str(value) == "None":
            continue
        # `distill.scheme=kd` -> `distill=kd`, `student.model._target_=...mlp` -> `student.model=mlp`
        if _names_option(key):
            name, value = (key.rsplit(".", 1)[0],
                           str(value).rsplit(".", 1)[-1] if leaf == "_target_" else value)
        else:
            name = _ABBREVIATIONS.get(key) or (leaf if leaves.count(leaf) == 1 else key)
        number = pd.to_numeric(pd.Series([value]), errors="coerce")[0]
        parts.append(f"{name}={number:g}" if pd.notna(number) else f"{name}={value}")
    return ", ".join(parts) or "defaults"


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (runs equal in every param but the seed), labelled `config` by
    the values that define it (`distill=kd`, `T=4`): the number of seeds, and mean and std of
    each metric over them."""
    keys = [k for k in varying_params(runs) if k not in _NOT_CONFIG]
    cols = [f"params.{k}" for k in keys]
    metrics = [m for m in METRICS if m in runs and runs[m].notna().any()]
    if cols:
        groups = runs.groupby(cols, sort=False, dropna=False)
    else:
        groups = runs.groupby(lambda _: 0)
    rows = []
    for _, grp in groups:
        row = {k: grp[f"params.{k}"].iloc[0] for k in keys}
        row["runs"] = len(grp)
        for m in metrics:
            row[f"{m} mean"] = grp[m].mean()
            row[f"{m} std"] = grp[m].std(ddof=1) if len(grp) > 1 else 0.0
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary = summary.sort_values([c for c in keys if c in summary] or ["runs"],
                                  key=_numeric_key).reset_index(drop=True)
    defining = defining_keys(summary, keys)
    summary.insert(0, "config",
                   [group_label(r, defining) for _, r in summary.iterrows()] if keys else "all runs")
    return summary


def _numeric_key(col: pd.Series) -> pd.Series:
    converted = pd.to_numeric(col, errors="coerce")
    return converted if converted.notna().all() else col.astype(str)


def pareto_front(cost: Sequence[float], acc: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (lower or equal cost and higher or equal
    accuracy, one of them strictly), ordered by cost."""
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -acc[i]))
    front, best = [], -math.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return front


def _markdown(df: pd.DataFrame, std: bool) -> str:
    """A GitHub table; with `std`, `<m> mean` and `<m> std` columns are shown as one `mean ± std`."""
    cols, cells = [], []
    for c in df.columns:
        if std and c.endswith(" std"):
            continue
        cols.append(c[: -len(" mean")] if std and c.endswith(" mean") else c)
    for _, r in df.iterrows():
        row = []
        for c in df.columns:
            if std and c.endswith(" std"):
                continue
            if std and c.endswith(" mean"):
                s = r[c[: -len(" mean")] + " std"]
                row.append(f"{fmt(r[c])} ± {fmt(s)}" if r["runs"] > 1 else fmt(r[c]))
            else:
                row.append(fmt(r[c]))
        cells.append(row)
    return markdown_table(cols, cells)


def plot_temperature(summary: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy against temperature, one line per other varying setting, std over seeds as
    error bars. None when the temperature does not vary."""
    if TEMPERATURE not in summary or summary[TEMPERATURE].nunique() < 2:
        return None
    data = summary[pd.to_numeric(summary[TEMPERATURE], errors="coerce").notna()].copy()
    data["_T"] = data[TEMPERATURE].astype(float)
    others = []
    for c in summary.columns:
        if (c in (TEMPERATURE, "_T", "runs", "config") or c.endswith((" mean", " std"))
                or data[c].nunique() < 2):
            continue
        if (data.groupby("_T")[c].nunique() <= 1).all() and data[c].nunique() == data["_T"].nunique():
            continue  # a copy of T (an interpolation such as distill.terms.kd.temperature)
        if any((data.groupby(o)[c].nunique() <= 1).all() for o in others):
            continue  # a copy of a key already shown
        others.append(c)
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = data.groupby(others, sort=False) if others else [((), data)]
    for label, grp in groups:
        grp = grp.sort_values("_T")
        name = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,),
                                                     strict=False)) or "kd"
        ax.errorbar(grp["_T"], 100 * grp["test/acc mean"], yerr=100 * grp["test/acc std"], marker="o",
                    capsize=3, label=name)
    scratch = summary[summary[TEMPERATURE].isna() | (summary[TEMPERATURE].astype(str) == "None")] \
        if TEMPERATURE in summary else summary.iloc[0:0]
    for _, r in scratch.iterrows():
        ax.axhline(100 * r["test/acc mean"], color="grey", linestyle="--", label="no distillation")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(data["_T"].unique()), [f"{t:g}" for t in sorted(data["_T"].unique())])
    ax.minorticks_off()
    return _save(fig, ax, "temperature T (log scale)",
                 "Accuracy against distillation temperature (mean ± std over seeds)", path)


def _save(fig, ax, xlabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(summary: pd.DataFrame, cost: str, xlabel: str, path: Path) -> Path | None:
    """Accuracy against `cost` (size or latency) per configuration, Pareto front marked."""
    col = f"{cost} mean"
    if col not in summary or summary[col].isna().all():
        return None
    data = summary.dropna(subset=[col, "test/acc mean"]).reset_index(drop=True)
    x, y = list(data[col]), list(100 * data["test/acc mean"])
    front = pareto_front(x, y)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(x, y, yerr=list(100 * data["test/acc std"]), fmt="o", color="tab:blue", alpha=0.7,
                capsize=2, label="configurations")
    ax.plot([x[i] for i in front], [y[i] for i in front], "-s", color="tab:red", label="Pareto front")
    for i in front:
        ax.annotate(str(data["config"][i]), (x[i], y[i]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    return _save(fig, ax, xlabel, f"Accuracy against {xlabel.split(' (')[0]}", path)


def build_report(experiment: str, sweep: str | None, folder: Path, log: bool = True) -> SweepReport:
    """Write `runs.{csv,md}`, `summary.{csv,md}` and the plots into `folder`; with `log`, store
    them as artefacts (`report/`) of a summary run tagged `kdpipe.run_type=sweep_report`."""
    runs = load_runs(experiment, sweep)
    summary = summarise(runs)
    folder.mkdir(parents=True, exist_ok=True)
    report = SweepReport(folder, runs=runs, summary=summary)
    shown = ["run_name", *[f"params.{k}" for k in varying_params(runs)],
             *[m for m in METRICS if runs[m].notna().any()]]
    table = runs[shown].rename(columns=lambda c: c[len("params."):] if c.startswith("params.") else c)
    # summary.md names each configuration by its label; summary.csv also has every varying key
    labelled = summary[[c for c in summary.columns
                        if c in ("config", "runs") or c.endswith((" mean", " std"))]]
    for name, df, md, std in (("runs", table, table, False), ("summary", summary, labelled, True)):
        df.to_csv(folder / f"{name}.csv", index=False)
        (folder / f"{name}.md").write_text(_markdown(md, std))
        report.files += [folder / f"{name}.csv", folder / f"{name}.md"]
    for made in (plot_temperature(summary, folder / "acc_vs_temperature.png"),
                 plot_pareto(summary, "model/size_bytes", "size of the model file (bytes)",
                             folder / "acc_vs_size.png"),
                 plot_pareto(summary, "latency/p50_ms", "latency p50 (ms, batch 1)",
                             folder / "acc_vs_latency.png")):
        if made is not None:
            report.files.append(made)
    if log:
        report.run_id = _log_summary_run(experiment, sweep, report)
    return report


def _log_summary_run(experiment: str, sweep: str | None, report: SweepReport) -> str:
    exp = MlflowClient().get_experiment_by_name(experiment)
    tags = {RUN_TYPE_TAG: SUMMARY_RUN_TYPE}
    if sweep:
        tags[SWEEP_TAG] = sweep
    best = report.summary["test/acc mean"].max()
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="sweep-report", tags=tags) as run:
        mlflow.log_metrics({"sweep/runs": float(len(report.runs)),
                            "sweep/configs": float(len(report.summary)),
                            "sweep/best_test_acc": float(best)})
        for path in report.files:
            mlflow.log_artifact(str(path), artifact_path="report")
    return run.info.run_id
