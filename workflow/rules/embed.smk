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
        config["containers"]["gpu" if PROFILE["gpu"]["count"] else "cpu"]
    threads: resources_of("embed")["threads"]
    resources:
        **{k: v for k, v in resources_of("embed").items() if k != "threads"},
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
        config["containers"]["cpu"]
    threads: resources_of("gather")["threads"]
    resources:
        mem_mb=resources_of("gather")["mem_mb"],
        runtime=resources_of("gather", LAYOUT.n_cells)["runtime"],
    params:
        provenance=provenance_of("gather"),
        profile=PROFILE["name"],
    shell:
        "helixflow step gather {output} {input} --model {params.profile} > {log} 2>&1"
