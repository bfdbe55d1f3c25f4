"""Huffman coding of JPEG-style symbols, with code tables built per stream and stored in it.

Two symbol alphabets, the two of baseline JPEG:
  values  one integer a token: a magnitude category (0..15, Huffman-coded) followed by that many
          raw bits (`vli`). Used for DC differences.
  runs    sparse rows of integers: (zero run 0..15, magnitude category 1..15) pairs, plus ZRL
          (16 zeros) and EOB (rest of the row is zero). Used for AC coefficients.

A segment is self-contained: the code table (16 counts of codes per length, then the symbols in
code order, as a JPEG DHT segment) followed by the bits, zero-padded to a byte. Decoders check every
field, so damaged or crafted segments raise BitstreamError, never another exception.
Encoding is vectorised with numpy; decoding is a tight Python loop over a 16-bit lookup table.
"""
import array
import heapq

import numpy as np

from utils.errors import BitstreamError

MAX_CODE_LENGTH = 16
MAX_CATEGORY = 15
EOB, ZRL = 0x00, 0xF0
ZRL_RUN = 16
_INVALID = -1


def category(values):
  """Magnitude category of each integer: the bit length of |v| (0 for 0)."""
  # frexp's exponent of a nonzero integer is exactly its bit length (and 0 for 0).
  return np.frexp(np.abs(np.asarray(values, np.int64)).astype(np.float64))[1].astype(np.int64)


def vli(values):
  """(category, raw bits) of each integer: negatives are stored as v + 2**size - 1 (JPEG's VLI)."""
  values = np.asarray(values, np.int64)
  size = category(values)
  if size.size and size.max() > MAX_CATEGORY:
    raise ValueError(f"value {np.abs(values).max()} is too large to code (at most 2**15 - 1)")
  extra = np.where(values < 0, values + (np.int64(1) << size) - 1, values)
  return size, extra


def from_vli(size, extra):
  size = np.asarray(size, np.int64)
  extra = np.asarray(extra, np.int64)
  half = np.where(size > 0, np.int64(1) << np.maximum(size - 1, 0), 0)
  return np.where(extra >= half, extra, extra - (np.int64(1) << size) + 1)


def code_lengths(counts, max_length=MAX_CODE_LENGTH):
  """Huffman code length of each symbol (0 for symbols that never occur), at most max_length.

  If the optimal code is too deep, the counts are flattened (halved, keeping every used symbol at
  least 1) and the code rebuilt: slightly suboptimal in that rare case, always within the limit
  because equal counts give a balanced tree.
  """
  counts = np.asarray(counts, np.int64)
  used = np.count_nonzero(counts)
  if not 0 < used <= 1 << max_length:
    raise ValueError(f"cannot build a code for {used} symbols")
  while True:
    lengths = _huffman_lengths(counts)
    if lengths.max() <= max_length:
      return lengths
    counts = np.where(counts > 0, np.maximum(counts >> 1, 1), 0)


def _huffman_lengths(counts):
  lengths = np.zeros(len(counts), np.int64)
  heap = [(int(c), s, [s]) for s, c in enumerate(counts) if c > 0]
  if len(heap) == 1:
    lengths[heap[0][2]] = 1
    return lengths
  heapq.heapify(heap)
  while len(heap) > 1:
    c1, t1, s1 = heapq.heappop(heap)
    c2, t2, s2 = heapq.heappop(heap)
    lengths[s1 + s2] += 1
    heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
  return lengths


class Code:
  """A canonical prefix code: symbols listed in code order, with their code lengths."""

  def __init__(self, symbols, lengths):
    self.symbols = [int(s) for s in symbols]
    self.lengths = [int(n) for n in lengths]
    self.codes = []
    code = prev = 0
    for n in self.lengths:
      code <<= n - prev
      if code >> n:
        raise BitstreamError("Huffman table is invalid (its code lengths overflow)")
      self.codes.append(code)
      code += 1
      prev = n

  @classmethod
  def from_counts(cls, counts):
    lengths = code_lengths(counts)
    order = sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s))
    return cls(order, [lengths[s] for s in order])

  def to_bytes(self):
    per_length = [0] * MAX_CODE_LENGTH
    for n in self.lengths:
      per_length[n - 1] += 1
    return bytes(per_length) + bytes(self.symbols)

  @classmethod
  def parse(cls, data, valid_symbol):
    """(Code, bytes consumed) from the start of `data`; BitstreamError for a malformed table."""
    if len(data) < MAX_CODE_LENGTH:
      raise BitstreamError("Huffman table is truncated")
    per_length = list(data[:MAX_CODE_LENGTH])
    total = sum(per_length)
    end = MAX_CODE_LENGTH + total
    if total == 0 or len(data) < end:
      raise BitstreamError("Huffman table is empty or truncated")
    symbols = list(data[MAX_CODE_LENGTH:end])
    if len(set(symbols)) != total or not all(valid_symbol(s) for s in symbols):
      raise BitstreamError("Huffman table lists an invalid or repeated symbol")
    lengths = [n + 1 for n, count in enumerate(per_length) for _ in range(count)]
    return cls(symbols, lengths), end

  def encoder_arrays(self, alphabet=256):
    code = np.zeros(alphabet, np.int64)
    length = np.zeros(alphabet, np.int64)
    code[self.symbols] = self.codes
    length[self.symbols] = self.lengths
    return code, length

  def lookup(self):
    """For every 16-bit window: symbol << 5 | code length, or -1 where no code starts."""
    table = np.full(1 << MAX_CODE_LENGTH, _INVALID, np.int64)
    for symbol, code, n in zip(self.symbols, self.codes, self.lengths):
      shift = MAX_CODE_LENGTH - n
      table[code << shift:(code + 1) << shift] = symbol << 5 | n
    return table.tolist()


def pack_bits(values, nbits):
  """Concatenates the low nbits[i] bits of values[i], most significant first, zero-padded to bytes."""
  values = np.asarray(values, np.uint64)
  nbits = np.asarray(nbits, np.int64)
  starts = np.cumsum(nbits) - nbits
  token = np.repeat(np.arange(len(nbits)), nbits)
  shift = (nbits[token] - 1 - (np.arange(int(nbits.sum())) - starts[token])).astype(np.uint64)
  bits = (values[token] >> shift) & np.uint64(1)
  return np.packbits(bits.astype(np.uint8)).tobytes()


def _encode_tokens(symbols, sizes, extras):
  symbols = np.asarray(symbols, np.int64)
  code = Code.from_counts(np.bincount(symbols, minlength=256))
  codes, lengths = code.encoder_arrays()
  sizes = np.asarray(sizes, np.int64)
  values = (codes[symbols] << sizes) | np.asarray(extras, np.int64)
  return code.to_bytes() + pack_bits(values, lengths[symbols] + sizes)


class _Bits:
  """The bits of a segment after its table, read 32 at a time from any bit position."""

  def __init__(self, data):
    self.size = 8 * len(data)
    self.nbytes = len(data)
    padded = np.frombuffer(bytes(data) + bytes(5), np.uint8).astype(np.uint64)
    windows = np.zeros(len(data) + 1, np.uint64)
    for i in range(5):
      windows = (windows << np.uint64(8)) | padded[i:i + len(data) + 1]
    # 40-bit big-endian windows at every byte: any 32 bits from bit p are
    # (windows[p >> 3] >> (8 - (p & 7))) & 0xFFFFFFFF.
    self.windows = windows.tolist()

  def check_end(self, pos, what):
    if pos > self.size:
      raise BitstreamError(f"{what} is truncated")
    if (pos + 7) // 8 != self.nbytes:
      raise BitstreamError(f"{what} has {self.nbytes - (pos + 7) // 8} bytes of trailing data")


def _valid_value_symbol(s):
  return s <= MAX_CATEGORY


def _valid_run_symbol(s):
  return s & 0x0F != 0 or s in (EOB, ZRL)


def encode_values(values):
  """A segment coding a sequence of integers (|v| < 2**15), one category token each."""
  sizes, extras = vli(np.ravel(values))
  return _encode_tokens(sizes, sizes, extras)


def decode_values(data, count, what="segment"):
  """The `count` integers of a segment made by encode_values."""
  code, start = Code.parse(data, _valid_value_symbol)
  lut = code.lookup()
  bits = _Bits(data[start:])
  windows, size = bits.windows, bits.size
  out = array.array("q")  # packed tokens, 8 bytes each (a list of ints takes 40)
  pos = 0
  for _ in range(count):
    if pos >= size:
      raise BitstreamError(f"{what} is truncated")
    w = (windows[pos >> 3] >> (8 - (pos & 7))) & 0xFFFFFFFF
    entry = lut[w >> 16]
    if entry < 0:
      raise BitstreamError(f"{what} holds an invalid Huffman code")
    n, cat = entry & 31, entry >> 5
    out.append(cat << 15 | (w >> (32 - n - cat)) & ((1 << cat) - 1))
    pos += n + cat
  bits.check_end(pos, what)
  packed = np.frombuffer(out, np.int64)
  return from_vli(packed >> 15, packed & 0x7FFF)


def run_tokens(rows):
  """(symbols, categories, raw bits) coding an (n, m) integer array row by row, zeros as runs."""
  rows = np.asarray(rows, np.int64)
  n, m = rows.shape
  row, pos = np.nonzero(rows)
  first = np.ones(len(row), bool)
  first[1:] = row[1:] != row[:-1]
  prev_end = np.where(first, 0, np.concatenate([[0], pos[:-1] + 1]))
  run = pos - prev_end
  zrls = run // ZRL_RUN
  sizes, extras = vli(rows[row, pos])
  symbols = (run % ZRL_RUN) << 4 | sizes
  # Sort keys place, inside each row, a value's ZRLs just before it and the EOB after everything.
  slot = 8
  key_of = lambda r, p, sub: (r * (m + 1) + p) * slot + sub
  zrl_owner = np.repeat(np.arange(len(row)), zrls)
  zrl_sub = np.arange(len(zrl_owner)) - np.repeat(np.cumsum(zrls) - zrls, zrls)
  last = np.full(n, -1)
  np.maximum.at(last, row, pos)
  eob_rows = np.flatnonzero(last < m - 1)
  keys = np.concatenate([key_of(row, pos, slot - 1), key_of(row[zrl_owner], pos[zrl_owner], zrl_sub),
                         key_of(eob_rows, m, 0)])
  order = np.argsort(keys, kind="stable")
  all_symbols = np.concatenate([symbols, np.full(len(zrl_owner), ZRL), np.full(len(eob_rows), EOB)])
  all_sizes = np.concatenate([sizes, np.zeros(len(zrl_owner) + len(eob_rows), np.int64)])
  all_extras = np.concatenate([extras, np.zeros(len(zrl_owner) + len(eob_rows), np.int64)])
  return all_symbols[order], all_sizes[order], all_extras[order]


def encode_runs(rows):
  """A segment coding an (n, m) integer array (|v| < 2**15), mostly zeros, row by row."""
  return _encode_tokens(*run_tokens(rows))


def decode_runs(data, n, m, what="segment"):
  """The (n, m) array of a segment made by encode_runs."""
  code, start = Code.parse(data, _valid_run_symbol)
  lut = code.lookup()
  bits = _Bits(data[start:])
  windows, size = bits.windows, bits.size
  out = array.array("q")  # packed tokens, 8 bytes each (a list of ints takes 40)
  pos = row = k = 0
  while row < n:
    if pos >= size:
      raise BitstreamError(f"{what} is truncated")
    w = (windows[pos >> 3] >> (8 - (pos & 7))) & 0xFFFFFFFF
    entry = lut[w >> 16]
    if entry < 0:
      raise BitstreamError(f"{what} holds an invalid Huffman code")
    length, symbol = entry & 31, entry >> 5
    cat = symbol & 15
    if cat:
      k += symbol >> 4
      if k >= m:
        raise BitstreamError(f"{what} runs past the end of a row")
      out.append((row * m + k) << 19 | cat << 15 | (w >> (32 - length - cat)) & ((1 << cat) - 1))
      pos += length + cat
      k += 1
      if k == m:
        row, k = row + 1, 0
    elif symbol == ZRL:
      pos += length
      k += ZRL_RUN
      if k >= m:
        raise BitstreamError(f"{what} runs past the end of a row")
    else:
      pos += length
      row, k = row + 1, 0
  bits.check_end(pos, what)
  packed = np.frombuffer(out, np.int64)
  rows = np.zeros(n * m, np.int16)  # |values| < 2**15: a quarter of the memory of int64
  if packed.size:
    rows[packed >> 19] = from_vli((packed >> 15) & 15, packed & 0x7FFF)
  return rows.reshape(n, m)
