"""The ``wsss`` command line. Imports are lazy so ``wsss --help`` answers at once."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _progress(label: str):
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 0.5:
            last[0] = now
            print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return report


def cmd_demo_data(args: argparse.Namespace) -> int:
    from wsss_platform.datasets.demo import write_demo_dataset

    if args.voc_aug and args.layout != "voc":
        raise ValueError("--voc-aug is a VOC layout (train_aug + SegmentationClassAug); drop it or "
                         "use --layout voc")
    splits = write_demo_dataset(args.out, args.layout, args.num_images, args.seed,
                                progress=_progress(f"writing {args.layout} demo data"), voc_aug=args.voc_aug)
    print(f"wrote {args.num_images} images ({', '.join(f'{k}: {len(v)}' for k, v in splits.items())}) "
          f"in {args.layout} layout to {args.out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from wsss_platform.datasets import DatasetConfig
    from wsss_platform.datasets.check import check_dataset

    cfg = DatasetConfig(uri=args.uri, layout=args.layout, split=args.split, labels_from=args.labels_from,
                        limit=args.limit, masks_dir=args.masks_dir, labels_file=args.labels_file)
    report = check_dataset(cfg)
    print(report.format(max_problems=args.max_problems))
    return 0 if report.ok else 1


def cmd_ui(args: argparse.Namespace) -> int:
    import signal

    from wsss_platform import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:") and not os.path.exists(path := uri.removeprefix("sqlite:///")):
        print(f"error: no MLflow store at {path} (looked there because MLFLOW_TRACKING_URI is not set); run a "
              "job in this folder first (e.g. `wsss label`), cd to the folder you ran it in, or set "
              "MLFLOW_TRACKING_URI", file=sys.stderr)
        return 1
    if not _port_free(args.host, args.port):
        print(f"error: {args.host}:{args.port} is already in use (another `wsss ui`?); pick another port, e.g. "
              f"wsss ui --port {args.port + 1}", file=sys.stderr)
        return 1
    runs = tracking.count_runs()
    print(f"MLflow UI over {uri}: {runs} run{'s' if runs != 1 else ''}" + (" (empty: run a job to fill it)" if not runs else ""),
          flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(tracking.ui_command(args.host, args.port), env=env,
                            stdout=None if args.verbose else subprocess.DEVNULL,
                            stderr=None if args.verbose else subprocess.DEVNULL, start_new_session=True)
    # The server runs its own worker processes: stop the whole group, on Ctrl-C and on SIGTERM alike.
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(proc.pid, signal.SIGTERM))
    try:
        if not _wait_listening(args.host, args.port, proc):
            print(f"error: the MLflow server did not start (exit code {proc.poll()}); rerun with --verbose to see why",
                  file=sys.stderr)
            return 1
        print(f"  open http://{args.host}:{args.port}/#/experiments?{tracking.CLASSIC}   (Ctrl-C stops it)", flush=True)
        proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 90.0) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.3)
    return False


def job_overrides(args: argparse.Namespace, dataset_key: str, extra: dict[str, object] | None = None) -> list[str]:
    """Flags for the common fields become overrides, applied before the key=value ones.

    ``dataset_key`` is where the dataset section lives: ``dataset`` (labeling) or ``label.dataset`` (sweeps).
    """
    flags = {f"{dataset_key}.uri": args.dataset, f"{dataset_key}.layout": args.layout,
             f"{dataset_key}.split": args.split, "output": args.output, "ray_address": args.address, **(extra or {})}
    out = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.overwrite:
        out.append("overwrite=true")
    return out + list(args.overrides)


def label_overrides(args: argparse.Namespace) -> list[str]:
    return job_overrides(args, "dataset")


def cmd_label(args: argparse.Namespace) -> int:
    from wsss_platform.config import load_config
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.job import main_exit_code, run_label

    cfg = load_config(LabelConfig, args.config, label_overrides(args))
    summary = run_label(cfg)
    if summary.run_url:
        print_run_url("wsss label", summary.run_url)
    return main_exit_code(summary, cfg)


def print_run_url(job: str, url: str) -> None:
    from wsss_platform import tracking

    local = not tracking.tracking_uri().startswith(("http://", "https://"))
    print(f"[{job}] MLflow run: {url}" + ("   (start the UI first: wsss ui)" if local else ""))


def add_job_args(p: argparse.ArgumentParser, dataset_key: str, config_help: str, output_help: str,
                 overwrite_help: str, override_example: str) -> None:
    """The flags `label` and `sweep` share (see :func:`job_overrides`)."""
    p.add_argument("--config", help=config_help)
    p.add_argument("--dataset", help=f"dataset root URI ({dataset_key}.uri)")
    p.add_argument("--layout", choices=["voc", "coco"], help=f"{dataset_key}.layout")
    p.add_argument("--split", help=f"{dataset_key}.split")
    p.add_argument("--output", help=output_help)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=f"config overrides, e.g. {override_example}")


def add_label_args(p: argparse.ArgumentParser) -> None:
    add_job_args(p, "dataset", "YAML config (see jobs/configs/); omitted: the embedded defaults", "output URI (output)",
                 "redo images that are already complete", "caa.t=3")


def sweep_overrides(args: argparse.Namespace) -> list[str]:
    from wsss_platform.config import read_yaml

    training = bool(args.config) and read_yaml(args.config).get("train") is not None
    return job_overrides(args, "train.dataset" if training else "label.dataset", {"tune.num_trials": args.num_trials})


def cmd_sweep(args: argparse.Namespace) -> int:
    import signal

    from wsss_platform.sweep.config import load_sweep_config
    from wsss_platform.sweep.job import run_sweep

    cfg, dims = load_sweep_config(args.config, sweep_overrides(args))
    # `ray job stop` and schedulers send SIGTERM; Tune saves its state on SIGUSR1, so a stopped
    # sweep resumes where it was.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGUSR1))
    summary = run_sweep(cfg, dims)
    if summary.parent_run_url:
        print_run_url("wsss sweep", summary.parent_run_url)
    if summary.interrupted:
        return 130
    return 0 if summary.best_yaml else 1


def _flag_overrides(args: argparse.Namespace, **extra: str | None) -> list[str]:
    """The dataset, output and address flags of train/predict (and ``extra``) as overrides, then key=value ones."""
    flags = {"dataset.uri": args.dataset, "dataset.layout": args.layout, "dataset.split": args.split,
             "output": args.output, "ray_address": args.address, **extra}
    overwrite = ["overwrite=true"] if getattr(args, "overwrite", False) else []
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + overwrite + list(args.overrides)


TRAIN_INPUTS = {"pseudo_masks": "segmenter: a `wsss label` output, or none for the ground truth (train.pseudo_masks)",
                "cams": "affinity: a `wsss label` output of the split, whose cams/ it learns from (train.cams)"}
"""``--pseudo-masks`` / ``--cams``: flags for the train keys of the recipes that have them."""


def train_overrides(args: argparse.Namespace) -> list[str]:
    return _flag_overrides(args, **{f"train.{k}": getattr(args, k, None) for k in TRAIN_INPUTS})


def cmd_train(args: argparse.Namespace) -> int:
    from wsss_platform.config import load_config
    from wsss_platform.train.job import run_train
    from wsss_platform.train.recipes import recipe_class

    summary = run_train(load_config(recipe_class(args.recipe).config, args.config, train_overrides(args)))
    if summary.run_url:
        print_run_url("wsss train", summary.run_url)
    return 0


def predict_overrides(args: argparse.Namespace) -> list[str]:
    return _flag_overrides(args, checkpoint=args.checkpoint)


def cmd_predict(args: argparse.Namespace) -> int:
    from wsss_platform.config import load_config
    from wsss_platform.predict.config import PredictConfig
    from wsss_platform.predict.job import exit_code, run_predict

    summary = run_predict(load_config(PredictConfig, args.config, predict_overrides(args)))
    if summary.run_url:
        print_run_url("wsss predict", summary.run_url)
    return exit_code(summary)


def _add_data_args(p: argparse.ArgumentParser, config: str, split: str, output: str, example: str) -> None:
    p.add_argument("--config", help=f"YAML config ({config}); omitted: the embedded defaults")
    p.add_argument("--dataset", help="dataset root URI (dataset.uri)")
    p.add_argument("--layout", choices=["voc", "coco"], help="dataset.layout")
    p.add_argument("--split", help=split)
    p.add_argument("--output", help=output)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=f"config overrides, e.g. {example}")


def add_train_args(p: argparse.ArgumentParser, inputs: tuple[str, ...] = tuple(TRAIN_INPUTS)) -> None:
    _add_data_args(p, "see jobs/configs/*train*.yaml, *toco*.yaml, *affinity*.yaml", "dataset.split to train on",
                   "checkpoints and run state, local or s3:// (output)", "train.iterations=2000")
    for key in inputs:
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, help=TRAIN_INPUTS[key])
    p.add_argument("--overwrite", action="store_true", help="start over in an output that holds a training")


def add_submit_train_args(p: argparse.ArgumentParser) -> None:
    from wsss_platform.train.recipes import recipe_names

    p.add_argument("--recipe", choices=recipe_names(), default="segmenter", help="what to train (`wsss train <recipe>`)")
    add_train_args(p)


def add_predict_args(p: argparse.ArgumentParser) -> None:
    _add_data_args(p, "keys of PredictConfig", "dataset.split", "where masks/ and confidence/ go, local or s3:// (output)",
                   "'scales=[0.75,1,1.25]'")
    p.add_argument("--checkpoint", help="a `wsss train` checkpoint folder, or its output (the latest checkpoint)")


def _add_train_commands(sub) -> None:
    """`wsss train <recipe> …` (one subcommand per training recipe) and `wsss predict`."""
    from wsss_platform.train.recipes import recipe_class, recipe_names

    tr = sub.add_parser("train", help="train a model with Ray Train")
    _describe(tr, "train")
    rsub = tr.add_subparsers(dest="recipe", required=True)
    for name in recipe_names():
        recipe = recipe_class(name)
        p = rsub.add_parser(name, help=recipe.description)
        _describe(p, f"train {name}")
        fields = recipe.config.model_fields["train"].annotation.model_fields
        add_train_args(p, tuple(k for k in TRAIN_INPUTS if k in fields))
        p.set_defaults(func=cmd_train)
    pr = sub.add_parser("predict", help="predict masks for a dataset split with a trained segmenter (Ray Data)")
    _describe(pr, "predict")
    add_predict_args(pr)
    pr.set_defaults(func=cmd_predict)


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    add_job_args(p, "label.dataset", "sweep YAML (see jobs/configs/*sweep*.yaml)", "output URI of the sweep (output)",
                 "start over in an output that holds a sweep", "tune.seed=3")
    p.add_argument("--num-trials", type=int, help="tune.num_trials")


def cmd_submit(args: argparse.Namespace) -> int:
    from wsss_platform import submit

    rest = {"label": label_overrides, "sweep": sweep_overrides, "train": train_overrides,
            "predict": predict_overrides}[args.kind](args)
    submit.refuse_secrets(rest, args.config)
    # jobs/train.py takes the recipe first, as `wsss train <recipe>` does
    lead = [args.recipe] if getattr(args, "recipe", None) else []
    forwarded = lead + (["--config", args.config] if args.config else []) + rest
    job_id = submit.submit(args.kind, [a for a in forwarded if not a.startswith("ray_address=")], args.address,
                           args.submission_id)
    addr = submit.dashboard_address(args.address)
    print(f"submitted {args.kind} job {job_id} to {addr}")
    print(f"  follow it: wsss jobs status {job_id} --address {addr}   |   wsss jobs logs {job_id} --address {addr}")
    if not args.follow:
        return 0
    status = submit.wait(job_id, args.address, follow=True)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from wsss_platform import submit

    c = submit.client(args.address)
    if args.action == "status":
        info = c.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            status = submit.wait(args.job_id, args.address, follow=True)
            return 0 if status == "SUCCEEDED" else 1
        print(c.get_job_logs(args.job_id), end="")
        return 0
    stopped = c.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wsss_platform import cluster

    state_dir = Path(args.state_dir) if args.state_dir else cluster.default_state_dir()
    try:
        if args.action == "up":
            print(cluster.describe(cluster.up(args.workers, args.cpus_per_node, state_dir)))
        elif args.action == "status":
            print(cluster.status(state_dir))
        else:
            c, stopped = cluster.down(state_dir)
            print(f"[wsss cluster] stopped {stopped} process(es) of the cluster at {c.dashboard}; "
                  f"Ray's logs stay in {c.temp_dir}")
    except cluster.ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wsss_platform.demo import run_demo

    return run_demo(args.workdir, num_images=args.num_images, offline=args.offline)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples as written, defaults shown (where a flag has one of its own)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


ABOUT = {
    "demo-data": ("Write synthetic shape scenes with exact ground truth in the real VOC or COCO layout.",
                  ["wsss demo-data --layout voc --out demo-data/voc --num-images 40",
                   "wsss demo-data --layout coco --out s3://bucket/demo-coco"]),
    "check": ("Validate a dataset split: counts, classes, sizes, and every problem with its file.",
              ["wsss data check demo-data/voc --split train", "wsss data check s3://bucket/coco --layout coco --split val2017"]),
    "ui": ("Serve the MLflow UI over the tracking store (./mlflow.db here, or MLFLOW_TRACKING_URI); Ctrl-C stops it.",
           ["wsss ui", "wsss ui --port 5001"]),
    "label": ("CAMs, refined CAMs and pseudo masks for a dataset split with Ray Data, written to --output;\n"
              "one MLflow run per job. Every config key can be overridden as key.sub=value (see jobs/configs/).",
              ["wsss label --config jobs/configs/voc.yaml --dataset s3://bucket/VOC2012 --output s3://bucket/clip-es-voc",
               "wsss label --dataset demo-data/voc --output out model.name=tiny model.pretrained=none 'refine=[caa]'"]),
    "sweep": ("Search prompt and refinement settings (a labeling config under label:) or training settings (a\n"
              "training config under train:) with Ray Tune + Optuna; the best config goes to <output>/best.yaml.\n"
              "Keys of the swept config are under label. or train. (label.caa.t=3, train.train.mu=0.9).",
              ["wsss sweep --config jobs/configs/synthshapes-sweep.yaml", "wsss sweep --config jobs/configs/synthshapes-train-sweep.yaml",
               "wsss sweep --config my-sweep.yaml --dataset s3://bucket/VOC2012 --output s3://bucket/sweeps/voc-1"]),
    "train": ("Train on Ray Train: the segmenter on pseudo masks (a `wsss label` output) with CLIP-ES's\n"
              "confidence-guided loss, ToCo on image-level labels (its CAMs then label with cam_source=toco), or\n"
              "PSA's AffinityNet on a labeling output's CAMs (then refine: [random_walk]).\n"
              "DDP over compute.num_workers, checkpoints in --output, resumed by running it again.",
              ["wsss train segmenter --config jobs/configs/synthshapes-train.yaml",
               "wsss train toco --config jobs/configs/synthshapes-toco.yaml",
               "wsss train affinity --config jobs/configs/synthshapes-affinity.yaml --cams synthshapes-train-cams"]),
    "train segmenter": ("The final segmenter on pseudo masks (--pseudo-masks: a `wsss label` output of the split) with\n"
                        "CLIP-ES's confidence-guided loss (train.mu; 0 = plain cross-entropy), or on the ground truth\n"
                        "(--pseudo-masks none). DDP over compute.num_workers, checkpoints in --output, resumed by running\n"
                        "it again; a finished one is left as it is.",
                        ["wsss train segmenter --config jobs/configs/synthshapes-train.yaml",
                         "wsss train segmenter --dataset s3://bucket/VOC2012 --pseudo-masks s3://bucket/clip-es-voc "
                         "--output s3://bucket/seg-1 train.mu=0.95"]),
    "train toco": ("ToCo (a ViT with patch- and class-token contrast) on the split's image-level labels; its CAMs then\n"
                   "label with `wsss label cam_source=toco model.checkpoint=OUTPUT`. DDP over compute.num_workers,\n"
                   "checkpoints in --output, resumed by running it again; a finished one is left as it is.",
                   ["wsss train toco --config jobs/configs/synthshapes-toco.yaml",
                    "wsss train toco --config jobs/configs/voc-toco.yaml --dataset s3://bucket/VOC2012 --output s3://bucket/toco-1"]),
    "train affinity": ("PSA's AffinityNet on the CAMs of a `wsss label` output of the split (--cams; labelled with\n"
                       "cache: cams or full); it then refines with `wsss label 'refine=[random_walk]'\n"
                       "random_walk.checkpoint=OUTPUT`. Checkpoints in --output, resumed by running it again.",
                       ["wsss train affinity --config jobs/configs/synthshapes-affinity.yaml --cams synthshapes-train-cams"]),
    "predict": ("Masks for a dataset split from a trained segmenter, with Ray Data (one GPU per actor when there are\n"
                "GPUs): masks/ and confidence/ like `wsss label` writes them, scored when the split has ground truth.",
                ["wsss predict --checkpoint seg-output --dataset demo-data/voc --split val --output pred",
                 "wsss predict --checkpoint s3://bucket/seg-1 --dataset s3://bucket/VOC2012 --split val "
                 "--output s3://bucket/pred-1 'scales=[0.5,0.75,1,1.25,1.5,1.75]' flip=true"]),
    "export": ("A labeling or prediction output for people to review: its images scored for doubt (share of pixels\n"
               "below mu, foreground confidence, disagreement with --against), written most doubtful first as\n"
               "review.parquet (and a table on the output's MLflow run), and the --review N first of them in\n"
               "an annotation tool's format: Label Studio tasks + labeling config, a CVAT 'Segmentation mask\n"
               "1.1' zip, or COCO results. Failed images are left out and listed.",
               ["wsss export --from labels --format label-studio --output review --review 50 "
                "--image-url '/data/local-files/?d=voc/{path}'",
                "wsss export --from s3://bucket/labels --format cvat --output s3://bucket/review"]),
    "import": ("The annotators' work back as a pseudo-mask folder: corrected images at full confidence, the rest\n"
               "as --pseudo labelled them; `wsss train segmenter train.pseudo_masks=OUTPUT` reads it. Prints how\n"
               "much people changed (pixel share, IoU of the pseudo masks against the corrections per class).",
               ["wsss import --format label-studio --from project-1-export.json --pseudo labels --output labels-reviewed",
                "wsss import --format cvat --from task.zip --pseudo labels --dataset demo-data/voc --output labels-reviewed"]),
    "submit": ("Submit a job to a running Ray cluster through its Job Submission API.",
               ["wsss submit label --address http://HEAD:8265 --config jobs/configs/voc.yaml --follow"]),
    "cluster": ("A Ray cluster of several nodes on this machine, all on 127.0.0.1 (each node its own `ray start`,\n"
                "with ports of its own): for trying multi-node jobs, `wsss submit` and the metrics before a real\n"
                "cluster (cluster/README.md: KubeRay, the cluster launcher).",
                ["wsss cluster up --workers 2 --cpus-per-node 2", "wsss cluster status", "wsss cluster down"]),
    "jobs": ("Follow or stop a job submitted with `wsss submit`.", ["wsss jobs logs raysubmit_123 --address http://HEAD:8265"]),
    "demo": ("Generate the demo dataset and label it end to end (what `make demo` runs).", ["wsss demo --offline"]),
}


def _describe(parser: argparse.ArgumentParser, name: str) -> None:
    text, examples = ABOUT[name]
    parser.formatter_class = HelpFormatter
    parser.description = text
    parser.epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)


def _version() -> str:
    from wsss_platform.ray_utils import code_version

    v = code_version()
    return f"wsss {v['package']} (commit {v['git_commit'][:12]})"


def _add_handoff_commands(sub) -> None:
    """`wsss export` and `wsss import`: pseudo masks to annotation tools and back."""
    from wsss_platform.handoff.formats import FORMATS, IMPORTABLE

    ex = sub.add_parser("export", help="export pseudo masks for review, most doubtful first (Label Studio, CVAT, COCO)")
    _describe(ex, "export")
    ex.add_argument("--from", dest="source", required=True, help="a `wsss label` or `wsss predict` output")
    ex.add_argument("--format", required=True, choices=sorted(FORMATS))
    ex.add_argument("--output", required=True, help="folder for the export, local or s3://")
    ex.add_argument("--review", type=int, help="export only the N most doubtful images (default: all)")
    ex.add_argument("--order", choices=["doubt", "id"], default="doubt", help="order of the images and review.parquet")
    ex.add_argument("--image-url", default="{uri}",
                    help="each task's image: {uri} the image's URI, {path} its path under the dataset root, {id}")
    ex.add_argument("--against", help="a second output of the same images; their disagreement joins the doubt")
    ex.add_argument("--mu", type=float, help="confidence cut of the doubt (default: the labeling's mask.mu)")
    ex.add_argument("--overwrite", action="store_true", help="replace an export in --output")
    ex.set_defaults(func=cmd_export)
    im = sub.add_parser("import", help="turn annotators' corrections into a pseudo-mask folder for training")
    _describe(im, "import")
    im.add_argument("--format", required=True, choices=IMPORTABLE)
    im.add_argument("--from", dest="source", required=True,
                    help="the tool's export: Label Studio's JSON export, or CVAT's 'Segmentation mask 1.1' zip")
    im.add_argument("--pseudo", required=True, help="the labeling output the export was made from")
    im.add_argument("--dataset", help="dataset root, when it moved since labeling (default: the labeling's)")
    im.add_argument("--output", required=True, help="folder for the corrected pseudo masks, local or s3://")
    im.add_argument("--mu", type=float, help="masks/ cut of the uncorrected images (default: the labeling's mask.mu)")
    im.add_argument("--overwrite", action="store_true", help="replace an import in --output")
    im.set_defaults(func=cmd_import)


def cmd_export(args: argparse.Namespace) -> int:
    from wsss_platform.handoff.job import ExportConfig, run_export

    if args.review is not None and args.review < 1:
        raise ValueError("--review: give a number of images ≥ 1 (omit it to export all)")
    run_export(ExportConfig(args.source, args.format, args.output, args.review, args.order, args.image_url,
                            args.against, args.mu, args.overwrite))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from wsss_platform.handoff.job import ImportConfig, run_import

    run_import(ImportConfig(args.format, args.source, args.pseudo, args.dataset, args.output, args.mu, args.overwrite))
    return 0


def _add_cluster_commands(sub) -> None:
    """`wsss submit …` and `wsss jobs …`: jobs on a running Ray cluster."""
    sb = sub.add_parser("submit", help="submit a job to a Ray cluster (Job Submission API)")
    _describe(sb, "submit")
    sbsub = sb.add_subparsers(dest="kind", required=True)
    for kind, add, text in (("label", add_label_args, "submit `wsss label`"),
                            ("sweep", add_sweep_args, "submit `wsss sweep`"),
                            ("train", add_submit_train_args, "submit `wsss train <recipe>` (--recipe)"),
                            ("predict", add_predict_args, "submit `wsss predict`")):
        sp = sbsub.add_parser(kind, help=text)
        add(sp)
        sp.add_argument("--submission-id", default=None)
        sp.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 1 unless it succeeded")
        sp.set_defaults(func=cmd_submit)

    cl = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine (loopback): up, status, down")
    _describe(cl, "cluster")
    csub = cl.add_subparsers(dest="action", required=True)
    for action, text in (("up", "start a head and N worker nodes, each its own `ray start`"),
                         ("status", "the cluster's nodes and their resources"),
                         ("down", "stop exactly the processes the cluster started")):
        ca = csub.add_parser(action, help=text)
        ca.add_argument("--state-dir", help="where the cluster's state file lives (default: $WSSS_CLUSTER_DIR or "
                        "~/.wsss/cluster)")
        if action == "up":
            ca.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
            ca.add_argument("--cpus-per-node", type=float, default=2, help="CPUs each node offers Ray")
        ca.set_defaults(func=cmd_cluster)

    jb = sub.add_parser("jobs", help="follow jobs submitted with `wsss submit`")
    _describe(jb, "jobs")
    jsub = jb.add_subparsers(dest="action", required=True)
    for action, text in (("status", "print a job's status"), ("logs", "print a job's logs"), ("stop", "stop a job")):
        ja = jsub.add_parser(action, help=text)
        ja.add_argument("job_id")
        ja.add_argument("--address", help="dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
        if action == "logs":
            ja.add_argument("--follow", action="store_true")
        ja.set_defaults(func=cmd_jobs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsss", description="Weakly-supervised semantic segmentation on Ray: label, "
                                "sweep and track pixel masks from image-level tags.", formatter_class=HelpFormatter)
    p.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own output and full tracebacks")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo-data", help="write a synthetic dataset with exact ground truth (VOC or COCO format)")
    d.add_argument("--layout", choices=["voc", "coco"], default="voc", help="dataset format")
    d.add_argument("--out", required=True, help="output URI: a local path or s3://bucket/prefix")
    d.add_argument("--num-images", type=int, default=100, help="scenes to generate (split 80/20 into train/val)")
    d.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same data)")
    d.add_argument("--voc-aug", action="store_true",
                   help="VOC as WSSS papers use it: split train_aug, ground truth in SegmentationClassAug/ (grey PNGs)")
    d.set_defaults(func=cmd_demo_data)
    _describe(d, "demo-data")

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="validate a dataset; exit 1 when problems are found")
    c.add_argument("uri", help="dataset root: a local path or s3://bucket/prefix")
    c.add_argument("--layout", choices=["voc", "coco"], default="voc", help="dataset format")
    c.add_argument("--split", default="train", help="split name (VOC: ImageSets/Segmentation/<split>.txt)")
    c.add_argument("--labels-from", choices=["auto", "xml", "mask"], default="auto",
                   help="VOC image-level labels: Annotations XML, masks, or xml when present")
    c.add_argument("--masks-dir", default="SegmentationClass",
                   help="VOC ground-truth folder (SegmentationClassAug for the train_aug split)")
    c.add_argument("--labels-file", default=None, help="VOC labels of ids without an XML: '<id> <class> ...' lines")
    c.add_argument("--limit", type=int, default=None, help="check only the first N images")
    c.add_argument("--max-problems", type=int, default=50, help="problems to print (all are counted)")
    c.set_defaults(func=cmd_data_check)
    _describe(c, "check")

    u = sub.add_parser("ui", help="open the MLflow UI on the local tracking store")
    u.add_argument("--host", default="127.0.0.1", help="address to serve on")
    u.add_argument("--port", type=int, default=5000, help="port to serve on")
    u.set_defaults(func=cmd_ui)
    _describe(u, "ui")

    lb = sub.add_parser("label", help="compute CAMs and pseudo masks for a dataset split with Ray")
    add_label_args(lb)
    lb.set_defaults(func=cmd_label)
    _describe(lb, "label")

    sw = sub.add_parser("sweep", help="search prompt and refinement settings with Ray Tune + Optuna")
    add_sweep_args(sw)
    sw.set_defaults(func=cmd_sweep)
    _describe(sw, "sweep")

    _add_train_commands(sub)
    _add_handoff_commands(sub)
    _add_cluster_commands(sub)

    dm = sub.add_parser("demo", help="run the end-to-end demo on generated data (what `make demo` runs)")
    dm.add_argument("--workdir", default=".", help="folder for demo-data/, demo-output/ and the MLflow store")
    dm.add_argument("--num-images", type=int, default=40, help="scenes to generate")
    dm.add_argument("--offline", action="store_true", help="do not try to download CLIP weights; use the random tiny model")
    dm.set_defaults(func=cmd_demo)
    _describe(dm, "demo")
    return p


def main(argv: list[str] | None = None) -> int:
    from wsss_platform.config import ConfigError
    from wsss_platform.datasets.base import DatasetError
    from wsss_platform.storage import StorageError

    args = parse(build_parser(), argv)
    from wsss_platform.console import set_verbose

    set_verbose(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # One line a person can act on; the traceback (Ray's run to ~200 lines) only on request.
        if args.verbose:
            raise
        print(f"error: {one_line(e)} (run with --verbose for the traceback)", file=sys.stderr)
        return 1


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, with ``key=value`` overrides accepted anywhere after the subcommand: argparse
    takes a positional list only in one run, so those after a flag come back unparsed and join it here."""
    args, rest = parser.parse_known_args(argv)
    late = [a for a in rest if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        rest = [a for a in rest if a not in late]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def one_line(e: BaseException) -> str:
    """The innermost cause of ``e`` in one line (Ray wraps worker errors in several layers)."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(("Traceback", "  File"))]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]


if __name__ == "__main__":
    sys.exit(main())
