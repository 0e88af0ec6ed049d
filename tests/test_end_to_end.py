"""The headline as a new user meets it, on a fresh copy of the repository with no `../shared` beside it.

The pipeline runs on a small registry sample against a real Prefect server (so its runs are in that
server's database), the deployments are registered, `prefect deployment run pretrain/sigma --watch`
is run to completion by a process worker with the deployment's default parameters (fewer steps only),
`pipeline/sample` with the pipeline's inputs and settings reuses every stage,
`pangu eval --checkpoint EXPORT` scores the export with no tokenizer, domain or data flag, and the server's
API lists the pipeline run and an artifact whose markdown holds a picture.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_deployments import POOL, PREFECT, _post, local_server, run_deployment

ROOT = Path(__file__).resolve().parents[1]


def _fresh_copy(target: Path) -> Path:
    """The repository's files as a clean clone has them (tracked and new, nothing ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


@pytest.fixture(scope="module")
def fresh_repo(tmp_path_factory, registry_sample):
    """A copy of the repository under a directory with no `shared/`, a Prefect server, and the sample."""
    top = tmp_path_factory.mktemp("user")
    repo = _fresh_copy(top / "pangu")
    assert not (repo.parent / "shared").exists()
    home = top / "prefect-home"
    home.mkdir()
    # `python -m` from the copy imports the copy's code first.
    with local_server(home, repo, OMP_NUM_THREADS="1", PYTHONPATH=str(repo),
                      PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") as server:
        yield {"repo": repo, "env": server["env"], "api": server["api"], "sample": registry_sample[0]}


def _run(args: list[str], repo: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_new_user_runs_the_pipeline_then_pretrain_sigma_then_eval(fresh_repo):
    repo, env, api = fresh_repo["repo"], fresh_repo["env"], fresh_repo["api"]
    pangu = [sys.executable, "-m", "flows.cli"]

    # 1. the pipeline (what `make run` runs), smaller: no evaluation data given, so the built-in set is used
    piped = _run([*pangu, "pipeline", str(fresh_repo["sample"]), "--root", "runs", "--preset", "sigma-tiny",
                  "--steps", "3", "--vocab-size", "8000", "--input-sentence-size", "20000", "--eval-limit", "8",
                  "--workers", "1"], repo, env, timeout=900)
    assert piped.returncode == 0, piped.stdout[-3000:] + piped.stderr[-5000:]
    assert "chance" in piped.stderr  # the scores printed beside chance

    # 2. the deployments on a process pool, and `prefect deployment run pretrain/sigma --watch`, served by a
    # worker started in another directory: the deployment's pull step runs the flow in the repository.
    for args in (["work-pool", "create", POOL, "--type", "process"],
                 ["--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"]):
        done = _run([PREFECT, *args], repo, env, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    listed = _run([PREFECT, "deployment", "ls"], repo, env, timeout=60).stdout
    assert "pretrain/alpha" in listed and "pretrain/sigma" in listed, listed
    # JSON: the table form folds a long directory over two lines
    inspected = json.loads(_run([PREFECT, "deployment", "inspect", "pretrain/sigma", "--output", "json"], repo, env,
                                timeout=60).stdout)
    directories = [step[name]["directory"] for step in inspected["pull_steps"] for name in step
                   if name.endswith("set_working_directory")]
    assert directories == [str(repo)], inspected["pull_steps"]  # {{ $PWD }} resolved at deploy time
    run, out, worker, worker_out = run_deployment("pretrain/sigma", {"steps": 3}, env, api, cwd=repo,
                                                  worker_cwd=repo.parent, timeout=400)
    assert run.returncode == 0 and "Completed" in out, f"{out[-3000:]}\n--- worker ---\n{worker_out[-5000:]}"
    assert worker.returncode == 0, worker_out[-3000:]
    export = repo / "runs" / "pretrain" / "sigma-tiny" / "export"
    assert {"model.safetensors", "config.json", "domains.json", "tokenizer"} <= {p.name for p in export.iterdir()}
    assert len((export.parent / "metrics.csv").read_text().splitlines()) == 1 + 3

    # `prefect deployment run pipeline/sample` with step 1's inputs and settings: every stage is reused (the
    # same corpus version, no tokenizer trained or model trained again, the evaluation's results kept)
    runs = repo / "runs"
    latest = (runs / "corpus" / "LATEST").read_text()
    made = {p: p.read_bytes() for p in [*runs.glob("tokenizer/*/spm.model"), *runs.glob("pretrain/*/metrics.csv"),
                                         *runs.glob("pretrain/*/checkpoints/latest"), *runs.glob("eval/*/*/results.json")]}
    assert len(made) == 6, sorted(made)
    params = {"inputs": json.dumps([str(fresh_repo["sample"])]), "steps": 3, "vocab_size": 8000,
              "input_sentence_size": 20000, "eval_limit": 8, "workers": 1}
    run, out, worker, worker_out = run_deployment("pipeline/sample", params, env, api, cwd=repo,
                                                  worker_cwd=repo.parent, timeout=400)
    assert run.returncode == 0 and "Completed" in out, f"{out[-3000:]}\n--- worker ---\n{worker_out[-5000:]}"
    assert (runs / "corpus" / "LATEST").read_text() == latest
    assert {p: p.read_bytes() for p in made} == made

    # 3. `pangu eval --checkpoint EXPORT`: no tokenizer, domain or data flag (a subset of each task, for time)
    evaluated = _run([*pangu, "eval", "--checkpoint", str(export), "--limit", "16"], repo, env, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((export.parent / "eval" / "builtin" / "results.json").read_text())
    scored = {name for name, task in results["tasks"].items() if task["status"] == "ok"}
    assert {"thucnews_title", "review_sentiment", "idiom_cloze"} <= scored
    assert results["meta"]["domain"]["chosen_by"] == "most training tokens"

    # 4. the server holds the pipeline run and a picture
    flows = {f["id"]: f["name"] for f in _post(f"{api}/flows/filter", {})}
    runs = _post(f"{api}/flow_runs/filter", {})
    assert {"pipeline", "pretrain", "evaluate"} <= {flows[r["flow_id"]] for r in runs}
    artifacts = _post(f"{api}/artifacts/filter", {"limit": 200})
    assert any(a["type"] == "markdown" and "](data:image/png;base64," in (a["data"] or "") for a in artifacts)

