"""The distillation benchmark of docs/distillation.md: Fashion-MNIST, full training set, a teacher
above 93 %, students at about 1/10 and 1/50 of its parameters, every scheme at the setting kdpipe's
own Optuna search picked on the validation split (most are now the shipped defaults), next to
scratch at its own searched learning rate and epochs; 3 seeds, mean ± std of the last epoch on the
official test split. Then the label-scarce regime (1 % and 10 % labels) and the temperature curve.

    python scripts/bench_distill.py --workdir W                 # the whole benchmark, 2 jobs at a time
    python scripts/bench_distill.py --workdir W --phases report # the tables and plots from the store

Every run is a `kdpipe` command, printed before it starts, against one MLflow store in
`--workdir` (`mlflow ui --backend-store-uri sqlite:///<workdir>/mlflow.db` shows them all).
Phases (a phase skips the commands whose runs an earlier invocation finished):

- `teacher`: cnn width 32 depth 4 (391k parameters), crop+flip augmentation, 30 epochs, or with
  `--teacher ensemble` three of them trained apart (`teacher=ensemble`); every student loads it with
  `teacher.checkpoint`, so its logits are computed once per training set; the students of the
  ensemble are experiments of their own (`...-ensemble`), the report puts both in one table;
- `final`: the cells of STUDY (below), each x seeds 0-2 (a command per seed): the 1/10 student from
  scratch at 10 and 20 epochs (each at the learning rate its search chose) and by kd, ls_kd, dist,
  dkd, crd at 20 epochs
  at their shipped defaults; the 1/50 student from scratch and by kd at 20 epochs at its own
  search's settings. `--schemes` runs others (a scheme not in STUDY: 20 epochs, shipped default),
  `--epochs` one schedule for all, `--setting <scheme> '<overrides>'` other values chosen on val;
- `scarce`: `data.labeled_fraction` 0.01 and 0.1 (`--scarce-size`, the 1/10 student): scratch on the
  labeled images (its epochs chosen on val/acc from a grid, at most the distilled student's optimiser
  steps) against KD on every image (its setting chosen on val/acc between the full-data one and the
  classic T=4, alpha=0.9);
- `temperature`: `experiment=temperature_sweep` (KD at alpha 0.9, T from 0.25 to 16, 10 epochs) on
  the `--temperature-size` student (1/10) with 1 % of the labels (`--temperature-labels`; 1 for
  every label), seeds 0-2;
- `report`: `<workdir>/report.md` (with what each phase's runs cost), `curves.png` (val/acc per
  epoch), `temperature.png`;
- `search` (not run by default: how the settings were found): for each of `--schemes`,
  `kdpipe -m hparams_search=<scheme>` on the `--search-size` student for `--search-epochs`, seed 0
  (conf/hparams_search/<scheme>.yaml: the keys and their ranges), `val/acc` maximised; `--searched`
  runs the final and scarce phases at its winners.

Jobs run with one torch thread each (`OMP_NUM_THREADS=1`), `--jobs` of them at once; a job that
runs alone (the teacher) gets `--jobs` threads. The final, scarce and temperature phases share one
queue (a command per seed), so no core waits for another phase's last job.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

Job = tuple[list[str], str]  # (kdpipe arguments, name of its log)
REPO = Path(__file__).resolve().parent.parent
PHASES = ("teacher", "search", "final", "scarce", "temperature", "report")
# The benchmark; `search` is how the settings it runs at were found (on the validation split).
DEFAULT_PHASES = ("teacher", "final", "scarce", "temperature", "report")
# Any scheme with a conf/hparams_search/<scheme>.yaml can be named; the report lists them in this order.
SEARCHABLE = tuple(sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")
                          if p.stem != "optuna"))
REPORT_ORDER = ("none", "kd", "ls_kd", "dist", "dkd", "crd", "attention", "sp",
                *sorted(set(SEARCHABLE) - {"none", "kd", "ls_kd", "dist", "dkd", "crd", "attention", "sp"}))
# Students as fractions of the teacher's 390,890 parameters (cnn width 32 depth 4).
STUDENTS = {
    "1/50": ["student.model.width=9", "student.model.depth=3"],    # 7,867 parameters
    "1/10": ["student.model.width=10", "student.model.depth=4"],   # 39,000 parameters
}
# The teachers (`--teacher`), each trained once by the teacher phase, 30 epochs with crop+flip:
# cnn width 32 depth 4 (93.46 and 93.40 % test with seeds 0 and 1; 93.0 ± 0.1 at 20 epochs), or
# three of them trained apart whose softened outputs the
# ensemble averages (Hinton et al. 2015: an ensemble is the stronger teacher a single model can't be).
CNN_TEACHER = "{_target_:kdpipe.models.cnn,width:32,depth:4}"
TEACHERS = {"cnn": ["teacher.model.depth=4"],
            "ensemble": ["teacher=ensemble", f"teacher.model.members=[{','.join([CNN_TEACHER] * 3)}]"]}
TEACHER_EPOCHS = "teacher.max_epochs=30"
# The final phase of the benchmark: per student size, each scheme's schedules (epochs) and the setting
# that kdpipe's searches chose on the validation split (docs/distillation.md, "The searches"); [] is
# the scheme's shipped default, itself a search's winner. Scratch runs at two schedules so that its
# own is chosen on val too. A scheme named by --schemes and not here runs 20 epochs at its default.
STUDY = {
    "1/10": {"none": {10: ["optim.lr=0.01641"], 20: ["optim.lr=0.008559"]},
             **{scheme: {20: []} for scheme in ("kd", "ls_kd", "dist", "dkd", "crd")}},
    "1/50": {"none": {20: ["optim.lr=0.01641"]},
             "kd": {20: ["distill.temperature=1.059", "distill.alpha=0.118"]}},
}
# Epochs of the distilled students with few labels (on every image) and of the temperature curve.
SCARCE_KD_EPOCHS = 10
TEMPERATURE_EPOCHS = 10


def teacher_folder(teacher: str) -> str:
    """The folder (under --workdir) and, after `bench_`, the experiment of a teacher's training run."""
    return "teacher" if teacher == "cnn" else f"teacher-{teacher}"
TEACHER_AUGMENT = "data.augment=[crop,flip]"
COMMON = ["data=fashion_mnist", "data.seed=0", "prune=none", "quantize=none", "eval.latency_iters=5",
          "eval.latency_warmup=1", "trainer.enable_progress_bar=false"]
# Scratch with few labels: epochs tried (the labeled images are few, so an epoch is short).
SCARCE_EPOCHS = {"0.01": [100, 300, 800], "0.1": [10, 30, 100]}
# KD's classic setting (Hinton et al. 2015; T=4 is the common CIFAR value): a candidate with few labels.
CLASSIC_KD = ["distill=kd", "distill.temperature=4", "distill.alpha=0.9"]
# The temperatures of conf/experiment/temperature_sweep.yaml.
TEMPERATURES = (0.25, 0.5, 1, 2, 4, 8, 16)


def std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {std(values):.2f}"


def search_keys(scheme: str) -> list[str]:
    """The keys `hparams_search=<scheme>` varies (conf/hparams_search/<scheme>.yaml)."""
    space = yaml.safe_load((REPO / "conf" / "hparams_search" / f"{scheme}.yaml").read_text())
    return list(space["hydra"]["sweeper"]["params"])


def labels_text(frac: float) -> str:
    return "every label" if frac == 1 else f"{100 * frac:g} % of the labels"


def tag(size: str) -> str:
    return size.replace("/", "_")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.work: Path = args.workdir.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                    "MLFLOW_TRACKING_URI": f"sqlite:///{self.work / 'mlflow.db'}",
                    "KDPIPE_CHECKPOINT_DIR": str(self.work / "checkpoints")}
        self.log = (self.work / "commands.log").open("a")
        self.n_seeds = len(args.seeds.split(","))

    # -- running -------------------------------------------------------------------------------
    def kdpipe(self, args: list[str], name: str, threads: int = 1) -> int:
        """One kdpipe command on `threads` torch threads, its output in <workdir>/logs/<name>.log."""
        cmd = [sys.executable, "-m", "kdpipe", *args]
        line = "kdpipe " + " ".join(shlex.quote(a) for a in args)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {line}", flush=True)
        self.log.write(line + "\n")
        self.log.flush()
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        t0 = time.time()
        with (logs / f"{name}.log").open("w") as out:
            rc = subprocess.run(cmd, cwd=self.work, env={**self.env, "OMP_NUM_THREADS": str(threads)},
                                stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        return rc

    def parallel(self, jobs: list[Job]) -> None:
        """The jobs, `--jobs` at once; a lone job gets that many threads."""
        self.chains([[lambda: jobs]])

    def chains(self, chains: list[list[Callable[[], list[Job]]]]) -> None:
        """Several chains of jobs, `--jobs` commands at once from one queue. A chain is a list of
        stages, each a function returning its jobs, called once the stage before has finished (it
        may read that stage's runs); a later stage's jobs go to the front of the queue. One queue for
        every phase keeps both cores busy to the end: no phase waits on another's last job."""
        cond, queue, left, failed, broken = threading.Condition(), deque(), {}, [], set()

        def enqueue(chain: int, stage: int) -> None:  # with cond held
            for k in range(stage, len(chains[chain])):
                if jobs := [(job, chain, k) for job in chains[chain][k]()]:
                    left[chain] = len(jobs)
                    if k:
                        queue.extendleft(reversed(jobs))
                    else:
                        queue.extend(jobs)
                    return
            left[chain] = 0

        def worker() -> None:
            while True:
                with cond:
                    while not queue and any(left.values()):
                        cond.wait()
                    if not queue:
                        return
                    job, chain, stage = queue.popleft()
                rc = self.kdpipe(*job, threads=threads)
                with cond:
                    left[chain] -= 1
                    if rc:
                        failed.append(job[1])
                        broken.add(chain)
                    elif left[chain] == 0 and chain not in broken:
                        enqueue(chain, stage + 1)
                    cond.notify_all()

        with cond:
            for chain in range(len(chains)):
                enqueue(chain, 0)
        alone = len(queue) == 1 and all(len(c) == 1 for c in chains)
        threads = self.args.jobs if alone else 1
        workers = [threading.Thread(target=worker) for _ in range(self.args.jobs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if failed:
            sys.exit(f"failed: {', '.join(failed)} (logs under {self.work / 'logs'})")

    # -- the pieces of a command -------------------------------------------------------------------
    @property
    def teacher_dir(self) -> Path:
        return self.work / teacher_folder(self.args.teacher)

    @property
    def teacher_file(self) -> Path:
        return self.teacher_dir / "teacher" / "model.pt"

    def student(self, size: str, epochs: int) -> list[str]:
        return [*COMMON, f"teacher.checkpoint={self.teacher_file}", *TEACHERS[self.args.teacher],
                *STUDENTS[size], f"student.max_epochs={epochs}", *self.args.override]

    def schedules(self, size: str, scheme: str) -> dict[int, list[str]]:
        """{epochs: setting} of one final cell: the study's (STUDY), `--epochs` instead of its
        schedules, `--setting` or `--searched` instead of its setting."""
        study = STUDY[size].get(scheme, {20: []})
        return {epochs: self.tuned(scheme, study.get(epochs, next(iter(study.values()))))
                for epochs in ([self.args.epochs] if self.args.epochs else study)}

    def tuned(self, scheme: str, study: list[str]) -> list[str]:
        """The scheme at the values `--setting` gives it, at its search's winner (`--searched`), or
        at the study's setting `study` ([]: its shipped default)."""
        if scheme in self.args.setting:
            return [f"distill={scheme}", *self.args.setting[scheme]]
        if not self.args.searched:
            return [f"distill={scheme}", *study]
        path = self.search_dir(scheme) / "optimization_results.yaml"
        if not path.is_file():
            sys.exit(f"--searched: no search result for {scheme} at {path}: run --phases search first")
        best = yaml.safe_load(path.read_text())["best_params"]
        return [f"distill={scheme}", *(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in best.items())]

    def schemes(self, size: str) -> list[str]:
        """The schemes of one student size: `--schemes`, else the study's."""
        return self.args.schemes or list(STUDY[size])

    def search_dir(self, scheme: str) -> Path:
        """Where a scheme's search sweeps: `search/<scheme>` for the 1/50 student at 10 epochs, else
        named by the student and its epochs (`--search-size`, `--search-epochs`)."""
        return self.work / self.search_name / scheme

    @property
    def search_name(self) -> str:
        a = self.args
        return ("search" if (a.search_size, a.search_epochs) == ("1/50", 10)
                else f"search-{tag(a.search_size)}-{a.search_epochs}ep")

    def final_name(self, size: str, scheme: str, epochs: int, teacher: str | None = None) -> str:
        """The experiment of one final cell; a schedule other than 10 epochs and a teacher other than
        the cnn (for a scheme that has one) are part of its name."""
        teacher = teacher or self.args.teacher
        return (f"bench-final-{tag(size)}-{scheme}" + ("" if epochs == 10 else f"-{epochs}ep")
                + ("" if teacher == "cnn" or scheme == "none" else f"-{teacher}"))

    # -- phases ------------------------------------------------------------------------------------
    def teacher(self) -> None:
        if self.teacher_file.is_file():
            print(f"teacher: {self.teacher_file} exists", flush=True)
            return
        name = self.teacher_dir.name
        self.parallel([([*COMMON, *TEACHERS[self.args.teacher], TEACHER_EPOCHS, TEACHER_AUGMENT,
                         "distill=none", "student.max_epochs=1", *self.args.override,
                         f"tracking.experiment=bench_{name}", f"hydra.run.dir={self.teacher_dir}"], name)])

    def search(self) -> None:
        jobs = []
        for scheme in self.args.schemes or REPORT_ORDER[:6]:
            if (self.search_dir(scheme) / "optimization_results.yaml").is_file():
                continue
            trials = self.args.trials.get(scheme, self.args.default_trials)
            exp = f"bench-{self.search_name}-{scheme}"
            jobs.append((["-m", f"hparams_search={scheme}",
                          *self.student(self.args.search_size, self.args.search_epochs), "seed=0",
                          f"hydra.sweeper.n_trials={trials}", f"tracking.experiment={exp}",
                          f"hydra.sweep.dir={self.search_dir(scheme)}"], exp))
        self.parallel(jobs)

    def final(self) -> list[Job]:
        """One command per (student size, scheme, schedule, seed) not finished yet."""
        jobs = []
        for size in self.args.sizes:
            for scheme in self.schemes(size):
                for epochs, setting in self.schedules(size, scheme).items():
                    exp = self.final_name(size, scheme, epochs)
                    done = {r.data.params.get("seed") for r in self.runs(exp)}
                    jobs += [(["-m", *self.student(size, epochs), *setting, f"seed={seed}",
                               *self.where("final", exp, seed)], f"{exp}-seed{seed}")
                             for seed in self.args.seeds.split(",") if seed not in done]
        return jobs

    def scarce_name(self, frac: float, rest: str, size: str | None = None) -> str:
        """The experiment of a scarce-label cell; a student other than 1/50 is part of its name."""
        size = size or self.args.scarce_size
        return f"bench-scarce-{frac:g}-{rest}" + ("" if size == "1/50" else f"-{tag(size)}")

    def kd_choices(self) -> list[tuple[str, list[str]]]:
        """KD's candidate settings with few labels: the classic T=4, alpha=0.9 and the full-data one
        (the student's in the study, or `--setting`, `--searched`)."""
        study = STUDY[self.args.scarce_size].get("kd", {20: []})
        return [("classic", CLASSIC_KD), ("tuned", self.tuned("kd", next(iter(study.values()))))]

    def scratch(self, size: str) -> list[str]:
        """Scratch's setting with few labels: the study's at its shortest schedule."""
        study = STUDY[size]["none"]
        return self.tuned("none", study[min(study)])

    def scarce(self) -> list[Callable[[], list[Job]]]:
        """Two stages: each side's setting on val/acc (seed 0), scratch over a grid of epochs and KD
        between its full-data setting and the classic T=4, alpha=0.9; then each at its choice, 3 seeds."""
        return [self.scarce_choices, self.scarce_seeds]

    def scarce_choices(self) -> list[Job]:
        jobs, size = [], self.args.scarce_size
        for frac in self.args.fractions:
            labels = f"data.labeled_fraction={frac}"
            for name, setting in self.kd_choices():
                exp = self.scarce_name(frac, f"kd-choice-{name}")
                if not self.finished(exp):
                    jobs.append((["-m", *self.student(size, SCARCE_KD_EPOCHS), *setting, labels, "seed=0",
                                  *self.where("scarce", exp)], exp))
            grid, epochs = self.scarce_name(frac, "none-epochs"), self.args.scarce_epochs[str(frac)]
            if self.finished(grid) < len(epochs):
                jobs.append((["-m", *self.student(size, SCARCE_KD_EPOCHS), *self.scratch(size), labels,
                              "seed=0", "student.max_epochs=" + ",".join(map(str, epochs)),
                              "+trainer.check_val_every_n_epoch=10", *self.where("scarce", grid)], grid))
        return jobs

    def scarce_seeds(self) -> list[Job]:
        """Each side at the setting its validation accuracy chose, one command per seed."""
        jobs, size = [], self.args.scarce_size
        for frac in self.args.fractions:
            labels = f"data.labeled_fraction={frac}"
            choices = self.kd_choices()
            val = [self.best(self.scarce_name(frac, f"kd-choice-{name}")).data.metrics["val/acc"]
                   for name, _ in choices]
            kd = choices[val.index(max(val))][1]
            epochs = int(self.best(self.scarce_name(frac, "none-epochs")).data.params["student.max_epochs"])
            scratch = [*self.student(size, epochs), *self.scratch(size),
                       "+trainer.check_val_every_n_epoch=10"]
            distilled = [*self.student(size, SCARCE_KD_EPOCHS), *kd]
            for exp, setting in ((self.scarce_name(frac, "kd"), distilled),
                                 (self.scarce_name(frac, "none"), scratch)):
                done = {r.data.params.get("seed") for r in self.runs(exp)}
                jobs += [(["-m", *setting, labels, f"seed={seed}", *self.where("scarce", exp, seed)],
                          f"{exp}-seed{seed}") for seed in self.args.seeds.split(",") if seed not in done]
        return jobs

    def temperature_name(self, frac: float) -> str:
        return "bench-temperature" + ("" if frac == 1 else f"-{frac:g}")

    def temperature(self) -> list[Job]:
        """KD at the shipped alpha (0.9: the softened term carries the loss) over the temperatures of
        experiment=temperature_sweep at each of `--temperature-labels`, one command per (seed, T)."""
        jobs = []
        student = self.student(self.args.temperature_size, TEMPERATURE_EPOCHS)
        for frac in self.args.temperature_labels:
            exp = self.temperature_name(frac)
            labels = [] if frac == 1 else [f"data.labeled_fraction={frac:g}"]
            for seed in self.args.seeds.split(","):
                done = {float(r.data.params["distill.temperature"]) for r in self.runs(exp)
                        if r.data.params.get("seed") == seed}
                jobs += [(["-m", "experiment=temperature_sweep", *student, *labels,
                           f"distill.temperature={t:g}", f"seed={seed}",
                           *self.where("temperature", exp, f"seed{seed}/T{t:g}")],
                          f"{exp}-seed{seed}-T{t:g}") for t in TEMPERATURES if t not in done]
        return jobs

    def where(self, phase: str, experiment: str, sub: str = "") -> list[str]:
        """The MLflow experiment and the sweep folder of one command."""
        folder = self.work / phase / experiment / sub
        return [f"tracking.experiment={experiment}", f"hydra.sweep.dir={folder}"]

    # -- reading the store -------------------------------------------------------------------------
    def runs(self, experiment: str) -> list:
        """The FINISHED pipeline runs of an experiment, newest first."""
        import mlflow

        mlflow.set_tracking_uri(self.env["MLFLOW_TRACKING_URI"])
        if mlflow.get_experiment_by_name(experiment) is None:
            return []
        runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                  filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
        return [r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline"]

    def best(self, experiment: str):
        """The finished pipeline run of highest val/acc."""
        return max(self.runs(experiment), key=lambda r: r.data.metrics["val/acc"])

    def finished(self, experiment: str) -> int:
        return len(self.runs(experiment))

    def per_seed(self, experiment: str) -> list:
        """The newest finished pipeline run per seed."""
        seen: dict[str, object] = {}
        for r in self.runs(experiment):
            seen.setdefault(r.data.params.get("seed"), r)
        return list(seen.values())

    def teacher_run(self, teacher: str):
        """The teacher stage run that trained the teacher file of `--teacher <teacher>`."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        exp = client.get_experiment_by_name(f"bench_{teacher_folder(teacher)}")
        query = "tags.`kdpipe.stage` = 'teacher' and attributes.status = 'FINISHED'"
        runs = client.search_runs([exp.experiment_id], query) if exp else []
        return runs[0] if runs else None

    def curve(self, run) -> list[float]:
        """val/acc per epoch of the run's distill stage."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        query = f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`kdpipe.stage` = 'distill'"
        child = client.search_runs([run.info.experiment_id], query)
        if not child:
            return []
        return [m.value for m in sorted(client.get_metric_history(child[0].info.run_id, "val/acc"),
                                        key=lambda m: m.step)]

    def setting(self, scheme: str, run) -> str:
        """The run's values of the keys the scheme's search varies."""
        values = [f"{k}={float(run.data.params[k]):.4g}" for k in search_keys(scheme) if k in run.data.params]
        return f"`{' '.join(values)}`"

    def final_table(self, size: str, stats: dict, curves: dict) -> list[str]:
        """The rows of one student size, every scheme at every schedule of `--report-epochs`; each
        against scratch at the schedule of its highest validation accuracy (a user's choice).
        Fills `stats` and `curves`, keyed (size, row label, epochs)."""
        cells = {}  # (row label, epochs) -> (scheme, runs)
        schedules = itertools.product(TEACHERS, REPORT_ORDER, self.args.report_epochs)
        for teacher, scheme, epochs in schedules:
            runs = self.per_seed(self.final_name(size, scheme, epochs, teacher))
            label = scheme if teacher == "cnn" or scheme == "none" else f"{scheme}, {teacher} teacher"
            if runs and (label, epochs) not in cells:
                cells[label, epochs] = scheme, runs
                acc = [100 * r.data.metrics["test/acc"] for r in runs]
                stats[size, label, epochs] = (statistics.mean(acc), std(acc))
                curves[size, label, epochs] = [self.curve(r) for r in runs]

        def val(runs: list) -> float:
            return statistics.mean(100 * r.data.metrics.get("val/acc", float("nan")) for r in runs)

        scratch = [(val(runs), epochs) for (label, epochs), (_, runs) in cells.items() if label == "none"]
        chosen = ("none", max(scratch)[1]) if scratch else None
        base = stats[(size, *chosen)] if chosen else None
        rows = []
        for (label, epochs), (scheme, runs) in cells.items():
            m, s = stats[size, label, epochs]
            delta = ""
            if base and (label, epochs) != chosen:
                delta = f"{m - base[0]:+.2f}" + (" (mean-std > its mean+std)" if m - s > sum(base) else "")
            ece = statistics.mean(r.data.metrics.get("test/ece", float("nan")) for r in runs)
            rows.append(f"| {label} | {epochs} | {self.setting(scheme, runs[0])} | {m:.2f} ± {s:.2f} "
                        f"(n={len(runs)}) | {delta} | {val(runs):.2f} | {ece:.4f} |")
        return rows

    def report(self) -> None:
        lines = ["# Distillation benchmark (scripts/bench_distill.py)", ""]
        for name, what in (("cnn", "cnn width 32 depth 4"), ("ensemble", "three of them trained apart")):
            teacher = self.teacher_run(name)
            if teacher is not None:
                m = teacher.data.metrics
                lines.append(f"Teacher `{name}`: {what}, {int(m['model/params']):,} parameters, "
                             f"test acc {100 * m['test/acc']:.2f} %, val acc {100 * m['val/acc']:.2f} % "
                             f"(run {teacher.info.run_id})  ")
        stats: dict = {}
        curves: dict = {}
        for size in self.args.sizes:
            table = self.final_table(size, stats, curves)
            if table:
                lines += ["", f"## Students at {size} of the teacher's parameters", "",
                          "| scheme | epochs | setting | test acc % (mean ± std, last epoch) | "
                          "vs scratch (its epochs chosen on val) | val acc % | test ECE |", "|---" * 7 + "|",
                          *table]
        lines += ["", "## Few labels: scratch on the labeled images, KD on all", "",
                  "| student | labels | scratch test acc % | scratch epochs (chosen on val) | "
                  "KD test acc % | KD setting (chosen on val) | KD - scratch |", "|---" * 7 + "|"]
        for size, frac in itertools.product(STUDENTS, (0.01, 0.1)):
            kd_runs = self.per_seed(self.scarce_name(frac, "kd", size))
            sc_runs = self.per_seed(self.scarce_name(frac, "none", size))
            kd = [100 * r.data.metrics["test/acc"] for r in kd_runs]
            sc = [100 * r.data.metrics["test/acc"] for r in sc_runs]
            if kd or sc:
                ep = sc_runs[0].data.params.get("student.max_epochs") if sc else ""
                p = kd_runs[0].data.params if kd else {}
                setting = f"T={p.get('distill.temperature')} alpha={p.get('distill.alpha')}" if kd else ""
                delta = f"{statistics.mean(kd) - statistics.mean(sc):+.2f}" if kd and sc else ""
                lines.append(f"| {size} | {100 * frac:g} % | {mean_std(sc) if sc else ''} (n={len(sc)}) | "
                             f"{ep} | {mean_std(kd) if kd else ''} (n={len(kd)}) | {setting} | {delta} |")
        trials = []
        for scheme in REPORT_ORDER:
            for r in reversed(self.runs(f"bench-{self.search_name}-{scheme}")):
                values = " ".join(f"{k}={float(r.data.params[k]):.3g}" for k in search_keys(scheme))
                trials.append(f"| {scheme} | `{values}` | {100 * r.data.metrics['val/acc']:.2f} |")
        if trials:
            lines += ["", f"## The searches ({self.args.search_size} student, {self.args.search_epochs} "
                          "epochs, seed 0, validation split)", "",
                      "| scheme | trial | val acc % |", "|---|---|---|", *trials]
        temps = {}  # (label fraction, T, seed) -> (test acc %, val acc %)
        for frac in self.args.temperature_labels:
            for r in self.runs(self.temperature_name(frac)):
                key = (frac, float(r.data.params["distill.temperature"]), r.data.params.get("seed"))
                temps.setdefault(key, (100 * r.data.metrics["test/acc"],
                                       100 * r.data.metrics.get("val/acc", float("nan"))))
        for frac in self.args.temperature_labels:
            if not (ts := sorted({k[1] for k in temps if k[0] == frac})):
                continue
            lines += ["", f"## Temperature ({self.args.temperature_size} student, KD at alpha 0.9, "
                          f"{labels_text(frac)})", "",
                      "| T | test acc % (mean ± std) | val acc % | seeds |", "|---|---|---|---|"]
            for t in ts:
                vals = [v for k, v in temps.items() if k[:2] == (frac, t)]
                lines.append(f"| {t:g} | {mean_std([v[0] for v in vals])} | "
                             f"{statistics.mean(v[1] for v in vals):.2f} | {len(vals)} |")
        lines += self.cost()
        (self.work / "report.md").write_text("\n".join(lines) + "\n")
        (self.work / "report.json").write_text(json.dumps(
            {"final": {" ".join(map(str, k)): v for k, v in stats.items()},
             "curves": {" ".join(map(str, k)): v for k, v in curves.items()},
             "temperature": {" ".join(map(str, k)): v for k, v in temps.items()}}, indent=1))
        self.plots(curves, temps)
        print("\n".join(lines))

    def cost(self) -> list[str]:
        """What each phase's runs in the store took: the sum of their wall-clock times (one torch
        thread each, `--jobs` of them at once), so the study's cost on these cores can be read off."""
        import mlflow

        mlflow.set_tracking_uri(self.env["MLFLOW_TRACKING_URI"])
        minutes: dict[str, list[float]] = {}
        for exp in mlflow.search_experiments(filter_string="name LIKE 'bench%'"):
            phase = exp.name[6:].split("-")[0] if exp.name.startswith("bench-") else "teacher"
            minutes.setdefault(phase, []).extend((r.info.end_time - r.info.start_time) / 60000
                                                 for r in self.runs(exp.name))
        if not minutes:
            return []
        rows = [f"| {phase} | {len(m)} | {sum(m):.0f} | {sum(m) / len(m):.1f} |"
                for phase, m in minutes.items() if m]
        total = sum(sum(m) for m in minutes.values())
        return ["", "## Cost (wall-clock of the finished runs in this store, one torch thread each)", "",
                "| phase | runs | minutes in all | minutes per run |", "|---|---|---|---|", *rows,
                f"| all | {sum(map(len, minutes.values()))} | {total:.0f} | |"]

    def plots(self, curves: dict, temps: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if curves:
            n = len(self.args.sizes)
            fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
            for ax, size in zip(axes[0], self.args.sizes, strict=True):
                for (sz, scheme, epochs), seeds in curves.items():
                    runs = [c for c in seeds if c]
                    if sz != size or not runs:
                        continue
                    n = min(map(len, runs))
                    mean = [100 * statistics.mean(c[i] for c in runs) for i in range(n)]
                    ax.plot(range(1, n + 1), mean, label=f"{scheme} ({epochs} ep)",
                            linestyle="-" if epochs == min(self.args.report_epochs) else "--")
                ax.set(title=f"student {size}: validation accuracy per epoch (mean of seeds)", xlabel="epoch",
                       ylabel="val acc %")
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(self.work / "curves.png", dpi=110)
        if temps:
            fracs = sorted({k[0] for k in temps})
            fig, axes = plt.subplots(1, len(fracs), figsize=(5 * len(fracs), 3.5), squeeze=False)
            for ax, frac in zip(axes[0], fracs, strict=True):
                ts = sorted({k[1] for k in temps if k[0] == frac})
                for i, split in enumerate(("test", "val")):
                    ys = [[v[i] for k, v in temps.items() if k[:2] == (frac, t)] for t in ts]
                    ax.errorbar(ts, [statistics.mean(y) for y in ys],
                                yerr=[std(y) for y in ys], marker="o", label=split)
                ax.set(xscale="log", xlabel="temperature T", ylabel="acc %",
                       title=f"KD against T, {labels_text(frac)}")
                ax.set_xticks(ts, [f"{t:g}" for t in ts])
                ax.legend()
            fig.tight_layout()
            fig.savefig(self.work / "temperature.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO / "outputs" / "bench_distill")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(DEFAULT_PHASES))
    ap.add_argument("--schemes", nargs="+", choices=SEARCHABLE,
                    help="the schemes of the search and final phases (default: the study's, STUDY)")
    ap.add_argument("--sizes", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
    ap.add_argument("--epochs", type=int, help="one schedule for every final run instead of the study's")
    ap.add_argument("--teacher", choices=list(TEACHERS), default="cnn",
                    help="the teacher the students distil from (its own folder and experiments)")
    ap.add_argument("--report-epochs", type=int, nargs="+", default=[10, 20, 30],
                    help="the schedules whose final runs the report tabulates")
    ap.add_argument("--jobs", type=int, default=2, help="kdpipe commands at once, one torch thread each")
    ap.add_argument("--default-trials", type=int, default=4, help="Optuna trials per scheme")
    ap.add_argument("--trials", type=json.loads, default={"kd": 6, "crd": 3, "none": 3},
                    help='trials of some schemes, JSON, e.g. \'{"kd": 8}\'')
    ap.add_argument("--search-size", choices=list(STUDENTS), default="1/50",
                    help="the student the search phase tunes on (its settings serve every size)")
    ap.add_argument("--search-epochs", type=int, default=10, help="epochs of each search trial")
    ap.add_argument("--searched", action="store_true",
                    help="run the final and scarce phases at the search phase's winners")
    ap.add_argument("--temperature-size", choices=list(STUDENTS), default="1/10",
                    help="the student of the temperature phase")
    ap.add_argument("--temperature-labels", type=float, nargs="+", default=[0.01],
                    help="label fractions of the temperature phase (1: every label); with few labels "
                         "the soft targets carry what the student learns, and T decides what they say")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the final, scarce and temperature runs")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1],
                    help="label fractions of the scarce phase")
    ap.add_argument("--scarce-size", choices=list(STUDENTS), default="1/10",
                    help="the student of the scarce phase")
    ap.add_argument("--setting", nargs=2, action="append", default=[], metavar=("SCHEME", "OVERRIDES"),
                    help="a setting chosen on the validation split elsewhere, used instead of the study's, "
                         "e.g. --setting ls_kd 'distill.temperature=2.29 distill.alpha=0.744'")
    ap.add_argument("--scarce-epochs", type=json.loads, default=SCARCE_EPOCHS,
                    help="epochs tried for scratch with few labels, JSON by fraction")
    ap.add_argument("--override", nargs="*", default=[],
                    help="extra overrides for every command, e.g. data.limit_train=2000 for a smoke run")
    args = ap.parse_args()
    args.setting = {scheme: values.split() for scheme, values in args.setting}
    if unknown := set(args.setting) - set(SEARCHABLE):
        ap.error(f"--setting: unknown scheme(s) {sorted(unknown)}; choose from {', '.join(SEARCHABLE)}")
    bench = Bench(args)
    t0 = time.time()
    for phase in ("teacher", "search"):
        if phase in args.phases:
            getattr(bench, phase)()
    # The phases that train students from the one teacher share one queue, in this order: the scarce
    # chain's first stage, the final runs (the longest), the temperature runs (the shortest).
    chains = ([bench.scarce()] if "scarce" in args.phases else []) + [
        [getattr(bench, p)] for p in ("final", "temperature") if p in args.phases]
    if chains:
        bench.chains(chains)
    if "report" in args.phases:
        bench.report()
    print(f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
