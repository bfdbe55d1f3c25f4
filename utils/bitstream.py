"""The compressed file format shared by every codec.

Layout (all integers unsigned; varint = LEB128, 7 bits a byte):

    magic        2 bytes   b"\\x89L"
    version      1 byte    FORMAT_VERSION
    codec/count  1 byte    high nibble: codec id (CODEC_IDS), low nibble: number of strings (1..15)
    fingerprint  2 bytes   first bytes of the SHA-256 of the weights that made the file
    check        4 bytes   HMAC-SHA-256 of all other fields and the strings, keyed by the full
                           SHA-256 of the weights (its first 4 bytes)
    height       varint
    width        varint
    lengths      varint x (count - 1)   the last string takes the rest (so put the longest last)
    payload      the entropy-coded strings, concatenated

Varints must be minimal, so every file has exactly one encoding. A 768x512 image coded with one
string costs 14 bytes of framing, with two strings 15 or 16.

The check turns a flipped bit, a truncation or an edit into an error instead of a wrong picture
(a damaged file passes it with probability 2**-32). It does the work of a CRC and more, so the
format has no CRC: a CRC catches accidents only, and a file edited with its CRC recomputed would
reach the range decoder. Range decoders turn almost any bytes into symbols
(tensorflow-compression's end-of-string test is, in its own words, a weak sanity check, and crafted strings can keep its overflow decoder looping
forever), so decoders verify the check, from the header and strings alone, before decoding
anything. Computing a valid check takes the model's weights: it stops edits by anyone who does not
have the model, and it is not a signature (whoever has the model can make a valid file of any
picture). The 2-byte fingerprint tells files of two different models apart with a clear message.
Files of version 1 (before the check) are refused with a message saying to compress again.
unpack() alone parses and bounds the framing; only verify_check(), which needs the key, vouches
for the contents, so every decoder calls both.
"""
import dataclasses
import hashlib
import hmac

from utils.errors import BitstreamError

MAGIC = b"\x89L"
FORMAT_VERSION = 2
# Ids are part of the format: never renumber, only append.
CODEC_IDS = {"bls2017": 1, "bmshj2018": 2, "hcae": 3, "dct": 4, "klt": 5}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
FINGERPRINT_BYTES = 2
CHECK_BYTES = 4
# Decoding work grows with the size a header declares: refuse sizes beyond these before any work.
# 2**26 pixels (8192x8192, or any camera photo up to 67 megapixels) bounds what a file can demand;
# decoders hold the image as uint8 and run the synthesis in tiles of bounded memory.
MAX_SIDE = 1 << 15
MAX_PIXELS = 1 << 26


@dataclasses.dataclass
class Header:
  codec: str
  fingerprint: bytes
  height: int
  width: int
  check: bytes = bytes(CHECK_BYTES)  # made by pack() when it is given the key


def weights_digest(arrays):
  """SHA-256 of a set of weight arrays (numpy), in the given order: the key of a model's checks."""
  digest = hashlib.sha256()
  for a in arrays:
    digest.update(str(a.dtype).encode())
    digest.update(str(a.shape).encode())
    digest.update(a.tobytes())
  return digest.digest()


def weights_fingerprint(arrays):
  """Short, stable id of a set of weight arrays (numpy), in the given order."""
  return weights_digest(arrays)[:FINGERPRINT_BYTES]


def _check(key, header, strings):
  fields = bytearray(MAGIC)
  fields.append(FORMAT_VERSION)
  fields.append(CODEC_IDS[header.codec] << 4 | len(strings))
  fields += header.fingerprint + _varint(header.height) + _varint(header.width)
  for s in strings:
    fields += _varint(len(s))
  mac = hmac.new(key, bytes(fields), hashlib.sha256)
  for s in strings:
    mac.update(s)
  return mac.digest()[:CHECK_BYTES]


def verify_check(header, strings, key):
  """Raises BitstreamError unless the file's check was made with `key` (the digest of the weights
  that should have made it) over exactly these fields and strings. Run it before decoding."""
  if not hmac.compare_digest(_check(key, header, strings), header.check):
    raise BitstreamError("file is corrupted or was edited (its check does not match its contents)")


def _varint(n):
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _read_varint(data, pos, end, what):
  value = shift = 0
  while True:
    if pos >= end:
      raise BitstreamError(f"file is truncated (in the {what} field)")
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      if byte == 0 and shift:
        # An overlong encoding: every value has exactly one, so an edit cannot hide in another.
        raise BitstreamError(f"file is corrupted (the {what} field is not minimally encoded)")
      return value, pos
    shift += 7
    if shift > 35:
      raise BitstreamError(f"file is corrupted (the {what} field is too long)")


def check_image_size(height, width):
  if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE and height * width <= MAX_PIXELS):
    raise BitstreamError(
        f"image size {height}x{width} is outside the supported range "
        f"(1..{MAX_SIDE} per side, at most {MAX_PIXELS} pixels)")


def pack(header, strings, key=None):
  """Returns the file bytes for `strings` (a sequence of bytes) under `header`, with the check made
  with `key` (without a key, header.check is written as it is)."""
  if header.codec not in CODEC_IDS:
    raise ValueError(f"unknown codec {header.codec!r}")
  if not 1 <= len(strings) <= 15:
    raise ValueError(f"a file holds 1 to 15 strings, not {len(strings)}")
  if len(header.fingerprint) != FINGERPRINT_BYTES:
    raise ValueError("fingerprint must be %d bytes" % FINGERPRINT_BYTES)
  check_image_size(header.height, header.width)
  if key is not None:
    header = dataclasses.replace(header, check=_check(key, header, strings))
  if len(header.check) != CHECK_BYTES:
    raise ValueError("check must be %d bytes" % CHECK_BYTES)
  out = bytearray(MAGIC)
  out.append(FORMAT_VERSION)
  out.append(CODEC_IDS[header.codec] << 4 | len(strings))
  out += header.fingerprint + header.check
  out += _varint(header.height) + _varint(header.width)
  for s in strings[:-1]:
    out += _varint(len(s))
  for s in strings:
    out += s
  return bytes(out)


def unpack(data):
  """Parses file bytes into (Header, list of strings); raises BitstreamError on any defect of the
  framing. The contents are vouched for by verify_check() only."""
  data = bytes(data)
  if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
    raise BitstreamError("not a compressed image of this suite (wrong magic bytes)")
  if len(data) < len(MAGIC) + 1:
    raise BitstreamError("file is truncated (no format version)")
  version = data[len(MAGIC)]
  if version == 1:
    raise BitstreamError("file has format version 1, which this program no longer reads (it has no "
                         "check against edits); compress the image again")
  if version != FORMAT_VERSION:
    raise BitstreamError(
        f"unsupported format version {version} (this program reads version {FORMAT_VERSION})")
  min_size = len(MAGIC) + 2 + FINGERPRINT_BYTES + CHECK_BYTES + 2
  if len(data) < min_size:
    raise BitstreamError(f"file is truncated ({len(data)} bytes)")
  end = len(data)
  pos = len(MAGIC) + 1
  codec_id, count = data[pos] >> 4, data[pos] & 0x0F
  pos += 1
  if codec_id not in CODEC_NAMES or count == 0:
    raise BitstreamError(f"file names an unknown codec (id {codec_id}, {count} strings)")
  fingerprint = data[pos:pos + FINGERPRINT_BYTES]
  pos += FINGERPRINT_BYTES
  check = data[pos:pos + CHECK_BYTES]
  pos += CHECK_BYTES
  height, pos = _read_varint(data, pos, end, "height")
  width, pos = _read_varint(data, pos, end, "width")
  check_image_size(height, width)
  lengths = []
  for _ in range(count - 1):
    n, pos = _read_varint(data, pos, end, "string length")
    lengths.append(n)
  if sum(lengths) > end - pos:
    raise BitstreamError("file is truncated (string lengths exceed the payload)")
  strings = []
  for n in lengths:
    strings.append(data[pos:pos + n])
    pos += n
  strings.append(data[pos:end])
  return Header(CODEC_NAMES[codec_id], fingerprint, height, width, check), strings


def framing_bytes(data):
  """Bytes of a file that are not entropy-coded payload."""
  _, strings = unpack(data)
  return len(data) - sum(len(s) for s in strings)


def check_maker(header, codec, fingerprint):
  """Raises BitstreamError unless the file was made by `codec` with weights `fingerprint`."""
  if header.codec != codec:
    raise BitstreamError(f"file was made by {header.codec}, not {codec}")
  if header.fingerprint != fingerprint:
    raise BitstreamError(
        f"file was made by another {codec} model (weights {header.fingerprint.hex()}, "
        f"this model is {fingerprint.hex()}); pass the --model_path that made it")
