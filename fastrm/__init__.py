"""fastrm: fast reward-model training for RLHF.

Stages, one module each: data -> tokenization -> packing -> attention/backbones/model -> losses -> trainer ->
evaluation (+ scoring, benchmark, serve, cli); loading.py turns model and tokenizer specs into objects.
"""

from fastrm.attention import UnsupportedBackbone
from fastrm.benchmark import evaluate_benchmark
from fastrm.config import RewardConfig
from fastrm.loading import load_model, load_tokenizer
from fastrm.losses import pairwise_loss
from fastrm.model import LossConfig, RewardModel
from fastrm.scoring import score
from fastrm.seq2seq_rewards import token_rewards
from fastrm.trainer import RewardTrainer
from fastrm.version import __version__ as __version__

__all__ = [
    "RewardConfig",
    "RewardModel",
    "RewardTrainer",
    "LossConfig",
    "pairwise_loss",
    "load_model",
    "load_tokenizer",
    "score",
    "token_rewards",
    "evaluate_benchmark",
    "UnsupportedBackbone",
]
