# Fine-tuning a cell classifier: label_split -> finetune -> evaluate (-> annotate).
# The config's server, else MLflow's own MLFLOW_TRACKING_URI (e.g. set by the Airflow DAG), else files.
MLFLOW_URI = (
    config["finetune"]["mlflow_tracking_uri"]
    or os.environ.get("MLFLOW_TRACKING_URI")
    or f"{OUTDIR}/mlruns"
)
INFERENCE_ARGS = (
    f"--batch-size {PROFILE['embed']['batch_size']} --device {PROFILE['device']}"
    f" --precision {PROFILE['precision']}"
)


rule label_split:
    input:
        chunks=expand(f"{OUTDIR}/chunks/{{chunk}}.h5ad", chunk=CHUNKS),
        tokens=expand(f"{OUTDIR}/tokens/{{chunk}}.arrow", chunk=CHUNKS),
    output:
        f"{OUTDIR}/finetune/label_split.tsv",
    log:
        f"{OUTDIR}/logs/label_split.log",
    benchmark:
        f"{OUTDIR}/benchmarks/label_split/all.tsv"
    conda:
        "../../envs/helixflow.yaml"
    container:
        container_of("label_split")
    threads: threads_of("label_split")
    resources:
        **resources_of("label_split"),
    params:
        provenance=provenance_of("label_split"),
        label=config["label_column"],
        fraction=config["finetune"]["validation_fraction"],
        seed=config["finetune"]["seed"],
    shell:
        "helixflow step label-split {output} --chunks {input.chunks} --tokens {input.tokens}"
        " --label {params.label:q} --validation-fraction {params.fraction} --seed {params.seed} > {log} 2>&1"


# Checkpoints go to a folder that is not an output, so a killed or failed job leaves them
# for the rerun to resume from; the step deletes them once the model is saved.
rule finetune:
    input:
        split=f"{OUTDIR}/finetune/label_split.tsv",
        tokens=expand(f"{OUTDIR}/tokens/{{chunk}}.arrow", chunk=CHUNKS),
        model=MODEL_READY,
    output:
        model=directory(f"{OUTDIR}/finetune/model"),
        log=f"{OUTDIR}/finetune/training_log.tsv",
    log:
        f"{OUTDIR}/logs/finetune.log",
    benchmark:
        f"{OUTDIR}/benchmarks/finetune/all.tsv"
    conda:
        "../../envs/helixflow-torch.yaml"
    container:
        container_of("finetune")
    threads: threads_of("finetune")
    resources:
        **resources_of("finetune"),
    params:
        provenance=provenance_of("finetune"),
        model=MODEL_ARGS,
        checkpoints=f"{OUTDIR}/finetune/checkpoints",
        label=config["label_column"],
        seed=config["finetune"]["seed"],
        mlflow=MLFLOW_URI,
        experiment=config["finetune"]["mlflow_experiment"],
    shell:
        "helixflow step finetune {input.split} {output.model} {output.log} --tokens {input.tokens}"
        " --checkpoints {params.checkpoints} {params.model} --label {params.label:q} --seed {params.seed}"
        " --mlflow-uri {params.mlflow:q} --mlflow-experiment {params.experiment:q} --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        model=f"{OUTDIR}/finetune/model",
        training_log=f"{OUTDIR}/finetune/training_log.tsv",
        split=f"{OUTDIR}/finetune/label_split.tsv",
        tokens=expand(f"{OUTDIR}/tokens/{{chunk}}.arrow", chunk=CHUNKS),
        embeddings=f"{OUTDIR}/embeddings/embeddings.h5ad",
    output:
        metrics=f"{OUTDIR}/evaluate/metrics.json",
        # Named to come first in the report's Fine-tuning category (its items are sorted by name).
        baseline_check=report(
            f"{OUTDIR}/evaluate/baseline_check.html",
            caption="../report/finetune_baseline_check.rst",
            category="Fine-tuning",
        ),
        summary=report(
            f"{OUTDIR}/evaluate/summary.tsv",
            caption="../report/finetune_summary.rst",
            category="Fine-tuning",
        ),
        per_class=report(
            f"{OUTDIR}/evaluate/per_class.tsv",
            caption="../report/finetune_per_class.rst",
            category="Fine-tuning",
        ),
        confusion=report(
            f"{OUTDIR}/evaluate/confusion_matrix.png",
            caption="../report/finetune_confusion.rst",
            category="Fine-tuning",
        ),
        curve=report(
            f"{OUTDIR}/evaluate/training_curve.png",
            caption="../report/finetune_training.rst",
            category="Fine-tuning",
        ),
        predictions=f"{OUTDIR}/evaluate/predictions.tsv",
    log:
        f"{OUTDIR}/logs/evaluate.log",
    benchmark:
        f"{OUTDIR}/benchmarks/evaluate/all.tsv"
    conda:
        "../../envs/helixflow-torch.yaml"
    container:
        container_of("evaluate")
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    params:
        provenance=provenance_of("evaluate"),
        out_dir=lambda wildcards, output: Path(output.metrics).parent,
        inference=INFERENCE_ARGS,
    shell:
        "helixflow step evaluate {input.model} {input.split} {params.out_dir} --tokens {input.tokens}"
        " --embeddings {input.embeddings} --training-log {input.training_log} {params.inference}"
        " --threads {threads} > {log} 2>&1"


if ANNOTATE_INPUT:

    rule annotate:
        input:
            h5ad=ANNOTATE_INPUT,
            model=f"{OUTDIR}/finetune/model",
        output:
            f"{OUTDIR}/annotate/{Path(ANNOTATE_INPUT).stem}.h5ad",
        log:
            f"{OUTDIR}/logs/annotate.log",
        benchmark:
            f"{OUTDIR}/benchmarks/annotate/all.tsv"
        conda:
            "../../envs/helixflow-torch.yaml"
        container:
            container_of("annotate")
        threads: threads_of("annotate")
        resources:
            **resources_of("annotate", inspect_h5ad(ANNOTATE_INPUT).n_cells),
        params:
            provenance=provenance_of("annotate"),
            inference=INFERENCE_ARGS,
            genes=GENE_ARGS,
        shell:
            "helixflow annotate {input.h5ad} --model-dir {input.model} --out {output}"
            " {params.inference} {params.genes} --threads {threads} > {log} 2>&1"
