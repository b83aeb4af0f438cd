"""ToMe merging invariants and the TomeFormer connector (pure torch, CPU, seconds)."""
import pytest
import torch
from transformers import BertConfig, BertModel

from evlgen_lavis.models.tome import (
    bipartite_soft_matching, check_schedule, max_merge, merge_wavg, parse_r, token_counts,
)
from evlgen_lavis.models.tomeformer import TomeFormer, TomeLayer

TINY_BERT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("n,r,class_token", [(257, 19, True), (49, 4, False), (17, 4, True), (10, 3, True)])
def test_merge_removes_r_tokens(n, r, class_token):
    merge, unmerge = bipartite_soft_matching(torch.randn(3, n, 8), r, class_token)
    x = torch.randn(3, n, 5)
    assert merge(x).shape == (3, n - r, 5)
    assert unmerge(merge(x)).shape == (3, n, 5)


def test_r_is_clamped_to_half_of_unprotected_tokens():
    for n, cls in [(11, True), (12, False), (2, True), (1, True)]:
        merge, _ = bipartite_soft_matching(torch.randn(2, n, 4), 100, cls)
        assert merge(torch.randn(2, n, 3)).shape[1] == n - max_merge(n, cls)
    assert max_merge(257, True) == 128 and max_merge(49, False) == 24


def test_weighted_sum_and_sizes_preserved():
    torch.manual_seed(0)
    x, size = torch.randn(4, 33, 6), torch.randint(1, 5, (4, 33, 1)).float()
    merge, _ = bipartite_soft_matching(torch.randn(4, 33, 8), 10)
    y, new_size = merge_wavg(merge, x, size)
    assert y.shape == (4, 23, 6) and new_size.shape == (4, 23, 1)
    torch.testing.assert_close((y * new_size).sum(1), (x * size).sum(1))
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    _, ones = merge_wavg(merge, x)  # size None = ones
    assert ones.sum().item() == 4 * 33


def test_class_token_protected_even_when_most_similar():
    metric = torch.randn(2, 9, 4)
    metric[:, 0] = metric[:, 1]  # the class token is an exact duplicate of token 1
    x = torch.randn(2, 9, 3)
    merge, _ = bipartite_soft_matching(metric, 4, class_token=True)
    y, size = merge_wavg(merge, x)
    assert torch.equal(y[:, 0], x[:, 0]) and torch.all(size[:, 0] == 1)
    merge, _ = bipartite_soft_matching(metric, 1, class_token=False)  # unprotected: 0 may merge
    y, size = merge_wavg(merge, x)
    assert size.max() == 2  # the duplicate pair (0, 1) is the merged edge
    assert torch.allclose(y[size[..., 0] == 2], (x[:, 0] + x[:, 1]) / 2)


def test_most_similar_pairs_are_merged_first():
    # tokens come in near-duplicate pairs (2k, 2k+1) except one pair that is far apart
    base = torch.randn(1, 6, 16)
    metric = base.repeat_interleave(2, dim=1) + 1e-3 * torch.randn(1, 12, 16)
    metric[:, 11] = -metric[:, 10]  # pair (10, 11) is anti-similar
    merge, unmerge = bipartite_soft_matching(metric, 5, class_token=False)
    x = torch.arange(12.0).view(1, 12, 1)
    y, size = merge_wavg(merge, x)
    merged_values = sorted(y[size[..., 0] == 2].flatten().tolist())
    assert merged_values == [0.5, 2.5, 4.5, 6.5, 8.5]  # every near-duplicate pair, not (10, 11)
    back = unmerge(y)  # merged tokens map back to both positions they absorbed
    assert back[0, 0, 0] == back[0, 1, 0] == 0.5 and back[0, 10, 0] == 10 and back[0, 11, 0] == 11


def test_batched_equals_per_sample():
    torch.manual_seed(1)
    metric, x = torch.randn(5, 20, 8), torch.randn(5, 20, 4)
    merge, _ = bipartite_soft_matching(metric, 6)
    batched = merge_wavg(merge, x)[0]
    for i in range(5):
        m_i, _ = bipartite_soft_matching(metric[i:i + 1], 6)
        torch.testing.assert_close(batched[i:i + 1], merge_wavg(m_i, x[i:i + 1])[0])


def test_parse_r_forms():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(3, [5, 2, 0]) == [5, 2, 0]
    decreasing = parse_r(12, (19, 0.5))
    assert decreasing[0] > decreasing[-1] and abs(sum(decreasing) - 12 * 19) <= 6
    assert parse_r(12, (19, 0.0)) == [19] * 12
    increasing = parse_r(12, (19, -0.5))
    assert increasing[0] < increasing[-1]
    with pytest.raises(ValueError, match="one entry per layer"):
        parse_r(3, [1, 2])
    with pytest.raises(ValueError, match="inflection"):
        parse_r(3, (2, 1.5))
    with pytest.raises(ValueError, match=">= 0"):
        parse_r(3, -1)


def test_token_counts_per_schedule_form():
    assert token_counts(257, parse_r(12, 19)) == [257 - 19 * (i + 1) for i in range(12)]
    assert token_counts(49, parse_r(6, 4), class_token=False)[-1] == 25
    assert token_counts(20, [5, 2, 0]) == [15, 13, 13]
    assert token_counts(9, [100, 100]) == [5, 3]  # clamped each layer: (9-1)//2=4, (5-1)//2=2
    with pytest.raises(ValueError, match="lower r"):
        check_schedule(17, [8, 8])  # would leave only the class token


def test_tomeformer_paper_size_257_to_29():
    tf = TomeFormer(BertConfig(), r=19, vision_width=1408).eval()  # bert-base shape, 12 layers
    with torch.no_grad():
        tokens, sizes = tf(torch.randn(2, 257, 1408))
    assert tokens.shape == (2, 29, 768)
    assert torch.all(sizes.sum(dim=(1, 2)) == 257)
    assert torch.all(sizes[:, 0] == 1)  # the class token is never merged
    assert tf.token_counts(257) == [257 - 19 * (i + 1) for i in range(12)]
    assert tf.check_input_tokens(257) == 29


@pytest.mark.parametrize("schedule", [2, (3, 0.5), [4, 2, 1]])
def test_tomeformer_token_counts_follow_schedule(schedule):
    tf = TomeFormer(BertConfig(**TINY_BERT), r=schedule, vision_width=16).eval()
    tokens, sizes = tf(torch.randn(2, 30, 16))
    assert tokens.shape[1] == tf.token_counts(30)[-1] == 30 - sum(parse_r(3, schedule))
    assert torch.all(sizes.sum(dim=(1, 2)) == 30)


def test_proportional_attention_uses_sizes():
    config = BertConfig(**TINY_BERT)
    torch.manual_seed(0)
    plain = TomeLayer(config, r=0, class_token=True, prop_attn=False).eval()
    prop = TomeLayer(config, r=0, class_token=True, prop_attn=True).eval()
    prop.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 32)
    ones = torch.ones(2, 7, 1)
    torch.testing.assert_close(plain(x, ones)[0], prop(x, ones)[0])  # log(1) = 0: identical
    sizes = torch.tensor([1.0, 5, 1, 1, 3, 1, 1]).view(1, 7, 1).expand(2, 7, 1)
    assert not torch.allclose(plain(x, sizes)[0], prop(x, sizes)[0])


def test_tomeformer_without_merging_matches_hf_bert(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).eval()
    bert.save_pretrained(tmp_path / "bert")
    tf = TomeFormer.from_bert(str(tmp_path / "bert"), r=0, vision_width=16, num_layers=2).eval()
    assert len(tf.layer) == 2
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        ours, _ = tf(x)
        h = tf.LayerNorm(tf.vl_proj(tf.ln_vision(x)))
        theirs = h
        for layer in bert.encoder.layer[:2]:
            theirs = layer(theirs)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tf.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight)


def test_tomeformer_from_bert_rejects_too_many_layers(tmp_path):
    BertModel(BertConfig(**TINY_BERT)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="has 3 layers"):
        TomeFormer.from_bert(str(tmp_path / "bert"), r=1, vision_width=16, num_layers=4)
