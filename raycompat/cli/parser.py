"""The ``raycompat`` argument parser: one subcommand per stage, its help and its options."""

from __future__ import annotations

import argparse
from typing import Callable

from raycompat.cli.chain_commands import cmd_bench_chain, cmd_chain
from raycompat.cli.commands import (
    DEFAULT_DEMO_CONFIG,
    _submit_dispatch,
    _submit_options,
    cmd_backfill_report,
    cmd_bench_quality,
    cmd_bench_suite,
    cmd_demo,
    cmd_eval,
    cmd_extract,
    cmd_fit_compat,
    cmd_init,
    cmd_measure_costs,
    cmd_serve_extractor,
    cmd_train,
    cmd_train_fct,
    cmd_train_old,
    cmd_train_side_info,
    cmd_transform,
    cmd_tune,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raycompat",
        description="Upgrade an embedding model without backfilling the whole gallery: train compatible models "
        "(NIFCL, BCT, L2), forward transformations (FCT/FastFill), and measure what each costs. "
        "Stages run on Ray: a local runtime by default, a cluster with RAY_ADDRESS or ray.address.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable, help_: str, config_required: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if config_required:
            sp.add_argument("--config", required=True, help="pipeline config YAML (see raycompat/configs/)")
        sp.add_argument("--out", help="override output_dir from the config")
        sp.set_defaults(fn=fn)
        return sp

    demo = add("demo", cmd_demo, "Run the whole pipeline end to end (train old, extract, train new, evaluate, "
               "backfill cost section) and write a report.", config_required=False)
    demo.add_argument("--config", default=str(DEFAULT_DEMO_CONFIG),
                      help="pipeline config YAML (default: the bundled Fashion-MNIST demo)")
    add("train-old", cmd_train_old, "Train an old model for the config's protocol and export it as a "
        "TorchScript black box (models/<old.name>/); refused when old.extractor names one.")
    ex = add("extract", cmd_extract, "Extract features with Ray Data into a Parquet feature store "
             "(old model: train and test splits; new model: test split).")
    ex.add_argument("--model", choices=["old", "new"], default="old", help="which model to extract with")
    ex.add_argument("--split", nargs="+", choices=["train", "test"], default=["train", "test"],
                    help="splits to extract (old model only)")
    add("train", cmd_train, "Train the new model with Ray Train (new.method: independent | l2 | bct | nifcl), "
        "using stored old features; exports models/new-<method>/.")
    add("eval", cmd_eval, "Evaluate old/old, new/new, new/old (top-1, top-5, mAP, negative flips) "
        "from the feature stores; writes eval/metrics.json and eval/report.md.")
    add("train-side-info", cmd_train_side_info, "FCT: train the side-information model (no labels) on the old "
        "training images and export it (models/side/); extract it together with the old model.")
    fct = add("train-fct", cmd_train_fct, "FCT: train the transformation h(old, side) -> new with Ray Train on "
              "cached features only; saves models/<variant>/.")
    fct.add_argument("--variant", choices=["fct", "fct+side", "fastfill"], default="fct+side",
                     help="without side-info, with it, or with it plus FastFill's uncertainty head")
    fct.add_argument("--target", help="new model whose features h maps to (default: new-<new.method>)")
    tr = add("transform", cmd_transform, "FCT: transform the stored old (+ side) features of a split with a trained "
             "transformation (Ray Data), writing a new feature store (with sigma for FastFill).")
    tr.add_argument("--transformation", required=True, help="models/<variant> directory written by train-fct")
    tr.add_argument("--split", choices=["train", "test"], default="test")
    mc = add("measure-costs", cmd_measure_costs, "Measure backbone images/s and transformation vectors/s on one "
             "unit of the current Ray cluster (a GPU if any, else a node) and write the cluster and costs "
             "sections of a backfill config.")
    mc.add_argument("--write", required=True, help="YAML file to write")
    mc.add_argument("--backbone", help="extractor spec to time (default: the config's exported new model)")
    mc.add_argument("--transformation", help="trained transformation dir (default: the config's, if trained)")
    mc.add_argument("--read-bandwidth", default="500 MB/s", help="storage read rate per unit (not measured)")
    mc.add_argument("--dollars-per-hour", type=float, default=0.0, help="price of one unit (not measured)")
    bench = sub.add_parser("bench", help="Benchmarks (quality, suite).", description="Benchmarks.")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bq = bench_sub.add_parser("quality", help="Train old (unless old.extractor names a black box) and new models "
                              "for every method of bench.methods (plus FCT and FastFill) and write <name>.json / "
                              "<name>.md.",
                              description="Quality benchmark: every strategy on one protocol, measured the same way.")
    bq.add_argument("--config", required=True, help="pipeline config with a bench section")
    bq.add_argument("--out", help="override output_dir (the working storage) from the config")
    bq.add_argument("--out-dir", required=True, help="where the results go")
    bq.add_argument("--name", default="quality", help="results are <out-dir>/<name>.json, <name>.md, <name>_curves.png")
    bq.set_defaults(fn=cmd_bench_quality)
    bs = bench_sub.add_parser("suite", help="The protocol suite: one NIFCL recipe and every baseline on several "
                              "protocols and seeds (one Ray task per protocol and seed, resumable); writes "
                              "<name>.json / <name>.md.",
                              description="Protocol suite: several protocols x seeds, mean and spread, criteria.")
    bs.add_argument("--config", required=True, help="suite config (see raycompat/configs/suite.yaml)")
    bs.add_argument("--out", help="override output_dir (where finished units are kept) from the config")
    bs.add_argument("--out-dir", required=True, help="where the results go")
    bs.add_argument("--name", default="suite", help="results are <out-dir>/<name>.json, <name>.md")
    bs.add_argument("--notes", help="Markdown file: the reading of the results, the Diagnosis section of <name>.md")
    bs.add_argument("--render-only", action="store_true",
                    help="re-write <name>.md from an existing <name>.json measured with this config (e.g. to "
                         "add --notes); runs nothing")
    bs.set_defaults(fn=cmd_bench_suite)
    bc = bench_sub.add_parser("chain", help="Chains of upgrades x methods (raycompat chain for each, resumable); "
                              "writes <name>.json / <name>.md with AC, AM and the matrices.",
                              description="Chain benchmark: every chain of the config with every method.")
    bc.add_argument("--config", required=True, help="chain benchmark config (see raycompat/configs/bench_chain_*.yaml)")
    bc.add_argument("--out", help="override output_dir (the runs' working storage) from the config")
    bc.add_argument("--out-dir", required=True, help="where the results go")
    bc.add_argument("--name", default="chain", help="results are <out-dir>/<name>.json, <name>.md")
    bc.add_argument("--notes", help="Markdown file: the reading of the results, the Diagnosis section of <name>.md "
                    "(a rerun of a finished benchmark only re-evaluates: seconds)")
    bc.set_defaults(fn=cmd_bench_chain)
    tn = sub.add_parser("tune", help="Ray Tune search over the compatibility-loss weights.",
                        description="Ray Tune search (ASHA) over loss weights; resumes an interrupted search.")
    tn.add_argument("--config", required=True, help="search config YAML (see raycompat/configs/tune_*.yaml)")
    tn.add_argument("--out", help="override the pipeline output_dir")
    tn.set_defaults(fn=cmd_tune)
    add("fit-compat", cmd_fit_compat, "Tune the compatibility weights (fit_compat section) for this old model and "
        "data with Ray Tune on the validation split, then export the winner as the new model (models/new-<method>/).")
    ch = sub.add_parser("chain", help="A chain of upgrades: train every generation against its predecessor's "
                        "exported model (resumable per generation), then the cross-generation matrix, AC/AM and "
                        "negative flips.",
                        description="Train generations 1..T of a chain config (raycompat/configs/chain_*.yaml), each "
                        "on its increment against the previous generation's black box, and evaluate the chain; "
                        "writes <output_dir>/chain/metrics.json and report.md. A rerun skips finished generations.")
    ch.add_argument("--config", required=True, help="chain config YAML (see raycompat/configs/chain_*.yaml)")
    ch.add_argument("--out", help="override output_dir from the config")
    ch.set_defaults(fn=cmd_chain)
    br = sub.add_parser("backfill-report", help="Cost/quality report of every upgrade strategy at your gallery size.",
                        description="Simulate the backfill of each strategy on your cluster from measured "
                        "throughputs and quality curves; writes report.html, report.md, report.json.")
    br.add_argument("--config", required=True, help="backfill config YAML (see raycompat/configs/backfill_example_1e9.yaml)")
    br.add_argument("--out-dir", required=True, help="report folder")
    br.set_defaults(fn=cmd_backfill_report)
    from raycompat.pipeline.jobs import STAGES

    job = sub.add_parser("submit", parents=[_submit_options()],
                         help="Submit a stage as a Ray job to a cluster, follow it, check or stop it.",
                         description="Ray Jobs API wrapper. `raycompat submit train --address URL -- --config C` "
                         "uploads this checkout and runs jobs/train.py --config C on the cluster, streaming its "
                         "logs until it ends.")
    job.add_argument("stage", choices=[*STAGES, "status", "logs", "stop"],
                     help="a stage to submit, or status/logs/stop of --job-id")
    job.add_argument("args", nargs=argparse.REMAINDER,
                     help="the stage's own arguments after `--`, e.g. -- --config C")
    job.set_defaults(fn=_submit_dispatch)
    srv = sub.add_parser("serve-extractor", help="Serve a model as a black-box HTTP extractor.",
                         description="Serve a TorchScript file, model dir or module:callable over HTTP "
                         "(POST .npy uint8 images, get .npy float32 features).")
    srv.add_argument("--model", required=True, help="TorchScript file, model directory or module:callable")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.set_defaults(fn=cmd_serve_extractor)
    ini = sub.add_parser("init", help="Write a commented starting config for your own gallery and old black box.",
                         description="Detect the gallery's kind (imagefolder tree or Parquet), classes and image "
                         "size, probe the black box's feature dim, and write a commented pipeline config "
                         "(method nifcl, no old model trained).")
    ini.add_argument("--gallery", required=True, help="folder with train/ and test/: class folders of images "
                     "(imagefolder) or *.parquet tables (id, image, label)")
    ini.add_argument("--old-extractor", required=True, help="the old model's black box: http:// endpoint, "
                     "TorchScript file or model dir, or module:callable")
    ini.add_argument("--out", default="raycompat.yaml", help="config file to write (default: raycompat.yaml)")
    ini.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    ini.set_defaults(fn=cmd_init)
    return p
