"""The ``leukofed`` command: one subcommand per pipeline stage.

Each subcommand is what one Snakemake rule runs. Heavy libraries (torch, mlflow) are imported only
by the stage that needs them, so ``leukofed --help`` and the data stages start fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leukofed.errors import LeukofedError


def _add_params(parser: argparse.ArgumentParser, dataset: bool = True) -> None:
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    if dataset:
        parser.add_argument("--dataset", help="entry of `datasets` in params (default: the params' `dataset`)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="leukofed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="STAGE")

    acquire = commands.add_parser("acquire", help="get the dataset (folder, zip, URL or synthetic) and list it")
    _add_params(acquire)
    acquire.add_argument("--workdir", type=Path, required=True, help="where manifest.csv and source.json go")

    preprocess = commands.add_parser("preprocess", help="validate, group duplicates, resize and cache as uint8")
    _add_params(preprocess, dataset=False)
    preprocess.add_argument("--workdir", type=Path, required=True, help="the acquire stage's folder")
    preprocess.add_argument("--out-dir", type=Path, required=True, help="cache folder to write")

    split = commands.add_parser("split", help="stratified, duplicate-group-aware train/val/test split")
    _add_params(split, dataset=False)
    split.add_argument("--cache", type=Path, required=True, help="the preprocess stage's cache folder")
    split.add_argument("--out", type=Path, required=True, help="split CSV to write (a .json summary goes beside it)")

    train = commands.add_parser("train", help="centralized baseline: train on the pooled training split")
    _add_params(train)
    train.add_argument("--cache", type=Path, required=True)
    train.add_argument("--split", type=Path, required=True)
    train.add_argument("--out-dir", type=Path, required=True, help="model.pt, history.csv, training.json")

    partition = commands.add_parser("partition", help="non-IID split of the pooled train+val images into N sites")
    _add_params(partition, dataset=False)
    partition.add_argument("--cache", type=Path, required=True, help="the preprocess stage's cache folder")
    partition.add_argument("--split", type=Path, required=True, help="the split stage's CSV (its test part stays global)")
    partition.add_argument("--sites", type=int, required=True, help="number of sites (an entry of partition.sites)")
    partition.add_argument("--out-dir", type=Path, required=True, help="partition.csv, heterogeneity.json and .png")

    federate = commands.add_parser("federate", help="in-process federated training of one entry of federation.runs")
    _add_params(federate)
    federate.add_argument("--run", required=True, help="entry of federation.runs, e.g. fedavg-3")
    federate.add_argument("--cache", type=Path, required=True)
    federate.add_argument("--partition", type=Path, required=True, help="the partition stage's partition.csv")
    federate.add_argument("--out-dir", type=Path, required=True, help="model.pt, final_model.pt, rounds.csv, federation.json")

    privacy = commands.add_parser(
        "privacy", help="privacy-utility sweep: privacy.sweep.run at every privacy.sweep.epsilons, membership audit"
    )
    _add_params(privacy)
    privacy.add_argument("--cache", type=Path, required=True)
    privacy.add_argument("--split", type=Path, required=True, help="split CSV: its test part scores and is the non-members")
    privacy.add_argument("--partition", type=Path, required=True, help="partition.csv of the sweep run's site count")
    privacy.add_argument("--out-dir", type=Path, required=True, help="privacy.json, privacy.csv, figures, eps-<epsilon>/")

    evaluate = commands.add_parser(
        "evaluate", help="metrics of a model on the test split, or on any labelled folder (--data)"
    )
    _add_params(evaluate, dataset=False)
    evaluate.add_argument("--model", type=Path, required=True, help="a leukofed checkpoint (model.pt)")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--cache", type=Path, help="cache folder of the training data (uses --split's test part)")
    source.add_argument("--data", type=Path, help="a folder in the official layout (Original/<Class>/*.jpg)")
    evaluate.add_argument("--split", type=Path, help="split CSV (with --cache)")
    evaluate.add_argument("--out-dir", type=Path, required=True)

    report = commands.add_parser("report", help="summary.json and README.md from every evaluated model")
    _add_params(report, dataset=False)
    report.add_argument("--results", type=Path, required=True, help="results/<dataset>")
    report.add_argument("--out-dir", type=Path, required=True, help="reports/<dataset>")
    report.add_argument("--command", dest="made_by", help="the command recorded as having made the report")
    _add_analysis_commands(commands)
    _add_federation_commands(commands)
    return parser


def _add_analysis_commands(commands) -> None:
    """Subcommands that analyse trained models: calibrate, explain, audit, compare, predict."""
    calibrate = commands.add_parser("calibrate", help="reliability, ECE/MCE, Brier, NLL; temperature scaling on validation data")
    _add_params(calibrate, dataset=False)
    calibrate.add_argument("--model", type=Path, required=True, help="a leukofed checkpoint (model.pt)")
    calibrate.add_argument("--cache", type=Path, required=True)
    calibrate.add_argument("--split", type=Path, required=True, help="split CSV: test part scored, val part fits T")
    calibrate.add_argument("--partition", type=Path,
                           help="federated model: its partition.csv; each site fits T on its own validation part")
    calibrate.add_argument("--out-dir", type=Path, required=True, help="calibration.json, reliability.png, confidence.png")

    explain = commands.add_parser("explain", help="Grad-CAM panels of the test images and the randomisation check")
    _add_params(explain, dataset=False)
    explain.add_argument("--model", type=Path, required=True, help="a leukofed checkpoint (model.pt)")
    explain.add_argument("--cache", type=Path, required=True)
    explain.add_argument("--split", type=Path, required=True)
    explain.add_argument("--out-dir", type=Path, required=True, help="cam.json and the PNG panels")

    audit = commands.add_parser("audit", help="shortcut audit: linear models on border colour and a corner patch")
    _add_params(audit, dataset=False)
    audit.add_argument("--cache", type=Path, required=True)
    audit.add_argument("--split", type=Path, required=True)
    audit.add_argument("--out", type=Path, required=True, help="shortcut.json to write")

    compare = commands.add_parser("compare", help="bootstrap CIs of every model; McNemar centralized vs each federated")
    _add_params(compare, dataset=False)
    compare.add_argument("--results", type=Path, required=True, help="results/<dataset> (reads <model>/eval/)")
    compare.add_argument("--out", type=Path, required=True, help="statistics.json to write")

    predict = commands.add_parser("predict", help="classify image files; optional calibration and Grad-CAM overlays")
    _add_params(predict, dataset=False)
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files (any size; centre-cropped)")
    predict.add_argument("--model", type=Path, required=True, help="a leukofed checkpoint (model.pt)")
    predict.add_argument("--cam", type=Path, metavar="DIR", help="write <image>_gradcam.png overlays here")
    predict.add_argument("--temperature-from", type=Path, metavar="CALIBRATION_JSON",
                         help="calibrate the probabilities with the temperature of a calibration.json")


def _add_federation_commands(commands) -> None:
    """``leukofed federation certs|local``: a real Flower deployment (see README, "Deploy across hospitals")."""
    federation = commands.add_parser("federation", help="Flower deployment: certificates, one-command local trial")
    actions = federation.add_subparsers(dest="action", required=True, metavar="ACTION")
    certs = actions.add_parser("certs", help="a federation's CA, the SuperLink's TLS certificate, one auth key per hospital")
    _add_params(certs, dataset=False)
    certs.add_argument("--out", type=Path, required=True, help="new folder for the certificates and keys")
    certs.add_argument("--host", action="append", required=True,
                       help="DNS name or IP under which hospitals reach the SuperLink (repeatable)")
    certs.add_argument("--nodes", type=int, required=True, help="number of hospitals (SuperNodes)")
    local = actions.add_parser("local", help="SuperLink + N SuperNodes on 127.0.0.1 (TLS, node auth), one run, then stop")
    _add_params(local)
    local.add_argument("--sites", type=int, help="SuperNodes to start (default: the run's site count)")
    local.add_argument("--run", help="entry of federation.runs (default: the first with --sites sites)")
    local.add_argument("--rounds", type=int, help="override the run's rounds (a quick trial)")
    local.add_argument("--cache", type=Path, help="cache folder (default: data/<dataset>/cache; synthetic: built if missing)")
    local.add_argument("--partition", type=Path,
                       help="partition.csv (default: results/<dataset>/partitions/sites-<n>/partition.csv)")
    local.add_argument("--out-dir", type=Path, help="outputs (default: results/<dataset>/flower/<run>)")
    local.add_argument("--workdir", type=Path, help="parent of the trial's work folder (certificates, logs)")
    local.add_argument("--keep-workdir", action="store_true", help="keep the work folder after a successful run")
    local.add_argument("--app", type=Path, help="the Flower app folder (default: the repository's deploy/flower)")
    local.add_argument("--insecure", action="store_true",
                       help="DANGER: no TLS and no node authentication (debugging only; prints a warning)")


def _run(args: argparse.Namespace) -> str:
    from leukofed import stages
    from leukofed.config import load_params

    params = load_params(args.params)
    if args.command == "acquire":
        return stages.acquire(params, args.dataset or params.dataset, args.workdir)
    if args.command == "preprocess":
        return stages.preprocess(params, args.workdir, args.out_dir)
    if args.command == "split":
        return stages.split(params, args.cache, args.out)
    if args.command == "train":
        return stages.train_centralized(params, args.dataset or params.dataset, args.cache, args.split, args.out_dir)
    if args.command == "evaluate":
        if args.cache is not None and args.split is None:
            raise LeukofedError("evaluate: --cache needs --split (the split CSV whose test part is evaluated)")
        return stages.evaluate(params, args.model, args.out_dir, cache_dir=args.cache, split_path=args.split, data_dir=args.data)
    if args.command == "partition":
        return stages.partition(params, args.cache, args.split, args.sites, args.out_dir)
    if args.command == "federate":
        return stages.federate(params, args.dataset or params.dataset, args.run, args.cache, args.partition, args.out_dir)
    if args.command == "report":
        return stages.report(params, args.results, args.out_dir, args.made_by or "leukofed report")
    if args.command == "privacy":
        return stages.privacy(params, args.dataset or params.dataset, args.cache, args.split, args.partition, args.out_dir)
    if args.command == "federation":
        return _run_federation(args, params)
    return _run_analysis(args, params)


def _run_analysis(args: argparse.Namespace, params) -> str:
    from leukofed import stages

    if args.command == "calibrate":
        return stages.calibrate(params, args.model, args.cache, args.split, args.out_dir, partition_path=args.partition)
    if args.command == "explain":
        return stages.explain(params, args.model, args.cache, args.split, args.out_dir)
    if args.command == "audit":
        return stages.audit(params, args.cache, args.split, args.out)
    if args.command == "compare":
        return stages.compare(params, args.results, args.out)
    if args.command == "predict":
        return stages.predict(params, args.images, args.model, cam_dir=args.cam, temperature_path=args.temperature_from)
    raise AssertionError(f"unhandled command {args.command}")


def _run_federation(args: argparse.Namespace, params) -> str:
    if args.action == "certs":
        from leukofed.federation.certs import make_certificates

        made = make_certificates(args.out, args.host, args.nodes, params.federation.flower.cert_validity_days)
        return (f"wrote the CA ({made.ca}), the SuperLink's certificate and key and {len(made.node_keys)} SuperNode key "
                f"pairs (site-<n>.key to hospital n only; register site-<n>.pub) to {made.folder}")
    from leukofed.federation.deploy import local_trial

    return local_trial(params, sites=args.sites, run_name=args.run, dataset=args.dataset, cache=args.cache,
                       partition=args.partition, rounds=args.rounds, out_dir=args.out_dir, workdir=args.workdir,
                       app=args.app, insecure=args.insecure, keep_workdir=args.keep_workdir)


def main(argv: list[str] | None = None) -> int:
    """Run one stage; user errors print one clear message and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        print(_run(args))
    except LeukofedError as error:
        print(f"leukofed {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leukofed {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
