"""Best-of-N scoring on Ray Data: a pool of reward-model actors scores {prompt, responses} rows.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python ray_jobs/best_of_n.py --model runs/rm --input prompts.jsonl --output best.jsonl --num-actors 2

Writes the valid rows in input order with scores, best_index, best_response (and top_k) to --output (.jsonl or
.parquet; an existing file needs --overwrite) and every rejected row with its reason to --errors. See
fastrm/ray_bon.py for the rules and where each file is read and written.
"""

from __future__ import annotations

import argparse
import sys

from fastrm.formatting import add_rule_flags
from fastrm.ray_bon import default_errors_path, run_best_of_n
from fastrm.ray_cluster import NODE_CHECK_TIMEOUT_S


def build_parser():
    p = argparse.ArgumentParser(prog="ray_jobs/best_of_n.py", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="reward-model checkpoint folder at the same path on every node (checked), or a URI such as "
        "s3://bucket/run/model (each actor downloads it)",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help='.jsonl / .jsonl.gz files of {"prompt": str, "responses": [str, ...]} (local files are read on the '
        "driver's node and streamed to the actors; URIs anywhere), or a datasets folder (Dataset.save_to_disk) "
        "with prompt/responses columns",
    )
    p.add_argument("--split", default="train", help="split of a DatasetDict folder")
    p.add_argument("--output", required=True, help=".jsonl or .parquet, written by the driver (absolute path in a job)")
    p.add_argument("--errors", help="rejected rows with their reason (default: <output stem>.errors.jsonl)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output/--errors (once the new one is complete)"
    )
    p.add_argument("--tokenizer", help="default: the checkpoint's")
    p.add_argument("--top-k", type=int, help="also write the indices of the k best responses")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per actor call")
    p.add_argument("--num-actors", type=int, help="scoring actors (default: the cluster's GPUs with --use-gpu, else 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    add_rule_flags(p)  # --scoring-rule, --max-length, --append-eos: the checkpoint's record unless given
    p.add_argument("--max-tokens-per-batch", type=int, default=16384)
    p.add_argument("--no-prefix-sharing", action="store_true", help="score each response as its own sequence")
    p.add_argument(
        "--node-check-timeout-s",
        type=float,
        default=NODE_CHECK_TIMEOUT_S,
        help="how long each node may take to answer the check that it sees --model",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    source = a.input if len(a.input) > 1 or a.input[0].endswith((".jsonl", ".jsonl.gz")) else a.input[0]
    res = run_best_of_n(
        source,
        a.output,
        a.model,
        errors=a.errors or default_errors_path(a.output),
        tokenizer=a.tokenizer,
        batch_size=a.batch_size,
        num_actors=a.num_actors,
        use_gpu=a.use_gpu,
        cpus_per_actor=a.cpus_per_actor,
        top_k=a.top_k,
        max_length=a.max_length,
        append_eos=a.append_eos,
        scoring_rule=a.scoring_rule,
        max_tokens_per_batch=a.max_tokens_per_batch,
        prefix_sharing=not a.no_prefix_sharing,
        split=a.split,
        overwrite=a.overwrite,
        node_check_timeout_s=a.node_check_timeout_s,
    )
    print(
        f"scored {res['rows']} rows on {len(res['nodes'])} node(s) -> {res['output']}; {res['errors']} rejected "
        f"rows -> {res['errors_path']}"
    )
    return 0 if res["rows"] else 1


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with fastrm's one-line errors (``--debug`` shows the traceback)."""
    from fastrm.cli import run_user_facing

    return run_user_facing("best_of_n.py", main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(cli())
