"""The ``cxr-ray`` command line: data, train, study, report, serve."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import data
from .config import ConfigError, TrainConfig
from .errors import CxrError
from .metrics import POLICIES
from .spec import yaml_load


def _parse_set(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml_load(value)  # 3e-4 -> float, true -> bool, adamw -> str
    return out


def _manifest_format(args):
    """How to read a manifest, from --column ROLE=NAME, --positive, --negative and --root."""
    from .manifest import ManifestFormat
    columns = {}
    for pair in args.column or []:
        role, _, name = pair.partition("=")
        if not name:
            raise ConfigError(f"--column expects ROLE=NAME (e.g. label=Target, patient=image), got {pair!r}")
        columns[role.strip()] = name.strip()
    default = ManifestFormat()
    return ManifestFormat(columns, tuple(args.positive or default.positive), tuple(args.negative or default.negative),
                          args.root)


def cmd_data_prepare(args) -> None:
    prepared = data.prepare(args.source, args.path, args.size, args.out, val_fraction=args.val_fraction,
                            test_fraction=args.test_fraction, seed=args.seed, cache_root=args.cache,
                            strict=args.strict, synthetic_images=args.synthetic_images,
                            manifest=_manifest_format(args))
    print(data.format_report(prepared.report))
    print(f"cache  {prepared.cache.dir}\nsplit  {os.path.join(args.out, 'split.csv')}")


def cmd_data_check(args) -> None:
    prepared = data.prepare(args.source, args.path, args.size, None, seed=args.seed, cache_root=args.cache,
                            synthetic_images=args.synthetic_images, manifest=_manifest_format(args),
                            progress=not args.json)
    if args.json:
        print(json.dumps(prepared.report, indent=1))
    else:
        print(data.format_report(prepared.report))


def cmd_data_manifest(args) -> None:
    from . import archives
    info = archives.convert(args.archive, args.path, args.out, uncertain=args.uncertain,
                            views=args.views.split(",") if args.views else None)
    c = info["counts"]
    print(f"{args.out}: {c['images']} images of {c['patients']} patients ({c['negative']} NORMAL, {c['positive']} "
          f"PNEUMONIA) from {args.archive} {info['source']}")
    for note in info["notes"]:
        print(f"note  {note}")
    print(f"sidecar {args.out}.json; use it with: cxr-ray data check --source manifest --path {args.out}")


def cmd_data_synthetic(args) -> None:
    from .synthetic import SyntheticSet, write_site
    drawn = SyntheticSet(args.images, args.seed, args.shift)
    c = write_site(args.folder, drawn, args.size)["counts"]
    table = os.path.join(args.folder, "manifest.csv")
    print(f"{table}: {c['images']} SYNTHETIC images (not medical data) of {c['patients']} patients ({c['negative']} "
          f"NORMAL, {c['positive']} PNEUMONIA), {args.size} px PNG, site {drawn.site}, with sex, age and view columns")
    print(f"use it as an external set: {{name: ..., source: manifest, path: {table}}}")


def cmd_train(args) -> None:
    import threading

    from . import console, runtime, storage, training
    values = {"backbone": args.backbone, "image_size": args.size, "epochs": args.epochs, **_parse_set(args.set)}
    cfg = TrainConfig.from_dict(values, where="--set")
    out = storage.normalize(args.out)
    os.makedirs(out, exist_ok=True)
    prepared = data.prepare(args.source, args.data, args.size, out, seed=args.seed, cache_root=args.cache,
                            synthetic_images=args.synthetic_images, manifest=_manifest_format(args), publish_to=out)
    name = args.name or f"{cfg.backbone}-{cfg.image_size}px"
    run_dir = storage.join(out, name)
    runtime.connect(verbose=args.verbose, log_file=os.path.join(run_dir, "driver.log"))
    ref = runtime.put_data(prepared)
    print(f"training {name}: {cfg.backbone} at {cfg.image_size}px, {cfg.epochs} epochs, {args.workers} worker(s) "
          f"-> {run_dir}", flush=True)
    stop = threading.Event()
    printer = threading.Thread(target=console.follow_history,
                               args=(storage.join(run_dir, "metrics.csv"), stop, name, cfg.epochs))
    printer.start()
    try:
        result = training.fit(cfg, ref, name=name, storage_path=out, workers=args.workers, use_gpu=args.gpus > 0,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus)
    finally:
        stop.set()
        printer.join()
    if result.error:
        raise training.TrainError(f"training {name} failed: {result.error}")
    saved = training.checkpoints(run_dir)
    print(f"last checkpoint: {saved[max(saved)] if saved else None}")
    print(f"metrics: {storage.join(run_dir, 'metrics.csv')}")


def cmd_study_run(args) -> None:
    from . import study
    study.run(args.spec, args.out, args.storage, data_path=args.data_path, report=not args.no_report,
              verbose=args.verbose, mlflow=args.mlflow)


def cmd_study_resume(args) -> None:
    from . import study
    study.resume(args.dir, report=not args.no_report, verbose=args.verbose, mlflow=args.mlflow)


def cmd_study_status(args) -> None:
    from . import status
    print(status.status(args.dir))


def _labelled_set(args, name: str):
    """An external set or site sample from --source/--path/--split (and the synthetic options)."""
    from .spec import External, SpecError
    if args.source != "synthetic" and not args.path:
        raise SpecError(f"{name}: source {args.source} needs the path of its images")
    fmt = _manifest_format(args)
    return External(name, args.source, args.path, args.split, args.synthetic_images, args.synthetic_seed,
                    args.synthetic_shift, fmt.columns, list(fmt.positive), list(fmt.negative), fmt.root,
                    args.prevalence)


def _study_spec(study_dir: str):
    from .study_layout import finished_study, read_spec
    sdir = finished_study(study_dir)
    return sdir, read_spec(sdir)


def cmd_evaluate(args) -> None:
    from . import external, report
    sdir, spec = _study_spec(args.dir)
    name, _, path = args.external.partition("=")
    args.path = path or None
    result = external.evaluate_set(spec, sdir, _labelled_set(args, name))
    print(result["verdict"])
    print(f"report: {report.write(sdir)}")


def cmd_calibrate(args) -> None:
    from . import external, operating
    sdir, spec = _study_spec(args.dir)
    profile = external.calibrate_site(spec, sdir, args.name, _labelled_set(args, args.name), args.policy, args.target,
                                      prevalence=args.prevalence)
    m = profile["model"]
    classes = ", ".join(f"{n} {c}" for c, n in profile["classes"].items())
    print(f"site {args.name}: {profile['images']} images ({classes}); policy {args.policy}"
          f"{f' {args.target}' if args.target else ''}: threshold {m['threshold']:.4f}"
          f"{' on Platt-calibrated probabilities' if m['platt'] else ''}; on this sample sensitivity "
          f"{m['on_sample']['sensitivity']:.3f}, specificity {m['on_sample']['specificity']:.3f}")
    print(operating.line(f"site {args.name}", m["point"]))
    print(f"saved {sdir}/sites/{args.name}.json; serve it with: cxr-ray serve {sdir} --site {args.name}")
    print("Report results at this site on other images than this sample: it chose the threshold.")


def cmd_report(args) -> None:
    from . import report
    print(report.write(args.dir))


def cmd_compare(args) -> None:
    from . import compare
    page, _, said = compare.write(args.dirs, args.out, measure=not args.no_speed)
    for sentence in said:
        print(sentence)
    print(f"comparison: {page}")


def cmd_track(args) -> None:
    from . import tracking
    print(f"MLflow: {tracking.track(args.dir, args.mlflow, args.experiment)}")


def cmd_serve(args) -> None:
    from . import serving
    if args.study_dir and args.study_dir.startswith("models:/"):
        from . import tracking
        if args.checkpoint or args.ensemble or args.site:
            raise tracking.TrackingError(f"{args.study_dir}: a registered version holds the served model alone; "
                                         "--checkpoint, --ensemble and --site need the study directory")
        args.study_dir = tracking.download_model(args.study_dir, args.mlflow)
    serving.serve_blocking(args)


def _data_args(p, path_flag="--path"):
    p.add_argument("--source", choices=data.SOURCES, default="synthetic", help="data source (default: synthetic)")
    p.add_argument(path_flag, dest="path" if path_flag == "--path" else "data",
                   help="manifest table, Kaggle folder or .npz file (not needed for synthetic)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--cache", help="decoded-image cache root (default: $CXR_RAY_CACHE or ~/.cache/cxr-ray)")
    p.add_argument("--synthetic-images", type=int, default=data.SYNTHETIC_DEFAULT_IMAGES)
    _manifest_args(p)


def _manifest_args(p) -> None:
    p.add_argument("--column", action="append", metavar="ROLE=NAME",
                   help="manifest: the column holding a role (path, label, patient, split, site), e.g. "
                        "label='Finding Labels'; patient=image for no patient ids (an image-level split)")
    p.add_argument("--positive", action="append", metavar="VALUE", help="manifest: a label value meaning "
                   "pneumonia (repeatable; default 1 and PNEUMONIA)")
    p.add_argument("--negative", action="append", metavar="VALUE", help="manifest: a label value meaning no "
                   "pneumonia (repeatable; default 0 and NORMAL)")
    p.add_argument("--root", help="manifest: relative image paths start here (default: the table's folder), and no "
                   "path may leave it")


def _prevalence(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a prevalence is a fraction in (0, 1) (got {text})")
    return value


def _labelled_args(p, path: bool) -> None:
    p.add_argument("--source", choices=data.SOURCES, default="kaggle", help="data source (default: kaggle)")
    if path:
        p.add_argument("--path", help="manifest table, folder of NORMAL/PNEUMONIA images, Kaggle layout, or npz")
    p.add_argument("--split", help="only this split of a manifest, Kaggle layout or npz (default: every image)")
    p.add_argument("--synthetic-images", type=int, default=300)
    p.add_argument("--synthetic-seed", type=int, default=1)
    p.add_argument("--synthetic-shift", type=float, default=0.0,
                   help="synthetic source: another exposure and noise level (0: the training site's)")
    p.add_argument("--prevalence", type=_prevalence, help="the site's expected fraction of pneumonia (default: "
                   "the study's); adjusts the calibrated policy's point by Bayes' rule, and the report's PPV/NPV")
    _manifest_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="prepare or check a data source").add_subparsers(dest="data_command",
                                                                                      required=True)
    p = d.add_parser("prepare", help="decode into the cache and write the patient-level split")
    _data_args(p)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", required=True, help="directory for split.csv and data_report.json")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    p.set_defaults(func=cmd_data_prepare)
    p = d.add_parser("check", help="counts, patients, duplicates, corrupt files, leakage")
    _data_args(p)
    p.add_argument("--size", type=int, default=64, help="decode size used to verify every image")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_check)
    p = d.add_parser("manifest", help="write a manifest from an archive's label files (NIH, RSNA, CheXpert, MIMIC, "
                                      "folders)")
    p.add_argument("--from", dest="archive", required=True, choices=("nih", "rsna", "chexpert", "mimic", "folders"),
                   help="the archive whose published label files to read")
    p.add_argument("path", help="the archive's folder (label files and images under it)")
    p.add_argument("-o", "--out", required=True,
                   help="manifest to write (.csv, or .parquet); its sidecar goes to OUT.json")
    p.add_argument("--uncertain", choices=("exclude", "positive", "negative"), default="exclude",
                   help="CheXpert/MIMIC uncertain (-1) Pneumonia labels: left out (default), or read as positive or "
                        "negative")
    p.add_argument("--views", help="keep only these views, comma-separated (e.g. PA,AP)")
    p.set_defaults(func=cmd_data_manifest)
    p = d.add_parser("synthetic", help="write synthetic demo films as PNG files with a manifest (path, label, patient, "
                                       "site, sex, age, view): a site's files without medical data")
    p.add_argument("folder", help="where images/ and manifest.csv go")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=5, help="drawing seed (the study's own data is seed 0)")
    p.add_argument("--shift", type=float, default=1.0, help="another exposure and noise level (0: the training site's)")
    p.add_argument("--size", type=int, default=128, help="side of each PNG in pixels")
    p.set_defaults(func=cmd_data_synthetic)

    p = sub.add_parser("train", help="fine-tune one configuration with Ray Train")
    _data_args(p, "--data")
    p.add_argument("--backbone", default="resnet18", help="any timm model name")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="DDP workers")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--gpus", type=float, default=0, help="GPUs per worker (0 = CPU)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any training setting, e.g. lr=3e-4")
    p.add_argument("--out", default="runs/train")
    p.add_argument("--name", help="run name; re-running the same name resumes it")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs and the workers' output")
    p.set_defaults(func=cmd_train)

    s = sub.add_parser("study", help="run, resume or inspect a study").add_subparsers(dest="study_command",
                                                                                      required=True)
    p = s.add_parser("run", help="run a study spec")
    p.add_argument("spec")
    p.add_argument("--out", help="study directory (default: runs/<name>)")
    p.add_argument("--storage", help="storage root URI (s3://..., gs://..., NFS path); study goes to ROOT/<name>")
    p.add_argument("--data-path", help="replaces data.path of the spec (this machine's copy of the data)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs and the trials' output")
    p.add_argument("--mlflow", metavar="URI", help="log the study to this MLflow tracking server (replaces the "
                   "spec's tracking.mlflow; default $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_study_run)
    p = s.add_parser("resume", help="continue a killed or failed study")
    p.add_argument("dir")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs and the trials' output")
    p.add_argument("--mlflow", metavar="URI", help="log to this MLflow tracking server (default: where the study "
                   "was logged before, else $MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_study_resume)
    p = s.add_parser("status", help="trials per arm and best so far")
    p.add_argument("dir")
    p.set_defaults(func=cmd_study_status)

    p = sub.add_parser("evaluate", help="score a finished study on an external set (nothing retrained)")
    p.add_argument("dir", help="study directory or URI")
    p.add_argument("--external", required=True, metavar="NAME=PATH",
                   help="a name for the set and its manifest, folder of NORMAL/PNEUMONIA images, Kaggle layout or npz")
    _labelled_args(p, path=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit the served model's threshold on a labelled sample of a site")
    p.add_argument("dir", help="study directory or URI")
    p.add_argument("--name", required=True, help="the site profile's name (cxr-ray serve --site NAME)")
    _labelled_args(p, path=True)
    p.add_argument("--policy", choices=POLICIES, default="youden")
    p.add_argument("--target", type=float, help="the sensitivity or specificity to reach (those policies)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("track", help="upload a finished study to MLflow (what is there already is not sent again)")
    p.add_argument("dir", help="study directory or URI")
    p.add_argument("--mlflow", metavar="URI", help="tracking server (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="MLflow experiment for a study new to this server (default "
                   "$MLFLOW_EXPERIMENT_NAME, else cxr-ray)")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("compare", help="compare finished studies: spec differences, metrics side by side, their "
                                       "winners tested on the images they share, cost")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="two or more finished study directories (the first is the "
                                                          "reference the others are tested against)")
    p.add_argument("--out", help="output directory (default compare/<a>-vs-<b>)")
    p.add_argument("--no-speed", action="store_true", help="do not measure inference speed (imports no torch)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="write DIR/report/index.html and report.md")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)

    # Serve options default to None: serving.build()'s defaults apply (README 'Serving' lists them).
    p = sub.add_parser("serve", help="serve a study's best model over HTTP (Ray Serve)")
    p.add_argument("study_dir", metavar="dir", nargs="?",
                   help="study directory or URI, or a registered model: models:/NAME/VERSION")
    p.add_argument("--mlflow", metavar="URI", help="the MLflow server of a models:/ URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--arm", help="serve this arm's best final model instead of the best arm's")
    p.add_argument("--checkpoint", help="serve this checkpoint directory")
    p.add_argument("--ensemble", action="store_true",
                   help="serve the mean probability of the arm's final seeds (its seed ensemble)")
    p.add_argument("--site", help="serve at the threshold (and calibration) of this site profile (cxr-ray calibrate)")
    p.add_argument("--prevalence", type=_prevalence, help="the site's expected fraction of pneumonia: adjusts the "
                   "calibrated policy's point by Bayes' rule (the other policies do not depend on it)")
    p.add_argument("--threshold-policy", metavar="POLICY[:TARGET]",
                   help="choose the threshold on the study's validation split by youden, calibrated, "
                        "sensitivity:TARGET or specificity:TARGET (default: the study's own)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; anything else exposes an unauthenticated API)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", help="replica count, or 'auto' to autoscale up to --max-replicas")
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--max-batch-size", type=int, help="images per forward pass of a replica")
    p.add_argument("--batch-wait-ms", type=float, help="how long a batch waits to fill")
    p.add_argument("--gpus-per-replica", type=float)
    p.add_argument("--max-upload-mb", type=float, help="size limit of one request's body (413 over)")
    p.add_argument("--upload-timeout-s", type=float, help="seconds to receive one request's body (408 after)")
    p.add_argument("--decode-timeout-s", type=float, help="decoder seconds for all images of one request (422 after)")
    p.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                   help="a Host name to serve besides localhost and --host (repeatable)")
    p.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                   help="a web origin allowed to call the API cross-origin, e.g. https://viewer.example "
                        "(repeatable; * for any)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Bad input (data, spec, settings, model names, missing files, study state) exits 2 with one line."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CxrError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
