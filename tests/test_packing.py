"""GPTQ tensor packing: bit-exact layout, round trips, v1/v2 zeros and input validation."""

from __future__ import annotations

import pytest
import torch

from gptq_format.packing import (
    SUPPORTED_BITS,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)

SHAPES = [(1, 32), (48, 64), (96, 256), (7, 128), (256, 96)]  # (rows, packed-dim length), non-square


def _to_int32(u: int) -> int:
    """uint32 bit pattern -> the int32 a checkpoint stores."""
    return u - (1 << 32) if u >= (1 << 31) else u


def _ref_bitstream_pack(values: list[int], bits: int) -> list[int]:
    """Plain-Python reference: concatenate b-bit values little-endian into one stream, cut into words."""
    stream = 0
    for j, v in enumerate(values):
        stream |= v << (bits * j)
    n_words = len(values) * bits // 32
    return [_to_int32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(n_words)]


def _ref_autogptq_3bit(col: list[int]) -> list[int]:
    """Transcription of AutoGPTQ's QuantLinear.pack 3-bit branch for one output column."""
    words: list[int] = []
    i = 0
    while i < len(col):
        w0 = w1 = w2 = 0
        for j in range(i, i + 10):
            w0 |= col[j] << (3 * (j - i))
        i += 10
        w0 |= col[i] << 30
        w1 |= (col[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            w1 |= col[j] << (3 * (j - i) + 1)
        i += 10
        w1 |= col[i] << 31
        w2 |= (col[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            w2 |= col[j] << (3 * (j - i) + 2)
        i += 10
        words += [_to_int32(w & 0xFFFFFFFF) for w in (w0, w1, w2)]
    return words


def _rand_codes(shape: tuple[int, int], bits: int, seed: int, low: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 1 << bits, shape, generator=g, dtype=torch.int64)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_qweight_round_trip(bits: int, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    codes = _rand_codes((out_f, in_f), bits, seed=bits * 1000 + out_f)
    q = pack_qweight(codes, bits)
    assert q.dtype == torch.int32
    assert q.shape == (in_f * bits // 32, out_f)
    back = unpack_qweight(q, bits, in_f)
    assert back.dtype == torch.uint8
    assert back.shape == (out_f, in_f)
    assert torch.equal(back.to(torch.int64), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("v1", [False, True])
def test_qzeros_round_trip(bits: int, shape: tuple[int, int], v1: bool) -> None:
    n_groups, out_f = shape
    zeros = _rand_codes((n_groups, out_f), bits, seed=bits * 7 + n_groups, low=1 if v1 else 0)
    q = pack_qzeros(zeros, bits, v1=v1)
    assert q.dtype == torch.int32
    assert q.shape == (n_groups, out_f * bits // 32)
    back = unpack_qzeros(q, bits, out_f, v1=v1)
    assert back.dtype == torch.int32
    assert torch.equal(back.to(torch.int64), zeros)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_accepts_any_integer_dtype(dtype: torch.dtype) -> None:
    codes = _rand_codes((16, 64), 4, seed=3)
    assert torch.equal(pack_qweight(codes.to(dtype), 4), pack_qweight(codes, 4))


def test_large_layer_round_trip_4bit() -> None:
    codes = _rand_codes((1024, 2048), 4, seed=11)
    assert torch.equal(unpack_qweight(pack_qweight(codes, 4), 4, 2048).to(torch.int64), codes)


# --------------------------------------------------------------------------- known vectors


def test_4bit_known_vector() -> None:
    codes = torch.arange(8, dtype=torch.int64).reshape(1, 8)  # one output column, inputs 0..7
    q = pack_qweight(codes, 4)
    assert q.tolist() == [[0x76543210]]


def test_4bit_known_vector_two_columns_and_words() -> None:
    # out=2, in=16: column 0 = 0..15, column 1 = 15..0; each column spans two words.
    codes = torch.stack([torch.arange(16), torch.arange(15, -1, -1)])
    q = pack_qweight(codes, 4)
    assert q.shape == (2, 2)
    assert q[:, 0].tolist() == [0x76543210, _to_int32(0xFEDCBA98)]
    assert q[:, 1].tolist() == [_to_int32(0x89ABCDEF), 0x01234567]


def test_8bit_known_vector() -> None:
    codes = torch.tensor([[0x01, 0x02, 0x03, 0x04, 0xAA, 0xBB, 0xCC, 0x7F]])
    q = pack_qweight(codes, 8)
    assert q.tolist() == [[0x04030201], [0x7FCCBBAA]]


def test_2bit_known_vector() -> None:
    codes = torch.tensor([[1, 2, 3, 0] * 4])  # 16 values -> 0b00_11_10_01 repeated = 0x39 per byte
    assert pack_qweight(codes, 2).tolist() == [[0x39393939]]


def test_int32_sign_reinterpretation() -> None:
    codes = torch.zeros((1, 8), dtype=torch.int64)
    codes[0, 7] = 15  # top nibble -> bit 31 set
    q = pack_qweight(codes, 4)
    assert q.tolist() == [[-0x10000000]]  # 0xF0000000 as int32
    assert int(q) < 0
    assert pack_qweight(torch.full((1, 8), 15), 4).tolist() == [[-1]]
    assert unpack_qweight(q, 4, 8).tolist() == [[0, 0, 0, 0, 0, 0, 0, 15]]


def test_3bit_straddling_values_by_hand() -> None:
    # value 10 occupies bits 30..32 (word 0 bits 30,31 + word 1 bit 0);
    # value 21 occupies bits 63..65 (word 1 bit 31 + word 2 bits 0,1).
    codes = torch.zeros((1, 32), dtype=torch.int64)
    codes[0, 10] = 0b111
    assert pack_qweight(codes, 3)[:, 0].tolist() == [_to_int32(0xC0000000), 0x1, 0x0]
    codes = torch.zeros((1, 32), dtype=torch.int64)
    codes[0, 21] = 0b111
    assert pack_qweight(codes, 3)[:, 0].tolist() == [0x0, _to_int32(0x80000000), 0x3]
    codes = torch.zeros((1, 32), dtype=torch.int64)
    codes[0, 31] = 0b101  # last value: top 3 bits of word 2
    assert pack_qweight(codes, 3)[:, 0].tolist() == [0x0, 0x0, _to_int32(0xA0000000)]


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_matches_plain_python_bitstream(bits: int) -> None:
    out_f, in_f = 5, 96
    codes = _rand_codes((out_f, in_f), bits, seed=42 + bits)
    q = pack_qweight(codes, bits)
    for o in range(out_f):
        assert q[:, o].tolist() == _ref_bitstream_pack(codes[o].tolist(), bits)


def test_3bit_matches_autogptq_loop() -> None:
    codes = _rand_codes((4, 64), 3, seed=5)
    q = pack_qweight(codes, 3)
    for o in range(4):
        ref = _ref_autogptq_3bit(codes[o].tolist())
        assert q[:, o].tolist() == ref
        assert ref == _ref_bitstream_pack(codes[o].tolist(), 3)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_qzeros_layout_matches_bitstream_along_outputs(bits: int) -> None:
    zeros = _rand_codes((3, 64), bits, seed=9 + bits)
    q = pack_qzeros(zeros, bits, v1=False)
    for g in range(3):
        assert q[g].tolist() == _ref_bitstream_pack(zeros[g].tolist(), bits)


def test_qzeros_4bit_known_vector_v1_and_v2() -> None:
    zeros = torch.arange(1, 9).reshape(1, 8)
    assert pack_qzeros(zeros, 4, v1=False).tolist() == [[_to_int32(0x87654321)]]
    assert pack_qzeros(zeros, 4, v1=True).tolist() == [[0x76543210]]


# --------------------------------------------------------------------------- v1 zeros


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_v1_stores_zero_minus_one(bits: int) -> None:
    zeros = _rand_codes((4, 96), bits, seed=77, low=1)
    q = pack_qzeros(zeros, bits, v1=True)
    assert torch.equal(unpack_qzeros(q, bits, 96, v1=False).to(torch.int64), zeros - 1)
    assert torch.equal(unpack_qzeros(q, bits, 96, v1=True).to(torch.int64), zeros)


def test_v1_zero_of_zero_raises() -> None:
    zeros = torch.full((2, 32), 8)
    zeros[1, 5] = 0
    with pytest.raises(ValueError, match=r"v1.*(gptq_v2|v1=False)"):
        pack_qzeros(zeros, 4, v1=True)
    pack_qzeros(zeros, 4, v1=False)  # v2 stores it fine


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bits", [1, 5, 16, 0, -4, True, 4.0])
def test_bad_bits(bits) -> None:
    codes = torch.zeros((2, 64), dtype=torch.int64)
    packed = torch.zeros((8, 2), dtype=torch.int32)
    with pytest.raises(ValueError, match="bits="):
        pack_qweight(codes, bits)
    with pytest.raises(ValueError, match="bits="):
        unpack_qweight(packed, bits, 64)
    with pytest.raises(ValueError, match="bits="):
        pack_qzeros(codes, bits, v1=False)
    with pytest.raises(ValueError, match="bits="):
        unpack_qzeros(packed.t().contiguous(), bits, 64, v1=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_dtype_rejected(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=r"codes must have an integer dtype.*dtype=torch\."):
        pack_qweight(torch.zeros((2, 8), dtype=dtype), 4)
    with pytest.raises(ValueError, match=r"zeros must have an integer dtype"):
        pack_qzeros(torch.ones((2, 8), dtype=dtype), 4, v1=False)


@pytest.mark.parametrize(("bits", "bad"), [(4, 16), (4, -1), (2, 4), (3, 8), (8, 256)])
def test_codes_out_of_range(bits: int, bad: int) -> None:
    codes = torch.zeros((2, 32), dtype=torch.int64)
    codes[1, 3] = bad
    with pytest.raises(ValueError, match=rf"codes values must lie in \[0, {(1 << bits) - 1}\].*{bad}"):
        pack_qweight(codes, bits)
    zeros = torch.ones((2, 32), dtype=torch.int64)
    zeros[0, 0] = bad
    with pytest.raises(ValueError, match=r"zeros values must lie in"):
        pack_qzeros(zeros, bits, v1=False)


@pytest.mark.parametrize(("bits", "n"), [(4, 12), (2, 8), (8, 6), (3, 48), (3, 16)])
def test_in_features_not_multiple(bits: int, n: int) -> None:
    with pytest.raises(ValueError, match=rf"in_features={n} must be a multiple of"):
        pack_qweight(torch.zeros((4, n), dtype=torch.int64), bits)
    with pytest.raises(ValueError, match=rf"in_features={n} must be a multiple of"):
        unpack_qweight(torch.zeros((1, 4), dtype=torch.int32), bits, n)


@pytest.mark.parametrize(("bits", "n"), [(4, 12), (2, 8), (8, 6), (3, 48)])
def test_out_features_not_multiple(bits: int, n: int) -> None:
    with pytest.raises(ValueError, match=rf"out_features={n} must be a multiple of"):
        pack_qzeros(torch.ones((2, n), dtype=torch.int64), bits, v1=False)
    with pytest.raises(ValueError, match=rf"out_features={n} must be a multiple of"):
        unpack_qzeros(torch.zeros((2, 1), dtype=torch.int32), bits, n, v1=False)


@pytest.mark.parametrize("shape", [(32,), (2, 2, 32), ()])
def test_wrong_ndim(shape: tuple[int, ...]) -> None:
    t = torch.zeros(shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"codes must be 2-D, got ndim="):
        pack_qweight(t, 4)
    with pytest.raises(ValueError, match=r"zeros must be 2-D, got ndim="):
        pack_qzeros(t, 4, v1=False)
    with pytest.raises(ValueError, match=r"qweight must be 2-D, got ndim="):
        unpack_qweight(t.to(torch.int32), 4, 32)
    with pytest.raises(ValueError, match=r"qzeros must be 2-D, got ndim="):
        unpack_qzeros(t.to(torch.int32), 4, 32, v1=False)


def test_unpack_qweight_row_mismatch() -> None:
    q = pack_qweight(torch.zeros((4, 64), dtype=torch.int64), 4)  # 8 rows
    with pytest.raises(ValueError, match=r"qweight has 8 rows but in_features=128 at bits=4 needs 16"):
        unpack_qweight(q, 4, 128)
    q3 = pack_qweight(torch.zeros((4, 64), dtype=torch.int64), 3)  # 6 rows
    with pytest.raises(ValueError, match=r"qweight has 6 rows but in_features=32 at bits=3 needs 3"):
        unpack_qweight(q3, 3, 32)


def test_unpack_qzeros_column_mismatch() -> None:
    q = pack_qzeros(torch.ones((2, 64), dtype=torch.int64), 4, v1=False)  # 8 columns
    with pytest.raises(ValueError, match=r"qzeros has 8 columns but out_features=32 at bits=4 needs 4"):
        unpack_qzeros(q, 4, 32, v1=False)


def test_unpack_rejects_wrong_dtype_and_count() -> None:
    with pytest.raises(ValueError, match=r"qweight must have dtype torch.int32, got dtype=torch.int64"):
        unpack_qweight(torch.zeros((4, 2), dtype=torch.int64), 4, 32)
    with pytest.raises(ValueError, match=r"qzeros must have dtype torch.int32, got dtype=torch.float32"):
        unpack_qzeros(torch.zeros((2, 4), dtype=torch.float32), 4, 32, v1=False)
    with pytest.raises(ValueError, match=r"in_features must be a positive int, got 0"):
        unpack_qweight(torch.zeros((0, 2), dtype=torch.int32), 4, 0)
    with pytest.raises(ValueError, match=r"out_features must be a positive int, got -8"):
        unpack_qzeros(torch.zeros((2, 1), dtype=torch.int32), 4, -8, v1=False)


@pytest.mark.parametrize("bits", [3, 4])
def test_unpack_across_column_chunks(bits):
    """Wide layers (LM heads) are unpacked in column chunks; the chunk seams must be invisible."""
    from gptq_format.packing import _UNPACK_CHUNK

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (_UNPACK_CHUNK + 40, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_qweight(pack_qweight(codes, bits), bits, 64), codes)
