"""The compressed file format shared by every codec.

Layout (all integers unsigned; varint = LEB128, 7 bits a byte):

    magic        2 bytes   b"\\x89L"
    version      1 byte    FORMAT_VERSION
    codec/count  1 byte    high nibble: codec id (CODEC_IDS), low nibble: number of strings (1..15)
    fingerprint  2 bytes   first bytes of the SHA-256 of the weights that made the file
    height       varint
    width        varint
    lengths      varint x (count - 1)   the last string takes the rest (so put the longest last)
    payload      the entropy-coded strings, concatenated
    crc32        4 bytes   big-endian CRC-32 of everything before it

A 768x512 image coded with one string costs 14 bytes of framing, with two strings 15 or 16.
The checksum turns a flipped bit or a truncation into an error instead of a wrong picture; the
2-byte fingerprint tells files of two different trained models apart (a chance collision is
1 in 65 536, so it is a guard against mix-ups, not a signature).
"""
import dataclasses
import hashlib
import zlib

from utils.errors import BitstreamError

MAGIC = b"\x89L"
FORMAT_VERSION = 1
# Ids are part of the format: never renumber, only append.
CODEC_IDS = {"bls2017": 1, "bmshj2018": 2, "hcae": 3, "dct": 4, "klt": 5}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
FINGERPRINT_BYTES = 2
# Decoders allocate height*width*3 bytes and more: refuse sizes beyond this before any work.
MAX_SIDE = 1 << 15
MAX_PIXELS = 1 << 28


@dataclasses.dataclass
class Header:
  codec: str
  fingerprint: bytes
  height: int
  width: int


def weights_fingerprint(arrays):
  """Short, stable id of a set of weight arrays (numpy), in the given order."""
  digest = hashlib.sha256()
  for a in arrays:
    digest.update(str(a.dtype).encode())
    digest.update(str(a.shape).encode())
    digest.update(a.tobytes())
  return digest.digest()[:FINGERPRINT_BYTES]


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
      return value, pos
    shift += 7
    if shift > 35:
      raise BitstreamError(f"file is corrupted (the {what} field is too long)")


def check_image_size(height, width):
  if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE and height * width <= MAX_PIXELS):
    raise BitstreamError(
        f"image size {height}x{width} is outside the supported range "
        f"(1..{MAX_SIDE} per side, at most {MAX_PIXELS} pixels)")


def pack(header, strings):
  """Returns the file bytes for `strings` (a sequence of bytes) under `header`."""
  if header.codec not in CODEC_IDS:
    raise ValueError(f"unknown codec {header.codec!r}")
  if not 1 <= len(strings) <= 15:
    raise ValueError(f"a file holds 1 to 15 strings, not {len(strings)}")
  if len(header.fingerprint) != FINGERPRINT_BYTES:
    raise ValueError("fingerprint must be %d bytes" % FINGERPRINT_BYTES)
  check_image_size(header.height, header.width)
  out = bytearray(MAGIC)
  out.append(FORMAT_VERSION)
  out.append(CODEC_IDS[header.codec] << 4 | len(strings))
  out += header.fingerprint
  out += _varint(header.height) + _varint(header.width)
  for s in strings[:-1]:
    out += _varint(len(s))
  for s in strings:
    out += s
  out += zlib.crc32(out).to_bytes(4, "big")
  return bytes(out)


def unpack(data):
  """Parses file bytes into (Header, list of strings); raises BitstreamError on any defect."""
  data = bytes(data)
  if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
    raise BitstreamError("not a compressed image of this suite (wrong magic bytes)")
  if len(data) < len(MAGIC) + 1:
    raise BitstreamError("file is truncated (no format version)")
  version = data[len(MAGIC)]
  if version != FORMAT_VERSION:
    raise BitstreamError(
        f"unsupported format version {version} (this program reads version {FORMAT_VERSION})")
  min_size = len(MAGIC) + 2 + FINGERPRINT_BYTES + 2 + 4
  if len(data) < min_size:
    raise BitstreamError(f"file is truncated ({len(data)} bytes)")
  end = len(data) - 4
  if zlib.crc32(data[:end]).to_bytes(4, "big") != data[end:]:
    raise BitstreamError("file is corrupted or truncated (checksum mismatch)")
  pos = len(MAGIC) + 1
  codec_id, count = data[pos] >> 4, data[pos] & 0x0F
  pos += 1
  if codec_id not in CODEC_NAMES or count == 0:
    raise BitstreamError(f"file names an unknown codec (id {codec_id}, {count} strings)")
  fingerprint = data[pos:pos + FINGERPRINT_BYTES]
  pos += FINGERPRINT_BYTES
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
  return Header(CODEC_NAMES[codec_id], fingerprint, height, width), strings


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
