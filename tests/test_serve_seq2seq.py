"""The reward server with a seq2seq checkpoint: /token_rewards, and /score and /get_reward answering sequence
scores, equal to offline ``fastrm.token_rewards`` / ``fastrm.score`` (fastrm/serve_seq2seq.py)."""

import pytest
import torch
from serve_helpers import AUTH, KEY, ServerThread, ckpt, post  # noqa: F401  (ckpt: the scalar checkpoint)

from fastrm.config import RewardConfig
from fastrm.loading import load_model
from fastrm.scoring import score
from fastrm.seq2seq_model import Seq2SeqRewardModel
from fastrm.seq2seq_rewards import sequence_scores, token_rewards
from fastrm.serve import RewardService, ServeConfig
from fastrm.synthetic import byte_tokenizer, synthetic_pairs
from fastrm.trainer import RewardTrainer

TOK = byte_tokenizer()
LIMITS = dict(max_batch_tokens=300, max_wait_ms=20, max_responses=16, max_body_bytes=65536, body_timeout_s=2.0)
PROMPTS = ["Say something about Ada.\n", "Q?", "What do you think of Bob?\n"]
RESPONSES = [[" Ada is kind.", " Ada is rude and cold."], [" yes"], [" Bob is lazy.", " Bob is helpful.", " Bob."]]


@pytest.fixture(scope="module")
def s2s_ckpt(tmp_path_factory):
    """A seq2seq checkpoint trained for a few steps (rewards differ between responses), max_length 96."""
    from fastrm.presets import resolve_config

    torch.manual_seed(0)
    model = Seq2SeqRewardModel.from_config(resolve_config("tiny-llama", vocab_size=len(TOK)), attn_backend="exact")
    out = tmp_path_factory.mktemp("s2s") / "rm"
    fixed = dict(progress=False, save_final=True, max_steps=6, pairs_per_step=8, learning_rate=3e-3, max_length=96)
    args = RewardConfig(output_dir=str(out), objective="seq2seq", **fixed)
    RewardTrainer(model, args, synthetic_pairs(48, seed=2), tokenizer=TOK).train()
    return out


@pytest.fixture(scope="module")
def offline(s2s_ckpt):
    return load_model(s2s_ckpt).eval()


@pytest.fixture(scope="module")
def server(s2s_ckpt):
    srv = ServerThread(RewardService.load(ServeConfig(model=str(s2s_ckpt), api_key=KEY, **LIMITS)))
    try:
        yield srv
    finally:
        srv.stop()


def test_token_rewards_endpoint_equals_offline_token_rewards(server, offline):
    r = post(server, "/token_rewards", {"prompts": PROMPTS, "responses": RESPONSES})
    assert r.status_code == 200, r.text
    got = r.json()
    for g, (p, rs) in enumerate(zip(PROMPTS, RESPONSES)):
        detail = token_rewards(offline, p, rs, return_tokens=True)
        assert got["tokens"][g] == [t for t, _ in detail]
        assert got["token_rewards"][g] == [rw for _, rw in detail]
        assert got["scores"][g] == pytest.approx(sequence_scores(offline, p, rs), abs=1e-12)
        for toks, rw, resp in zip(got["tokens"][g], got["token_rewards"][g], rs):
            assert len(toks) == len(rw) == len(TOK(resp, add_special_tokens=False)["input_ids"])
    flat = [x for per in got["token_rewards"] for rw in per for x in rw]
    assert set(flat) <= {1.0, -1.0, 0.0} and len(set(map(tuple, got["token_rewards"][2]))) > 1


def test_score_and_get_reward_answer_sequence_scores(server, offline):
    """/score = fastrm.score (several prompts, micro-batches of whole groups under --max-batch-tokens 300) =
    sequence_scores prompt by prompt; /get_reward splits each query at its prompt."""
    want = [sequence_scores(offline, p, rs) for p, rs in zip(PROMPTS, RESPONSES)]
    assert score(offline, PROMPTS, RESPONSES, max_tokens_per_batch=300) == want
    with pytest.raises(ValueError, match=r"append_eos \(--append-eos\): a seq2seq reward model"):
        score(offline, PROMPTS, RESPONSES, append_eos=False)  # a scalar RM's setting is refused, not ignored
    r = post(server, "/score", {"prompts": PROMPTS, "responses": RESPONSES})
    assert r.status_code == 200, r.text
    assert r.json() == {"rewards": want}
    queries = [(p, x) for p, rs in zip(PROMPTS, RESPONSES) for x in rs]
    r = post(server, "/get_reward", {"query": [p + x for p, x in queries], "prompts": [p for p, _ in queries]})
    assert r.status_code == 200, r.text
    flat = [s for per in want for s in per]
    assert r.json()["rewards"] == flat and r.json()["scores"] == flat


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/get_reward", {"query": ["Q? yes"]}, "prompts"),
        ("/get_reward", {"query": ["Q? yes", "R? no"], "prompts": ["Q?", "Q?"]}, "query[1]"),
        ("/get_reward", {"query": ["Q?"], "prompts": ["Q?"]}, "query[0]"),
        ("/score", {"prompts": ["Q?", "P?"], "responses": [[" a"], [" b", " "]]}, "responses[1][1]"),
        ("/token_rewards", {"prompts": ["Q?"], "responses": [[" ok", " x" * 60]]}, "responses[0][1]"),
        ("/classify", {"input": ["Q? yes"]}, "input"),
    ],
    ids=["no-prompts", "query-not-its-prompt", "no-response", "empty-response", "target-over-max-length", "classify"],
)
def test_requests_a_seq2seq_server_cannot_answer_name_their_field(server, path, body, field):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field, r.json()


def test_a_scalar_server_answers_token_rewards_with_404(ckpt):  # noqa: F811
    srv = ServerThread(RewardService.load(ServeConfig(model=str(ckpt), api_key=KEY, max_length=64, **LIMITS)))
    try:
        r = post(srv, "/token_rewards", {"prompts": ["Q?"], "responses": [[" yes"]]})
        assert r.status_code == 404 and "scalar reward model" in r.json()["error"], r.text
        assert post(srv, "/score", {"prompts": ["Q?"], "responses": [[" yes"]]}).status_code == 200
    finally:
        srv.stop()


def test_health_says_seq2seq_and_scalar_flags_are_refused(server, s2s_ckpt):
    import httpx

    h = httpx.get(server.url + "/health", headers=AUTH, timeout=30).json()
    assert h["scoring_rule"] == "seq2seq" and "max_length 96" in h["scoring"]
    with pytest.raises(ValueError, match=r"max_length \(--max-length\): a seq2seq reward model scores with its"):
        RewardService.load(ServeConfig(model=str(s2s_ckpt), max_length=64, **LIMITS))
