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
            config["containers"]["cpu"]
        threads: resources_of("stage_model")["threads"]
        resources:
            mem_mb=resources_of("stage_model")["mem_mb"],
            runtime=resources_of("stage_model")["runtime"],
        params:
            model=MODEL_ARGS,
        shell:
            "helixflow model stage {params.model} > {log} 2>&1"
