rule tokenize:
    input:
        chunk=f"{OUTDIR}/chunks/{{chunk}}.h5ad",
        model=MODEL_READY,
    output:
        f"{OUTDIR}/tokens/{{chunk}}.arrow",
    log:
        f"{OUTDIR}/logs/tokenize/{{chunk}}.log",
    benchmark:
        f"{OUTDIR}/benchmarks/tokenize/{{chunk}}.tsv"
    conda:
        "../../envs/helixflow.yaml"
    container:
        container_of("tokenize")
    threads: threads_of("tokenize")
    resources:
        **resources_of("tokenize"),
    params:
        provenance=provenance_of("tokenize"),
        model=MODEL_ARGS,
        genes=GENE_ARGS,
    shell:
        "helixflow step tokenize {input.chunk} {output} {params.model} {params.genes} --threads {threads} --chunk-name {wildcards.chunk} > {log} 2>&1"
