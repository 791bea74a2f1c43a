"""The ``medmerge`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]

_DEBUG_ENV = "MEDMERGE_DEBUG"


def main(argv: list[str] | None = None) -> int:
    """Run the ``medmerge`` command; returns its exit status.

    An error a user can act on (a file or folder that is missing, exists, cannot be written or is of the wrong kind;
    a bad value; any of this package's own error types) ends the command with one line on stderr,
    ``medmerge: error: <what, naming the file or item>``, and status 2. ``--debug`` (anywhere before ``--``) or
    ``MEDMERGE_DEBUG=1`` shows the traceback instead; other exceptions (bugs) always do.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get(_DEBUG_ENV, "") not in ("", "0")
    argv = [a for i, a in enumerate(argv) if a != "--debug" or i >= end]
    try:
        return _main(argv)
    except Exception as e:
        from monai_medmerge.errors import user_error

        found = None if debug else user_error(e)
        if found is None:
            raise
        lines = str(found).strip().splitlines() or [type(found).__name__]
        more = f" (and {len(lines) - 1} more lines: run with --debug or {_DEBUG_ENV}=1)" if len(lines) > 1 else ""
        print(f"medmerge: error: {lines[0]}{more}", file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medmerge", description="Merge pretrained networks for a new task (MONAI).")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (also {_DEBUG_ENV}=1), anywhere on the line",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="short end-to-end merge on synthetic images (CPU; README gives its time)")
    q.add_argument("--out", default="medmerge_out/quickstart", help="output folder")
    q.add_argument("--seed", type=_int_at_least(0), default=0)
    q.add_argument("--k", type=_int_at_least(1), default=16, help="labelled target images per class")
    q.add_argument("--no-progress", action="store_true")
    d = sub.add_parser("demo", help="the main job: offline brain-MRI merge, comparison, report and bundle (CPU)")
    d.add_argument("--out", default="medmerge_out/demo", help="output folder")
    # no defaults here: the demo's own (medmerge_bench.demo.DEMO_TASK, DEMO_K) apply when these are not given
    d.add_argument(
        "--task",
        default=None,
        help="the task (default: two brain-region specialists and a target of the regions they split, tested on "
        "another subject, where the recorded benchmark found room for a merge); brain, fashion or a brain variant",
    )
    d.add_argument("--k", type=_int_at_least(1), default=None, help="labelled target examples per class (default 10)")
    d.add_argument("--seed", type=_int_at_least(0), default=0)
    d.add_argument("--no-progress", action="store_true")
    x = sub.add_parser(
        "example",
        help="write a small example workspace for bundles/medmerge_classification or, with --task segmentation, "
        "bundles/medmerge_segmentation (NIfTI images, two sources)",
    )
    x.add_argument("--out", default="medmerge_out/example", help="the workspace folder to write")
    x.add_argument(
        "--task",
        choices=("classification", "segmentation"),
        default="classification",
        help="classification: images with class labels, two ResNets; segmentation: images with label maps, two UNets",
    )
    x.add_argument("--k", type=_int_at_least(1), default=16, help="target training images per class (classification)")
    x.add_argument(
        "--n-train", type=_int_at_least(1), default=12, help="target training image/label pairs (segmentation)"
    )
    x.add_argument("--source-epochs", type=_int_at_least(1), default=3, help="pretraining epochs of each source")
    x.add_argument("--seed", type=_int_at_least(0), default=0)
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    x.add_argument("--no-progress", action="store_true")
    f = sub.add_parser(
        "dicom-datalist",
        help="a MONAI datalist from a folder of DICOM studies and a labels CSV (reports what did not match)",
    )
    f.add_argument("root", help="the folder of DICOM studies (searched recursively)")
    f.add_argument("--labels", required=True, help="CSV with a key column and a label column")
    f.add_argument("--out", required=True, help="the datalist JSON to write (a <stem>_report.json goes beside it)")
    _dicom_selection_args(f)
    f.add_argument("--materialize-dir", default=None, help="folder for series that share a folder with other files")
    f.add_argument("--no-progress", action="store_true")
    w = sub.add_parser(
        "dicomweb-datalist",
        help="a MONAI datalist from a DICOMweb server (QIDO-RS search, WADO-RS retrieval into a cache) and labels",
        description="Search a DICOMweb server for the labelled studies, retrieve the matching series into a local "
        "cache (a rerun fetches only what is missing) and write a MONAI datalist of the cached series folders. "
        f"Credentials come from the environment, never the command line: {_USER_ENV} and {_PASSWORD_ENV} (basic) "
        f"or {_TOKEN_ENV} (bearer token).",
    )
    w.add_argument("url", help="the DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    w.add_argument("--labels", required=True, help="CSV with a key column and a label column")
    w.add_argument("--out", required=True, help="the datalist JSON to write (a <stem>_report.json goes beside it)")
    _dicom_selection_args(w)
    _dicomweb_args(w)
    c = sub.add_parser(
        "dicomweb-classify",
        help="classify studies on a DICOMweb server with an exported bundle (predictions.csv and .json)",
        description="Retrieve one series per study from a DICOMweb server into a local cache and classify it with an "
        "exported bundle; writes predictions.csv and predictions.json (UIDs, class, probabilities) into --out. "
        f"Credentials come from the environment: {_USER_ENV} and {_PASSWORD_ENV}, or {_TOKEN_ENV}.",
    )
    c.add_argument("url", help="the DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    c.add_argument("--bundle", required=True, help="an exported bundle folder (medmerge export)")
    c.add_argument("--out", required=True, help="folder for predictions.csv and predictions.json")
    c.add_argument("--study", nargs="+", default=None, metavar="UID", help="StudyInstanceUIDs to classify")
    c.add_argument(
        "--query",
        nargs="+",
        default=None,
        metavar="KEYWORD=VALUE",
        help="classify the studies this QIDO-RS search finds, e.g. StudyDate=20240101-20240131; "
        "--query all classifies every study on the server",
    )
    c.add_argument("--modality", nargs="+", default=None, help="the modality of the series to classify, e.g. CT")
    c.add_argument("--series-description", default=None, help="the series description must match this regex")
    c.add_argument("--device", default=None, help="torch device for the bundle (default: the bundle's choice)")
    _dicomweb_args(c)
    sub.add_parser("methods", help="list the registered merge methods and their settings (JSON)")
    b = sub.add_parser("benchmark", help="compare MedMerge with transfer baselines on an offline task, over seeds")
    b.add_argument("--task", default="brain", help="brain, fashion, or a brain variant brain_<variant> (docs/data.md)")
    b.add_argument("--k", type=_int_at_least(1), default=50, help="labelled target examples per class")
    b.add_argument("--seeds", type=_int_at_least(1), default=5, help="number of seeds (0, 1, ...)")
    b.add_argument(
        "--first-seed",
        type=_int_at_least(0),
        default=0,
        help="run seeds first-seed, first-seed + 1, ... (add seeds to a recorded run, then join the files with "
        "`python -m medmerge_bench.comparison join`; on the recorded run's kind of CPU and thread count, where "
        "sources pretrained again come out bit for bit the same)",
    )
    b.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all)")
    b.add_argument("--out", default="benchmarks/results", help="output folder")
    b.add_argument("--name", default=None, help="file stem of the results (default <task>_k<k>)")
    b.add_argument(
        "--protocol",
        nargs="+",
        default=["default"],
        metavar="NAME",
        help="named settings of recorded benchmarks (medmerge_bench.transfer.PROTOCOLS), applied in order, e.g. "
        "lpft_distill_ft150 shared_rotation; --quick and --set apply on top",
    )
    b.add_argument("--quick", action="store_true", help="a short profile: fewer epochs (for CI; numbers not kept)")
    b.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="change recipe settings (medmerge_bench.transfer.Recipe), e.g. --set anchor_weight=0.99 coef_lr=0.05; "
        "device=cuda trains and evaluates on a GPU",
    )
    b.add_argument("--no-progress", action="store_true")
    e = sub.add_parser(
        "export",
        help="write a checkpoint as a standard MONAI bundle that runs without monai_medmerge",
        description="Write a checkpoint as a MONAI bundle folder (configs/metadata.json, configs/inference.yaml, "
        "models/model.pt, models/model.ts) that `python -m monai.bundle run` runs with MONAI and torch only.",
    )
    e.add_argument("--checkpoint", required=True, help="the network's weights (.pt, .pth, .ckpt or .safetensors)")
    e.add_argument(
        "--network-def",
        required=True,
        metavar="FILE",
        help="JSON/YAML file: a '_target_' network config, or a bundle config with the id 'network_def'",
    )
    e.add_argument("--network-def-id", default="network_def", help="id of the network in a bundle config")
    e.add_argument("--checkpoint-key", default=None, help="entry of the checkpoint that holds the state dict")
    e.add_argument("--classes", nargs="+", required=True, metavar="NAME", help="class names, in output order")
    e.add_argument(
        "--spatial-size", nargs="+", type=int, required=True, metavar="N", help="network input size, e.g. 96 96 96"
    )
    e.add_argument("--out", required=True, help="the bundle folder to write")
    e.add_argument("--in-channels", type=int, default=1, help="image channels the network reads (default 1)")
    e.add_argument("--modality", default="other", help="CT (window), MR (percentiles) or other (normalisation)")
    e.add_argument(
        "--window",
        nargs=2,
        type=float,
        default=(-1000.0, 1000.0),
        metavar=("LOW", "HIGH"),
        help="CT: intensities (HU) mapped to 0..1, clipped outside (default -1000 1000)",
    )
    e.add_argument(
        "--percentiles",
        nargs=2,
        type=float,
        default=(1.0, 99.0),
        metavar=("LOW", "HIGH"),
        help="MR: each image's own intensity percentiles mapped to 0..1, clipped outside (default 1 99)",
    )
    e.add_argument("--pixdim", nargs="+", type=float, default=None, help="resample to this spacing first")
    e.add_argument(
        "--kind",
        default="nifti",
        choices=["png", "nifti", "dicom", "dicom_series"],
        help="the image kind the network was trained on (its training pipeline is the bundle's preprocessing)",
    )
    e.add_argument("--reader", default=None, help="MONAI image reader of training (default: the kind's reader)")
    e.add_argument("--name", default="medmerge_classification", help="bundle name (metadata)")
    e.add_argument("--description", default="", help="bundle description (metadata and README)")
    e.add_argument("--version", default="0.1.0", help="bundle version")
    e.add_argument("--no-torchscript", action="store_true", help="do not write models/model.ts")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)

    if args.command == "quickstart":
        run_quickstart = _research(parser, "quickstart", "run_quickstart")
        run_quickstart(args.out, seed=args.seed, k=args.k, progress=not args.no_progress)
    elif args.command == "demo":
        run_demo = _research(parser, "demo", "run_demo")
        given = {name: value for name, value in (("task", args.task), ("k", args.k)) if value is not None}
        if "task" in given:
            _check_task(parser, d, args.task)
        run_demo(args.out, seed=args.seed, progress=not args.no_progress, **given)
    elif args.command == "benchmark":
        run_comparison = _research(parser, "comparison", "run_comparison")
        _check_task(parser, b, args.task)
        methods, Recipe = _research(parser, "transfer", "COMPARISON_METHODS"), _research(parser, "transfer", "Recipe")
        unknown = sorted(set(args.methods or ()) - set(methods))
        if unknown:
            b.error(f"argument --methods: unknown {unknown}; choose from {' '.join(methods)}")
        try:
            recipe = Recipe.protocol(*args.protocol, *(["quick"] if args.quick else []))
        except ValueError as e:
            b.error(f"argument --protocol: {e}")
        recipe = _with_settings(recipe, args.set, b)
        run_comparison(
            args.task,
            args.k,
            list(range(args.first_seed, args.first_seed + args.seeds)),
            args.out,
            methods=args.methods,
            recipe=recipe,
            progress=not args.no_progress,
            name=args.name,
        )
    elif args.command == "export":
        return _export(args)
    elif args.command == "example":
        from monai_medmerge.bundle.example import make_example, make_segmentation_example

        try:
            if args.task == "segmentation":
                make, size = make_segmentation_example, {"n_train": args.n_train}
            else:
                make, size = make_example, {"k": args.k}
            info = make(
                args.out,
                **size,
                source_epochs=args.source_epochs,
                seed=args.seed,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        except FileExistsError as e:
            print(f"medmerge example: {e}", file=sys.stderr)
            return 2
        print(json.dumps(info, indent=2))
    elif args.command == "dicom-datalist":
        from monai_medmerge.dicom.folders import datalist_from_folder

        try:
            report = datalist_from_folder(
                args.root,
                args.labels,
                args.out,
                materialize_dir=args.materialize_dir,
                progress=not args.no_progress,
                **_dicom_selection(args),
            )
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            print(f"medmerge dicom-datalist: {e}", file=sys.stderr)
            return 2
        print(json.dumps(_report_summary(report), indent=2))
    elif args.command in ("dicomweb-datalist", "dicomweb-classify"):
        return _dicomweb(args)
    elif args.command == "methods":
        from monai_medmerge.merging import list_methods

        json.dump(list_methods(), sys.stdout, indent=2)
        print()
    return 0


def _dicom_selection_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that pick labelled DICOM series (folders and DICOMweb)."""
    p.add_argument("--key", default="StudyInstanceUID", help="StudyInstanceUID, AccessionNumber or PatientID")
    p.add_argument("--label-column", default="label", help="CSV column of the labels (ints or class names)")
    p.add_argument("--classes", nargs="+", default=None, metavar="NAME", help="class names, in label order")
    p.add_argument("--modality", nargs="+", default=None, help="keep series of these modalities, e.g. CT MR")
    p.add_argument("--series-description", default=None, help="keep series whose description matches this regex")
    p.add_argument("--split", nargs=3, type=float, default=None, metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0, help="seed of the split")


def _dicom_selection(args) -> dict:
    modality = args.modality[0] if args.modality and len(args.modality) == 1 else args.modality
    return {
        "key": args.key,
        "label_column": args.label_column,
        "class_names": args.classes,
        "modality": modality,
        "series_description": args.series_description,
        "split": args.split,
        "seed": args.seed,
    }


_USER_ENV, _PASSWORD_ENV, _TOKEN_ENV = "DICOMWEB_USER", "DICOMWEB_PASSWORD", "DICOMWEB_TOKEN"


def _dicomweb_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, help="cache of retrieved series (default ~/.cache/monai_medmerge/...)")
    p.add_argument("--retries", type=int, default=3, help="retries after a transient failure, with backoff")
    p.add_argument("--timeout", type=float, default=30, help="seconds per request")
    p.add_argument(
        "--max-instance-size",
        type=_size,
        default="512MiB",
        metavar="SIZE",
        help="refuse a larger instance while it downloads, e.g. 512MiB (the default), 2GiB, or none",
    )
    p.add_argument(
        "--max-series-size",
        type=_size,
        default="8GiB",
        metavar="SIZE",
        help="refuse a larger series while it downloads, e.g. 8GiB (the default), 500MB, or none",
    )
    p.add_argument("--no-progress", action="store_true")


def _size(text: str) -> int | None:
    from monai_medmerge.dicom.web import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _dicomweb(args) -> int:
    """``dicomweb-datalist`` and ``dicomweb-classify``; errors (a URL with credentials in it, a refused password, an
    unreachable server, a bad labels file) go to :func:`main`, which prints them as one line."""
    from monai_medmerge.dicom.web import DICOMwebSource

    prog = f"medmerge {args.command}"
    user, password, token = (os.environ.get(v) or None for v in (_USER_ENV, _PASSWORD_ENV, _TOKEN_ENV))
    source = DICOMwebSource(
        args.url,
        username=user,
        password=password,
        token=token,
        retries=args.retries,
        timeout=args.timeout,
        cache_dir=args.cache_dir,
        max_instance_bytes=args.max_instance_size,
        max_series_bytes=args.max_series_size,
    )
    if args.command == "dicomweb-datalist":
        from monai_medmerge.dicom.web import datalist_from_dicomweb

        report = datalist_from_dicomweb(
            source, args.labels, args.out, progress=not args.no_progress, **_dicom_selection(args)
        )
        summary = _report_summary(report)
        summary["fetched_instances"] = report["fetched_instances"]
        summary["skipped_instances"] = len(report["skipped_instances"])
        print(json.dumps(summary, indent=2))
        return 0
    from monai_medmerge.dicom.infer import classify_dicomweb

    if args.study is None and args.query is None:
        print(f"{prog}: give --study UID... or --query KEYWORD=VALUE... (or --query all)", file=sys.stderr)
        return 2
    query = None
    if args.query is not None:
        query = {}
        for item in args.query:
            if item == "all":
                continue
            keyword, sep, value = item.partition("=")
            if not sep or not keyword:
                print(f"{prog}: --query expects KEYWORD=VALUE or all, got {item!r}", file=sys.stderr)
                return 2
            query[keyword] = value
    modality = args.modality[0] if args.modality and len(args.modality) == 1 else args.modality
    result = classify_dicomweb(
        args.bundle,
        source,
        args.out,
        study_uids=args.study,
        query=query,
        modality=modality,
        series_description=args.series_description,
        progress=not args.no_progress,
        device=args.device,
    )
    counts = {
        k: len(result[k])
        for k in ("predictions", "failed", "several_candidate_series", "studies_without_series", "skipped_instances")
    }
    print(json.dumps({"out": str(args.out), "studies": result["studies"], **counts}, indent=2))
    return 1 if result["failed"] else 0


def _report_summary(report: dict) -> dict:
    """The counts of a datalist report (the full report, with UIDs, is written beside the datalist)."""
    keep = ("matched", "written", "sections", "datalist", "report_path", "failed")
    out = {k: report[k] for k in keep if k in report}
    for k in ("labels_without_images", "studies_without_labels", "several_candidate_series"):
        v = report.get(k)
        if v is not None:
            out[k] = v.get("count", len(v)) if isinstance(v, dict) else len(v)
    return out


def _export(args) -> int:
    """``medmerge export``; its errors (a bad checkpoint or network_def, an --out that exists, is a file, holds an
    input or cannot be written) go to :func:`main`, which prints them as one line."""
    from monai_medmerge.bundle import export_from_checkpoint

    out = export_from_checkpoint(
        args.checkpoint,
        args.network_def,
        args.out,
        args.classes,
        args.spatial_size,
        checkpoint_key=args.checkpoint_key,
        network_def_id=args.network_def_id,
        in_channels=args.in_channels,
        name=args.name,
        description=args.description,
        version=args.version,
        torchscript=not args.no_torchscript,
        overwrite=args.overwrite,
        kind=args.kind,
        reader=args.reader,
        modality=args.modality,
        window=args.window,
        percentiles=args.percentiles,
        pixdim=args.pixdim,
    )
    print(f"[medmerge export] bundle written to {out}")
    print(
        f"  run it: python -m monai.bundle run --config_file {out}/configs/inference.yaml --bundle_root {out} "
        "--dataset_dir IMAGES --output_dir OUT"
    )
    return 0


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``; anything else is a one-line usage error naming the valid range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _check_task(parser, sub, task: str) -> None:
    """Exit through ``sub``'s usage error unless ``task`` is one of the research package's benchmark tasks."""
    names = _research(parser, "data.tasks", "benchmark_names")()
    if task not in names:
        sub.error(f"argument --task: invalid choice {task!r} (choose from {', '.join(names)})")


def _research(parser: argparse.ArgumentParser, module: str, name: str):
    """``name`` from the research package ``medmerge_bench.<module>`` (demo, benchmark and quickstart live there;
    the product never imports it otherwise); a usage error that says what to install when it is missing."""
    import importlib

    try:
        return getattr(importlib.import_module(f"medmerge_bench.{module}"), name)
    except ImportError as e:
        parser.error(
            f"this command needs the research package medmerge_bench ({e}); install it from the repository with "
            "pip install -e '.[bench]'"
        )


def _with_settings(recipe, settings: list[str], parser: argparse.ArgumentParser | None = None):
    """``Recipe`` with ``FIELD=VALUE`` changes, each value parsed as the field's current type."""
    import dataclasses

    def bad(message: str):
        if parser is not None:
            parser.error(f"argument --set: {message}")
        raise SystemExit(f"medmerge: --set {message}")

    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    changes = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            bad(f"expects FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        current = fields[name]
        try:
            if isinstance(current, tuple):
                changes[name] = tuple(type(current[0])(v) for v in value.split(","))
            else:
                changes[name] = type(current)(value)
        except ValueError:
            kind = (
                f"comma-separated {type(current[0]).__name__}s"
                if isinstance(current, tuple)
                else type(current).__name__
            )
            bad(f"{name} expects {kind}, got {value!r}")
    try:
        return dataclasses.replace(recipe, **changes)
    except ValueError as e:  # the recipe's own checks of values (e.g. an unknown lineage)
        bad(str(e))


if __name__ == "__main__":
    sys.exit(main())
