"""The workflow's steps, each declared once: what it is sized by, its resource kind, GPU use, stage.

Every place that treats steps differently reads this table: the rules' resources, containers
and SLURM partitions (workflow/rules/common.smk), ``helixflow.profiles.step_resources``,
``helixflow profile show``, the front door's ``--until`` and the Airflow DAG's stages and
limits. Standard library only: the Airflow image imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One workflow step (one Snakemake rule).

    Parameters
    ----------
    name
        The rule's name.
    sized_by
        ``dataset``: the step reads the whole dataset, so its runtime (and, where the profile
        says so, its memory) follows the dataset's cells; ``chunk``: sized for one chunk.
    kind
        ``light``, ``embed`` or ``finetune``: which of the profile's ``memory_mb`` and
        ``runtime_min_per_10k_cells`` entries it gets; model steps also get all the profile's threads.
    gpu
        Runs on the GPU (GPU image, ``--gpus``, GPU partition) when the profile has GPUs.
    stage
        The user-facing stage (``helixflow run --until``, an Airflow task) it belongs to.
    """

    name: str
    sized_by: str
    kind: str
    gpu: bool
    stage: str


# In workflow order: a stage ends with its last step here.
STEPS = {step.name: step for step in (
    Step("stage_model", sized_by="chunk", kind="light", gpu=False, stage="stage"),
    Step("validate_input", sized_by="dataset", kind="light", gpu=False, stage="validate"),
    Step("split", sized_by="chunk", kind="light", gpu=False, stage="split"),
    Step("tokenize", sized_by="chunk", kind="light", gpu=False, stage="tokenize"),
    Step("embed", sized_by="chunk", kind="embed", gpu=True, stage="embed"),
    Step("gather", sized_by="dataset", kind="light", gpu=False, stage="embed"),
    Step("label_split", sized_by="dataset", kind="light", gpu=False, stage="label_split"),
    Step("finetune", sized_by="dataset", kind="finetune", gpu=True, stage="finetune"),
    Step("evaluate", sized_by="dataset", kind="embed", gpu=True, stage="evaluate"),
    Step("annotate", sized_by="dataset", kind="embed", gpu=True, stage="annotate"),
    Step("plot_embeddings", sized_by="chunk", kind="light", gpu=False, stage="report"),
    Step("pipeline_info", sized_by="chunk", kind="light", gpu=False, stage="report"),
    Step("software_versions", sized_by="chunk", kind="light", gpu=False, stage="report"),
)}
# The stage that runs the whole workflow: ``--until report`` is a run without --until.
FINAL_STAGE = "report"


def stages() -> list[str]:
    """The stages in workflow order."""
    return list(dict.fromkeys(step.stage for step in STEPS.values()))


def stage_steps(stage: str) -> list[Step]:
    """The steps of ``stage``, in workflow order."""
    return [step for step in STEPS.values() if step.stage == stage]


def until_rules() -> dict[str, str]:
    """Each stage but the final one, with the rule it ends with (snakemake ``--until``)."""
    return {stage: stage_steps(stage)[-1].name for stage in stages() if stage != FINAL_STAGE}
