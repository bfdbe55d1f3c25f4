"""The Huffman entropy coder of the teaching codec: exact round trips, code limits, hostile input."""
import numpy as np
import pytest

from utils import huffman
from utils.errors import BitstreamError


def test_vli_round_trip_and_categories():
  values = np.array([0, 1, -1, 2, -2, 3, -3, 255, -256, 1023, -1024, 32767, -32767])
  size, extra = huffman.vli(values)
  assert size.tolist() == [0, 1, 1, 2, 2, 2, 2, 8, 9, 10, 11, 15, 15]
  assert np.all(extra < (1 << size)) and np.all(extra >= 0)
  assert huffman.from_vli(size, extra).tolist() == values.tolist()
  with pytest.raises(ValueError):
    huffman.vli([32768])


def test_code_lengths_are_optimal_and_limited():
  assert huffman.code_lengths([4, 0, 2, 1, 1]).tolist() == [1, 0, 2, 3, 3]
  assert huffman.code_lengths([7]).tolist() == [1]
  # Fibonacci counts make the deepest possible Huffman tree: 39 levels without the limit.
  fibonacci = [1, 1]
  while len(fibonacci) < 40:
    fibonacci.append(fibonacci[-1] + fibonacci[-2])
  lengths = huffman.code_lengths(fibonacci)
  assert lengths.max() == huffman.MAX_CODE_LENGTH
  assert np.sum(2.0 ** -lengths.astype(float)) <= 1.0


def test_table_round_trip():
  code = huffman.Code.from_counts(np.bincount([3, 3, 3, 7, 9, 9, 200], minlength=256))
  parsed, used = huffman.Code.parse(code.to_bytes() + b"tail", lambda s: True)
  assert used == len(code.to_bytes())
  assert (parsed.symbols, parsed.lengths, parsed.codes) == (code.symbols, code.lengths, code.codes)


def test_values_round_trip():
  rng = np.random.default_rng(0)
  values = np.round(rng.laplace(0, 40, 5000)).astype(np.int64)
  values[:3] = [32767, -32767, 0]
  assert huffman.decode_values(huffman.encode_values(values), len(values)).tolist() == values.tolist()
  constant = np.full(10, 5)
  assert huffman.decode_values(huffman.encode_values(constant), 10).tolist() == constant.tolist()


@pytest.mark.parametrize("m", [63, 64])
def test_runs_round_trip(m):
  rng = np.random.default_rng(m)
  rows = np.round(rng.laplace(0, 3, (300, m))).astype(np.int64) * (rng.random((300, m)) < 0.2)
  rows[0] = 0                               # an empty row: a lone EOB
  rows[1, :] = 0
  rows[1, m - 1] = -9                       # a value in the last position: no EOB
  rows[2, :] = 0
  rows[2, [17, 50]] = [3, 32767]            # runs of 17 and 32: ZRLs
  rows[3] = rng.integers(1, 5, m)           # no zeros at all
  out = huffman.decode_runs(huffman.encode_runs(rows), *rows.shape)
  assert out.tolist() == rows.tolist()


def _table(lengths_and_symbols):
  per_length = [0] * 16
  symbols = []
  for n, s in lengths_and_symbols:
    per_length[n - 1] += 1
    symbols.append(s)
  return bytes(per_length) + bytes(symbols)


@pytest.mark.parametrize("table,match", [
    (b"\x01" * 5, "truncated"),
    (bytes(16), "empty"),
    (_table([(1, 1), (1, 2), (1, 3)]), "overflow"),
    (_table([(1, 1), (2, 1)]), "repeated"),
    (_table([(1, 16), (1, 2)]), "invalid"),     # category 16 is not a value symbol
])
def test_malformed_tables(table, match):
  with pytest.raises(BitstreamError, match=match):
    huffman.decode_values(table + b"\x00", 1)


def test_malformed_bits():
  segment = huffman.encode_values([1, 2, 3, 4])
  with pytest.raises(BitstreamError, match="truncated"):
    huffman.decode_values(segment[:-1], 4)
  with pytest.raises(BitstreamError, match="trailing"):
    huffman.decode_values(segment + b"\x00", 4)
  with pytest.raises(BitstreamError, match="truncated"):
    huffman.decode_values(segment, 40)
  # One symbol with the 1-bit code 0: a 1 bit starts no code.
  with pytest.raises(BitstreamError, match="invalid Huffman code"):
    huffman.decode_values(_table([(1, 0)]) + b"\x80", 1)
  # Runs: symbol 0xF1 (15 zeros, then a value) twice overruns a row of 20.
  with pytest.raises(BitstreamError, match="past the end of a row"):
    huffman.decode_runs(_table([(1, 0xF1)]) + b"\x00", 1, 20)


def test_damaged_segments_never_raise_anything_else():
  rng = np.random.default_rng(1)
  rows = np.round(rng.laplace(0, 2, (40, 63))).astype(np.int64) * (rng.random((40, 63)) < 0.3)
  segment = huffman.encode_runs(rows)
  for trial in range(300):
    bad = bytearray(segment)
    for _ in range(1 + trial % 3):
      bad[rng.integers(len(bad))] ^= 1 << rng.integers(8)
    try:
      out = huffman.decode_runs(bytes(bad), 40, 63)
      assert out.shape == (40, 63)
    except BitstreamError:
      pass
