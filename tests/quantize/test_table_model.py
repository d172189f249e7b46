"""Tests of the code-table recommender: item vectors, the encoder, params round trips."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantize.exceptions import QuantizeError
from quantize.table_model import (
    DOMAIN_PREFIX,
    PRODUCT_PAD,
    ModelConfig,
    Snapshot,
    _Block,
    _Dropout,
    _product,
    borrow_trained_codes,
    build_model,
    domain_names,
    export_params,
    history_mask,
    load_params,
    model_from_params,
    pad_rows,
    served_depth,
    shared_names,
)
from tests.text_reference import TEXT_IN, slow_text_part

ROWS = pad_rows([[0, 3], [1], [2, 4, 5], [0, 4]])


def _config(**kw: object) -> ModelConfig:
    base: dict[str, object] = {"hidden": 8, "max_len": 6, "heads": 2, "layers": 1}
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def test_pad_rows_pads_with_minus_one() -> None:
    assert ROWS.tolist() == [[0, 3, -1], [1, -1, -1], [2, 4, 5], [0, 4, -1]]
    with pytest.raises(QuantizeError):
        pad_rows([[1, 2, 3]], width=2)


def test_item_vectors_are_sums_of_code_rows() -> None:
    torch.manual_seed(0)
    model = build_model(_config(), ROWS)
    rows = model.table.rows.detach().numpy()
    vecs = model.item_vectors(torch.as_tensor(ROWS)).detach().numpy()
    expected = np.stack([rows[[r for r in code if r >= 0]].sum(axis=0) for code in ROWS])
    np.testing.assert_allclose(vecs, expected, rtol=1e-6, atol=1e-6)


def test_level_weights_scale_each_code_position() -> None:
    torch.manual_seed(0)
    model = build_model(_config(combine="level"), ROWS)
    assert model.table.level_weight is not None
    with torch.no_grad():
        model.table.level_weight.copy_(torch.tensor([1.0, 0.5, 2.0]))
    rows = model.table.rows.detach().numpy()
    vecs = model.item_vectors(torch.as_tensor(ROWS)).detach().numpy()
    np.testing.assert_allclose(
        vecs[2], rows[2] + 0.5 * rows[4] + 2.0 * rows[5], rtol=1e-6, atol=1e-6
    )
    with pytest.raises(QuantizeError):
        model.item_vectors(torch.as_tensor(pad_rows([[0, 1, 2, 3]])))


@pytest.mark.parametrize("text_hidden", [0, 6])
def test_the_text_part_is_added_to_the_code_rows(text_hidden: int) -> None:
    torch.manual_seed(0)
    model = build_model(_config(text_dim=5, text_hidden=text_hidden), ROWS)
    text = torch.randn(4, 5)
    got = model.item_vectors(torch.as_tensor(ROWS), text).detach().numpy()
    params = export_params(model)
    assert (TEXT_IN in params) == bool(text_hidden)
    rows = params["table.rows"].astype(np.float64)
    for i, item_rows in enumerate(ROWS):
        code = sum((rows[r] for r in item_rows if r >= 0), np.zeros(rows.shape[1]))
        expected = code + slow_text_part(params, text[i].numpy())
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantizeError):
        model.item_vectors(torch.as_tensor(ROWS))


def test_configurations_written_before_the_text_adaptor_read_as_a_linear_map() -> None:
    old = {k: v for k, v in _config(text_dim=5).to_dict().items() if k != "text_hidden"}
    assert ModelConfig.from_dict(old).text_hidden == 0
    assert ModelConfig().text_hidden > 0  # the adaptor is the default for new models
    assert ModelConfig.from_dict(_config(text_hidden=7).to_dict()).text_hidden == 7
    with pytest.raises(QuantizeError, match="text_hidden"):
        ModelConfig(text_hidden=-1)


@pytest.mark.parametrize("encoder", ["transformer", "attention"])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), cut=st.integers(1, 5))
def test_encoder_is_causal_and_padding_invariant(encoder: str, seed: int, cut: int) -> None:
    torch.manual_seed(seed)
    model = build_model(_config(encoder=encoder), ROWS).eval()
    vecs = model.item_vectors(torch.as_tensor(ROWS))
    rng = np.random.default_rng(seed)
    seq = torch.as_tensor(rng.integers(0, 4, size=(1, 6)))
    out = model.encode(seq, vecs)
    # causal: changing items after position `cut - 1` leaves positions < cut unchanged
    changed = seq.clone()
    changed[0, cut:] = (changed[0, cut:] + 1) % 4
    np.testing.assert_allclose(
        model.encode(changed, vecs)[0, :cut].detach().numpy(),
        out[0, :cut].detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    # padding: the last state of the last `cut` items is the same with or without left pads
    short = seq[:, -cut:]
    padded = torch.cat([torch.full((1, 6 - cut), -1), short], dim=1)
    np.testing.assert_allclose(
        model.encode(short, vecs)[0, -1].detach().numpy(),
        model.encode(padded, vecs)[0, -1].detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_cosine_scores_are_bounded_by_inverse_temperature() -> None:
    torch.manual_seed(0)
    model = build_model(_config(temperature=0.5), ROWS).eval()
    vecs = model.item_vectors(torch.as_tensor(ROWS))
    scores = model.score_last(torch.as_tensor([[-1, 0, 1, 2, 3, 0]]), vecs)
    assert scores.shape == (1, 4)
    assert float(scores.detach().abs().max()) <= 2.0 + 1e-5


def test_repeat_bias_shifts_only_items_in_the_history() -> None:
    torch.manual_seed(0)
    model = build_model(_config(temperature=0.5), ROWS).eval()
    assert model.table.repeat is not None
    vecs = model.item_vectors(torch.as_tensor(ROWS))
    seq = torch.as_tensor([[-1, -1, 2, 0, 2]])  # padding must not hide the real item 0
    before = model.score_last(seq, vecs).detach()
    with torch.no_grad():
        model.table.repeat.fill_(-1.0)
    after = model.score_last(seq, vecs).detach()
    # cosine scores are divided by the temperature, and so is the offset
    np.testing.assert_allclose((after - before).numpy(), [[-2.0, 0.0, -2.0, 0.0]], atol=1e-5)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_score_chunk_equals_score_last_over_any_chunking(width: int) -> None:
    """The repeat offset lands on a chunk's history items once each (an item repeated in a
    history, item 0 beside padding, items outside the chunk ignored), and the chunks joined
    are :meth:`score_last` over every item (up to the matrix product's rounding)."""
    torch.manual_seed(0)
    model = build_model(_config(temperature=0.5), ROWS).eval()
    with torch.no_grad():
        model.table.repeat.fill_(-0.75)
        vecs = model.item_vectors(torch.as_tensor(ROWS))
        seqs = torch.as_tensor([[-1, -1, 2, 0, 2], [3, 3, 3, 1, 0], [-1, -1, -1, -1, 1]])
        full = model.score_last(seqs, vecs)
        states = model.last_states(seqs, vecs)
        n = vecs.shape[0]
        chunks = [
            (
                model.score_chunk(states, seqs, vecs[a : a + width], a),
                model.logits(states, vecs[a : a + width]),
            )
            for a in range(0, n, width)
        ]
    shift = torch.cat([scored - plain for scored, plain in chunks], dim=1)
    in_history = [[i in row.tolist() for i in range(n)] for row in seqs]
    expected = torch.where(torch.as_tensor(in_history), float(model.repeat_offset().detach()), 0.0)
    torch.testing.assert_close(shift, expected, rtol=0, atol=1e-6)  # once per item, exactly there
    torch.testing.assert_close(torch.cat([c for c, _ in chunks], dim=1), full)


def test_history_mask_matches_a_loop() -> None:
    seqs = torch.as_tensor([[-1, 3, 1, 3], [0, 2, -1, 4]])
    keep = torch.as_tensor([[False, True, True, True], [True, False, False, True]])
    slot = torch.as_tensor([0, -1, 1, 2, 3])  # item 1 is not a candidate
    mask = history_mask(seqs, keep, slot, 4)
    expected = []
    for b in range(2):
        for t in range(4):
            if not keep[b, t]:
                continue
            row = [False] * 4
            for s in range(t + 1):
                item = int(seqs[b, s])
                if item >= 0 and int(slot[item]) >= 0:
                    row[int(slot[item])] = True
            expected.append(row)
    assert mask.tolist() == expected


@pytest.mark.parametrize("combine", ["sum", "level"])
def test_export_load_round_trip_is_exact(combine: str) -> None:
    torch.manual_seed(1)
    config = _config(combine=combine, text_dim=3)
    model = build_model(config, ROWS, n_rows=9)
    params = export_params(model)
    restored = model_from_params(config, params)
    again = export_params(restored)
    assert params.keys() == again.keys()
    for name in params:
        assert params[name].dtype == again[name].dtype
        assert np.array_equal(params[name], again[name]), name
    # and the exported arrays are copies, not views into the live model
    with torch.no_grad():
        model.table.rows.add_(1.0)
    assert np.array_equal(export_params(restored)["table.rows"], params["table.rows"])


def test_snapshot_bytes_round_trip_is_exact() -> None:
    torch.manual_seed(2)
    config = _config(encoder="attention", score="dot")
    params = export_params(build_model(config, ROWS))
    snap = Snapshot(config, params)
    back = Snapshot.from_bytes(snap.to_bytes())
    assert back.config == config
    assert back.params.keys() == params.keys()
    for name in params:
        assert np.array_equal(back.params[name], params[name]), name
    assert back.table_bytes() == sum(params[n].nbytes for n in domain_names(params))
    seq = torch.as_tensor([[0, 1, 2]])
    rows = torch.as_tensor(ROWS)
    a = snap.model()
    b = back.model()
    assert torch.equal(
        a.score_last(seq, a.item_vectors(rows)), b.score_last(seq, b.item_vectors(rows))
    )


def test_snapshot_from_garbage_raises() -> None:
    with pytest.raises(QuantizeError):
        Snapshot.from_bytes(b"not a snapshot")


def test_partial_load_copies_the_overlap_of_a_grown_table() -> None:
    torch.manual_seed(3)
    config = _config()
    small = export_params(build_model(config, ROWS, n_rows=6))
    grown = build_model(config, ROWS, n_rows=10)
    fresh_tail = grown.table.rows.detach()[6:].clone()
    load_params(grown, small, partial=True)
    rows = grown.table.rows.detach().numpy()
    assert np.array_equal(rows[:6], small["table.rows"])
    assert np.array_equal(rows[6:], fresh_tail.numpy())
    with pytest.raises(QuantizeError):
        load_params(grown, small)  # an exact load refuses the mismatch


def test_params_split_into_domain_and_shared() -> None:
    config = _config(text_dim=2, combine="level")
    model = build_model(config, ROWS)
    params = export_params(model)
    domain = domain_names(params)
    shared = shared_names(params)
    assert set(domain) == {
        "table.rows",
        "table.level_weight",
        "table.text_proj.weight",
        "table.text_in.weight",
        "table.text_in.bias",
        "table.repeat",
    }
    assert all(n.startswith("encoder.") for n in shared)
    assert set(domain) | set(shared) == set(params)
    n_domain = sum(p.numel() for p in model.domain_parameters())
    assert n_domain == sum(params[n].size for n in params if n.startswith(DOMAIN_PREFIX))


def test_invalid_inputs_raise_quantize_error() -> None:
    with pytest.raises(QuantizeError):
        ModelConfig(hidden=10, heads=3)
    with pytest.raises(QuantizeError):
        ModelConfig(encoder="rnn")  # type: ignore[arg-type]
    with pytest.raises(QuantizeError):
        build_model(_config(), np.array([[-1, 2]]))
    with pytest.raises(QuantizeError):
        build_model(_config(), ROWS, n_rows=3)
    with pytest.raises(QuantizeError):
        ModelConfig.from_dict({"hidden": 8, "colour": "red"})


def _reference_borrow(
    served: np.ndarray, full: np.ndarray, trained: np.ndarray, min_share: int = 2
) -> np.ndarray:
    """Slow reference: each untrained item takes the longest prefix of its path that at
    least ``min_share`` trained items' codes (path prefixes) pass through."""
    out = served.copy()
    codes = []
    for j in np.flatnonzero(trained):
        depth = 0
        while depth < full.shape[1] and served[j, depth] == full[j, depth]:
            depth += 1
        codes.append(tuple(full[j, :depth].tolist()))
    for i in np.flatnonzero(~trained):
        own = tuple(full[i].tolist())
        best = 0
        for d in range(1, len(own) + 1):
            through = sum(1 for c in codes if len(c) >= d and c[:d] == own[:d])
            if through >= min_share:
                best = d
        if best:
            out[i] = -1
            out[i, :best] = full[i, :best]
    return out


def _random_codes(seed: int, n: int = 30, levels: int = 3, k: int = 3):
    """Full paths (level rows) and served codes: random prefixes, some with an extra row."""
    rng = np.random.default_rng(seed)
    digits = rng.integers(0, k, size=(n, levels))
    full = np.arange(levels)[None, :] * k + digits
    lengths = rng.integers(1, levels + 1, size=n)
    served = np.full((n, levels + 1), -1, dtype=np.int64)
    for i in range(n):
        served[i, : lengths[i]] = full[i, : lengths[i]]
        if lengths[i] == levels and rng.random() < 0.3:
            served[i, levels] = levels * k + i  # a disambiguation row of its own
    trained = rng.random(n) < 0.6
    return served, full, trained


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000))
def test_borrow_trained_codes_matches_reference(seed: int) -> None:
    served, full, trained = _random_codes(seed)
    out = borrow_trained_codes(served, full, trained)
    assert out.tolist() == _reference_borrow(served, full, trained).tolist()
    # trained items never change; a changed code is a plain prefix of the item's own path
    assert np.array_equal(out[trained], served[trained])
    depth = served_depth(out, full)
    changed = (out != served).any(axis=1)
    assert not changed[trained].any()
    for i in np.flatnonzero(changed):
        assert (out[i] >= 0).sum() == depth[i] >= 1


def _rowwise_borrow(served: np.ndarray, full: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """A reference at sizes the loop reference cannot take: prefix groups by
    ``np.unique(full[:, :d], axis=0)`` (row-wise compares), counted with a Counter."""
    depth = served_depth(served, full)
    levels = min(full.shape[1], served.shape[1])
    borrow = np.zeros(served.shape[0], dtype=np.int64)
    for d in range(1, levels + 1):
        inverse = np.unique(full[:, :d], axis=0, return_inverse=True)[1].reshape(-1)
        through = Counter(inverse[trained & (depth >= d)].tolist())
        shared = np.array([through[g] >= 2 for g in inverse.tolist()])
        borrow[shared & ~trained] = d
    out = served.copy()
    for i in np.flatnonzero(borrow):
        out[i] = -1
        out[i, : borrow[i]] = full[i, : borrow[i]]
    return out


@pytest.mark.parametrize(("n", "levels", "k"), [(5_000, 4, 8), (20_000, 6, 64), (3_000, 2, 300)])
def test_borrow_trained_codes_matches_the_rowwise_grouping_at_size(
    n: int, levels: int, k: int
) -> None:
    """Prefixes numbered as integers group the items as row-wise compares do, on catalogues
    with many shared prefixes (few digits) and few (many digits), some trained deep."""
    rng = np.random.default_rng(n + levels + k)
    digits = np.minimum(rng.zipf(1.3, size=(n, levels)) - 1, k - 1)
    full = np.arange(levels)[None, :] * k + digits
    lengths = rng.integers(1, levels + 1, size=n)
    served = np.where(np.arange(levels)[None, :] < lengths[:, None], full, -1)
    trained = rng.random(n) < 0.3
    out = borrow_trained_codes(served, full, trained)
    assert np.array_equal(out, _rowwise_borrow(served, full, trained))
    assert (out != served).any()  # some items did borrow


def test_borrowed_code_is_the_deepest_prefix_several_trained_items_share() -> None:
    full = np.array([[0, 10, 20], [0, 10, 21], [0, 11, 20], [1, 10, 20], [0, 10, 22]])
    served = pad_rows([[0, 10], [0, 10, 21], [0, 11, 20, 99], [1], [0]], width=4)
    trained = np.array([True, True, True, False, False])
    out = borrow_trained_codes(served, full, trained)
    assert out[4].tolist() == [0, 10, -1, -1]  # items 0 and 1 both pass through [0, 10]
    assert out[3].tolist() == [1, -1, -1, -1]  # no trained code on its path: unchanged
    assert served_depth(served, full).tolist() == [2, 3, 3, 1, 1]  # row 99 is off the path
    # one trained item is not enough: item 1's own code [0, 10, 21] is not borrowed, and
    # with item 1 untrained [0, 10] is item 0's alone, so item 4 falls back to [0]
    assert borrow_trained_codes(served, full, trained, min_share=1)[4].tolist() == [0, 10, -1, -1]
    alone = np.array([True, False, True, False, False])
    assert borrow_trained_codes(served, full, alone)[4].tolist() == [0, -1, -1, -1]
    assert borrow_trained_codes(served, full, alone)[1].tolist() == [0, -1, -1, -1]
    assert borrow_trained_codes(served, full, alone, min_share=1)[4].tolist() == [0, 10, -1, -1]
    with pytest.raises(QuantizeError):
        borrow_trained_codes(served, full, trained[:3])
    with pytest.raises(QuantizeError):
        borrow_trained_codes(served, full[:3], trained)
    with pytest.raises(QuantizeError, match="min_share"):
        borrow_trained_codes(served, full, trained, min_share=0)


def test_borrowing_gives_a_new_item_its_relatives_shared_row_vector() -> None:
    model = build_model(_config(), pad_rows([[0, 3], [0], [1, 4]], width=3), n_rows=6)
    full = np.array([[0, 3, 5], [0, 2, 5], [0, 3, 4], [0, 3, 5]])
    served = pad_rows([[0, 3], [0], [0, 3, 4], [0, 3, 5]], width=3)
    trained = np.array([True, True, False, False])
    out = borrow_trained_codes(served, full, trained)
    vecs = model.item_vectors(torch.as_tensor(out)).detach()
    # row 0 was trained by both items, row 3 by item 0 alone: the new item is not item 0's clone
    assert torch.equal(vecs[2], vecs[1])
    assert not torch.equal(vecs[2], model.item_vectors(torch.as_tensor(served)).detach()[2])
    trained[3] = True  # a second trained item through [0, 3]: now it is shared
    out = borrow_trained_codes(served, full, trained)
    assert out[2].tolist() == [0, 3, -1]


def test_dropout_keeps_the_expectation_and_drops_its_share() -> None:
    drop = _Dropout(0.25).train()
    x = torch.ones(200, 500)
    torch.manual_seed(0)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert dropped == pytest.approx(0.25, abs=0.01)
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    assert float(y.mean()) == pytest.approx(1.0, abs=0.02)
    assert torch.equal(drop.eval()(x), x)  # eval: the identity


def test_training_attention_is_scaled_dot_product_attention_when_nothing_drops() -> None:
    """The block's own attention (taken in training, for its faster dropout mask) computes
    what ``scaled_dot_product_attention`` does: with a dropout too small to drop anything,
    training and evaluation outputs agree."""
    torch.manual_seed(1)
    block = _Block(hidden=16, heads=2, dropout=1e-12)
    x = torch.randn(3, 7, 16)
    idx = torch.arange(7)
    mask = (idx.view(1, -1) <= idx.view(-1, 1)).unsqueeze(0).expand(3, 7, 7).clone()
    mask[0, :, :2] = False
    mask[0, torch.arange(7), torch.arange(7)] = True
    trained = block.train()(x, mask)
    evaluated = block.eval()(x, mask)
    torch.testing.assert_close(trained, evaluated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", [(37,), (3, 29), (PRODUCT_PAD,), (1,)])
@pytest.mark.parametrize("m", [1, 200, PRODUCT_PAD * 2])
def test_the_bfloat16_product_is_the_unpadded_product(lead: tuple[int, ...], m: int) -> None:
    """Padding the operands' rows changes no entry: the result (any leading dimensions) is
    the plain bfloat16 product's, within float32 summation order, and the float32 one's
    within bfloat16 rounding; gradients reach both operands alike."""
    gen = torch.Generator().manual_seed(m)
    a = torch.randn(*lead, 24, generator=gen, requires_grad=True)
    b = torch.randn(m, 24, generator=gen, requires_grad=True)
    out = _product(a, b, torch.bfloat16)
    assert out.shape == (*lead, m) and out.dtype == torch.float32
    plain = (a.bfloat16() @ b.bfloat16().T).float()
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, a @ b.T, rtol=0.05, atol=0.1)
    (out * plain.detach()).sum().backward()
    grad_a, grad_b = a.grad, b.grad
    a.grad = b.grad = None
    ((a.bfloat16() @ b.bfloat16().T).float() * plain.detach()).sum().backward()
    torch.testing.assert_close(grad_a, a.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_b, b.grad, rtol=1e-5, atol=1e-4)


def test_the_bfloat16_product_reaches_few_shapes() -> None:
    """A sampled loss's operands change size at every step; the bfloat16 kernel (oneDNN on
    the CPU, which keeps a kernel and its buffers per shape) sees rows in multiples of
    PRODUCT_PAD only: 300 products of 300 random sizes, a few dozen shapes."""
    shapes: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()

    class Shapes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
                shapes.add((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    rng = np.random.default_rng(0)
    with Shapes():
        for p, m in zip(rng.integers(1, 800, 300), rng.integers(900, 1900, 300), strict=True):
            _product(torch.zeros(int(p), 8), torch.zeros(int(m), 8), torch.bfloat16)
    assert shapes  # the products were seen
    assert all(s[0][0] % PRODUCT_PAD == 0 and s[1][1] % PRODUCT_PAD == 0 for s in shapes)
    assert len(shapes) <= (800 // PRODUCT_PAD + 1) * (1000 // PRODUCT_PAD + 2)
