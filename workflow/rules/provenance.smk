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
        container_of("software_versions")
    threads: 1
    resources:
        **resources_of("software_versions"),
    params:
        # This snakemake process's versions: the workflow's, wherever its jobs run.
        workflow=lambda wildcards: step_fingerprint("workflow", MODEL_FILES),
    shell:
        "helixflow step software-versions {output} --embeddings {input.embeddings}"
        " --workflow-versions {params.workflow:q} > {log} 2>&1"
