"""`guardray validate | run | status | datasets | report | submit | jobs | serve`.

Exit codes: 0 success, 2 invalid input (spec, paths, columns), 1 failure while running. Errors print as one
readable line each (no traceback unless --debug).
"""
from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from guardray import progress
from guardray.errors import InputError, SpecError, StageError, one_line

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _load(args: argparse.Namespace):
    from guardray.jobspec import load_spec

    return load_spec(args.spec, getattr(args, "set", None) or [], getattr(args, "output", None))


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _load(args)
    print(f"{args.spec}: valid job '{spec.name}' -> {spec.output}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from guardray.api import run

    spec = _load(args)
    stages = [s for s in (args.stages or "").split(",") if s] or None
    force = tuple(s for f in args.force or [] for s in f.split(",") if s)
    print(f"log: {args.log_file}", file=sys.stderr, flush=True)
    results = run(spec, stages, force=force)
    print(stage_summary(results, spec.output))
    return EXIT_OK


def stage_summary(results: dict, output: str) -> str:
    """The end-of-job table: rows, wall time and throughput per stage, then where the results are."""
    lines = [f"{'stage':10} {'status':7} {'rows':>7} {'wall s':>8} {'rows/s':>8} {'tokens/s':>9}  directory"]
    for name, r in results.items():
        rows = r.get("rows") or r.get("train_rows") or r.get("test_rows")
        wall = r.get("wall_s")
        rate = f"{rows / wall:.1f}" if rows and wall and r["status"] == "ran" else "-"
        lines.append(f"{name:10} {r['status']:7} {rows or '-':>7} {wall if wall is not None else '-':>8} {rate:>8} "
                     f"{r.get('tokens_per_s') or '-':>9}  {r['dir']}")
    lines.append(f"output: {output}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from guardray.runner import status_lines

    for line in status_lines(_load(args)):
        print(line)
    return EXIT_OK


def cmd_datasets(args: argparse.Namespace) -> int:
    from guardray.datasets.huggingface import PRESETS
    from guardray.datasets.packaged import CORPORA

    print(f"{'type':22} {'label':8} {'rows':>6}  {'offline':8} description")
    for name, corpus in CORPORA.items():
        label = "harmful" if corpus.harmful else "benign"
        rows = corpus.expected or "-"
        print(f"{name:22} {label:8} {rows:>6}  {'yes' if corpus.available() else 'missing':8} {corpus.description}")
    print(f"{'file':22} {'column':8} {'-':>6}  {'yes':8} parquet/jsonl/csv on local disk or gs://")
    for name, preset in PRESETS.items():
        label = "harmful" if preset.get("harmful") else ("column" if "label_column" in preset else "benign")
        print(f"{'huggingface:' + name:22} {label:8} {preset['expected']:>6}  {'no (hub)':8} {preset['repo']}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """Re-render report.md and plots from stored results: a report directory, an output root, or a spec."""
    from guardray.report import rerender
    from guardray.storage import resolve

    target = args.target
    if target.endswith((".yaml", ".yml")):
        from guardray.runner import plan
        from guardray.jobspec import load_spec

        stage = plan(load_spec(target, args.set or []))["report"].location
    else:
        from guardray.cache import latest_stage

        stage = resolve(target)
        if not stage.join("report.json").exists():  # a job output: its finished report stage
            stage = latest_stage(stage, "report") or stage
    if not stage.join("report.json").exists():
        raise InputError(f"{stage.uri}: no report.json (run the job's report stage first)")
    if stage.is_local:  # re-rendered files keep the mode the job wrote its report with (its `file_mode`)
        stage = resolve(stage.uri, os.stat(stage.join("report.json").path).st_mode & 0o777)
    print(rerender(stage))
    print(f"re-rendered {stage.join('report.md').uri}")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from guardray.submit import submit

    return submit(args.spec, args.address, args.set or [], args.output, wait=not args.no_wait)


def cmd_jobs(args: argparse.Namespace) -> int:
    from guardray import submit

    if args.action == "status":
        return submit.job_status(args.address, args.id)
    if args.action == "logs":
        return submit.job_logs(args.address, args.id, args.follow)
    return submit.job_stop(args.address, args.id)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a trained probe in front of its chat model until interrupted, or write a Serve config and return."""
    from guardray.serve.api import ServeSettings
    from guardray.serve.artifact import find_probe

    fields = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    try:
        settings = ServeSettings(artifact=args.target, **fields)
    except ValueError as e:
        raise InputError(one_line(e)) from None
    # a bad path or probe name, or a pickle without --allow-pickle: exit 2 before Ray starts (a pickle's
    # metadata only: the replicas unpickle it, this process never does)
    served = find_probe(settings.artifact, settings.probe, allow_pickle=settings.allow_pickle, unpickle=False)
    # pinned to the probe's own directory: a later run of the job must not change what a replica (a restarted
    # or an added one) serves
    pinned = settings.model_copy(update={"artifact": served.uri, "probe": None})
    from guardray.serve.deploy import check_exposure, model_line

    check_exposure(args.host, pinned, args.insecure_no_auth, key_here=not args.write_config and not args.address,
                   cluster=bool(args.address) and not args.write_config)
    print(model_line(served, pinned), flush=True)  # what the replicas will load, before they load it
    if args.write_config:
        from guardray.serve.deploy import write_serve_config

        write_serve_config(args.write_config, pinned, args.host, args.port)
        print(f"wrote {args.write_config}: `serve deploy {args.write_config}` (artifact {served.uri})")
        return EXIT_OK
    from guardray.serve.deploy import run_server

    return run_server(pinned, args.host, args.port, args.address, served)


def default_log_file(command: str) -> Path:
    """A new private file for this invocation's full log, in a directory of this user's own:
    `$TMPDIR/guardray-logs-<uid>/<command>-<time>-<pid>.log`. A directory of that name that is not this user's,
    or that others can read or write, is refused (a shared /tmp must not let another user place the log)."""
    directory = Path(tempfile.gettempdir()) / f"guardray-logs-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    found = os.lstat(directory)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise InputError(f"{directory}: not a private directory of this user; pass --log-file PATH")
    path = directory / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
    return path


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": cmd_validate,
    "run": cmd_run,
    "status": cmd_status,
    "datasets": cmd_datasets,
    "report": cmd_report,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "serve": cmd_serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardray", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Ray Data's and Tune's own output on the console (always in the log file)")
    parser.add_argument("--log-file", dest="log_file", type=Path, default=None,
                        help="the run's full log (default: a new file under $TMPDIR/guardray-logs)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_spec(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("spec", help="job spec YAML")
        p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override a field, e.g. dataset.subsample.every=20")
        p.add_argument("--output", help="override `output`")
        return p

    with_spec("validate", "check a job spec")
    run = with_spec("run", "run a job's stages")
    run.add_argument("--stages", help="comma-separated stages to run (their inputs run too if missing)")
    run.add_argument("--force", action="append", metavar="STAGE", help="recompute a stage even if cached")
    with_spec("status", "show each stage: done / incomplete / missing")
    sub.add_parser("datasets", help="list the registered dataset sources")
    report = sub.add_parser("report", help="re-render report.md and plots from stored results")
    report.add_argument("target", help="report directory, job output directory, or job spec")
    report.add_argument("--set", action="append", metavar="PATH=VALUE")
    from guardray.submit import default_address

    submit = with_spec("submit", "submit a job to a Ray cluster (Jobs API) and follow its logs")
    submit.add_argument("--address", default=default_address(), help="Jobs API, e.g. http://HEAD:8265")
    submit.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    jobs.add_argument("action", choices=["status", "logs", "stop"])
    jobs.add_argument("id", help="submission id")
    jobs.add_argument("--address", default=default_address())
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    serve = sub.add_parser("serve", help="serve a trained probe in front of its chat model (Ray Serve)")
    serve.add_argument("target", help="job output, probes stage or probe artifact directory (local or gs://)")
    serve.add_argument("--probe", help="probe name in the job's probes stage (default: the headline probe)")
    serve.add_argument("--threshold", type=float, help="decision threshold (default: the artifact's)")
    serve.add_argument("--policy", choices=["block", "flag"], help="over the threshold: refuse, or answer and flag")
    serve.add_argument("--guard", choices=["probe", "both", "model", "none"],
                       help="probe (default), both (and the guard model, shadow), model (guard model alone), none")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--address", help="Ray cluster to deploy on (default: embedded local Ray)")
    serve.add_argument("--device", help="override the model's device (cpu, cuda)")
    serve.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    serve.add_argument("--num-replicas", dest="num_replicas", type=int)
    serve.add_argument("--num-gpus", dest="num_gpus", type=float, help="per replica")
    serve.add_argument("--write-config", dest="write_config", metavar="PATH",
                       help="write a Serve config for `serve deploy` instead of serving")
    serve.add_argument("--allow-pickle", dest="allow_pickle", action="store_true", default=None,
                       help="load a pickled (non-linear) probe: unpickling runs code, only for artifacts you trust")
    serve.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true", default=None,
                       help="let the models run their own code (never taken from the artifact)")
    serve.add_argument("--api-key-env", dest="api_key_env", metavar="NAME",
                       help="require `Authorization: Bearer <key>`, the key read from environment variable NAME")
    serve.add_argument("--insecure-no-auth", dest="insecure_no_auth", action="store_true",
                       help="allow a --host other machines can reach without --api-key-env")
    serve.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, help="largest request body (1 MiB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    log_file = None
    try:
        progress.set_verbose(args.verbose or args.debug)
        if args.command == "run":
            args.log_file = args.log_file or default_log_file(args.command)
            log_file = progress.log_to_file(args.log_file)
        return COMMANDS[args.command](args)
    except SpecError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_INVALID
    except (InputError, StageError) as e:  # one line the user can act on; exit 2 for bad input, 1 for a failure
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID if isinstance(e, InputError) else EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one readable line
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {one_line(e, 500)}", file=sys.stderr)
        return EXIT_FAILED
    finally:  # a second call in the same process (tests, a notebook) starts from the library's defaults
        progress.set_verbose(True)
        if log_file is not None:
            progress.stop_logging_to(log_file)


if __name__ == "__main__":
    sys.exit(main())
