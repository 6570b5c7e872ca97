rule validate_input:
    input:
        h5ad=config["input"],
        model=MODEL_READY,
    output:
        f"{OUTDIR}/qc/input_check.json",
    log:
        f"{OUTDIR}/logs/validate_input.log",
    benchmark:
        f"{OUTDIR}/benchmarks/validate_input/all.tsv"
    # Its failures are the input's problems: a retry (workflow profiles) would only repeat them.
    retries: 0
    conda:
        "../../envs/helixflow.yaml"
    container:
        container_of("validate_input")
    threads: threads_of("validate_input")
    resources:
        **resources_of("validate_input"),
    params:
        provenance=provenance_of("validate_input"),
        model=MODEL_ARGS,
        genes=GENE_ARGS,
        raw=(
            "--require-raw-counts"
            if config["require_raw_counts"]
            else "--allow-any-values"
        ),
        counts=config["counts_source"],
        label=(
            f"--label-column {config['label_column']!r}"
            if config["label_column"]
            else ""
        ),
    shell:
        "helixflow step validate {input.h5ad} {output} {params.model} {params.genes} {params.raw}"
        " --counts-source {params.counts:q} {params.label} > {log} 2>&1"


rule split:
    input:
        h5ad=config["input"],
        check=f"{OUTDIR}/qc/input_check.json",
    output:
        f"{OUTDIR}/chunks/{{chunk}}.h5ad",
    log:
        f"{OUTDIR}/logs/split/{{chunk}}.log",
    benchmark:
        f"{OUTDIR}/benchmarks/split/{{chunk}}.tsv"
    conda:
        "../../envs/helixflow.yaml"
    container:
        container_of("split")
    threads: threads_of("split")
    resources:
        **resources_of("split"),
    params:
        provenance=provenance_of("split"),
        start=lambda wildcards: CHUNK_BOUNDS[wildcards.chunk][0],
        stop=lambda wildcards: CHUNK_BOUNDS[wildcards.chunk][1],
    shell:
        "helixflow step split {input.h5ad} {output} --start {params.start} --stop {params.stop}"
        " --input-check {input.check} --chunk-name {wildcards.chunk} > {log} 2>&1"
