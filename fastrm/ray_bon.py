"""Best-of-N on Ray Data: score N candidate responses per prompt with a pool of reward-model actors.

Pipeline (streaming; the driver never holds the whole input)::

    JSONL files (read tasks, one per file, parsed and validated line by line)  or  a datasets.Dataset
      -> map_batches(BestOfNScorer, actor pool: one model per actor, ``batch_size`` prompts per call)
      -> driver: iter_batches in input order -> output JSONL / Parquet + errors JSONL

Rules (the same as ``fastrm score``, whose row parser this reuses):

* A row is ``{"prompt": str, "responses": [str, ...]}`` (N >= 1; the prompt may be ""). Anything else (invalid
  JSON, a missing field, a non-string, an empty list) goes to the errors file with its source (``path:line`` or
  ``dataset[i]``), its 0-based ``row`` and the reason, and is left out of the main output. Nothing is dropped
  silently: every input row ends up in exactly one of the two files (blank lines are not rows).
* An empty response string is an error for the whole row: it has no token of its own to pool, so its "reward"
  would be the prompt's. Filter or fill such responses before scoring.
* Ties go to the first index (``fastrm.scoring.best_of_n``); N = 1 picks index 0. Identical responses of a row
  are scored once, so they tie exactly (scored separately, their place in the packed batch can change the last
  bit of a float and decide the "tie").
* The main output keeps the input order of the valid rows (``DataContext.execution_options.preserve_order``),
  and each row's other fields (an ``id``, metadata): in JSONL as they were, after ``responses``; in Parquet as
  columns, their types unified over all rows (mixed types are an error naming the field: write JSONL then). A
  field named like an output column (``source``, ``scores``, ``best_index``, ``best_response``, ``top_k``) puts the
  row in the errors file.

Where things are read and written (a cluster has no common working directory):

* JSONL input on a local path is read by tasks pinned to the driver's node (so the file needs to exist there
  only) and streamed to the actors wherever they run; a URI (``s3://...``) is read anywhere; a datasets folder is
  loaded on the driver.
* The model is loaded by every actor: a local folder must exist at the same path on every node (checked at start),
  a URI is downloaded by each actor.
* The output and errors files are written by the driver, into temporary files renamed into place when the run
  completes; an existing output is replaced only with ``overwrite=True`` (``--overwrite``).

Scores equal in-process ``fastrm.scoring.score_rows`` (shared-prompt packing by default). A prompt whose N
responses do not fit one micro-batch (``max_tokens_per_batch``) is scored in several chunks of responses, each
with the prompt: every response still sees exactly the prompt and itself, so the scores are the same.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from fastrm import ray_cluster as cluster

PARSED_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("source", pa.string()),
        ("prompt", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("extra", pa.string()),  # the row's other fields as a JSON object (null when it has none)
        ("error", pa.string()),
    ]
)
SCORED_FIELDS = [
    ("scores", pa.list_(pa.float64())),
    ("best_index", pa.int64()),
    ("best_response", pa.string()),
    ("top_k", pa.list_(pa.int64())),
]
OUTPUT_COLUMNS = ["prompt", "responses", "extra", "source", "scores", "best_index", "best_response"]
# Input fields that would collide with the output's own columns (the row's other fields are kept, see _Writer).
RESERVED = ("source", "scores", "best_index", "best_response", "top_k")
_BLOCK_ROWS = 1024


def _parse(row: Any) -> tuple[str, list[str], str | None, str | None]:
    """(prompt, responses, other fields as JSON or None, None) for a valid row, else ("", [], None, reason)."""
    from fastrm.data import parse_prompt_row
    from fastrm.rows import RowError

    try:
        prompt, responses = parse_prompt_row(row)
    except RowError as e:
        return "", [], None, e.detail()
    extra = {k: v for k, v in row.items() if k not in ("prompt", "responses")}
    clash = [k for k in extra if k in RESERVED]
    if clash:
        return "", [], None, f"{clash[0]!r}: a column best-of-N writes itself; rename the input field"
    # default=str: a datasets column of dates or bytes is kept as text (JSON has no such type)
    return prompt, responses, json.dumps(extra, ensure_ascii=False, default=str) if extra else None, None


def _parsed_table(rows: list[int], sources: list[str], parsed: list[tuple]) -> pa.Table:
    return pa.table(
        {
            "row": rows,
            "source": sources,
            "prompt": [p[0] for p in parsed],
            "responses": [p[1] for p in parsed],
            "extra": [p[2] for p in parsed],
            "error": [p[3] for p in parsed],
        },
        schema=PARSED_SCHEMA,
    )


def _jsonl_datasource(paths: list[str]):
    from ray.data.datasource import FileBasedDatasource

    class JsonlRowsDatasource(FileBasedDatasource):
        """Each non-blank line -> one parsed row (line numbers kept; a bad line becomes an error row)."""

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            rows, sources, parsed = [], [], []
            row, lineno, rest = 0, 0, b""
            while True:
                chunk = f.read(1 << 20)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop() if chunk else b""
                for raw in lines:
                    lineno += 1
                    if not raw.strip():
                        continue
                    try:
                        p = _parse(json.loads(raw))
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        p = ("", [], None, f"invalid JSON: {e}")
                    rows.append(row)
                    sources.append(f"{path}:{lineno}")
                    parsed.append(p)
                    row += 1
                    if len(rows) >= _BLOCK_ROWS:
                        yield _parsed_table(rows, sources, parsed)
                        rows, sources, parsed = [], [], []
                if not chunk:
                    break
            if rows:
                yield _parsed_table(rows, sources, parsed)

    return JsonlRowsDatasource(paths)


def _parse_dataset_batch(batch: pa.Table) -> pa.Table:
    rows = batch.column("__row__").to_pylist()
    cols = [c for c in batch.column_names if c != "__row__"]
    records = batch.select(cols).to_pylist()
    return _parsed_table(rows, [f"dataset[{i}]" for i in rows], [_parse(r) for r in records])


def read_input(source: Any, *, split: str = "train"):
    """A Ray Dataset of parsed rows (PARSED_SCHEMA) from JSONL path(s) or a ``datasets.Dataset`` (or a folder
    written by ``Dataset.save_to_disk``).

    Reading and parsing are light and ask for no CPU: scoring actors that hold every CPU of a small cluster
    would otherwise leave the reads unscheduled and the pipeline waiting forever. Local files are read on the
    driver's node (the only node known to have them); URIs on any node.
    """
    import ray
    import ray.data

    from fastrm.data import DataError

    if isinstance(source, (str, os.PathLike)) and not cluster.is_uri(source):
        source = cluster.resolve_path(source, "--input")
    if isinstance(source, (list, tuple)):
        source = [cluster.resolve_path(p, "--input") for p in source]
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        import datasets

        source = datasets.load_from_disk(str(source))
        if isinstance(source, datasets.DatasetDict):
            source = source[split]
    if type(source).__module__.startswith("datasets"):
        import datasets

        if not isinstance(source, datasets.Dataset):
            raise DataError(f"expected a datasets.Dataset (one split), got {type(source).__name__}")
        table = source.with_format("arrow")[:]
        table = table.append_column("__row__", pa.array(range(table.num_rows), pa.int64()))
        return ray.data.from_arrow(table).map_batches(
            _parse_dataset_batch, batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=2)
        )
    paths = [str(p) for p in (source if isinstance(source, (list, tuple)) else [source])]
    for p in paths:
        if not p.endswith((".jsonl", ".jsonl.gz")):
            raise DataError(f"{p}: the Ray best-of-N job reads .jsonl / .jsonl.gz files or a datasets folder")
        if not cluster.is_uri(p) and not Path(p).is_file():
            raise DataError(f"{p}: no such file")
    pin = None
    if not all(cluster.is_uri(p) for p in paths):  # Ray labels every node with its id
        pin = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    return ray.data.read_datasource(_jsonl_datasource(paths), num_cpus=0, label_selector=pin)


class BestOfNScorer:
    """Ray Data callable class: loads the reward model once per actor, scores batches of parsed rows.

    Input columns: PARSED_SCHEMA. Output: the same plus scores, best_index, best_response, top_k (null for rows
    with an error; a row that cannot be scored gets an error here) and node (the actor's node id). ``model_path``
    is a local folder or a URI (downloaded once per actor).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: str | None = None,
        *,
        use_gpu: bool = False,
        top_k: int | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int = 16384,
        prefix_sharing: bool = True,
        append_eos: bool | None = None,
        scoring_rule: str = "auto",
    ):
        import ray
        import torch

        from fastrm.formatting import resolve_rule
        from fastrm.loading import load_model, load_tokenizer

        self.node = ray.get_runtime_context().get_node_id()
        if cluster.is_uri(model_path):
            import pyarrow.fs

            self._download = tempfile.TemporaryDirectory(prefix="fastrm-model-")
            pyarrow.fs.copy_files(model_path, self._download.name)
            model_path = self._download.name
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.model = load_model(model_path).to(self.device).eval()  # the one loader (a checkpoint keeps its head)
        self.tokenizer = (
            load_tokenizer(tokenizer, model_path) if tokenizer or self.model.tokenizer is None else self.model.tokenizer
        )
        self.top_k, self.budget, self.prefix_sharing = top_k, max_tokens_per_batch, prefix_sharing
        from fastrm.seq2seq_rewards import is_seq2seq

        self.seq2seq = is_seq2seq(self.model)  # sequence scores of its token rewards (fastrm/seq2seq_rewards.py)
        if self.seq2seq:
            from fastrm.formatting import refuse_rule_settings

            refuse_rule_settings(scoring_rule, max_length, append_eos)
            self.rule = None
            return
        # The checkpoint's scoring rule (fastrm_scoring.json; stock transformers' without one), flags override it.
        self.rule = resolve_rule(self.model, self.tokenizer, scoring_rule, max_length=max_length, append_eos=append_eos)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from fastrm.scoring import best_of_n

        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["error"] is None]
        scored = self._score([rows[i] for i in todo])
        extra: dict[str, list] = {name: [None] * len(rows) for name, _ in SCORED_FIELDS}
        errors = [r["error"] for r in rows]
        for i, s in zip(todo, scored):
            if isinstance(s, str):
                errors[i] = s
                continue
            pick = best_of_n(s, self.top_k)
            extra["scores"][i] = s
            extra["best_index"][i] = pick["best_index"]
            extra["best_response"][i] = rows[i]["responses"][pick["best_index"]]
            extra["top_k"][i] = pick.get("top_k")
        cols = {name: batch.column(name) for name in PARSED_SCHEMA.names if name != "error"}
        cols.update({name: pa.array(extra[name], typ) for name, typ in SCORED_FIELDS})
        cols["error"] = pa.array(errors, pa.string())
        cols["node"] = pa.array([self.node] * len(rows), pa.string())
        return pa.table(cols)

    def _score(self, rows: list[dict]) -> list[list[float] | str]:
        """Scores per row, or the reason a row cannot be scored."""
        from fastrm.scoring import score_token_groups, tokenize_groups

        if not rows:
            return []
        if self.seq2seq:
            return self._score_seq2seq(rows)
        kw = dict(rule=self.rule)
        try:
            toks = list(
                zip(*tokenize_groups(self.tokenizer, [r["prompt"] for r in rows], [r["responses"] for r in rows], **kw))
            )
        except ValueError:  # isolate the row(s) that cannot be tokenized (e.g. a response with no tokens)
            toks = []
            for r in rows:
                try:
                    p, rs = tokenize_groups(self.tokenizer, [r["prompt"]], [r["responses"]], **kw)
                    toks.append((p[0], rs[0]))
                except ValueError as e:
                    toks.append(str(e).removeprefix("prompt 0, "))
        # Score each distinct response of a row once (duplicates are common in sampled candidates, and then tie
        # exactly, so the first index wins, instead of differing in the last bit with their place in the batch),
        # in chunks that fit one micro-batch with the prompt.
        groups, owners, inverse = [], [], {}
        out: list[Any] = [None] * len(rows)
        for i, t in enumerate(toks):
            if isinstance(t, str):
                out[i] = t
                continue
            prompt, responses = t
            first: dict[tuple, int] = {}
            inverse[i] = [first.setdefault(tuple(r), len(first)) for r in responses]
            chunks = self._chunks(prompt, [list(r) for r in first])
            if isinstance(chunks, str):
                out[i] = chunks
                continue
            for c in chunks:
                groups.append(c)
                owners.append(i)
        if groups:
            res = score_token_groups(
                self.model,
                [g[0] for g in groups],
                [g[1] for g in groups],
                max_tokens_per_batch=self.budget,
                prefix_sharing=self.prefix_sharing,
            )
            for i, s in zip(owners, res):
                out[i] = (out[i] or []) + s
        return [o if isinstance(o, str) else [o[k] for k in inverse[i]] for i, o in enumerate(out)]

    def _score_seq2seq(self, rows: list[dict]) -> list[list[float] | str]:
        """A seq2seq RM's sequence scores per row (each distinct response once, as above), or why a row cannot be
        scored (an empty response, or one over max_length as the target)."""
        from fastrm.seq2seq_rewards import score_encoded, scoring_branches

        out: list[Any] = [None] * len(rows)
        todo, inverse = [], {}
        for i, r in enumerate(rows):
            first: dict[str, int] = {}
            inverse[i] = [first.setdefault(x, len(first)) for x in r["responses"]]
            try:
                group = scoring_branches(self.model, self.tokenizer, r["prompt"], list(first))
            except ValueError as e:  # "response j ...", j among the distinct ones: name it by its place in the row
                uniq, msg = list(first), str(e)
                j = next(k for k in range(len(uniq)) if msg.startswith(f"response {k} "))
                out[i] = msg.replace(f"response {j} ", f"response {r['responses'].index(uniq[j])} ", 1)
                continue
            todo.append((i, group))
        if todo:
            scores, _, _ = score_encoded(self.model, [g for _, g in todo], max_tokens_per_batch=self.budget)
            for (i, _), s in zip(todo, scores):
                out[i] = [s[k] for k in inverse[i]]
        return out

    def _chunks(self, prompt: list[int], responses: list[list[int]]):
        shared = self.prefix_sharing
        chunks, cur, cost = [], [], len(prompt) if shared else 0
        for r in responses:
            c = len(r) + (0 if shared else len(prompt))
            if (len(prompt) if shared else 0) + c > self.budget:
                return (
                    f"a response needs {len(prompt) + len(r)} tokens with its prompt, more than "
                    f"max_tokens_per_batch={self.budget}"
                )
            if cur and cost + c > self.budget:
                chunks.append((prompt, cur))
                cur, cost = [], len(prompt) if shared else 0
            cur.append(r)
            cost += c
        chunks.append((prompt, cur))
        return chunks


class _Writer:
    """Appends rows to a temporary file beside ``path`` (.jsonl or .parquet) as they stream in; :meth:`commit`
    renames it into place, :meth:`close` alone drops it (a failed run leaves any older output untouched).

    An ``extra`` column (each row's other input fields, as JSON) is spread back into fields: a JSONL record is
    prompt, responses, the row's other fields in input order, then the rest; in Parquet each other field becomes a
    column, its type unified over all rows when the file is committed (a field with no common type, say a number
    here and text there, is an error naming it)."""

    def __init__(self, path: str, columns: list[str], schema: pa.Schema):
        self.path, self.columns, self.schema = Path(path), columns, schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.parquet = self.path.suffix == ".parquet"
        if self.parquet:
            import pyarrow.parquet as pq

            self._pq = pq.ParquetWriter(str(self.tmp), schema)
        else:
            self._fh = open(self.tmp, "w", encoding="utf-8")

    def write(self, table: pa.Table) -> None:
        table = table.select(self.columns)
        if self.parquet:
            self._pq.write_table(table.cast(self.schema))
        else:
            for rec in table.to_pylist():
                self._fh.write(json.dumps(_spread(rec), ensure_ascii=False) + "\n")

    def close(self) -> None:
        (self._pq if self.parquet else self._fh).close()
        self.tmp.unlink(missing_ok=True)

    def commit(self) -> None:
        (self._pq if self.parquet else self._fh).close()
        if self.parquet and "extra" in self.columns:
            self._spread_parquet()
        os.replace(self.tmp, self.path)

    def _spread_parquet(self) -> None:
        """Rewrite the temporary Parquet file with the ``extra`` JSON as typed columns (a second pass: the types are
        known only once every row is in)."""
        import pyarrow.parquet as pq

        from fastrm.data import DataError

        src = pq.ParquetFile(str(self.tmp))
        groups = range(src.metadata.num_row_groups)

        def extras(i: int) -> list[dict]:
            return [json.loads(x) if x else {} for x in src.read_row_group(i, columns=["extra"]).column(0).to_pylist()]

        out = self.tmp.with_name(self.tmp.name + ".typed")
        try:
            schemas = [pa.Table.from_pylist(e).schema for i in groups if any(e := extras(i))]
            spread = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
            base = [f for f in self.schema if f.name != "extra"]
            at = [f.name for f in base].index("responses") + 1
            schema = pa.schema(base[:at] + list(spread) + base[at:])
            with pq.ParquetWriter(str(out), schema) as w:
                for i in groups:
                    t, e = src.read_row_group(i), pa.Table.from_pylist(extras(i), schema=spread)
                    cols = [(e if f.name in spread.names else t).column(f.name) for f in schema]
                    w.write_table(pa.table(cols, schema=schema))
            os.replace(out, self.tmp)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise DataError(
                f"--output {self.path}: the input's other fields cannot be Parquet columns ({err}): a column has one "
                "type in every row; make the field's type consistent or write .jsonl output (it keeps each row as is)"
            ) from None
        finally:
            out.unlink(missing_ok=True)


def _spread(rec: dict) -> dict:
    """A JSONL output record: the row's other fields (``extra``) right after prompt and responses."""
    extra = rec.pop("extra", None)
    if not extra:
        return rec
    out = {}
    for k, v in rec.items():
        out[k] = v
        if k == "responses":
            out.update(json.loads(extra))
    return out


def default_errors_path(output: str) -> str:
    p = Path(output)
    name = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.stem
    return str(p.with_name(name + ".errors.jsonl"))


def run_best_of_n(
    source: Any,
    output: str,
    model: str,
    *,
    errors: str | None = None,
    tokenizer: str | None = None,
    batch_size: int = 32,
    num_actors: int | None = None,
    use_gpu: bool = False,
    cpus_per_actor: float = 1.0,
    top_k: int | None = None,
    max_length: int | None = None,
    max_tokens_per_batch: int = 16384,
    prefix_sharing: bool = True,
    append_eos: bool | None = None,
    scoring_rule: str = "auto",
    split: str = "train",
    overwrite: bool = False,
    node_check_timeout_s: float = cluster.NODE_CHECK_TIMEOUT_S,
    actor_start_timeout_s: float = 600.0,
) -> dict:
    """Score every row of ``source`` with the reward model checkpoint ``model`` on Ray Data; write ``output``.

    Args:
        source: .jsonl / .jsonl.gz path(s) on the driver's node or URIs, a ``datasets.Dataset``, or a datasets
            folder.
        output: .jsonl or .parquet, written by the driver: the valid rows in input order with scores, best_index,
            best_response (top_k). An existing file is an error unless ``overwrite``.
        model: a reward-model checkpoint folder (``RewardModel.save_pretrained``) at the same path on every node
            (checked), or a URI.
        errors: where the rejected rows go (default ``<output stem>.errors.jsonl``).
        batch_size: prompts per actor call; num_actors: the actor pool (default: the cluster's GPUs with
            ``use_gpu``, else 1), all started
            (within ``actor_start_timeout_s``, else an error) before scoring begins.
        top_k, max_length, max_tokens_per_batch, prefix_sharing, append_eos, scoring_rule: as for ``fastrm score``
            (the checkpoint's scoring record unless given: :mod:`fastrm.formatting`).

    Returns:
        {"rows": valid rows written, "errors": rejected rows, "output": ..., "errors_path": ...,
        "nodes": ids of the nodes whose actors scored rows}
    """
    import ray
    import ray.data

    from fastrm.loading import LoadError, is_pretrained

    output = cluster.resolve_path(output, "--output")
    errors = cluster.resolve_path(errors or default_errors_path(output), "--errors")
    if cluster.is_uri(output) or cluster.is_uri(errors):
        raise ValueError("--output/--errors are written by the driver: give a local path (copy it to storage after)")
    existing = [p for p in (output, errors) if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s): pass --overwrite (overwrite=True) to replace them once the new "
            "output is complete, or choose another --output"
        )
    if not ray.is_initialized():  # after the checks that need no cluster
        ray.init()
    if num_actors is None:
        num_actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if use_gpu else 1
    if not cluster.is_uri(model):
        model = cluster.resolve_path(model, "--model")
        if not is_pretrained(model):  # a config-only folder would score with random weights
            raise LoadError(f"--model {model}: not a trained checkpoint (a folder with config.json and weights)")
        probes = [model]  # not just an empty mount point: the config (a LoRA adapter's and its base's)
        if os.path.isdir(model):
            from fastrm import lora

            adapter = lora.is_adapter_dir(model)
            probes = [os.path.join(model, lora.ADAPTER_CONFIG if adapter else "config.json")]
            if adapter:
                probes.append(os.path.join(lora.resolve_base(model), "config.json"))
        cluster.check_visible_everywhere(probes, "--model", node_check_timeout_s)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Start the whole pool before the first batch (else the first actor up takes everything a small input has) and
    # fail with a message when the cluster cannot place it, instead of waiting forever.
    ctx.wait_for_min_actors_s = actor_start_timeout_s
    ds = read_input(source, split=split)
    ds = ds.map_batches(
        BestOfNScorer,
        fn_constructor_args=(model, tokenizer),
        fn_constructor_kwargs=dict(
            use_gpu=use_gpu,
            top_k=top_k,
            max_length=max_length,
            max_tokens_per_batch=max_tokens_per_batch,
            prefix_sharing=prefix_sharing,
            append_eos=append_eos,
            scoring_rule=scoring_rule,
        ),
        batch_size=batch_size,
        batch_format="pyarrow",
        # Two batches queued per actor: each has its next batch ready, and since Ray Data prefers the actors on the
        # node holding a block (local input is read on the driver's node) a short queue spills work to the others.
        compute=ray.data.ActorPoolStrategy(size=num_actors, max_tasks_in_flight_per_actor=2),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_actor,
    )
    columns = OUTPUT_COLUMNS + (["top_k"] if top_k else [])
    types = {**{f.name: f.type for f in PARSED_SCHEMA}, **dict(SCORED_FIELDS)}
    out = _Writer(output, columns, pa.schema([(c, types[c]) for c in columns]))
    err = _Writer(
        errors,
        ["source", "row", "reason"],
        pa.schema([("source", pa.string()), ("row", pa.int64()), ("reason", pa.string())]),
    )
    n_ok = n_err = 0
    nodes: set[str] = set()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            bad = batch.column("error").is_valid()
            good = batch.filter(pc.invert(bad))
            failed = batch.filter(bad).rename_columns(["reason" if c == "error" else c for c in batch.column_names])
            out.write(good)
            err.write(failed)
            n_ok += good.num_rows
            n_err += failed.num_rows
            nodes.update(batch.column("node").to_pylist())
        out.commit()
        err.commit()
    finally:
        out.close()
        err.close()
    return {"rows": n_ok, "errors": n_err, "output": str(output), "errors_path": str(errors), "nodes": sorted(nodes)}
