rule embed:
    input:
        tokens=f"{OUTDIR}/tokens/{{chunk}}.arrow",
        chunk=f"{OUTDIR}/chunks/{{chunk}}.h5ad",
        model=MODEL_READY,
    output:
        f"{OUTDIR}/embeddings/chunks/{{chunk}}.h5ad",
    log:
        f"{OUTDIR}/logs/embed/{{chunk}}.log",
    benchmark:
        f"{OUTDIR}/benchmarks/embed/{{chunk}}.tsv"
    conda:
        "../../envs/helixflow-torch.yaml"
    container:
        container_of("embed")
    threads: threads_of("embed")
    resources:
        **resources_of("embed"),
    params:
        provenance=provenance_of("embed"),
        model=MODEL_ARGS,
    shell:
        "helixflow step embed {input.tokens} {input.chunk} {output} {params.model} --threads {threads} --chunk-name {wildcards.chunk} > {log} 2>&1"


rule gather:
    input:
        expand(f"{OUTDIR}/embeddings/chunks/{{chunk}}.h5ad", chunk=CHUNKS),
    output:
        f"{OUTDIR}/embeddings/embeddings.h5ad",
    log:
        f"{OUTDIR}/logs/gather.log",
    benchmark:
        f"{OUTDIR}/benchmarks/gather/all.tsv"
    conda:
        "../../envs/helixflow.yaml"
    container:
        container_of("gather")
    threads: threads_of("gather")
    resources:
        **resources_of("gather"),
    params:
        provenance=provenance_of("gather"),
        profile=PROFILE["name"],
    shell:
        "helixflow step gather {output} {input} --model {params.profile} > {log} 2>&1"
