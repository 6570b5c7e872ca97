if not MODEL_STAGED:

    rule stage_model:
        output:
            MODEL_READY,
        log:
            f"{OUTDIR}/logs/stage_model.log",
        benchmark:
            f"{OUTDIR}/benchmarks/stage_model/all.tsv"
        conda:
            "../../envs/helixflow.yaml"
        container:
            container_of("stage_model")
        threads: threads_of("stage_model")
        resources:
            **resources_of("stage_model"),
        params:
            model=MODEL_ARGS,
        shell:
            "helixflow model stage {params.model} > {log} 2>&1"
