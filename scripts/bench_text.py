"""The text benchmark of docs/text.md, on Debian's fortunes (real English text): a transformer
topic classifier distilled into a small one against the same student from scratch (accuracy), and a
causal language model distilled token by token against the same student from scratch at equal
steps (held-out perplexity). Settings are chosen on the validation split (seed 0), then run with
seeds 0-2; mean ± std of the last epoch on the test split.

    python scripts/bench_text.py --workdir W                    # every phase, 2 jobs at a time
    python scripts/bench_text.py --workdir W --phases report    # the tables from the store

Every run is a `kdpipe` command, printed before it starts, against `<workdir>/mlflow.db`; a command
whose run finished in an earlier invocation is skipped. Phases:

- `teacher`: the topic teacher (transformer, 4 layers of 128) and the LM teacher (causal_lm, 4 layers
  of 128), trained once (seed 0) at each rate of `--teacher-lrs`; the one with the best validation
  accuracy (perplexity) teaches. Every student loads it with `teacher.checkpoint`, so its outputs
  are computed once (top-k per token for the LM);
- `search`: seed 0, validation split: the scratch student's learning rate, then KD's temperature and
  alpha at that rate (topics, language, multi); the LM student's rate from scratch (the distilled LM
  students use it);
- `final`: seeds 0-2 at the chosen settings: topics scratch vs KD (and `--topic-schemes`: TinyBERT,
  MiniLM at their defaults); LM scratch vs each token-level divergence (forward KL, reverse KL, JSD,
  skew KL) at alpha 0.5, T 1, and sequence-level KD; with `--tasks multi`, one student with a head
  per task (topics and language identification) from scratch vs KD from one teacher per task, each
  task's test accuracy in its own column;
- `scarce`: 10 % of the topic labels (`data.labeled_fraction=0.1`): scratch on the labeled texts against
  KD on every text from the full-label teacher, each at its setting chosen on val, seeds 0-2;
- `report`: the tables (printed, and `<workdir>/report.md`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
PHASES = ("teacher", "search", "final", "scarce", "report")
COMMON = ["prune=none", "quantize=dynamic", "optim=adamw_transformer", "trainer.enable_progress_bar=false",
          "eval.latency_iters=20", "eval.latency_warmup=3"]
TASKS = {
    "topics": {"data": ["data=fortunes_topics"], "student": ["student=transformer_small"], "metric": "acc",
               "teacher": ["teacher=transformer", "teacher.model.width=128"]},
    "lm": {"data": ["data=fortunes_lm"], "teacher": ["teacher=causal_lm", "teacher.model.width=128"],
           "student": ["student=causal_lm_small"], "metric": "ppl"},
}
# Few labels (Hinton's transfer set): the topic student sees the labels of 10 % of the training texts
# and the full-label teacher's outputs on all of them; scratch learns from the labeled 10 % alone.
TASKS["topics10"] = {**TASKS["topics"], "data": ["data=fortunes_topics", "data.labeled_fraction=0.1"],
                     "teacher_of": "topics"}
# Multi-task distillation: topics and language identification at once; the teacher is one
# transformer (4 layers of 128) per task, the student one transformer_small with a head per task.
TASKS["multi"] = {"data": ["data=fortunes_multitask"], "teacher": ["teacher=multitask"],
                  "student": ["student=multitask_small"], "metric": "acc", "parts": ("topics", "language")}
# Language identification alone (8 languages), the same teacher and student as the topics.
TASKS["language"] = {**TASKS["topics"], "data": ["data=fortunes_language"]}
CLASSIFIERS = ("topics", "language", "multi")  # tasks whose scratch rate and KD setting the search picks
KD_SCARCE = [(1.0, 0.9), (4.0, 0.9)]
LM_SCHEMES = ("lm_forward_kl", "lm_reverse_kl", "lm_jsd", "lm_skew_kl", "sequence_kd")
# Beside KD on the topics (`--topic-schemes`), at their shipped defaults and the scratch student's rate:
# TinyBERT's hidden-state and MiniLM's attention-relation matching (they run the teacher every step).
TOPIC_SCHEMES = ("tinybert", "minilm")
LRS = {task: (0.0005, 0.001, 0.002) for task in ("topics", "lm", "language", "multi")}
TEACHER_LRS = (0.0005, 0.002)
KD_GRID = [(t, a) for t in (1.0, 2.0, 4.0) for a in (0.5, 0.9)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = args.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{self.workdir / 'mlflow.db'}"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                    "MLFLOW_TRACKING_URI": self.uri, "KDPIPE_CHECKPOINT_DIR": str(self.workdir / "ckpt")}
        mlflow.set_tracking_uri(self.uri)

    def pipeline_runs(self) -> dict[str, mlflow.entities.Run]:
        """Finished pipeline runs by name (the bench names every run)."""
        out = {}
        for exp in mlflow.search_experiments():
            for r in mlflow.search_runs([exp.experiment_id], output_format="list",
                                        filter_string="attributes.status = 'FINISHED'"):
                if "kdpipe.stage" not in r.data.tags:
                    out[r.info.run_name] = r
        return out

    def stage_run(self, pipeline: mlflow.entities.Run, stage: str) -> mlflow.entities.Run | None:
        found = mlflow.search_runs([pipeline.info.experiment_id], output_format="list",
                                   filter_string=f"tags.mlflow.parentRunId = '{pipeline.info.run_id}'")
        return next((r for r in found if r.data.tags.get("kdpipe.stage") == stage), None)

    def run(self, jobs: list[tuple[str, list[str]]]) -> None:
        done = self.pipeline_runs()
        todo = [(n, c) for n, c in jobs if n not in done]

        def one(job: tuple[str, list[str]]) -> int:
            name, cmd = job
            full = [*cmd, f"run_name={name}", f"hydra.run.dir={self.workdir / 'runs' / name}"]
            line = " ".join(shlex.quote(c) for c in full)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: kdpipe {line}", flush=True)
            with (self.workdir / f"{name}.log").open("w") as out:
                rc = subprocess.run([sys.executable, "-m", "kdpipe", *full], cwd=self.workdir, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, check=False).returncode
            print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {rc}", flush=True)
            return rc

        with ThreadPoolExecutor(self.args.jobs) as pool:
            if any(list(pool.map(one, todo))):
                sys.exit("some runs failed; see the logs in the workdir")

    def teacher_name(self, task: str) -> str:
        """The teacher run of `task` with the best validation accuracy (perplexity)."""
        task = TASKS[task].get("teacher_of", task)
        metric = TASKS[task]["metric"]
        runs = self.pipeline_runs()
        scores = {lr: self.stage_run(runs[f"{task}-teacher-lr{lr:g}"], "teacher").data.metrics
                  [f"val/{metric}"] for lr in self.args.teacher_lrs}
        best = (max if metric == "acc" else min)(scores, key=scores.get)
        return f"{task}-teacher-lr{best:g}"

    def teacher_file(self, task: str) -> str:
        return str(self.workdir / "runs" / self.teacher_name(task) / "teacher" / "model.pt")

    def student_cmd(self, task: str, seed: int, extra: list[str]) -> list[str]:
        t = TASKS[task]
        return [*t["data"], *COMMON, f"seed={seed}", f"data.seed={self.args.data_seed}", *t["teacher"],
                f"teacher.checkpoint={self.teacher_file(task)}", *t["student"],
                f"student.max_epochs={self.epochs(task, extra)}", f"tracking.experiment=bench_text_{task}",
                *extra]

    def epochs(self, task: str, extra: list[str]) -> int:
        """Student epochs: the task's; with few labels, scratch gets 4x as many (it sees a tenth of
        the texts per epoch; still fewer optimiser steps than the distilled student's)."""
        base = int(self.args.epochs[TASKS[task].get("teacher_of", task)])
        return 4 * base if task == "topics10" and "distill=none" in extra else base

    def best_lr(self, task: str) -> float:
        """The scratch student's rate of highest validation accuracy (the search's seed-0 runs)."""
        return max(LRS[TASKS[task].get("teacher_of", task)],
                   key=lambda lr: self.val(f"{task}-none-lr{lr:g}-s0", "acc"))

    def val(self, name: str, metric: str) -> float:
        run = self.stage_run(self.pipeline_runs()[name], "distill")
        return run.data.metrics[f"val/{metric}"]

    # -- phases ---------------------------------------------------------------------------------

    def teacher(self) -> None:
        split = f"data.seed={self.args.data_seed}"
        self.run([(f"{task}-teacher-lr{lr:g}",
                   [*t["data"], *COMMON, "seed=0", split, *t["teacher"], *t["student"], f"optim.lr={lr:g}",
                    "distill=none", f"teacher.max_epochs={self.args.teacher_epochs[task]}",
                    "student.max_epochs=1", f"tracking.experiment=bench_text_{task}"])
                  for task, t in TASKS.items() if "teacher_of" not in t and task in self.args.tasks
                  for lr in self.args.teacher_lrs])

    def chosen(self) -> dict[str, list[str]]:
        """The settings the search picked on the validation split."""
        out = {}
        for task in (t for t in CLASSIFIERS if t in self.args.tasks):
            lr = self.best_lr(task)
            t, a = max(self.args.kd_grid,
                       key=lambda ta: self.val(f"{task}-kd-T{ta[0]:g}-a{ta[1]:g}-s0", "acc"))
            out.update({f"{task}-none": [f"optim.lr={lr:g}", "distill=none"],
                        f"{task}-kd": [f"optim.lr={lr:g}", "distill=kd", f"distill.temperature={t:g}",
                                       f"distill.alpha={a:g}"]})
            if task == "topics":
                out.update({f"topics-{s}": [f"optim.lr={lr:g}", f"distill={s}"]
                            for s in self.args.topic_schemes})
        if "lm" in self.args.tasks:
            lr_lm = min(LRS["lm"], key=lambda lr: self.val(f"lm-none-lr{lr:g}-s0", "ppl"))
            out.update({"lm-none": [f"optim.lr={lr_lm:g}", "distill=none"],
                        **{f"lm-{s}": [f"optim.lr={lr_lm:g}", f"distill={s}"] for s in self.args.lm_schemes}})
        return out

    def search(self) -> None:
        jobs = [(f"{task}-none-lr{lr:g}-s0", self.student_cmd(task, 0, [f"optim.lr={lr:g}", "distill=none"]))
                for task in LRS if task in self.args.tasks for lr in LRS[task]]
        self.run(jobs)
        for task in (t for t in CLASSIFIERS if t in self.args.tasks):
            lr = self.best_lr(task)
            self.run([(f"{task}-kd-T{t:g}-a{a:g}-s0",
                       self.student_cmd(task, 0, [f"optim.lr={lr:g}", "distill=kd",
                                                  f"distill.temperature={t:g}", f"distill.alpha={a:g}"]))
                      for t, a in self.args.kd_grid])

    def final(self) -> None:
        jobs = [(f"{name}-s{seed}", self.student_cmd(name.split("-")[0], seed, extra))
                for (name, extra), seed in itertools.product(self.chosen().items(), self.args.seeds)]
        self.run(jobs)

    def scarce_chosen(self) -> dict[str, list[str]]:
        lr = self.best_lr("topics10")
        t, a = max(KD_SCARCE, key=lambda ta: self.val(f"topics10-kd-T{ta[0]:g}-a{ta[1]:g}-s0", "acc"))
        return {"topics10-none": [f"optim.lr={lr:g}", "distill=none"],
                "topics10-kd": [f"optim.lr={lr:g}", "distill=kd", f"distill.temperature={t:g}",
                                f"distill.alpha={a:g}"]}

    def scarce(self) -> None:
        """10 % labels: scratch's rate on val, KD's T at that rate on val, then seeds 0-2 of both."""
        self.run([(f"topics10-none-lr{lr:g}-s0", self.student_cmd("topics10", 0, [f"optim.lr={lr:g}",
                                                                                  "distill=none"]))
                  for lr in LRS["topics"]])
        lr = self.best_lr("topics10")
        self.run([(f"topics10-kd-T{t:g}-a{a:g}-s0",
                   self.student_cmd("topics10", 0, [f"optim.lr={lr:g}", "distill=kd",
                                                    f"distill.temperature={t:g}", f"distill.alpha={a:g}"]))
                  for t, a in KD_SCARCE])
        chosen = self.scarce_chosen().items()
        self.run([(f"{name}-s{seed}", self.student_cmd("topics10", seed, extra))
                  for (name, extra), seed in itertools.product(chosen, self.args.seeds)])

    def report(self) -> None:
        runs = self.pipeline_runs()
        lines = []
        chosen = self.chosen()
        if any(n.startswith("topics10-kd-s") for n in runs):
            chosen.update(self.scarce_chosen())
        for task, t in TASKS.items():
            if task not in self.args.tasks and not any(n.startswith(f"{task}-") for n in runs):
                continue
            metric = t["metric"]
            name = self.teacher_name(task)
            teacher = self.stage_run(runs[name], "teacher").data.metrics
            shown = self.fmt(metric, [teacher[f"test/{metric}"]])
            title = {"topics": "topics, every label", "lm": "causal language model",
                     "topics10": "topics, 10 % of the labels", "language": "language identification",
                     "multi": "topics and language at once (one student, a head per task)"}.get(task, task)
            parts = t.get("parts", ())
            shown += "".join(f", {p} {self.fmt(metric, [teacher[f'test/{metric}_{p}']])}" for p in parts)
            lines += [f"\n### {title}: teacher `{name}`, test {metric} {shown}, val {metric} "
                      f"{self.fmt(metric, [teacher[f'val/{metric}']])}\n",
                      f"| student | setting (chosen on val) | test {metric} (mean ± std, last epoch) "
                      + "".join(f"| test {metric} {p} " for p in parts)
                      + f"| val {metric} | int8 test {metric} | params |", "|---" * (6 + len(parts)) + "|"]
            for name, extra in chosen.items():
                if name.split("-")[0] != task:
                    continue
                found = [runs.get(f"{name}-s{s}") for s in self.args.seeds]
                stages = [(self.stage_run(r, "distill"), self.stage_run(r, "quantize")) for r in found if r]
                if not stages:
                    continue
                test = [d.data.metrics[f"test/{metric}"] for d, _ in stages]
                val = [d.data.metrics[f"val/{metric}"] for d, _ in stages]
                q = [q.data.metrics[f"test/{metric}"] for _, q in stages if q]
                params = int(stages[0][0].data.metrics["model/params"])
                cells = [name.split("-", 1)[1], f"`{' '.join(extra)}`, {self.epochs(task, extra)} epochs",
                         f"{self.fmt(metric, test)} (n={len(test)})",
                         *(self.fmt(metric, [d.data.metrics[f"test/{metric}_{p}"] for d, _ in stages])
                           for p in parts), self.fmt(metric, val),
                         self.fmt(metric, q), f"{params:,}"]
                lines.append("| " + " | ".join(cells) + " |")
        text = "\n".join(lines) + "\n"
        (self.workdir / "report.md").write_text(text)
        print(text)
        self.plot(chosen, runs)

    def plot(self, chosen: dict[str, list[str]], runs: dict) -> None:
        """`<workdir>/curves.png`: each student's validation curve per epoch, mean over the seeds."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        client = mlflow.tracking.MlflowClient()
        tasks = [t for t in TASKS if any(n.split("-")[0] == t and f"{n}-s0" in runs for n in chosen)]
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            metric = TASKS[task]["metric"]
            for name in (n for n in chosen if n.split("-")[0] == task):
                curves = []
                for seed in self.args.seeds:
                    if f"{name}-s{seed}" in runs:
                        run = self.stage_run(runs[f"{name}-s{seed}"], "distill")
                        trained = run.data.tags.get("kdpipe.reused_from", run.info.run_id)  # its curve
                        history = sorted(client.get_metric_history(trained, f"val/{metric}"),
                                         key=lambda m: m.step)
                        curves.append([m.value * (100 if metric == "acc" else 1) for m in history])
                if curves:
                    n = min(len(c) for c in curves)
                    ax.plot(range(1, n + 1), [statistics.mean(c[i] for c in curves) for i in range(n)],
                            marker="o", ms=3, label=name.split("-", 1)[1])
            ax.set(title=task, xlabel="epoch", ylabel=f"val {metric}" + (" %" if metric == "acc" else ""))
            if metric == "ppl":
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.workdir / "curves.png", dpi=110)

    @staticmethod
    def fmt(metric: str, values: list[float]) -> str:
        if not values:
            return ""
        scale = 100 if metric == "acc" else 1
        if len(values) == 1:
            return f"{scale * values[0]:.2f}"
        return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_text")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--data-seed", type=int, default=0,
                    help="the seeded train/val/test split (data.seed) of every run: repeat the study on "
                         "other splits, each in its own --workdir, where one split's held-out texts are few")
    ap.add_argument("--lm-schemes", nargs="+", choices=LM_SCHEMES, default=list(LM_SCHEMES))
    ap.add_argument("--epochs", type=lambda s: dict(kv.split("=") for kv in s.split(",")),
                    default={"topics": 15, "lm": 10, "language": 15, "multi": 15},
                    help="student epochs per task, e.g. topics=15,lm=10")
    ap.add_argument("--teacher-epochs", type=lambda s: dict(kv.split("=") for kv in s.split(",")),
                    default={"topics": 10, "lm": 10, "language": 10, "multi": 10})
    ap.add_argument("--tasks", nargs="+", choices=("topics", "lm", "language", "multi"),
                    default=["topics", "lm"],
                    help="language: identification of 8 languages; multi: topics and language at once, "
                         "one student with a head per task")
    ap.add_argument("--topic-schemes", nargs="+", choices=TOPIC_SCHEMES, default=[],
                    help="schemes beside KD on the full-label topics, at their defaults")
    ap.add_argument("--pretrained", type=Path, default=None,
                    help="a folder of scripts/pretrain_mlm.py: the topic teacher starts from its encoder, "
                         "and every topic run (teacher, scratch, KD) uses its tokenizer")
    ap.add_argument("--unlabeled", type=Path, default=None,
                    help="texts without labels (data.unlabeled) that join every topic run: the distilled "
                         "student learns the teacher's outputs on them, the others never see them")
    ap.add_argument("--teacher-lrs", type=float, nargs="+", default=list(TEACHER_LRS),
                    help="the teacher's rates (the best on val teaches)")
    ap.add_argument("--kd-grid", type=lambda s: tuple(map(float, s.split(":"))), nargs="+", default=KD_GRID,
                    metavar="T:ALPHA", help="KD's candidates on the full-label classifiers, e.g. 1:0.9")
    args = ap.parse_args()
    for task in ("topics", "topics10"):
        t = TASKS[task]
        if args.pretrained:
            folder = args.pretrained.resolve()
            t["data"] = [*t["data"], f"data.tokenizer={folder / 'tokenizer.json'}"]
            t["teacher"] = [*t["teacher"], f"teacher.model.pretrained={folder}"]
        if args.unlabeled:
            t["data"] = [*t["data"], f"data.unlabeled={args.unlabeled.resolve()}"]
    bench = Bench(args)
    for phase in args.phases:
        getattr(bench, phase)()


if __name__ == "__main__":
    main()
