"""The model and profile commands: ``helixflow info``, ``helixflow model stage``, and
``helixflow profile show`` and ``list``."""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from helixflow.cli.shared import profile_and_files
from helixflow.errors import HelixflowError


def add_info_command(commands: argparse._SubParsersAction) -> None:
    """``helixflow info``: versions, the compute device and a staged model's metadata."""
    info = commands.add_parser("info", help="versions, device and model metadata", description=(
        "Print versions, the compute device and, for a staged model, its metadata as loaded by helical."))
    info.add_argument("--profile", default="tiny", help="model profile; default: tiny")
    info.add_argument("--models-dir", type=Path, default=Path("resources/models"))
    info.add_argument("--profiles-dir", type=Path)
    info.set_defaults(handler=cmd_info)


def add_model_commands(commands: argparse._SubParsersAction) -> None:
    """``helixflow model stage``: put a model's files in place, once."""
    model = commands.add_parser("model", help="stage model files").add_subparsers(metavar="ACTION")
    stage = model.add_parser("stage", help="put a model's files into helical's cache layout", description=(
        "Stage a model under MODELS_DIR/PROFILE in helical's cache layout, once; loading never uses the "
        "network afterwards. The source defaults to the profile's 'source' setting."))
    stage.add_argument("--profile", required=True, help="model profile whose model to stage")
    stage.add_argument("--models-dir", type=Path, default=Path("resources/models"))
    stage.add_argument("--profiles-dir", type=Path)
    source = stage.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="a small random model and synthetic vocabulary (demo, tests)")
    source.add_argument("--architecture", help="random weights with a real architecture, e.g. gf-6L-10M-i2048, or scGPT's real (benchmarks)")
    source.add_argument("--from", dest="from_path", type=Path, help="a folder or archive laid out like geneformer/<version>/, or scGPT's scGPT_CP folder")
    source.add_argument("--download", action="store_true", help="download from --base-url, verifying checksums")
    stage.add_argument("--base-url", help="download location; default: helical's bucket")
    stage.add_argument("--sha256", type=Path, help="JSON manifest {relative path: sha256} for --download")
    stage.add_argument("--seed", type=int, default=0, help="seed of random weights")
    stage.set_defaults(handler=cmd_model_stage)


def add_profile_commands(commands: argparse._SubParsersAction) -> None:
    """``helixflow profile show`` and ``list``: the model resource profiles."""
    profile = commands.add_parser("profile", help="model resource profiles").add_subparsers(metavar="ACTION")
    show = profile.add_parser("show", help="print a profile with defaults and the resources it gives each step")
    show.add_argument("name")
    show.add_argument("--profiles-dir", type=Path)
    show.add_argument("--cells", type=int, default=10_000, help="chunk size the per-chunk steps' resources are computed for")
    show.add_argument("--dataset-cells", type=int, default=1_000_000,
                      help="dataset size the whole-dataset steps' runtime and memory are computed for; default: 1,000,000")
    show.set_defaults(handler=cmd_profile_show)
    listing = profile.add_parser("list", help="list profiles")
    listing.add_argument("--profiles-dir", type=Path)
    listing.set_defaults(handler=cmd_profile_list)


def cmd_info(args) -> int:
    import torch

    def package_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = {"python": platform.python_version()}
    lines.update({name: package_version(name) for name in ("helixflow", "helical", "torch", "transformers", "snakemake", "anndata", "deepspeed")})
    lines["device"] = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    lines["cpu threads"] = str(torch.get_num_threads())
    profile, files = profile_and_files(args)
    lines.update({"profile": profile["name"], "model": f"{profile['model_name']} ({profile['family']})",
                  "precision": profile["precision"],
                  "profile device": profile["device"], "model files": str(files.model_dir)})
    try:
        files.check()
    except HelixflowError as missing:
        lines["model status"] = f"not staged ({missing.problem})"
    else:
        from helixflow.families import load_family

        lines.update(load_family(profile["model_name"]).describe(files, batch_size=profile["embed"]["batch_size"]))
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_model_stage(args) -> int:
    from helixflow.families import load_family

    profile, files = profile_and_files(args)
    source = profile["source"]
    if args.tiny:
        source = "tiny"
    elif args.architecture:
        source = f"architecture:{args.architecture}"
    elif args.from_path:
        source = f"path:{args.from_path}"
    elif args.download:
        source = "download"
    # "staged": files must already be in place (air-gapped sites copy them); the family checks them.
    load_family(profile["model_name"]).stage(files, source, seed=args.seed, sha256_manifest=args.sha256,
                                             base_url=args.base_url)
    print(f"helixflow: staged {profile['family']} model {profile['model_name']} ({source}) in {files.model_dir}")
    return 0


def cmd_profile_show(args) -> int:
    import yaml

    from helixflow.profiles import load_profile, step_resources
    from helixflow.steps import STEPS

    profile = load_profile(args.name, args.profiles_dir)
    shown = dict(profile, snakemake_resources={
        name: step_resources(profile, name, args.dataset_cells if step.sized_by == "dataset" else args.cells)
        for name, step in STEPS.items()})
    print(yaml.safe_dump(shown, sort_keys=False), end="")
    return 0


def cmd_profile_list(args) -> int:
    from helixflow.profiles import list_profiles, load_profile

    for name in list_profiles(args.profiles_dir):
        profile = load_profile(name, args.profiles_dir)
        print(f"{name:<22} {profile['model_name']:<20} {profile['device']:<5} {profile['precision']:<5} {profile['description']}")
    return 0


