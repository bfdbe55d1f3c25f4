import random

import pytest

from utils import bitstream
from utils.errors import BitstreamError

FP = b"\x12\x34"
KEY = b"weights digest"


def make(strings=(b"abc" * 100,), codec="bls2017", height=512, width=768):
  return bitstream.pack(bitstream.Header(codec, FP, height, width), list(strings), key=KEY)


def read(data):
  """What every decoder does before decoding: parse the framing, then verify the check."""
  header, strings = bitstream.unpack(data)
  bitstream.verify_check(header, strings, KEY)
  return header, strings


@pytest.mark.parametrize("strings", [[b"x" * 5000], [b"y" * 3000, b"z" * 200], [b"", b"q"],
                                     [bytes([i]) * i for i in range(1, 16)]])
def test_round_trip(strings):
  data = make(strings, codec="hcae")
  header, out = read(data)
  assert out == strings
  assert (header.codec, header.fingerprint, header.height, header.width) == ("hcae", FP, 512, 768)


def test_framing_of_a_768x512_file_is_at_most_16_bytes():
  assert bitstream.framing_bytes(make([b"\x01" * 20000])) == 14
  assert bitstream.framing_bytes(make([b"\x02" * 900, b"\x01" * 20000], codec="bmshj2018")) == 16


def test_every_truncation_is_an_error():
  data = make([b"a" * 300, b"b" * 40])
  for n in range(len(data)):
    with pytest.raises(BitstreamError):
      read(data[:n])


def test_every_single_bit_flip_is_an_error():
  data = make([b"\x5a" * 40, b"\xa5" * 10])
  for i in range(len(data) * 8):
    bad = bytearray(data)
    bad[i // 8] ^= 1 << (i % 8)
    with pytest.raises(BitstreamError):
      read(bytes(bad))


def test_random_bytes_and_wrong_magic():
  rng = random.Random(0)
  for n in (0, 1, 5, 50, 5000):
    with pytest.raises(BitstreamError):
      read(bytes(rng.randrange(256) for _ in range(n)))
  with pytest.raises(BitstreamError, match="magic"):
    bitstream.unpack(b"\x89PNG\r\n\x1a\n" + make()[8:])


def test_unknown_version_is_named():
  data = bytearray(make())
  data[2] = 9
  with pytest.raises(BitstreamError, match="version 9"):
    bitstream.unpack(bytes(data))


def test_forged_image_size_is_refused_before_allocation():
  with pytest.raises(BitstreamError, match="outside the supported range"):
    bitstream.check_image_size(1 << 20, 1 << 20)
  with pytest.raises(BitstreamError):
    bitstream.check_image_size(0, 10)


def test_an_edit_of_fields_or_strings_is_caught_by_the_check():
  header, strings = bitstream.unpack(make([b"a" * 30, b"b" * 10]))
  import dataclasses
  for edited_header, edited_strings in [
      (dataclasses.replace(header, height=511), strings),
      (header, [strings[0], strings[1] + b"\0"]),
      (header, [strings[0][:-1], strings[0][-1:] + strings[1]])]:
    # Re-framed without the key, as anyone without the model's weights could.
    with pytest.raises(BitstreamError, match="check does not match"):
      read(bitstream.pack(edited_header, edited_strings))
  with pytest.raises(BitstreamError, match="check does not match"):
    bitstream.verify_check(header, strings, b"another model")


def test_maker_check():
  header, _ = bitstream.unpack(make())
  bitstream.check_maker(header, "bls2017", FP)
  with pytest.raises(BitstreamError, match="made by bls2017, not hcae"):
    bitstream.check_maker(header, "hcae", FP)
  with pytest.raises(BitstreamError, match="another bls2017 model"):
    bitstream.check_maker(header, "bls2017", b"\x00\x00")


def test_fingerprint_depends_on_values():
  import numpy as np
  a = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
  b = [np.zeros((2, 3), np.float32), np.full(4, 1.0001, np.float32)]
  assert bitstream.weights_fingerprint(a) == bitstream.weights_fingerprint([x.copy() for x in a])
  assert bitstream.weights_fingerprint(a) != bitstream.weights_fingerprint(b)
