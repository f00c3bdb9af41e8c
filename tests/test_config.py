"""RewardConfig: real types, one documented field each, sections in --help, YAML/JSON files and flags."""

import dataclasses
import typing

import pytest

from fastrm.config import SECTIONS, RewardConfig, field_types


def test_every_field_has_a_section_help_and_a_real_type():
    types = field_types()
    for f in dataclasses.fields(RewardConfig):
        assert f.metadata["section"] in SECTIONS, f.name
        assert len(f.metadata["help"]) > 10, f.name
        t = types[f.name]
        assert t is not str or f.name in ("output_dir", "seq2seq_mix"), (
            f"{f.name}: a free string where a Literal belongs?"
        )
        if typing.get_origin(t) is typing.Literal:
            assert f.default in typing.get_args(t), f.name


def test_tri_states_are_bool_or_none_and_old_spellings_still_load(tmp_path):
    assert RewardConfig().fused_head is None and RewardConfig().bf16 is None
    old = tmp_path / "old.yaml"
    old.write_text("fused_head: 'false'\nbf16: auto\nloss: threshold\n")
    cfg = RewardConfig.from_file(old)
    assert cfg.fused_head is False and cfg.bf16 is None and cfg.loss == "threshold"
    with pytest.raises(ValueError, match="field 'bf16': expected true, false or auto, got 'maybe'"):
        RewardConfig(bf16="maybe")


def test_files_and_flags_compose(tmp_path):
    from fastrm.cli import build_train_parser, config_from_args

    f = tmp_path / "c.json"
    f.write_text('{"loss": "batch_mean", "learning_rate": 0.001, "data": "x.jsonl", "model": "tiny-llama"}')
    args = build_train_parser().parse_args(["--config", str(f), "--learning-rate", "2e-5", "--margin-scope", "micro"])
    cfg, extra = config_from_args(args)
    assert (cfg.loss, cfg.learning_rate, cfg.margin_scope) == ("batch_mean", 2e-5, "micro")
    assert extra == {"data": "x.jsonl", "model": "tiny-llama"}
    f.write_text('{"learning_rat": 0.1}')
    with pytest.raises(ValueError, match="unknown config keys"):
        RewardConfig.from_file(f)


BAD_FIELDS = [
    # types: a value that is not the field's type, whatever the source
    (dict(learning_rate="fast"), "field 'learning_rate': expected a number, got 'fast'"),
    (dict(learning_rate=float("nan")), "field 'learning_rate': expected a finite number, got nan"),
    (dict(pairs_per_step=2.5), "field 'pairs_per_step': expected an integer, got 2.5"),
    (dict(seed=True), "field 'seed': expected an integer, got True"),
    (dict(prefix_sharing="maybe"), "field 'prefix_sharing': expected true or false, got 'maybe'"),
    (dict(output_dir=3), "field 'output_dir': expected a string, got 3"),
    (dict(loss="hinge"), "field 'loss': expected one of bt, margin, batch_mean, threshold, got 'hinge'"),
    # ranges: lengths, steps, fractions, rates
    (dict(max_length=2), "field 'max_length': expected an integer >= 16 (a prompt and a response must fit), got 2"),
    (dict(max_tokens_per_batch=8), "field 'max_tokens_per_batch': expected an integer >= 16, got 8"),
    (dict(save_steps=-5), "field 'save_steps': expected an integer >= 0 (0: only the final model), got -5"),
    (dict(eval_steps=-1), "field 'eval_steps': expected an integer >= 0"),
    (dict(logging_steps=-1), "field 'logging_steps': expected an integer >= 0"),
    (dict(save_total_limit=-1), "field 'save_total_limit': expected an integer >= 0"),
    (dict(pairs_per_step=0), "field 'pairs_per_step': expected an integer >= 1, got 0"),
    (dict(num_train_epochs=0), "field 'num_train_epochs': expected an integer >= 1, got 0"),
    (dict(max_steps=0), "field 'max_steps': expected an integer >= 1, or -1 (the epochs decide), got 0"),
    (dict(max_steps=-3), "field 'max_steps': expected an integer >= 1, or -1"),
    (dict(eval_fraction=1.0), "field 'eval_fraction': expected a number in [0, 1), got 1.0"),
    (dict(warmup_ratio=1.5), "field 'warmup_ratio': expected a number in [0, 1], got 1.5"),
    (dict(learning_rate=0.0), "field 'learning_rate': expected a number > 0, got 0.0"),
    (dict(weight_decay=-0.1), "field 'weight_decay': expected a number >= 0"),
    (dict(adam_beta1=1.0), "field 'adam_beta1': expected a number in [0, 1)"),
    (dict(adam_beta2=-0.5), "field 'adam_beta2': expected a number in [0, 1)"),
    (dict(adam_epsilon=0), "field 'adam_epsilon': expected a number > 0"),
    (dict(max_grad_norm=-1.0), "field 'max_grad_norm': expected a number >= 0"),
    (dict(center_rewards_coefficient=-0.1), "field 'center_rewards_coefficient': expected a number >= 0"),
    (dict(seed=-1), "field 'seed': expected an integer >= 0, got -1"),
    (dict(output_dir=""), "field 'output_dir': expected a folder path, got ''"),
    (dict(resume_from_checkpoint=" "), "field 'resume_from_checkpoint': expected a checkpoint folder or 'latest'"),
    (dict(seq2seq_positive=-1.0), "field 'seq2seq_positive': expected a number >= 0, got -1.0"),
    (dict(seq2seq_negative=-2), "field 'seq2seq_negative': expected a number >= 0, got -2.0"),
    (dict(seq2seq_mix="1:x"), "field 'seq2seq_mix': expected 'identity:correction': two numbers >= 0, not both 0"),
    (dict(objective="dpo"), "field 'objective': expected one of scalar, seq2seq, got 'dpo'"),
    (dict(lora_r=-1), "field 'lora_r': expected an integer >= 0 (0: full fine-tuning), got -1"),
    (dict(lora_r=8, lora_alpha=0), "field 'lora_alpha': expected a number > 0, got 0.0"),
    (dict(lora_r=8, lora_dropout=1.0), "field 'lora_dropout': expected a number in [0, 1), got 1.0"),
    (dict(lora_dropout=0.1), "field 'lora_dropout': 0.1 is set but lora_r is 0 (full fine-tuning)"),
]


@pytest.mark.parametrize("bad, match", BAD_FIELDS, ids=lambda x: "-".join(map(str, x)) if isinstance(x, dict) else "")
def test_bad_values_are_refused_in_python(bad, match):
    with pytest.raises(ValueError) as e:
        RewardConfig(**bad)
    assert str(e.value).startswith(match), str(e.value)


def test_every_numeric_field_has_a_range_and_a_tested_bad_value():
    """A field added without validation (or without a bad-value case above) fails here."""
    from fastrm.config import RANGES

    types = field_types()
    numeric = {
        f.name
        for f in dataclasses.fields(RewardConfig)
        if typing.get_args(types[f.name]) == () and types[f.name] in (int, float)
    } | {"center_rewards_coefficient"}
    assert numeric <= set(RANGES), numeric - set(RANGES)
    tested = {k for bad, _ in BAD_FIELDS for k in bad}
    assert numeric <= tested, numeric - tested


def test_numbers_spelled_as_strings_are_numbers_and_the_edges_are_allowed():
    # PyYAML reads `learning_rate: 1e-5` (no dot) as the string '1e-5'; JSON may give 1e3 as a float
    cfg = RewardConfig(learning_rate="1e-5", pairs_per_step=64.0, max_steps="-1", max_length=16, eval_fraction=0.0)
    assert (cfg.learning_rate, cfg.pairs_per_step, cfg.max_steps) == (1e-5, 64, -1)
    assert isinstance(cfg.pairs_per_step, int) and isinstance(cfg.learning_rate, float)
    RewardConfig(warmup_ratio=1.0, max_grad_norm=0, save_steps=0, logging_steps=0, adam_beta1=0.0, seed=0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("loss: threshold\nlearning_rate: fast\n", r"c.yaml:2: field 'learning_rate': expected a number, got 'fast'"),
        ("save_steps: -5\n", r"c.yaml:1: field 'save_steps': expected an integer >= 0"),
        ("max_length: 2\n", r"c.yaml:1: field 'max_length': expected an integer >= 16"),
        ("loss: bt\n  margin_scope: step\n", r"c.yaml:2:15: invalid YAML: mapping values are not allowed here"),
        ("a: [1, 2\nb: 3\n", r"c.yaml:2:2: invalid YAML: expected ',' or ']', but got ':'"),
        ("- loss\n", r"c.yaml: a config file holds a mapping"),
        ("learning_rat: 0.1\n", r"c.yaml:1: unknown config keys \['learning_rat'\]; did you mean 'learning_rate'\?"),
        ("data: 3\n", r"c.yaml:1: field 'data': expected a path or a list of paths, got 3"),
    ],
)
def test_a_yaml_file_names_the_file_line_and_field(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        RewardConfig.from_file(f)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [
        (
            '{"loss": "bt",\n "learning_rate": "fast"}',
            r"c.json:2: field 'learning_rate': expected a number, got 'fast'",
        ),
        ('{"loss": "bt"\n "seed": 1}', r"c.json:2:2: invalid JSON: Expecting ',' delimiter"),
        ('{"save_steps": -5}', r"c.json:1: field 'save_steps'"),
    ],
)
def test_a_json_file_names_the_file_line_and_field(tmp_path, text, match):
    f = tmp_path / "c.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        RewardConfig.from_file(f)


def test_a_missing_config_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--config .*nope.yaml: no such file"):
        RewardConfig.from_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--save-steps", "-5"], r"^--save-steps: expected an integer >= 0 \(0: only the final model\), got -5$"),
        (["--max-length", "2"], r"^--max-length: expected an integer >= 16"),
        (["--eval-fraction", "0.1", "--eval-data", "e.jsonl"], r"field 'eval_fraction': 0.1 would hold out training"),
        (["--eval-steps", "5"], r"field 'eval_steps': 5 asks for an evaluation every 5 steps, but there is no eval"),
    ],
)
def test_flags_are_validated_with_the_flag_named(argv, match):
    from fastrm.cli import build_train_parser, config_from_args

    with pytest.raises(ValueError, match=match):
        config_from_args(build_train_parser().parse_args(argv))


def test_a_flag_wins_over_a_bad_file_value_and_a_bad_flag_is_named_as_a_flag(tmp_path):
    from fastrm.cli import build_train_parser, config_from_args

    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: fast\nsave_steps: 3\n")
    cfg, _ = config_from_args(build_train_parser().parse_args(["--config", str(f), "--learning-rate", "1e-4"]))
    assert cfg.learning_rate == 1e-4 and cfg.save_steps == 3
    with pytest.raises(ValueError, match="^--save-steps: expected an integer >= 0"):
        config_from_args(
            build_train_parser().parse_args(["--config", str(f), "--learning-rate", "1", "--save-steps", "-1"])
        )


def test_eval_fraction_with_eval_data_is_refused_by_the_python_trainer_too():
    """One check for every entry point: the trainer refuses what the CLI refuses (the fraction was ignored)."""
    from fastrm.model import RewardModel
    from fastrm.synthetic import byte_tokenizer, synthetic_pairs
    from fastrm.trainer import RewardTrainer

    rows = synthetic_pairs(4)
    args = RewardConfig(eval_fraction=0.25, progress=False)
    with pytest.raises(ValueError, match="field 'eval_fraction': 0.25 would hold out training pairs"):
        RewardTrainer(
            RewardModel.from_config("tiny-llama", self_test=False), args, rows, rows, tokenizer=byte_tokenizer()
        )
