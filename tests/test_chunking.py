import numpy as np
import pytest

from dsl_fed.data.chunking import chunk_signal, count_chunks, iter_chunks, normalise_chunks
from dsl_fed.errors import DslFedError

W, H = 8, 3  # window and hop in samples


@pytest.mark.parametrize(
    "length,expected",
    [
        (1, 1),  # far shorter than one window: one padded chunk
        (W - 1, 1),
        (W, 1),  # exactly one window: no padding, no second chunk
        (W + 1, 2),  # one sample over: a second, mostly padded chunk keeps it
        (W + H - 1, 2),
        (W + H, 2),  # exactly two windows
        (W + H + 1, 3),
        (W + 2 * H, 3),
        (W + 10 * H, 11),
    ],
)
def test_chunk_counts_at_edge_lengths(length, expected):
    x = np.arange(1, length + 1, dtype=np.float32)
    chunks = chunk_signal(x, W, H)
    assert chunks.shape == (expected, W) and chunks.dtype == np.float32
    assert count_chunks(length, W, H) == expected
    # every sample appears, in order, at its place; everything past the end is zero padding
    for i, chunk in enumerate(chunks):
        start = i * H
        real = x[start : start + W]
        np.testing.assert_array_equal(chunk[: real.size], real)
        assert not chunk[real.size :].any()
    covered = set()
    for i in range(expected):
        covered.update(range(i * H, min(i * H + W, length)))
    assert covered == set(range(length))


def test_padding_amounts():
    assert not chunk_signal(np.ones(W + H - 1), W, H)[-1][W - 1]  # last sample of chunk 2 is padding
    assert chunk_signal(np.ones(W + H - 1), W, H)[-1].sum() == W - 1
    assert chunk_signal(np.ones(W + H), W, H)[-1].sum() == W  # exact fit: no padding
    assert chunk_signal(np.ones(3), W, H).sum() == 3


def test_hop_equal_to_window_tiles_without_overlap():
    chunks = chunk_signal(np.arange(1, 17, dtype=np.float32), 4, 4)
    np.testing.assert_array_equal(chunks.ravel(), np.arange(1, 17))


def test_hop_longer_than_window_skips_gaps_and_never_emits_an_all_padding_chunk():
    x = np.arange(1, 13, dtype=np.float32)  # 12 samples, window 2, hop 5: starts 0, 5, 10
    chunks = chunk_signal(x, 2, 5)
    np.testing.assert_array_equal(chunks, [[1, 2], [6, 7], [11, 12]])
    assert count_chunks(11, 2, 5) == 3 and chunk_signal(x[:11], 2, 5)[-1].tolist() == [11, 0]
    assert count_chunks(10, 2, 5) == 2  # a start at 10 would lie outside the signal


def test_empty_signal_still_gives_one_zero_chunk():
    chunks = chunk_signal(np.zeros(0), W, H)
    assert chunks.shape == (1, W) and not chunks.any()


@pytest.mark.parametrize("chunk,hop", [(0, 1), (4, 0), (-2, 1)])
def test_invalid_sizes(chunk, hop):
    with pytest.raises(DslFedError):
        chunk_signal(np.ones(10), chunk, hop)


def test_two_dimensional_input_is_rejected():
    with pytest.raises(DslFedError, match="1-D"):
        chunk_signal(np.ones((2, 10)), 4, 2)


def test_normalise_peaks_to_one_keeps_silence_and_is_idempotent():
    chunks = np.array([[0.1, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -1.0, 0.3], [1e-30, 0, 0, -2e-30]], np.float32)
    with np.errstate(all="raise"):  # no division-by-zero or invalid-value warnings for the silent chunk
        once = normalise_chunks(chunks)
    np.testing.assert_allclose(once[0], [0.2, -1.0, 0.5, 0.0], rtol=1e-6)
    assert not once[1].any()
    np.testing.assert_allclose(once[2], [1.0, 0.5, -1 / 3, 0.1], rtol=1e-6)
    assert np.max(np.abs(once), axis=1).tolist() == [1.0, 0.0, 1.0, 1.0]
    np.testing.assert_array_equal(normalise_chunks(once), once)  # exactly, not approximately
    assert once.dtype == np.float32 and once.shape == chunks.shape


def test_normalise_random_chunks_is_exactly_idempotent():
    chunks = np.random.default_rng(0).normal(size=(50, 1000)).astype(np.float32) * 0.01
    once = normalise_chunks(chunks)
    assert np.all(np.max(np.abs(once), axis=1) == 1.0)
    np.testing.assert_array_equal(normalise_chunks(once), once)


def test_normalise_single_chunk():
    np.testing.assert_allclose(normalise_chunks(np.array([0.0, -4.0, 2.0])), [0.0, -1.0, 0.5])


def test_chunks_of_a_stream_of_blocks_equal_chunk_signal():
    """Any block sizes, hop shorter, equal or longer than the window, signals shorter and longer than one."""
    rng = np.random.default_rng(1)
    for _ in range(500):
        n, chunk, hop = int(rng.integers(0, 300)), int(rng.integers(1, 50)), int(rng.integers(1, 70))
        x = rng.standard_normal(n).astype(np.float32)
        blocks = np.split(x, np.sort(rng.integers(0, n + 1, size=int(rng.integers(0, 5)))))
        got = list(iter_chunks(iter(blocks), chunk, hop))
        np.testing.assert_array_equal(np.array(got).reshape(-1, chunk), chunk_signal(x, chunk, hop))
