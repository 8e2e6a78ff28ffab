"""Packed sampling, global order, exact resume, blending, loaders, token-id check."""

from __future__ import annotations

import numpy as np
import pytest

from hpctrain.launcher.contract.corpus import Corpus, TokenStream, check_token_ids, open_corpus
from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.indexed import IndexedFile, IndexedWriter
from hpctrain.trainers.data.loader import TrainBatches
from hpctrain.trainers.data.sampler import PackedSource, SampleOrder, _key, feistel_permute


def _stream(tmp_path, name, n_tokens, n_docs=7, offset=0) -> TokenStream:
    w = IndexedWriter(tmp_path / name, np.int32)
    for chunk in np.array_split(np.arange(offset, offset + n_tokens), n_docs):
        w.add_document(chunk)
    w.close()
    return TokenStream((IndexedFile(tmp_path / name),))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 4097, 50_000])
def test_feistel_is_a_permutation(n):
    p = feistel_permute(np.arange(n), n, _key(3, 1))
    assert np.array_equal(np.sort(p), np.arange(n))


def test_packed_samples_cross_documents_and_share_the_target_token(tmp_path):
    src = PackedSource(_stream(tmp_path, "a", 100, n_docs=4), seq_len=10)
    assert src.num_samples == 9
    np.testing.assert_array_equal(src.sample(0), np.arange(0, 11))
    np.testing.assert_array_equal(src.sample(3), np.arange(30, 41))
    # documents of 25 tokens start at 0, 25, 50, 75
    np.testing.assert_array_equal(src.document_starts(2), [5])


def test_same_seed_same_order_other_seed_other_order():
    a = SampleOrder([1000], seed=1).take(500)[1]
    b = SampleOrder([1000], seed=1).take(500)[1]
    c = SampleOrder([1000], seed=2).take(500)[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    o = SampleOrder([97], seed=0)
    e1, e2 = o.take(97)[1], o.take(97)[1]
    assert sorted(e1) == sorted(e2) == list(range(97))
    assert not np.array_equal(e1, e2)


def test_resume_draws_exactly_the_uninterrupted_samples():
    ref = SampleOrder([300, 50], [0.7, 0.3], seed=9)
    ref_src, ref_idx = ref.take(1000)
    first = SampleOrder([300, 50], [0.7, 0.3], seed=9)
    first.take(437)
    state = first.state_dict()
    resumed = SampleOrder([300, 50], [0.7, 0.3], seed=9)
    resumed.load_state_dict(state)
    src, idx = resumed.take(563)
    assert np.array_equal(src, ref_src[437:]) and np.array_equal(idx, ref_idx[437:])


def test_resume_refuses_changed_data():
    s = SampleOrder([300], seed=9).state_dict()
    with pytest.raises(UserError, match="data changed"):
        SampleOrder([301], seed=9).load_state_dict(s)


@pytest.mark.parametrize(
    "weights",
    [[0.3, 0.7], [0.5, 0.3, 0.2], [0.01, 0.99], [1, 1, 1], [0.1, 0.2, 0.3, 0.4], [0.05, 0.05, 0.9]],
)
def test_blend_weights_hold_within_one_sample_in_every_window_of_1000(weights):
    o = SampleOrder([10_000] * len(weights), weights, seed=0)
    src, _ = o.take(30_000)
    w = np.asarray(weights) / sum(weights)
    cum = np.zeros((len(src) + 1, len(w)))
    for s in range(len(w)):
        cum[1:, s] = np.cumsum(src == s)
    windows = cum[1000:] - cum[:-1000]  # every window of 1000 consecutive samples
    assert np.abs(windows - w * 1000).max() <= 1.0 + 1e-9


def _tokens_seen(sources, weights, seed, gb, mb, world, steps, start_state=None):
    """Every rank's micro-batches for `steps` steps, concatenated in global order."""
    loaders = [TrainBatches(sources, weights, seed, gb, mb, r, world) for r in range(world)]
    if start_state:
        for ld in loaders:
            ld.load_state_dict(start_state)
    out = []
    for _ in range(steps):
        per_rank = [np.concatenate([m["tokens"].numpy() for m in ld.next_step()]) for ld in loaders]
        out.append(np.concatenate(per_rank))
    return out, loaders[0].state_dict()


def test_global_order_is_the_same_for_any_world_size_and_resumes_across_a_change(tmp_path):
    sources = [
        PackedSource(_stream(tmp_path, "a", 5000), 16),
        PackedSource(_stream(tmp_path, "b", 3000, offset=10**6), 16),
    ]
    one, _ = _tokens_seen(sources, [0.6, 0.4], 3, gb=8, mb=2, world=1, steps=12)
    two, _ = _tokens_seen(sources, [0.6, 0.4], 3, gb=8, mb=2, world=2, steps=12)
    four, _ = _tokens_seen(sources, [0.6, 0.4], 3, gb=8, mb=1, world=4, steps=12)
    for a, b, c in zip(one, two, four, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    # stop after 5 steps on 2 ranks, resume on 1 rank (and on 4): the same next batches
    _, state = _tokens_seen(sources, [0.6, 0.4], 3, gb=8, mb=2, world=2, steps=5)
    rest1, _ = _tokens_seen(sources, [0.6, 0.4], 3, gb=8, mb=4, world=1, steps=7, start_state=state)
    rest4, _ = _tokens_seen(sources, [0.6, 0.4], 3, gb=8, mb=2, world=4, steps=7, start_state=state)
    for a, b, c in zip(one[5:], rest1, rest4, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_dataloader_workers_give_the_same_batches_and_state(tmp_path):
    sources = [PackedSource(_stream(tmp_path, "a", 4000), 32)]
    plain = TrainBatches(sources, None, 5, 8, 2, 0, 2, num_workers=0)
    workers = TrainBatches(sources, None, 5, 8, 2, 0, 2, num_workers=2)
    for _ in range(6):
        for a, b in zip(plain.next_step(), workers.next_step(), strict=True):
            assert np.array_equal(a["tokens"].numpy(), b["tokens"].numpy())
    # prefetching workers ran ahead, yet the state counts only handed-out steps
    assert workers.state_dict() == plain.state_dict()
    assert workers.consumed_samples == 6 * 8


def test_micro_batch_must_divide_the_rank_share(tmp_path):
    sources = [PackedSource(_stream(tmp_path, "a", 4000), 32)]
    with pytest.raises(UserError, match="micro batch"):
        TrainBatches(sources, None, 5, global_batch=8, micro_batch=3, rank=0, world_size=2)
    with pytest.raises(UserError, match="does not divide"):
        TrainBatches(sources, None, 5, global_batch=9, micro_batch=1, rank=0, world_size=2)


def test_token_ids_beyond_the_model_vocab_are_found_at_start(tmp_path):
    _stream(tmp_path, "a", 1000)  # ids 0..999, no manifest: a full scan
    corpus = open_corpus(tmp_path / "a")
    check_token_ids(corpus, 1000)
    with pytest.raises(UserError, match="token id 999 .* vocab size 999"):
        check_token_ids(corpus, 999)
    with_manifest = Corpus(str(tmp_path), {"splits": {"train": {"max_token_id": 5000}}})
    with pytest.raises(UserError, match="5000"):
        check_token_ids(with_manifest, 4096)


class _Examples:
    """Examples of random lengths; a micro-batch is padded to its longest (as ExampleDataset)."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitems__(self, keys):
        return {"idx": [k[1] for k in keys], "width": max(self.lengths[k[1]] for k in keys)}


def _steps(batches, n):
    return [[(mb["idx"], mb["width"]) for mb in batches.next_step()] for _ in range(n)]


def test_length_grouping_cuts_padding_keeps_every_example_and_resumes_exactly():
    lengths = np.random.default_rng(0).integers(5, 300, size=503).tolist()
    ex = _Examples(lengths)

    def make(rank=0, world=1, grouped=True):
        return TrainBatches([], None, 11, 16, 4, rank, world, dataset=ex, lengths=lengths if grouped else None)

    plain, grouped = _steps(make(grouped=False), 100), _steps(make(), 100)  # 2 windows, ~3 epochs
    padded = lambda steps: sum(w * len(i) for s in steps for i, w in s)  # noqa: E731
    real = lambda steps: sum(lengths[j] for s in steps for i, _ in s for j in i)  # noqa: E731
    assert padded(plain) > 1.4 * real(plain) and padded(grouped) < 1.1 * real(grouped)
    # the same examples as often as the plain order, window by window (50 steps of 16)
    flat = lambda steps: [i for s in steps for idx, _ in s for i in idx]  # noqa: E731
    assert sorted(flat(grouped[:50])) == sorted(flat(plain[:50]))
    assert sorted(flat(grouped)) == sorted(flat(plain))
    # resume at step 37 (inside the first window) and on 2 ranks: the same global steps
    b = make()
    _steps(b, 37)
    again = make()
    again.load_state_dict(b.state_dict())
    assert _steps(again, 63) == grouped[37:]
    ranks = [make(r, 2) for r in (0, 1)]
    for step in grouped[:60]:
        both = [i for r in ranks for mb in r.next_step() for i in mb["idx"]]
        assert both == [i for idx, _ in step for i in idx]


def test_grouped_micro_batches_are_of_one_length_while_a_step_mixes_lengths():
    """With several micro-batches per step, each micro-batch is grouped (little padding) and the
    step's micro-batches come from anywhere in the window, so its gradient mixes short and long
    examples as an ungrouped step does. A checkpoint written before micro-batch groups (its
    sampler state without a unit) resumes grouping whole steps, the order it began with."""
    lengths = np.random.default_rng(1).integers(5, 300, size=800).tolist()
    ex = _Examples(lengths)

    def make(micro=4, grouped=True):
        return TrainBatches([], None, 3, 16, micro, 0, 1, dataset=ex, lengths=lengths if grouped else None)

    def spread(steps):  # the mean over steps of (longest - shortest example of the step)
        return np.mean([max(lengths[j] for i, _ in s for j in i) - min(lengths[j] for i, _ in s for j in i)
                        for s in steps])

    plain, by_micro, whole = _steps(make(grouped=False), 50), _steps(make(), 50), _steps(make(micro=16), 50)
    padded = lambda steps: sum(w * len(i) for s in steps for i, w in s)  # noqa: E731
    real = lambda steps: sum(lengths[j] for s in steps for i, _ in s for j in i)  # noqa: E731
    assert padded(by_micro) < 1.05 * real(by_micro) < 1.05 / 1.4 * padded(plain)
    assert spread(by_micro) > 0.6 * spread(plain) and spread(whole) < 0.1 * spread(plain)
    flat = lambda steps: sorted(i for s in steps for idx, _ in s for i in idx)  # noqa: E731
    assert flat(by_micro) == flat(plain) == flat(whole)

    old = make(micro=16)
    _steps(old, 20)
    state = old.state_dict()
    assert state.pop("length_unit") == 16
    resumed = make()  # now 4 micro-batches of 4 a step, from a checkpoint without a unit
    resumed.load_state_dict(state)
    got = _steps(resumed, 30)
    assert [sorted(i for idx, _ in s for i in idx) for s in got] == [sorted(i for idx, _ in s for i in idx)
                                                                     for s in whole[20:]]
    again = make()
    again.load_state_dict(resumed.state_dict())  # and it keeps whole steps after its own checkpoints
    assert again.state_dict()["length_unit"] == 16
