"""msa_train.eval.scoring on small stand-in models: buckets, perplexity sums, and the one-pass
greedy exact-match verdict against real greedy decoding."""
import math
from types import SimpleNamespace

import pytest
import torch

from msa_train.eval.scoring import LossByPosition, position_buckets, score_answer


def test_position_buckets_are_log_spaced_and_cover_everything():
    assert position_buckets(512, 16) == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256),
                                         (256, 512)]
    assert position_buckets(100, 16) == [(0, 16), (16, 32), (32, 64), (64, 100)]
    assert position_buckets(10, 16) == [(0, 10)]
    with pytest.raises(ValueError):
        position_buckets(0, 16)


def test_perplexity_by_position_is_exp_of_the_bucket_mean():
    acc = LossByPosition(8)
    acc.add(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]))
    acc.add(torch.tensor([1.0, 1.0, 2.0, 2.0]))  # a shorter sequence counts only where it exists
    out = acc.perplexity(position_buckets(8, 2))
    assert [b["ppl"] for b in out["by_position"]] == pytest.approx(
        [math.e, math.e ** 2, math.e ** 3])
    assert out["overall"] == pytest.approx(math.exp((4 * 1 + 4 * 2 + 4 * 3) / 12))
    with pytest.raises(ValueError, match="no scored tokens"):
        LossByPosition(4).perplexity(position_buckets(4, 2))


class _TinyLM(torch.nn.Module):
    """A causal bigram-ish model: logits at t depend on tokens <= t only."""

    def __init__(self, vocab, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, 16, generator=g))
        self.out = torch.nn.Parameter(torch.randn(16, vocab, generator=g))

    def forward(self, ids):
        h = self.emb[ids].cumsum(0) / torch.arange(1, len(ids) + 1)[:, None]
        return h @ self.out


def _greedy(lm, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(lm(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("seed", range(6))
def test_one_pass_exact_match_equals_greedy_decoding(seed):
    vocab = 5  # small vocabulary: greedy continuations are often right, often wrong
    lm = _TinyLM(vocab, seed)
    em = SimpleNamespace(logits=lambda ids: lm(ids))
    g = torch.Generator().manual_seed(100 + seed)
    verdicts = set()
    for _ in range(40):
        prompt = torch.randint(0, vocab, (7,), generator=g).tolist()
        answer = torch.randint(0, vocab, (3,), generator=g).tolist()
        if torch.rand((), generator=g) < 0.5:  # half the answers are the model's own greedy output
            answer = _greedy(lm, prompt, 3)
        score = score_answer(em, prompt, answer)
        assert score.correct == (_greedy(lm, prompt, len(answer)) == answer)
        logits = lm(torch.tensor(prompt + answer))
        lp = torch.log_softmax(logits, -1)[torch.arange(6, 9), torch.tensor(answer)].mean()
        assert score.mean_logprob == pytest.approx(float(lp), rel=1e-6)
        verdicts.add(score.correct)
    assert verdicts == {True, False}
