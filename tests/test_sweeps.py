"""Sweeps as users launch them: a parallel (joblib) multirun against the default SQLite store,
its sweep tag and run names, the sweep report, an Optuna search, and the runs in the real MLflow UI
(a `mlflow server` process driven by headless Chromium)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, open_dict

from kdpipe.cli import CONFIG_PATH
from kdpipe.config import validate
from kdpipe.pipeline import run_pipeline
from kdpipe.report.cli import main as report_main
from kdpipe.report.sweep import METRICS, build_report, pareto_front, summarise
from kdpipe.tracking.naming import SWEEP_ENV, run_name
from tests.conftest import FAST, REPO, make_cfg, run_cli

# The module-scoped fixtures are built once: all of this module's tests run in one worker.
pytestmark = pytest.mark.xdist_group("sweeps")

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    """`kdpipe -m experiment=temperature_sweep hydra/launcher=joblib` with 2 parallel jobs, tiny
    settings, against a fresh default-style SQLite store."""
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "KDPIPE_LOCK_DIR": str(root / "locks")}
    res = run_cli(["-m", "experiment=temperature_sweep", *FAST, "distill.temperature=2,4",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], root, env)
    assert res.returncode == 0, res.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["temperature_sweep"], output_format="list")
    (sweep_dir,) = (root / "outputs" / "multirun").glob("*/*")
    return {"root": root, "uri": uri, "res": res, "runs": runs, "sweep_dir": sweep_dir}


def _pipelines(runs):
    return [r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline"]


def test_parallel_joblib_sweep_finishes_every_run_and_trains_the_teacher_once(joblib_sweep):
    runs, res = joblib_sweep["runs"], joblib_sweep["res"]
    assert "database is locked" not in res.stderr
    pipelines = _pipelines(runs)
    assert sorted(float(p.data.params["distill.temperature"]) for p in pipelines) == [2.0, 4.0]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    teachers = [r for r in runs if r.data.tags.get("kdpipe.stage") == "teacher"]
    trained = [t for t in teachers if "kdpipe.reused_from" not in t.data.tags]
    assert len(teachers) == 2 and len(trained) == 1
    assert all(t.data.tags["kdpipe.reused_from"] == trained[0].info.run_id
               for t in teachers if t not in trained)


def test_every_run_of_a_multirun_shares_one_sweep_tag_and_has_a_readable_name(joblib_sweep):
    runs = joblib_sweep["runs"]
    stage_and_pipeline = [r for r in runs if r.data.tags.get("kdpipe.run_type") in ("pipeline", "stage")]
    sweeps = {r.data.tags.get("kdpipe.sweep") for r in stage_and_pipeline}
    assert len(sweeps) == 1
    (sweep,) = sweeps
    assert sweep and Path(joblib_sweep["root"] / sweep).resolve() == joblib_sweep["sweep_dir"].resolve()
    names = sorted(p.info.run_name for p in _pipelines(runs))
    assert [n.split("-synthetic")[0] for n in names] == ["kd-T2-a0.9", "kd-T4-a0.9"]
    one_search = mlflow.search_runs(experiment_names=["temperature_sweep"], output_format="list",
                                    filter_string=f"tags.`kdpipe.sweep` = '{sweep}'")
    assert len(one_search) == len(stage_and_pipeline) + 1  # + the sweep's summary run


def test_end_of_a_multirun_writes_the_sweep_report_and_logs_it_as_a_summary_run(joblib_sweep):
    folder = joblib_sweep["sweep_dir"] / "report"
    for name in ("runs.csv", "runs.md", "summary.csv", "summary.md", "acc_vs_temperature.png",
                 "acc_vs_size.png", "acc_vs_latency.png"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    table = pd.read_csv(folder / "runs.csv")
    by_t = dict(zip(table["distill.temperature"], table["test/acc"], strict=True))
    pipelines = {float(p.data.params["distill.temperature"]): p.data.metrics["test/acc"]
                 for p in _pipelines(joblib_sweep["runs"])}
    assert by_t == pytest.approx(pipelines)
    (summary_run,) = [r for r in joblib_sweep["runs"] if r.data.tags.get("kdpipe.run_type") == "sweep_report"]
    logged = {f.path for f in MlflowClient().list_artifacts(summary_run.info.run_id, "report")}
    assert "report/acc_vs_temperature.png" in logged and "report/summary.md" in logged
    assert summary_run.data.metrics["sweep/runs"] == 2


def test_report_gives_mean_and_std_over_runs_that_differ_only_by_seed(joblib_sweep, tmp_path, monkeypatch):
    """A second seed of T=2, launched later into the same sweep ($KDPIPE_SWEEP), joins the first
    one as one configuration with two runs."""
    sweep = _pipelines(joblib_sweep["runs"])[0].data.tags["kdpipe.sweep"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", joblib_sweep["uri"])
    monkeypatch.setenv("KDPIPE_LOCK_DIR", str(joblib_sweep["root"] / "locks"))
    monkeypatch.setenv(SWEEP_ENV, sweep)
    mlflow.set_tracking_uri(joblib_sweep["uri"])
    cfg = make_cfg(["experiment=temperature_sweep", "seed=1", "distill.temperature=2"])
    run_pipeline(cfg, tmp_path / "seed1")
    accs = {(int(p.data.params["seed"]), float(p.data.params["distill.temperature"])):
                p.data.metrics["test/acc"]
            for p in _pipelines(mlflow.search_runs(experiment_names=["temperature_sweep"],
                                                   output_format="list"))}
    assert set(accs) == {(0, 2.0), (1, 2.0), (0, 4.0)}
    report = build_report("temperature_sweep", sweep, tmp_path / "report", log=False)
    summary = report.summary.set_index(report.summary["distill.temperature"].astype(float))
    assert list(summary["runs"]) == [2, 1]
    two = pd.Series([accs[(0, 2.0)], accs[(1, 2.0)]])
    assert summary.loc[2.0, "test/acc mean"] == pytest.approx(two.mean())
    assert summary.loc[2.0, "test/acc std"] == pytest.approx(two.std(ddof=1))
    assert summary.loc[4.0, "test/acc mean"] == pytest.approx(accs[(0, 4.0)])
    md = (tmp_path / "report" / "summary.md").read_text()
    assert f"{two.mean():.4g} ± {two.std(ddof=1):.4g}" in md
    assert (tmp_path / "report" / "acc_vs_temperature.png").is_file()


def test_pareto_front_keeps_only_points_no_other_beats_on_both_cost_and_accuracy():
    cost = [10, 20, 5, 30, 20]
    acc = [0.8, 0.9, 0.7, 0.85, 0.95]
    assert pareto_front(cost, acc) == [2, 0, 4]


def test_report_command_names_the_experiments_there_when_the_name_is_wrong(joblib_sweep, capsys):
    assert report_main(["nope", "--uri", joblib_sweep["uri"]]) == 2
    err = capsys.readouterr().err
    assert "no experiment named 'nope'" in err and "temperature_sweep" in err


def test_run_name_is_built_from_the_scheme_temperature_alpha_pruning_and_quantization():
    cfg = make_cfg([])
    assert run_name(cfg) == "kd-T2-a0.9-mag50-int8"
    assert run_name(make_cfg(["distill=none", "prune=none", "quantize=none", "seed=2"]),
                    ["seed=2"]) == "none-s2"
    assert (run_name(cfg, ["student=mlp", "optim.lr=0.1", "eval.latency_iters=5"])
            == "kd-T2-a0.9-mag50-int8-mlp-lr0.1")


def test_run_name_abbreviates_paths_and_uris_and_shows_the_seed_once():
    cfg = make_cfg(["distill=none", "prune=none", "quantize=none"])
    run_id = "41418de295fb4c1a9e0d7c2b5a6f8e11"
    overrides = ["seed=0", "data=fashion_mnist", f"teacher.checkpoint=runs\\:/{run_id}/model/model.pt",
                 "trainer.max_epochs=15", "data.seed=0"]
    assert run_name(cfg, overrides) == "none-s0-fashion_mnist-t-ckpt-41418de2-ep15"
    assert run_name(cfg, ["teacher.checkpoint=/ckpts/resnet_best.pt"]) == "none-t-ckpt-resnet_best"
    assert run_name(cfg, ["teacher.checkpoint=models:/teacher/3"]) == "none-t-ckpt-teacher-3"
    assert run_name(cfg, ["data.root=/data/fmnist/"]) == "none-root-fmnist"


def test_run_name_starts_with_distill_name_or_the_scheme_class():
    terms = make_cfg(["prune=none", "quantize=none"])
    with open_dict(terms):
        del terms.distill["name"]
    assert run_name(terms) == "offline-T2-a0.9"


def test_run_name_shows_alpha_only_with_the_kd_term_and_names_term_and_scheme_overrides():
    dkd = make_cfg(["distill=dkd", "prune=none", "quantize=none"])
    assert run_name(dkd) == "dkd-T4.6"  # distill.alpha=0: no KD term in the sum, no alpha in the name
    hint = ("+distill.terms.hint={_target_:kdpipe.losses.Hint,"
            "student_layer:features.1,teacher_layer:features.1}")
    assert run_name(dkd, ["distill.terms.nckd.weight=4", hint]) == "dkd-T4.6-nckd4-hint"
    dml = make_cfg(["distill=dml", "prune=none", "quantize=none"])
    assert run_name(dml, ["distill.scheme.peers=3"]) == "dml-peers3"


def _runs_table(configs: list[dict[str, str]], seeds: int = 2) -> pd.DataFrame:
    """Pipeline runs as `load_runs` returns them: `params.<key>` strings and metrics."""
    rows = []
    for i, params in enumerate(configs):
        for seed in range(seeds):
            rows.append({"run_id": f"{i}-{seed}", "run_name": f"run{i}-s{seed}", "params.seed": str(seed),
                         **{f"params.{k}": v for k, v in params.items()}, "test/acc": 0.5 + 0.1 * seed})
    table = pd.DataFrame(rows)
    for m in METRICS:
        table[m] = table.get(m, float("nan"))
    return table


def test_sweep_summary_labels_each_group_by_the_values_that_define_it():
    schemes = summarise(_runs_table([
        {"distill.scheme": "none"},
        {"distill.scheme": "kd", "distill.temperature": "4.0", "distill.alpha": "0.9",
         "distill.loss._target_": "kdpipe.losses.HintonKD"},
        {"distill.scheme": "dkd", "distill.temperature": "4.0", "distill.alpha": "1.0", "distill.beta": "8.0",
         "distill.loss._target_": "kdpipe.losses.DecoupledKD"}]))
    assert sorted(schemes["config"]) == ["distill=dkd", "distill=kd", "distill=none"]
    assert list(schemes["runs"]) == [2, 2, 2]
    temperatures = summarise(_runs_table([{"distill.temperature": t, "distill.loss.temperature": t}
                                          for t in ("2.0", "4.0", "16.0")]))
    assert list(temperatures["config"]) == ["T=2", "T=4", "T=16"]
    grid = summarise(_runs_table([{"prune.sparsity": sp, "quantize.mode": q, "quantize.per_channel": pc}
                                  for sp in ("0.5", "0.9")
                                  for q, pc in (("none", None), ("dynamic", "False"))], 1))
    assert set(grid["config"]) == {f"quantize={q}, sparsity={sp}"
                                   for sp in ("0.5", "0.9") for q in ("none", "dynamic")}


def test_experiments_and_the_slurm_launcher_compose():
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        for name, swept in (("temperature_sweep", "distill.temperature"), ("scheme_comparison", "seed"),
                            ("compression_ladder", "prune.sparsity")):
            cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
            assert swept in cfg.hydra.sweeper.params and cfg.tracking.experiment == name
        cfg = compose("config", overrides=["experiment=scheme_comparison"], return_hydra_config=True)
        schemes = cfg.hydra.sweeper.params["distill"].split(",")
        options = {p.stem for p in (Path(CONFIG_PATH) / "distill").glob("*.yaml")}
        # scratch against every scheme of the image models (the text ones need transformer layer
        # paths or a language model: docs/text.md)
        text = {"lm_forward_kl", "lm_reverse_kl", "lm_jsd", "lm_skew_kl", "sequence_kd", "tinybert", "minilm"}
        assert schemes[0] == "none" and set(schemes) == options - text
        for scheme in schemes:  # each is a real option of the distill group
            assert compose("config", overrides=[f"distill={scheme}"]).distill
        slurm = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        assert "SlurmLauncher" in slurm.hydra.launcher._target_
        optuna = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
        assert "OptunaSweeper" in optuna.hydra.sweeper._target_
        assert set(optuna.hydra.sweeper.params) == {"distill.temperature", "distill.alpha", "prune.sparsity"}
        # each scheme's search: its own scheme, on val/acc, over keys that scheme really has
        for path in sorted((Path(CONFIG_PATH) / "hparams_search").glob("*.yaml")):
            if path.stem == "optuna":
                continue
            cfg = compose("config", overrides=[f"hparams_search={path.stem}"], return_hydra_config=True)
            assert cfg.distill.name == path.stem and cfg.optimized_metric == "val/acc", path.stem
            assert cfg.prune.method == "none" and cfg.quantize.mode == "none"
            for key in cfg.hydra.sweeper.params:
                assert OmegaConf.select(cfg, key) is not None, (path.stem, key)


def test_optuna_search_runs_trials_and_returns_the_best_parameters(joblib_sweep, tmp_path):
    """Against the sweep's store, so the search reuses the teacher the sweep trained."""
    env = {"MLFLOW_TRACKING_URI": joblib_sweep["uri"], "KDPIPE_LOCK_DIR": str(joblib_sweep["root"] / "locks")}
    res = run_cli(["-m", "hparams_search=optuna", *FAST, "quantize=none", "prune.finetune.epochs=1",
                   "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2"], tmp_path, env)
    assert res.returncode == 0, res.stderr[-3000:]
    (results,) = (tmp_path / "outputs" / "multirun").glob("*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert set(best["best_params"]) == {"distill.temperature", "distill.alpha", "prune.sparsity"}
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["hparams_search"], output_format="list")
    trials = _pipelines(runs)
    assert len(trials) == 3 and all(t.info.status == "FINISHED" for t in trials)
    teachers = [r for r in runs if r.data.tags.get("kdpipe.stage") == "teacher"]
    assert len(teachers) == 3 and all("kdpipe.reused_from" in t.data.tags for t in teachers)
    # the search steers on the validation split (optimized_metric: val/acc), never on test
    assert best["best_value"] == pytest.approx(max(t.data.metrics["val/acc"] for t in trials))


# --- the MLflow UI -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(joblib_sweep, tmp_path_factory):
    """`kdpipe-ui` (an `mlflow server` process) on 127.0.0.1 over the sweep's store, with its own
    artefact root for runs created through it (tracking=server)."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kdpipe.tracking.ui", "--store", joblib_sweep["uri"],
                             "--port", str(port), "--artifacts", str(joblib_sweep["root"] / "mlartifacts")],
                            cwd=joblib_sweep["root"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, "mlflow server exited; see its log"
            time.sleep(0.5)
    else:
        pytest.fail("mlflow server did not answer within 60 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
    log.close()


def test_ui_lists_the_sweep_runs_and_compares_their_temperatures_in_a_real_browser(joblib_sweep, server):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get update && apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    mlflow.set_tracking_uri(server)
    exp = mlflow.get_experiment_by_name("temperature_sweep")
    pipelines = _pipelines(mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list"))
    sweep = pipelines[0].data.tags["kdpipe.sweep"]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            search = urllib.parse.quote(f"tags.`kdpipe.sweep` = '{sweep}'")
            page.goto(f"{server}/#/experiments/{exp.experiment_id}/runs?searchFilter={search}")
            for run in pipelines:
                page.get_by_text(run.info.run_name, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_sweep_runs.png"), full_page=True)

            ids = urllib.parse.quote(json.dumps([r.info.run_id for r in pipelines]))
            page.goto(f"{server}/#/compare-runs?runs={ids}&experiments=%5B%22{exp.experiment_id}%22%5D")
            row = page.locator("tr", has=page.get_by_text("distill.temperature", exact=True)).first
            row.wait_for(timeout=60_000)
            cells = row.inner_text().split()
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_compare_temperature.png"), full_page=True)
        finally:
            browser.close()
    assert cells[0] == "distill.temperature"
    assert sorted(float(c) for c in cells[1:]) == sorted(float(r.data.params["distill.temperature"])
                                                         for r in pipelines)


def test_pipeline_logs_to_a_real_tracking_server_with_tracking_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_TRACKING_SERVER", server)
    monkeypatch.setenv("KDPIPE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv(SWEEP_ENV, raising=False)
    cfg = make_cfg(["tracking=server", "tracking.experiment=via_server", "prune=none", "quantize=none"])
    validate(cfg)
    try:
        run_pipeline(cfg, tmp_path / "out")
    finally:
        while mlflow.active_run():
            mlflow.end_run()
    assert mlflow.get_tracking_uri() == server
    (parent,) = _pipelines(mlflow.search_runs(experiment_names=["via_server"], output_format="list"))
    assert parent.info.status == "FINISHED"
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    model = mlflow.pytorch.load_model(f"runs:/{parent.info.run_id}/model")
    assert sum(p.numel() for p in model.parameters()) == parent.data.metrics["model/params"]


def test_bad_value_in_a_multirun_stops_with_one_line_before_the_store_is_created(tmp_path):
    res = run_cli(["-m", *FAST, "distill.alpha=1.5,0.5"], tmp_path,
                  {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
                   "KDPIPE_LOCK_DIR": str(tmp_path / "locks")})
    assert res.returncode == 2
    assert ("kdpipe: error: distill.alpha=1.5 must lie in [0, 1]" in res.stderr
            and "Traceback" not in res.stderr)
    assert not (tmp_path / "mlflow.db").exists()
