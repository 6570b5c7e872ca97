rule plot_embeddings:
    input:
        f"{OUTDIR}/embeddings/embeddings.h5ad",
    output:
        plot=report(
            f"{OUTDIR}/report/embedding_map.png",
            caption="../report/embedding_map.rst",
            category="Embeddings",
        ),
        summary=f"{OUTDIR}/report/embedding_summary.json",
    log:
        f"{OUTDIR}/logs/plot_embeddings.log",
    benchmark:
        f"{OUTDIR}/benchmarks/plot_embeddings/all.tsv"
    conda:
        "../../envs/helixflow.yaml"
    container:
        container_of("plot_embeddings")
    threads: threads_of("plot_embeddings")
    resources:
        **resources_of("plot_embeddings"),
    params:
        provenance=provenance_of("plot_embeddings"),
        # Without labels the map is coloured by clusters of the embeddings.
        label=f"--label {config['label_column']!r}" if LABELLED else "",
        max_cells=config["report"]["max_cells_plotted"],
    shell:
        "helixflow step plot {input} {output.plot} {output.summary} {params.label} --max-cells {params.max_cells} > {log} 2>&1"


rule pipeline_info:
    input:
        f"{OUTDIR}/embeddings/embeddings.h5ad",
        f"{OUTDIR}/report/embedding_map.png",
        FINETUNE_TARGETS,
    output:
        trace=report(
            f"{OUTDIR}/pipeline_info/execution_trace.tsv",
            caption="../report/execution_trace.rst",
            category="Resources",
        ),
        plot=report(
            f"{OUTDIR}/report/step_resources.png",
            caption="../report/step_resources.rst",
            category="Resources",
        ),
    log:
        f"{OUTDIR}/logs/pipeline_info.log",
    conda:
        "../../envs/helixflow.yaml"
    container:
        container_of("pipeline_info")
    threads: 1
    resources:
        **resources_of("pipeline_info"),
    params:
        benchmarks=f"{OUTDIR}/benchmarks",
        step_metrics=STEP_METRICS_DIR,
    shell:
        "helixflow step trace {params.benchmarks} {output.trace} {output.plot} --step-metrics {params.step_metrics} > {log} 2>&1"
