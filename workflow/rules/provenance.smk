# pipeline_info/software_versions.yml (nf-core style): the workflow's own versions, those the
# embed jobs ran with, and the model's files.
rule software_versions:
    input:
        embeddings=f"{OUTDIR}/embeddings/embeddings.h5ad",
    output:
        f"{OUTDIR}/pipeline_info/software_versions.yml",
    log:
        f"{OUTDIR}/logs/software_versions.log",
    conda:
        "../../envs/helixflow.yaml"
    container:
        config["containers"]["cpu"]
    threads: 1
    resources:
        mem_mb=resources_of("pipeline_info")["mem_mb"],
        runtime=resources_of("pipeline_info")["runtime"],
    params:
        # This snakemake process's versions: the workflow's, wherever its jobs run.
        workflow=lambda wildcards: step_fingerprint("workflow", MODEL_FILES),
    shell:
        "helixflow step software-versions {output} --embeddings {input.embeddings}"
        " --workflow-versions {params.workflow:q} > {log} 2>&1"
