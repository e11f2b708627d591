"""The Python API, what `import guardray` hands on: `run` a job as the CLI does, and `open_run` a finished one.

`guardray run` is a thin layer over `run`. A `Run` is a job's output directory (local or gs://). Each reader finds its stage the way `guardray report` and
`guardray serve` do (`cache.latest_stage`: the directory `latest.json` names when finished, else the newest
finished one) and reads only what it is asked for: `features(column)` projects that one column (and the label
and id) out of the parts, so a notebook can look at one layer of a run whose feature matrix would not fit in
memory.

    run = guardray.open_run("runs/local-smoke")
    X, y, ids = run.features("act_last_L29", split="train")
    probe = run.probe()                       # the headline probe of the first target
    scores = run.scores().to_pandas()         # every probe and guard score per test row
    run.report()["targets"]["harmful"]["probes"][0]["roc_auc"]
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from guardray import runner
from guardray.cache import MARKER, SPEC_FILE, latest_stage
from guardray.columns import ID, SPLIT
from guardray.errors import InputError
from guardray.jobspec import JobSpec, load_spec, validate_job
from guardray.storage import Location, resolve

DATASET_FILE, SCORES_FILE, REPORT_FILE = "dataset.parquet", "scores.parquet", "report.json"
#: the stages of a run, in pipeline order
PIPELINE = ("dataset", "responses", "features", "probes", "report")


@dataclass(frozen=True)
class Run:
    """A job's output directory: its finished stages, read on demand."""

    location: Location

    @property
    def uri(self) -> str:
        return self.location.uri

    def stage(self, name: str) -> Location:
        """The finished `name` stage (dataset, responses, features, probes, report) of one consistent run: the
        newest finished last stage and the directories it was computed from (its `spec.json` inputs), so the
        features, probe and scores a notebook reads belong together even after a partial rerun. One line naming
        the fix when there is none."""
        for last in PIPELINE[::-1]:
            found = latest_stage(self.location, last)
            if found is not None and name in (chain := self._chain(last, found)):
                return chain[name]
        raise InputError(f"{self.uri}: no finished {name} stage ({name}-<hash> with _SUCCESS); run the job "
                         f"with `guardray run` (or guardray.run)")

    def _chain(self, name: str, top: Location) -> dict[str, Location]:
        """{stage: directory} of `top` and every finished stage it read, through the `inputs` of `spec.json`."""
        chain, todo = {name: top}, [top]
        while todo:
            inputs = todo.pop().join(SPEC_FILE).read_json().get("inputs") or {}
            for stage, directory in inputs.items():
                found = self.location.join(posixpath.basename(str(directory)))
                if stage not in chain and found.join(MARKER).exists():
                    chain[stage] = found
                    todo.append(found)
        return chain

    def dataset(self, pandas: bool = False) -> Any:
        """The prompt set (the responses stage's, with the answers, when the job generated them): a pyarrow
        Table, or a pandas DataFrame with `pandas=True`."""
        stage = self._first_of("responses", "dataset")
        table = stage.join(DATASET_FILE).read_table()
        return table.to_pandas() if pandas else table

    def feature_columns(self) -> dict[str, int]:
        """{activation column: width} of the features stage, from a parquet footer (no rows read)."""
        from guardray.columns import feature_infos, feature_schema

        stage = self.stage("features")
        return {name: info.width for name, info in feature_infos(feature_schema(stage), stage.uri).items()}

    def features(self, column: str, split: str | None = None, target: str = "harmful"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X, y, ids): one activation column as a float32 [rows, width] matrix, the `target` label as bool and
        the row ids, of `split` ('train', 'test') or all rows; rows without a known label are left out. Only
        that column, the label's columns and the ids are read."""
        from guardray.columns import read_column

        if column not in (known := self.feature_columns()):
            raise InputError(f"Run.features: {column!r} is not an activation column of {self.stage('features').uri} "
                             f"(columns: {', '.join(known)})")
        data = read_column(self.stage("features"), column, target, split, extra=(ID,), reader="Run.features")
        return data.x, data.y, _ids(data.extra["id"])

    def scores(self, split: str | None = "test", pandas: bool = False) -> Any:
        """Every probe's and guard's score per row of `split` (None: all rows), with the labels, from the
        report stage's `scores.parquet`."""
        table = self.stage("report").join(SCORES_FILE).read_table()
        if split is not None:
            table = table.filter(pc.field(SPLIT) == split)
        return table.to_pandas() if pandas else table

    def probe(self, name: str | None = None, allow_pickle: bool = False) -> Any:
        """A trained probe (with `.score(X)` and `.meta`): the headline probe of the first target by default,
        else `name` as the probes stage lists it. A pickled (non-linear) probe runs code when loaded: it loads
        only with `allow_pickle=True`."""
        from guardray.probes import artifact

        stage = self.stage("probes")
        summary = stage.join("summary.json").read_json()
        names = _probe_names(summary)
        chosen = summary["best"]["name"] if name is None else name
        if chosen not in names:
            raise InputError(f"probe {chosen!r}: not in {stage.uri} (probes: {', '.join(names)})")
        return artifact.load(stage.join("artifacts", chosen), allow_pickle)

    def probes(self) -> list[str]:
        """The names `probe(name)` takes, in the probes stage's order (then those fitted without a source,
        `left_out/<i>/...`, with `evaluate.leave_one_source_out`)."""
        return _probe_names(self.stage("probes").join("summary.json").read_json())

    def report(self) -> dict[str, Any]:
        """The report's JSON (`targets: {name: section}` with every metric)."""
        return self.stage("report").join(REPORT_FILE).read_json()

    def _first_of(self, *names: str) -> Location:
        for name in names[:-1]:
            try:
                return self.stage(name)
            except InputError:
                continue
        return self.stage(names[-1])


def run(spec: JobSpec | Mapping[str, Any] | str | os.PathLike, stages: Sequence[str] | None = None,
        overrides: Sequence[str] = (), force: Sequence[str] = (), output: str | None = None) -> dict[str, Any]:
    """`guardray.run`: run a job from Python as `guardray run` does, and return the same summary
    ({stage: {status, dir, rows, wall_s, ...}}).

    `spec` is a spec file, the spec as a mapping (what the YAML would hold), or a validated `JobSpec`;
    `overrides` are `--set` items (`"probes.cv.folds=3"`), `output` replaces `output`. Bad input raises
    `SpecError`/`InputError` (one line per problem), a failed stage `StageError`."""
    if isinstance(spec, JobSpec):
        if overrides or output:
            spec = load_spec(spec.model_dump(mode="json"), overrides, output)
        else:  # built by hand: the registry checks a loaded spec gets, before any stage runs
            validate_job(spec)
    else:
        spec = load_spec(spec, overrides, output)
    return runner.run_job(spec, list(stages) if stages else None, tuple(force))


def open_run(output: str) -> Run:
    """The run in `output` (a job's output directory, local or gs://); InputError when it holds no stage."""
    location = resolve(str(output))
    if not location.exists():
        raise InputError(f"{location.uri}: no such run directory")
    return Run(location)


def _probe_names(summary: dict[str, Any]) -> list[str]:
    return [p["name"] for p in summary["probes"]] + [
        e["name"] for e in summary.get("leave_one_source_out", []) if e["name"]]


def _ids(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.to_pylist(), dtype=object)
