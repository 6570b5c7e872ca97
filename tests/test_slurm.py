"""The workflow on a real single-node SLURM cluster (ci/slurm-up.sh): one job per step and chunk.

The cluster is started for this module and stopped at its end. One workflow, three runs:

1. ``--until tokenize`` with workflow/profiles/slurm;
2. one tokenized chunk damaged, the whole workflow: that chunk's embed job fails twice (the
   retry asks for twice the memory), the run fails and shows the job's log, the other
   chunks are embedded;
3. the damaged file removed: only that chunk and what depends on it is planned and run, with
   workflow/profiles/slurm-gpu (the embed job goes to the "gpu" partition).

Every job the runs submitted is then looked up in the scheduler's records, and what it asked
for (CPUs, memory, time limit, GPUs) must be what the model profile gives its rule.

The model profile is the tiny one with other numbers: one thread per job (so that two jobs
share the two CPUs of a small test machine), memory and run times that differ per step kind,
and one GPU of model "testgpu" for embed (the test node offers two pretend ones).
"""

from __future__ import annotations

import os
import re
import subprocess

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import PROJECT_DIR, pushed_groups, require_service
from helixflow.demo_data import make_demo_dataset
from helixflow.embedding import embed_tokens, load_encoder
from helixflow.model_files import ModelFiles
from helixflow.profiles import DEFAULT_PROFILES_DIR, load_profile, step_resources
from helixflow.tokenization import open_tokens, tokenize_chunk

CELLS, CHUNK_SIZE = 600, 200
CHUNKS = [f"chunk-{index:05d}" for index in range(CELLS // CHUNK_SIZE)]
BAD_CHUNK = "chunk-00001"
GPU_RULES = {"embed", "finetune", "evaluate"}  # the GPU partition's, with workflow/profiles/slurm-gpu
WHOLE_DATASET_RULES = {"validate_input", "gather", "label_split", "finetune", "evaluate"}  # read every cell
# A hung run is killed (the executor ignores SIGTERM while it polls). Safety only: far above the
# slowest run seen, which a CI run on a loaded 2-core machine took to 600 s at 7 of 9 steps.
RUN_LIMIT_S = 2400

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """A running single-node cluster; its state folder (logs, jobcomp.txt) is returned."""
    require_service("sbatch", "the SLURM tests submit jobs (ci/slurm-up.sh --install installs SLURM)")
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the SLURM tests start slurmctld and slurmd and need root")
        pytest.skip("the SLURM tests start slurmctld and slurmd and need root")
    state = tmp_path_factory.mktemp("slurm")
    request.addfinalizer(lambda: subprocess.run(["bash", PROJECT_DIR / "ci" / "slurm-down.sh", state]))
    up = subprocess.run(["bash", PROJECT_DIR / "ci" / "slurm-up.sh", state], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"ci/slurm-up.sh failed:\n{up.stderr[-3000:]}")
    return state


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Input data, the test model profile and the run's folders, away from .test/results."""
    root = tmp_path_factory.mktemp("slurm-run")
    make_demo_dataset(root / "test.h5ad", CELLS, seed=3)
    profile = yaml.safe_load((DEFAULT_PROFILES_DIR / "tiny.yaml").read_text())
    profile.update(
        threads=1,
        gpu={"count": 1, "model": "testgpu"},
        memory_mb={"light": 1100, "embed": 1700, "finetune": 4000},
        # Time limits far above a job's run time on a loaded machine, and different per step kind, so
        # that each request is checked.
        runtime_min_per_10k_cells={"light": 600, "embed": 900, "finetune": 1500},
    )
    (root / "profiles").mkdir()
    (root / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(profile))
    return root


def config_args(work) -> list[str]:
    return ["--configfile", ".test/config/config.yaml", "--config", f"input={work / 'test.h5ad'}",
            f"outdir={work / 'out'}", f"models_dir={work / 'models'}", f"profiles_dir={work / 'profiles'}",
            f"chunk_size={CHUNK_SIZE}"]


def snakemake(work, profile: str, *extra: str, pushgateway: str | None = None) -> subprocess.CompletedProcess:
    command = ["timeout", "-s", "KILL", str(RUN_LIMIT_S), "snakemake",
               "--workflow-profile", f"workflow/profiles/{profile}",
               # the profile waits 10 s before the first status check; the test's jobs are short
               "--slurm-init-seconds-before-status-checks", "2",
               "--slurm-logdir", str(work / "slurm_logs"), *config_args(work), *extra]
    # The Pushgateway only as an environment variable: it has to reach the jobs through sbatch.
    env = {**os.environ, "HELIXFLOW_PUSHGATEWAY": pushgateway} if pushgateway else None
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, env=env)
    if result.returncode == 137:
        subprocess.run(["snakemake", "--unlock", *config_args(work)], cwd=PROJECT_DIR, capture_output=True)
        pytest.fail(f"snakemake ran longer than {RUN_LIMIT_S} s:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def submitted(result: subprocess.CompletedProcess) -> list[str]:
    """SLURM job ids of the jobs a run submitted, in submission order."""
    return re.findall(r"submitted with SLURM jobid (\d+)", result.stdout + result.stderr)


def scheduler_record(job_id: str) -> dict[str, str]:
    """slurmctld's record of a job (kept MinJobAge=300 s after it ends)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def records(result: subprocess.CompletedProcess) -> list[dict[str, str]]:
    found = [scheduler_record(job_id) for job_id in submitted(result)]
    assert found, f"no job was submitted:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return found


def rule_and_chunk(record: dict[str, str]) -> tuple[str, str | None]:
    """The plugin's job comment is rule_<rule> or rule_<rule>_wildcards_<chunk>."""
    rule, _, chunk = record["Comment"].removeprefix("rule_").partition("_wildcards_")
    return rule, chunk or None


@pytest.fixture(scope="module")
def runs(cluster, work, pushgateway):
    """The three runs, with the scheduler's records of their jobs taken right after each."""
    done = {}
    first = snakemake(work, "slurm", "--until", "tokenize", pushgateway=pushgateway)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done["first"] = (first, records(first))

    (work / "out" / "tokens" / f"{BAD_CHUNK}.arrow").write_bytes(b"not arrow")  # the injected bad chunk
    failed = snakemake(work, "slurm")
    done["failed"] = (failed, records(failed))

    (work / "out" / "tokens" / f"{BAD_CHUNK}.arrow").unlink()  # the fix
    plan = snakemake(work, "slurm-gpu", "--dry-run", "--quiet", "rules")
    done["plan"] = {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", plan.stdout, re.M)
                    if rule not in ("total", "job")}
    rerun = snakemake(work, "slurm-gpu")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    done["rerun"] = (rerun, records(rerun))
    return done


def expected_request(profile: dict, rule: str, attempt: int = 1) -> dict[str, str]:
    """What a job of `rule` asks SLURM for, as workflow/rules/*.smk derive it from the profile."""
    chunk = step_resources(profile, rule, CHUNK_SIZE)
    whole = step_resources(profile, rule, CELLS)
    runtime = (whole["runtime"] if rule in WHOLE_DATASET_RULES else chunk["runtime"]) * attempt
    threads = 1 if rule in ("pipeline_info", "software_versions") else chunk["threads"]
    request = {"NumCPUs": str(threads), "MinMemoryNode": f"{chunk['mem_mb'] * attempt}M",
               "TimeLimit": f"{runtime // 60:02d}:{runtime % 60:02d}:00"}
    if "gpu" in chunk:
        request["TresPerJob"] = f"gres:gpu:{chunk['gpu_model']}:{chunk['gpu']}"
    return request


def test_every_job_asked_for_what_the_profile_gives(runs, work, cluster):
    profile = load_profile("tiny", work / "profiles")
    jobcomp = (cluster / "log" / "jobcomp.txt").read_text()
    ran = []
    for run in ("first", "failed", "rerun"):
        attempts: dict[tuple[str, str | None], int] = {}  # a job's attempt within its run
        for record in runs[run][1]:
            rule, chunk = rule_and_chunk(record)
            attempts[rule, chunk] = attempts.get((rule, chunk), 0) + 1
            asked = {key: record.get(key) for key in expected_request(profile, rule)}
            assert asked == expected_request(profile, rule, attempts[rule, chunk]), (run, rule, chunk, record)
            gpu_partition = run == "rerun" and rule in GPU_RULES
            assert record["Partition"] == ("gpu" if gpu_partition else "main"), (run, rule, record)
            assert re.search(rf"^JobId={record['JobId']} .*JobState={record['JobState']} ", jobcomp, re.M)
            ran.append((rule, chunk, record["JobState"]))

    rules = {rule for rule, _, _ in ran}
    assert rules == {"stage_model", "validate_input", "split", "tokenize", "embed", "gather",
                     "plot_embeddings", "label_split", "finetune", "evaluate", "pipeline_info", "software_versions"}
    assert {chunk for rule, chunk, _ in ran if rule == "split"} == set(CHUNKS)
    failed = [(rule, chunk, state) for rule, chunk, state in ran if state != "COMPLETED"]
    # The jobs that read the bad chunk, each with its retry (twice the memory, checked above).
    assert sorted(failed) == sorted([("embed", BAD_CHUNK, "FAILED")] * 2 + [("label_split", None, "FAILED")] * 2)


def test_failed_chunk_fails_the_run_with_its_log_and_is_redone_alone(runs, work):
    failed = runs["failed"][0]
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert f"{BAD_CHUNK}.arrow: not a readable tokenized chunk" in output  # the job's own log, printed
    assert f"slurm_logs/rule_embed/{BAD_CHUNK}/" in output  # and where SLURM's log of the job is
    embedded = {rule_and_chunk(record) for record in runs["failed"][1] if record["JobState"] == "COMPLETED"}
    assert embedded == {("embed", chunk) for chunk in CHUNKS if chunk != BAD_CHUNK}

    # The chunk's tokens are redone, and so is everything that reads them: its embedding and,
    # through the label split, fine-tuning and evaluation.
    assert runs["plan"] == {"tokenize": 1, "embed": 1, "gather": 1, "plot_embeddings": 1, "label_split": 1,
                            "finetune": 1, "evaluate": 1, "pipeline_info": 1, "software_versions": 1, "all": 1}
    redone = [rule_and_chunk(record) for record in runs["rerun"][1]]
    assert sorted(redone) == sorted([("tokenize", BAD_CHUNK), ("embed", BAD_CHUNK), ("gather", None),
                                     ("plot_embeddings", None), ("label_split", None), ("finetune", None),
                                     ("evaluate", None), ("pipeline_info", None), ("software_versions", None)])


def test_embeddings_equal_a_direct_computation(runs, work, tmp_path):
    out = work / "out"
    embeddings = ad.read_h5ad(out / "embeddings" / "embeddings.h5ad")
    pd.testing.assert_frame_equal(embeddings.obs, ad.read_h5ad(work / "test.h5ad").obs)
    files = ModelFiles(work / "models" / "tiny", "gf-6L-10M-i2048")
    tokenize_chunk(work / "test.h5ad", files, tmp_path / "all.arrow")
    table = open_tokens(tmp_path / "all.arrow")
    direct = embed_tokens(load_encoder(files, torch.device("cpu")), table.column("input_ids").combine_chunks(),
                          table.column("length").to_numpy(), batch_size=32, special_tokens=False,
                          device=torch.device("cpu"))
    np.testing.assert_allclose(embeddings.obsm["X_geneformer"], direct, atol=1e-5)
    trace = pd.read_csv(out / "pipeline_info" / "execution_trace.tsv", sep="\t")
    assert (trace["process"] == "embed").sum() == len(CHUNKS)


def test_jobs_on_the_cluster_push_their_step_metrics(runs, pushgateway):
    """The first run's SLURM jobs pushed their figures: HELIXFLOW_PUSHGATEWAY travelled through sbatch."""
    tokenized = {group["labels"]["chunk"]: group["values"] for group in pushed_groups(pushgateway)
                 if group["labels"].get("run") == "out" and group["labels"].get("step") == "tokenize"}
    assert set(tokenized) == set(CHUNKS)
    for values in tokenized.values():
        assert values["helixflow_step_success"] == 1 and values["helixflow_step_cells"] == CHUNK_SIZE
    workflow = [group for group in pushed_groups(pushgateway)
                if group["labels"] == {"job": "helixflow_workflow", "run": "out"}]
    assert len(workflow) == 1  # the invocations' onsuccess/onerror pushes (the last one replaced the others)
