"""Classical transform coding: the real codecs of Pillow for the RD figures, and a teaching codec.

Real codecs (Pillow's libjpeg, OpenJPEG, libwebp, libavif): `sweep` codes every evaluation image at
a ladder of quality settings and writes RD points (bpp from the encoded bytes, PSNR and MS-SSIM
from the decoded image).

The teaching codec is baseline JPEG written out step by step: RGB -> YCbCr, optional 4:2:0 chroma,
8x8 blocks, an orthonormal 2-D transform, the standard JPEG quantization tables scaled by a quality
factor, zig-zag order, DC prediction, (zero run, magnitude) symbols and Huffman codes built for
each image (utils/huffman.py). Two transforms:
  dct  the 8x8 DCT, coefficients in zig-zag order, as JPEG;
  klt  the KLT (PCA) of 8x8 blocks, coefficients by decreasing energy: bases (luma, chroma)
       learned once on the built-in training photos (`--basis global`), or one basis fitted to all
       the blocks of each image and sent with it (`--basis image`, its cost counted in the file).

    python jpeg_baseline.py sweep                            # all codecs -> results/<codec>.csv
    python jpeg_baseline.py sweep --codec jpeg --subsampling 444
    python jpeg_baseline.py compress --codec dct --quality 75 photo.png     # writes photo.png.lic
    python jpeg_baseline.py decompress photo.png.lic                         # writes photo.png.lic.png
    python jpeg_baseline.py compaction photo.png             # DCT vs KLT energy compaction figure
"""
import argparse
import dataclasses
import functools
import io
import os
import sys
import time

import utils  # noqa: F401  (first: quiets TensorFlow start-up logs once utils.data loads it)

import numpy as np
from PIL import Image, features

from utils import bitstream, huffman
from utils.errors import BitstreamError, UserError

# ---------------------------------------------------------------------------------------------
# Real codecs through Pillow

JPEG_LADDER = (2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95)


def _jpeg_options(quality, subsampling):
  return dict(quality=int(quality), optimize=True, subsampling=2 if subsampling == "420" else 0)


def _jpeg2000_options(quality, subsampling):
  # The setting is OpenJPEG's target PSNR in dB; the 9/7 wavelet and the colour transform are
  # its lossy mode (Pillow's defaults are the lossless 5/3 wavelet on raw RGB).
  return dict(quality_mode="dB", quality_layers=[float(quality)], irreversible=True, mct=1,
              no_jp2=True)


def _webp_options(quality, subsampling):
  return dict(quality=int(quality), method=6)


def _avif_options(quality, subsampling):
  return dict(quality=int(quality), subsampling="4:2:0" if subsampling == "420" else "4:4:4",
              max_threads=1)


@dataclasses.dataclass(frozen=True)
class PillowCodec:
  format: str
  feature: str
  ladder: tuple
  options: object
  quality_range: tuple
  uses_subsampling: bool


PILLOW_CODECS = {
    "jpeg": PillowCodec("JPEG", "jpg", JPEG_LADDER, _jpeg_options, (1, 100), True),
    "jpeg2000": PillowCodec("JPEG2000", "jpg_2000", (22, 24, 26, 28, 30, 32, 34, 36, 38, 40),
                            _jpeg2000_options, (1, 100), False),
    "webp": PillowCodec("WEBP", "webp", (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95),
                        _webp_options, (0, 100), False),
    "avif": PillowCodec("AVIF", "avif", (0, 10, 20, 30, 40, 50, 60, 70, 80, 85, 90),
                        _avif_options, (0, 100), True),
}


def check_pillow_codec(name):
  codec = PILLOW_CODECS[name]
  if not features.check(codec.feature):
    raise UserError(f"this Pillow has no {codec.format} support (PIL.features.check({codec.feature!r}) "
                    "is False); install the Pillow wheel from requirements.txt, which bundles it")


def pillow_code(image, name, quality, subsampling="420"):
  """Encodes with a Pillow codec; returns (encoded bytes, decoded uint8 image)."""
  codec = PILLOW_CODECS[name]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=codec.format, **codec.options(quality, subsampling))
  encoded = buffer.getvalue()
  with Image.open(io.BytesIO(encoded)) as im:
    return encoded, np.asarray(im.convert("RGB"), np.uint8)


# ---------------------------------------------------------------------------------------------
# The teaching codec: colour, sampling, blocks

BLOCK = 8
COEFS = BLOCK * BLOCK
# JFIF's full-range YCbCr. Rows for Cb and Cr sum to zero, so (RGB - 128) maps to zero-centred planes.
RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                         [-0.168736, -0.331264, 0.5],
                         [0.5, -0.418688, -0.081312]])
YCBCR_TO_RGB = np.linalg.inv(RGB_TO_YCBCR)


def _mix(matrix, planes):
  # Written out per channel (no BLAS): the same sums in the same order in every process, which
  # the global KLT basis relies on to be reproducible.
  return np.stack([matrix[c, 0] * planes[0] + matrix[c, 1] * planes[1] + matrix[c, 2] * planes[2]
                   for c in range(3)])


def rgb_to_ycbcr(image):
  """uint8 HxWx3 -> three float planes (Y - 128, Cb - 128, Cr - 128)."""
  rgb = np.moveaxis(np.asarray(image, np.float64) - 128.0, -1, 0)
  return list(_mix(RGB_TO_YCBCR, rgb))


def ycbcr_to_rgb(planes):
  """Three full-size float planes -> uint8 HxWx3."""
  rgb = _mix(YCBCR_TO_RGB, planes) + 128.0
  return np.clip(np.rint(np.moveaxis(rgb, 0, -1)), 0, 255).astype(np.uint8)


def downsample(plane):
  """2x2 averages (4:2:0), an odd last row or column repeated."""
  h, w = plane.shape
  plane = np.pad(plane, ((0, h % 2), (0, w % 2)), mode="edge")
  return plane.reshape(plane.shape[0] // 2, 2, plane.shape[1] // 2, 2).mean(axis=(1, 3))


def _upsample_axis(plane, axis):
  n = plane.shape[axis]
  before = np.take(plane, np.maximum(np.arange(n) - 1, 0), axis=axis)
  after = np.take(plane, np.minimum(np.arange(n) + 1, n - 1), axis=axis)
  pair = np.stack([0.75 * plane + 0.25 * before, 0.75 * plane + 0.25 * after], axis=axis + 1)
  shape = list(plane.shape)
  shape[axis] *= 2
  return pair.reshape(shape)


def upsample(plane, height, width):
  """Doubles both sides with the triangle filter of libjpeg's 'fancy' upsampling, then crops."""
  return _upsample_axis(_upsample_axis(plane, 0), 1)[:height, :width]


def to_blocks(plane):
  """A plane, edge-padded to multiples of 8 -> (blocks, 64), blocks and pixels in raster order."""
  h, w = plane.shape
  plane = np.pad(plane, ((0, -h % BLOCK), (0, -w % BLOCK)), mode="edge")
  rows, cols = plane.shape[0] // BLOCK, plane.shape[1] // BLOCK
  return plane.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(-1, COEFS)


def from_blocks(blocks, height, width):
  rows, cols = -(-height // BLOCK), -(-width // BLOCK)
  plane = blocks.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3)
  return plane.reshape(rows * BLOCK, cols * BLOCK)[:height, :width]


def plane_shapes(height, width, subsampling):
  chroma = (height, width) if subsampling == "444" else ((height + 1) // 2, (width + 1) // 2)
  return [(height, width), chroma, chroma]


def image_planes(image, subsampling):
  y, cb, cr = rgb_to_ycbcr(image)
  if subsampling == "420":
    cb, cr = downsample(cb), downsample(cr)
  return [y, cb, cr]


def group_blocks(planes):
  """The two coding groups, as JPEG's two sets of tables: luma, and both chroma planes."""
  return [to_blocks(planes[0]), np.concatenate([to_blocks(planes[1]), to_blocks(planes[2])])]


# ---------------------------------------------------------------------------------------------
# Transforms: the 2-D DCT and the KLT, both as 64x64 orthonormal matrices whose rows are basis
# images in coding order (coefficients = blocks @ basis.T, blocks = coefficients @ basis).


def zigzag_order():
  """Natural (row-major) indices of the 8x8 frequencies in JPEG's zig-zag order."""
  def key(i):
    row, col = divmod(i, BLOCK)
    diagonal = row + col
    return diagonal, row if diagonal % 2 else -row
  return sorted(range(COEFS), key=key)


ZIGZAG = np.array(zigzag_order())


def dct_matrix(n=BLOCK):
  """Orthonormal DCT-II: rows are the n cosine basis vectors."""
  k, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
  matrix[0] /= np.sqrt(2.0)
  return matrix


@functools.lru_cache(maxsize=None)
def dct_basis():
  """The 64 separable DCT basis images (raster order), in zig-zag order."""
  c = dct_matrix()
  basis = np.einsum("ui,vj->uvij", c, c).reshape(COEFS, COEFS)[ZIGZAG]
  basis.flags.writeable = False
  return basis


def second_moment(blocks):
  return blocks.T @ blocks


def klt_rotation(moment):
  """The KLT of blocks with second-moment matrix `moment`, in DCT coordinates.

  Rows are eigenvectors by decreasing eigenvalue (the KLT basis image k is rotation[k] @ dct_basis()),
  each signed so that its largest entry is positive. The second moment, not the covariance: the
  codec codes blocks as they are, so the basis that packs the most energy into the first
  coefficients is the eigenbasis of E[x x^T] (its first vector is close to the flat, DC image).
  """
  d = dct_basis()
  values, vectors = np.linalg.eigh(d @ moment @ d.T)
  rotation = vectors[:, np.argsort(-values, kind="stable")].T
  peaks = rotation[np.arange(COEFS), np.argmax(np.abs(rotation), axis=1)]
  return rotation * np.where(peaks < 0, -1.0, 1.0)[:, None]


def quantize_rotation(rotation, precision):
  """Fixed-point integers (scale 2**precision): what a basis is identified by and sent as."""
  return np.rint(rotation * (1 << precision)).astype(np.int64)


def orthonormal_rows(matrix):
  """Gram-Schmidt of the rows in order (through QR): row k keeps the direction of rows 0..k."""
  q, r = np.linalg.qr(np.asarray(matrix, np.float64).T)
  signs = np.where(np.diag(r) < 0, -1.0, 1.0)
  return (q * signs).T


def basis_from_rotation(rotation_int):
  """The exactly orthonormal basis (pixel domain) of a quantized rotation."""
  return orthonormal_rows(rotation_int) @ dct_basis()


# ---------------------------------------------------------------------------------------------
# Quantization

# JPEG's example tables (ITU-T T.81 Annex K), natural order: luminance, chrominance.
JPEG_TABLES = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
     14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
     18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
     24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32,
], np.int64)


def jpeg_steps(quality):
  """Quantizer steps (luma, chroma) in zig-zag order, scaled as the IJG libjpeg scales them."""
  scale = 5000 // quality if quality < 50 else 200 - 2 * quality
  return np.clip((JPEG_TABLES * scale + 50) // 100, 1, 255)[:, ZIGZAG]


def klt_steps(rotation, dct_steps):
  """The JPEG table carried over to KLT coefficients.

  A KLT basis image is a mix of DCT frequencies with weights rotation[k, j]**2 (summing to one);
  its step is the weighted geometric mean of those frequencies' steps. For natural images the KLT
  is close to the DCT, so each KLT coefficient gets about the step of the frequency it resembles.
  """
  weights = np.asarray(rotation, np.float64) ** 2
  return np.clip(np.rint(np.exp(weights @ np.log(dct_steps))), 1, 255).astype(np.int64)


def quantize(blocks, basis, steps):
  return np.rint(blocks @ basis.T / steps).astype(np.int64)


def dequantize(levels, basis, steps):
  return (levels * steps) @ basis


# ---------------------------------------------------------------------------------------------
# The global KLT basis: learned from the built-in training photos, bit-exactly reproducible

GLOBAL_PRECISION = 12   # fixed-point bits of the global rotations (only hashed, never sent)
# Fixed-point bits of a per-image rotation, which is sent: fewer bits make it cheaper but less adapted.
# BD-rate against libjpeg on the two PNG eval photos (chelsea, coffee), basis cost included / left out:
# 2 bits +3.2 % / -3.8 %, 3 bits +6.1 % / -5.1 %, 4 bits +10.9 % / -5.7 %, 6 bits +22.8 % / -6.1 %.
# On the 2-megapixel retina photo the gaps shrink but 2 bits still cost least (-3.7 % against -3.4 %
# at 3 bits). One basis serves luma and chroma: a second one doubles the cost for little gain.
IMAGE_PRECISION = 2
# Training blocks are rounded to quarter levels, so their second moment is a sum of integer products
# below 2**53: exact in float64 whatever order BLAS adds them in.
MOMENT_SCALE = 4


def training_moments(images, subsampling):
  """Exact second moments (luma, chroma) of the 8x8 blocks of some images, in quarter levels."""
  moments = [np.zeros((COEFS, COEFS)), np.zeros((COEFS, COEFS))]
  for image in images:
    for g, blocks in enumerate(group_blocks(image_planes(image, subsampling))):
      scaled = np.rint(blocks * MOMENT_SCALE)
      moments[g] += second_moment(scaled)
  return moments


@functools.lru_cache(maxsize=None)
def global_rotations(subsampling):
  """The learned KLT (luma, chroma) as fixed-point rotations; the same integers in every process."""
  from utils import data
  images = (data.read_image(p) for p in data.builtin_paths("train"))
  return tuple(quantize_rotation(klt_rotation(m), GLOBAL_PRECISION)
               for m in training_moments(images, subsampling))


# ---------------------------------------------------------------------------------------------
# The file: settings, transforms, entropy-coded segments

CODECS = ("dct", "klt")
SUBSAMPLINGS = ("420", "444")
BASES = ("global", "image")
_BASIS_CODE = {None: 0, "global": 1, "image": 2}
_BASIS_NAME = {v: k for k, v in _BASIS_CODE.items()}


@dataclasses.dataclass(frozen=True)
class Settings:
  codec: str = "dct"
  quality: int = 75
  subsampling: str = "420"
  basis: str = None   # klt only: "global" or "image"

  def __post_init__(self):
    if self.codec not in CODECS:
      raise UserError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
    if not 1 <= self.quality <= 100:
      raise UserError(f"--quality must be 1..100, not {self.quality}")
    if self.subsampling not in SUBSAMPLINGS:
      raise UserError(f"--subsampling must be 420 or 444, not {self.subsampling}")
    if (self.codec == "klt") != (self.basis in BASES):
      raise UserError(f"a {self.codec} file cannot have basis {self.basis!r}")

  def describe(self):
    basis = f" ({self.basis} basis)" if self.basis else ""
    return f"{self.codec}{basis}, quality {self.quality}, {':'.join(self.subsampling)}"


def config_key(codec):
  """Identifies the codec's fixed configuration (tables, scan, colour, fixed-point basis precision)."""
  return bitstream.weights_digest([
      np.frombuffer(f"{codec} v1".encode(), np.uint8), JPEG_TABLES, ZIGZAG, RGB_TO_YCBCR,
      np.array([GLOBAL_PRECISION, IMAGE_PRECISION, MOMENT_SCALE])])


def expected_key(settings):
  """The key of a file's check, as a model's weights digest is for the neural codecs (public here:
  the check then guards against accidents and careless edits, not against a careful forger, whose
  file the decoder still turns into an error or a picture, never a hang)."""
  if settings.basis == "global":
    return bitstream.weights_digest(global_rotations(settings.subsampling))
  return config_key(settings.codec)


def expected_fingerprint(settings):
  return expected_key(settings)[:bitstream.FINGERPRINT_BYTES]


def _params_bytes(settings, steps):
  flags = (settings.subsampling == "420") | _BASIS_CODE[settings.basis] << 1
  extra = b"" if settings.codec == "dct" else bytes(np.concatenate(steps).astype(np.uint8))
  return bytes([flags, settings.quality]) + extra


def _parse_params(codec, data):
  """(Settings, steps or None) from the first string; BitstreamError if it does not fit `codec`."""
  size = 2 if codec == "dct" else 2 + 2 * COEFS
  if len(data) != size:
    raise BitstreamError(f"{codec} settings field has {len(data)} bytes, expected {size}")
  flags, quality = data[0], data[1]
  if flags >> 3 or (flags >> 1) not in _BASIS_NAME:
    raise BitstreamError(f"{codec} settings field is corrupted (flags {flags:#x})")
  try:
    settings = Settings(codec, quality, "420" if flags & 1 else "444", _BASIS_NAME[flags >> 1])
  except UserError as e:
    raise BitstreamError(f"{codec} settings field is corrupted ({e})") from None
  if codec == "dct":
    return settings, None
  steps = np.frombuffer(data[2:], np.uint8).astype(np.int64).reshape(2, COEFS)
  if not steps.all():
    raise BitstreamError("klt quantizer table holds a zero step")
  return settings, steps


def _transforms(settings, image_blocks=None, rotations=None):
  """(bases, steps, rotation ints to send or None) of the two groups.

  The encoder passes the image's blocks (a per-image KLT is fitted to them); the decoder passes the
  rotations read from the file.
  """
  dct_steps = jpeg_steps(settings.quality)
  if settings.codec == "dct":
    return [dct_basis()] * 2, dct_steps, None
  if settings.basis == "global":
    rotations = global_rotations(settings.subsampling)
  elif rotations is None:
    fitted = quantize_rotation(klt_rotation(second_moment(np.concatenate(image_blocks))), IMAGE_PRECISION)
    rotations = [fitted, fitted]
  bases = [basis_from_rotation(r) for r in rotations]
  steps = np.stack([klt_steps(orthonormal_rows(r), s) for r, s in zip(rotations, dct_steps)])
  return bases, steps, (rotations if settings.basis == "image" else None)


def _dc_differences(dc, planes):
  """DC prediction from the previous block of the same plane (the first block from zero)."""
  dc = dc.reshape(planes, -1)
  return np.diff(dc, axis=1, prepend=0).ravel()


def encode(image, settings):
  """uint8 HxWx3 -> the bytes of a compressed file."""
  image = np.asarray(image, np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise UserError(f"expected an RGB image, got an array of shape {image.shape}")
  height, width = image.shape[:2]
  bitstream.check_image_size(height, width)
  groups = group_blocks(image_planes(image, settings.subsampling))
  bases, steps, rotations = _transforms(settings, image_blocks=groups)
  levels = [quantize(b, t, s) for b, t, s in zip(groups, bases, steps)]
  strings = [_params_bytes(settings, steps)]
  if rotations is not None:
    strings.append(huffman.encode_runs(rotations[0]))
  strings += [huffman.encode_values(_dc_differences(levels[0][:, 0], 1)),
              huffman.encode_values(_dc_differences(levels[1][:, 0], 2)),
              huffman.encode_runs(levels[1][:, 1:]),
              huffman.encode_runs(levels[0][:, 1:])]
  header = bitstream.Header(settings.codec, expected_fingerprint(settings), height, width)
  return bitstream.pack(header, strings, key=expected_key(settings))


def read_settings(data):
  """(Header, Settings, steps, strings) of a file of this codec, its maker checked."""
  header, strings = bitstream.unpack(data)
  if header.codec not in CODECS:
    raise BitstreamError(f"file was made by {header.codec}, not by dct or klt "
                         f"(decompress it with {header.codec}.py)")
  settings, steps = _parse_params(header.codec, strings[0])
  expected = 5 + (settings.basis == "image")
  if len(strings) != expected:
    raise BitstreamError(f"{settings.codec} file has {len(strings)} strings, expected {expected}")
  fingerprint = expected_fingerprint(settings)
  if header.fingerprint != fingerprint:
    what = ("another global KLT basis (learned from other training images or by another version)"
            if settings.basis == "global" else f"an incompatible version of the {settings.codec} codec")
    raise BitstreamError(f"file was made with {what}: fingerprint {header.fingerprint.hex()}, "
                         f"this program's is {fingerprint.hex()}")
  bitstream.verify_check(header, strings, expected_key(settings))
  return header, settings, steps, strings


def decode(data):
  """File bytes -> (uint8 HxWx3, Settings); BitstreamError for anything malformed."""
  header, settings, stored_steps, strings = read_settings(data)
  shapes = plane_shapes(header.height, header.width, settings.subsampling)
  counts = [-(-h // BLOCK) * -(-w // BLOCK) for h, w in shapes]
  group_counts = [counts[0], counts[1] + counts[2]]
  dc = [huffman.decode_values(strings[-4], group_counts[0], "luma DC segment"),
        huffman.decode_values(strings[-3], group_counts[1], "chroma DC segment")]
  ac = [huffman.decode_runs(strings[-1], group_counts[0], COEFS - 1, "luma AC segment"),
        huffman.decode_runs(strings[-2], group_counts[1], COEFS - 1, "chroma AC segment")]
  rotations = None
  if settings.basis == "image":
    rotation = huffman.decode_runs(strings[1], COEFS, COEFS, "KLT basis segment")
    rotations = [rotation, rotation]
  bases, steps, _ = _transforms(settings, rotations=rotations)
  if stored_steps is not None:
    steps = stored_steps
  dc = [np.cumsum(dc[g].reshape(planes, -1), axis=1).ravel() for g, planes in enumerate((1, 2))]
  first = [(0, 0), (1, 0), (1, counts[1])]  # each plane's group and first block in it
  planes = [_plane_from_levels(dc[g][i:i + n], ac[g][i:i + n], bases[g], steps[g], *shape)
            for (g, i), n, shape in zip(first, counts, shapes)]
  # Stripe by stripe: the float64 temporaries of upsampling and colour conversion stay a few rows
  # high, so decoding takes about 20 bytes a pixel whatever the size (whole-image temporaries took
  # over 120).
  image = np.empty((header.height, header.width, 3), np.uint8)
  for top in range(0, header.height, STRIPE):
    bottom = min(top + STRIPE, header.height)
    chroma = [_chroma_rows(p, top, bottom, header.width, settings.subsampling) for p in planes[1:]]
    image[top:bottom] = ycbcr_to_rgb([planes[0][top:bottom]] + chroma)
  return image, settings


STRIPE = 16 * BLOCK  # rows of pixels decoded at a time


def _plane_from_levels(dc, ac, basis, steps, height, width):
  """A plane from the DC and AC levels of its blocks, dequantized a stripe of block rows at a time."""
  columns = -(-width // BLOCK)
  plane = np.empty((height, width))
  for top in range(0, height, STRIPE):
    bottom = min(top + STRIPE, height)
    blocks = slice(top // BLOCK * columns, -(-bottom // BLOCK) * columns)
    levels = np.concatenate([dc[blocks, None], ac[blocks]], axis=1)
    plane[top:bottom] = from_blocks(dequantize(levels, basis, steps), bottom - top, width)
  return plane


def _chroma_rows(plane, top, bottom, width, subsampling):
  """Rows top..bottom of a chroma plane at full resolution (upsampled from 4:2:0 with one chroma
  row of context on each side, which gives exactly the rows of the whole plane upsampled)."""
  if subsampling == "444":
    return plane[top:bottom]
  first = max(top // 2 - 1, 0)
  last = min((bottom - 1) // 2 + 2, plane.shape[0])
  rows = upsample(plane[first:last], 2 * (last - first), width)
  return rows[top - 2 * first:bottom - 2 * first]


# ---------------------------------------------------------------------------------------------
# Energy compaction: keep only the k largest-variance coefficients of every block

COMPACTION_KS = (1, 2, 4, 8, 16, 32, 64)


def compaction_bases(groups):
  """Per group: the DCT with its frequencies sorted by energy on these blocks, and their exact KLT."""
  out = []
  for blocks in groups:
    dct = dct_basis()
    energy = np.mean((blocks @ dct.T) ** 2, axis=0)
    out.append((dct[np.argsort(-energy, kind="stable")], klt_rotation(second_moment(blocks)) @ dct))
  return out


def kept_energy(blocks, basis, ks=COMPACTION_KS):
  """Fraction of the blocks' energy in their first k coefficients, for each k."""
  energy = np.sum((blocks @ basis.T) ** 2, axis=0)
  return [float(energy[:k].sum() / energy.sum()) for k in ks]


def compaction(image, ks=COMPACTION_KS):
  """Reconstructions and measures keeping the first k coefficients, for DCT and KLT (4:4:4)."""
  from utils import metrics
  planes = rgb_to_ycbcr(image)
  groups = group_blocks(planes)
  height, width = image.shape[:2]
  total = sum(float(np.sum(b ** 2)) for b in groups)
  result = {}
  for name, bases in zip(("DCT", "KLT"), zip(*compaction_bases(groups))):
    coefs = [b @ t.T for b, t in zip(groups, bases)]
    rows = []
    for k in ks:
      kept = [c[:, :k] @ t[:k] for c, t in zip(coefs, bases)]
      n = len(kept[1]) // 2
      recon = ycbcr_to_rgb([from_blocks(kept[0], height, width), from_blocks(kept[1][:n], height, width),
                            from_blocks(kept[1][n:], height, width)])
      energy = sum(float(np.sum(c[:, :k] ** 2)) for c in coefs) / total
      rows.append(dict(k=k, psnr=metrics.psnr(image, recon), energy=energy, recon=recon))
    result[name] = rows
  return result


def _center_crop(image, size):
  h, w = image.shape[:2]
  top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
  return image[top:top + size, left:left + size]


def draw_compaction(image, result, prefix, crop):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(result)
  ks = [r["k"] for r in result[names[0]]]
  fig, axes = plt.subplots(len(names), len(ks) + 1, figsize=(1.9 * (len(ks) + 1), 2.5 * len(names) + 0.4),
                           layout="constrained")
  for row, name in enumerate(names):
    axes[row, 0].imshow(_center_crop(image, crop), interpolation="nearest")
    axes[row, 0].set_title("original", fontsize=8)
    for col, r in enumerate(result[name], start=1):
      axes[row, col].imshow(_center_crop(r["recon"], crop), interpolation="nearest")
      axes[row, col].set_title(f"{name} k={r['k']}\n{_db(r['psnr'])}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(f"first k of 64 coefficients per 8x8 block (centre {crop}x{crop} crop; PSNR of the "
               "whole image)", fontsize=9)
  panel = prefix + "_panel.png"
  fig.savefig(panel, dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name in names:
    finite = [(r["k"], r["psnr"]) for r in result[name] if np.isfinite(r["psnr"])]
    ax.plot(*zip(*finite), marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("coefficients kept per block (k)")
  ax.set_ylabel("PSNR (dB)")
  ax.set_title("energy compaction (k = 64 is lossless)", fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  plot = prefix + "_psnr.png"
  fig.savefig(plot, dpi=120)
  plt.close(fig)
  return panel, plot


def _db(value):
  return "lossless" if not np.isfinite(value) else f"{value:.2f} dB"


# ---------------------------------------------------------------------------------------------
# Command line


def _coder(name, subsampling, basis):
  """(variant name for the CSV, function quality, image -> (bytes, decoded image))."""
  suffix = "-444" if subsampling == "444" else ""
  if name in PILLOW_CODECS:
    check_pillow_codec(name)
    label = name + (suffix if PILLOW_CODECS[name].uses_subsampling else "")
    return label, lambda quality, image: pillow_code(image, name, quality, subsampling)

  def code(quality, image):
    encoded = encode(image, Settings(name, int(quality), subsampling, basis))
    return encoded, decode(encoded)[0]
  return (f"klt-{basis}" if name == "klt" else name) + suffix, code


def _variants(args):
  names = list(PILLOW_CODECS) + list(CODECS) if args.codec == "all" else [args.codec]
  out = []
  for name in names:
    if name in PILLOW_CODECS and args.codec == "all" and not features.check(PILLOW_CODECS[name].feature):
      print(f"skipping {name}: this Pillow has no {PILLOW_CODECS[name].format} support", file=sys.stderr)
      continue
    bases = (BASES if args.basis == "both" else (args.basis,)) if name == "klt" else (None,)
    out += [(name, basis) for basis in bases]
  return out


def _ladder(name, qualities):
  if qualities is None:
    return PILLOW_CODECS[name].ladder if name in PILLOW_CODECS else JPEG_LADDER
  low, high = PILLOW_CODECS[name].quality_range if name in PILLOW_CODECS else (1, 100)
  for q in qualities:
    if not low <= q <= high or (name != "jpeg2000" and q != int(q)):
      raise UserError(f"quality {q:g} is outside {name}'s range (integers {low}..{high})"
                      if name != "jpeg2000" else f"jpeg2000 target PSNR {q:g} dB is outside {low}..{high}")
  return qualities


def _setting(quality):
  return int(quality) if float(quality).is_integer() else float(quality)


def rd_rows(name, images, qualities=None, subsampling="420", basis="global"):
  """RD rows of one codec over its quality ladder: (label, rows); images are (name, uint8) pairs.

  bpp comes from the encoded bytes, PSNR and MS-SSIM from the decoded image.
  """
  from utils import metrics
  label, code = _coder(name, subsampling, basis if name == "klt" else None)
  rows = []
  for stem, image in images:
    for quality in _ladder(name, qualities):
      encoded, recon = code(quality, image)
      rows.append(dict(codec=label, setting=_setting(quality), image=stem,
                       bpp=metrics.bpp(len(encoded), *image.shape[:2]),
                       psnr=metrics.psnr(image, recon), ms_ssim=metrics.ms_ssim(image, recon)))
  return label, rows


def sweep(args):
  from utils import data, rd
  paths = data.eval_paths("builtin", args.eval_glob)
  images = [(os.path.basename(p), data.read_image(p)) for p in paths]
  variants = _variants(args)
  all_rows = {}
  for name, basis in variants:
    start = time.time()
    label, rows = rd_rows(name, images, args.qualities, args.subsampling, basis)
    all_rows[label] = rows
    _print_means(label, rows, len(images), time.time() - start)
    if not args.output:
      path = os.path.join("results", label + ".csv")
      rd.write_points(path, rows)
      print(f"  points in {path}")
  if args.output:
    rd.write_points(args.output, [r for rows in all_rows.values() for r in rows])
    print(f"points in {args.output}")
  _print_bd_rates(all_rows, images, args.subsampling)


def _print_means(label, rows, count, seconds):
  from utils import rd
  print(f"{label}: mean over {count} images ({seconds:.1f} s)")
  for m in rd.mean_curve(rows):
    print(f"  {label} {m['setting']}: {m['bpp']:.4f} bpp, PSNR {m['psnr']:.2f} dB, "
          f"MS-SSIM {m['ms_ssim']:.4f}", flush=True)


def _print_bd_rates(all_rows, images, subsampling):
  """BD-rate of every swept codec against Pillow JPEG on the same images (swept here if need be)."""
  from utils import metrics, rd
  anchor_label, code = _coder("jpeg", subsampling, None)
  others = [label for label in all_rows if label != anchor_label]
  if not others:
    return
  anchor = all_rows.get(anchor_label)
  if anchor is None:
    anchor = []
    for stem, image in images:
      for quality in JPEG_LADDER:
        encoded, recon = code(quality, image)
        anchor.append(dict(setting=quality, image=stem, bpp=metrics.bpp(len(encoded), *image.shape[:2]),
                           psnr=metrics.psnr(image, recon)))
  print(f"BD-rate against {anchor_label} (Pillow libjpeg, same images; PCHIP over the common PSNR range):")
  for label in others:
    rows = all_rows[label]
    print(f"  {label}: {_bd_text(anchor, rows, with_psnr=True)}")
    if len(images) > 1:
      per_image = []
      for stem, _ in images:
        pick = lambda some: [r for r in some if r["image"] == stem]
        per_image.append(f"{stem} {_bd_text(pick(anchor), pick(rows))}")
      print(f"    per image: {', '.join(per_image)}")


def _bd_text(anchor, rows, with_psnr=False):
  from utils import rd
  try:
    text = f"{rd.bd_rate(anchor, rows):+.1f} %"
    return text + (f" bitrate, {rd.bd_psnr(anchor, rows):+.2f} dB PSNR" if with_psnr else "")
  except ValueError as e:
    return f"not comparable ({e})"


def _compress(args):
  from utils import cli, data, metrics
  output = args.output or args.input + cli.DEFAULT_EXT
  cli.check_output(output, args.overwrite)
  image = data.read_image(args.input)
  basis = args.basis if args.codec == "klt" else None
  settings = Settings(args.codec, args.quality, args.subsampling, basis)
  cli.write_bytes(output, encode(image, settings))
  written = cli.read_bytes(output)
  recon, _ = decode(written)
  height, width = image.shape[:2]
  side = ""
  if basis == "image":
    basis_bytes = len(bitstream.unpack(written)[1][1])
    side = f", of which the KLT basis {basis_bytes} bytes ({metrics.bpp(basis_bytes, height, width):.4f} bpp)"
  print(f"{args.input} ({height}x{width}) -> {output}: {len(written)} bytes, "
        f"{metrics.bpp(len(written), height, width):.4f} bpp{side}, "
        f"PSNR {metrics.psnr(image, recon):.2f} dB, MS-SSIM {metrics.ms_ssim(image, recon):.4f} "
        f"[{settings.describe()}]")


def _decompress(args):
  from utils import cli, data
  output = args.output or args.input + ".png"
  cli.check_output(output, args.overwrite)
  image, settings = decode(cli.read_bytes(args.input))
  try:
    data.write_png(output, image)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot write {output}: {e}") from None
  print(f"{args.input} -> {output} ({image.shape[0]}x{image.shape[1]}) [{settings.describe()}]")


def _compaction(args):
  from utils import data
  if not os.path.exists(args.input) and "://" not in args.input:
    raise UserError(f"no such file: {args.input}")
  if args.crop < 8:
    raise UserError(f"--crop must be at least 8 pixels, not {args.crop}")
  image = data.read_image(args.input)
  prefix = args.output or os.path.join(
      "results", "compaction_" + os.path.splitext(os.path.basename(args.input))[0])
  if os.path.dirname(prefix):
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
  result = compaction(image)
  print(f"{args.input} ({image.shape[0]}x{image.shape[1]}): first k coefficients of every 8x8 block "
        "(Y, Cb, Cr at full resolution, no quantization)")
  print("   k   DCT PSNR    KLT PSNR    DCT energy  KLT energy")
  for d, k in zip(result["DCT"], result["KLT"]):
    print(f"  {d['k']:2d}  {_db(d['psnr']):>10}  {_db(k['psnr']):>10}  {100 * d['energy']:9.3f} %"
          f"  {100 * k['energy']:8.3f} %")
  panel, plot = draw_compaction(image, result, prefix, args.crop)
  print(f"figures: {panel}, {plot}")


def _qualities(text):
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
  if not values:
    raise argparse.ArgumentTypeError("no qualities given")
  return values


def build_parser():
  parser = argparse.ArgumentParser(
      prog="jpeg_baseline.py", description="Classical transform coding: Pillow's JPEG, JPEG 2000, "
      "WebP and AVIF for RD points, and a teaching DCT/KLT codec.")
  sub = parser.add_subparsers(dest="command", required=True,
                              metavar="{sweep,compress,decompress,compaction}")
  sw = sub.add_parser("sweep", help="code every evaluation image over a quality ladder, write RD points")
  sw.add_argument("--codec", choices=(*PILLOW_CODECS, *CODECS, "all"), default="all",
                  help="codec to sweep (default: %(default)s)")
  sw.add_argument("--eval_glob", help="images to code (default: the built-in eval photos)")
  sw.add_argument("--output", help="one CSV for all points (default: results/<codec>.csv per codec)")
  sw.add_argument("--qualities", type=_qualities,
                  help="comma-separated settings instead of each codec's ladder "
                  "(JPEG 2000: target PSNR in dB)")
  sw.add_argument("--subsampling", choices=SUBSAMPLINGS, default="420",
                  help="chroma sampling of jpeg, avif, dct and klt (default: %(default)s)")
  sw.add_argument("--basis", choices=(*BASES, "both"), default="both",
                  help="KLT basis: learned on the training photos, per image, or both (default: %(default)s)")

  comp = sub.add_parser("compress", help="compress an image with the teaching codec")
  comp.add_argument("input", help="image file (PNG, JPEG, ...)")
  comp.add_argument("output", nargs="?", help="compressed file (default: INPUT.lic)")
  comp.add_argument("--codec", choices=CODECS, default="dct", help="block transform (default: %(default)s)")
  comp.add_argument("--quality", type=int, default=75, help="1..100, as libjpeg's (default: %(default)s)")
  comp.add_argument("--subsampling", choices=SUBSAMPLINGS, default="420",
                    help="chroma sampling (default: %(default)s)")
  comp.add_argument("--basis", choices=BASES, default="global",
                    help="klt: basis learned on the training photos, or fitted to this image and sent "
                    "with it (default: %(default)s)")
  comp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

  decomp = sub.add_parser("decompress", help="decompress a dct or klt file into a PNG image")
  decomp.add_argument("input", help="compressed file")
  decomp.add_argument("output", nargs="?", help="PNG image (default: INPUT.png)")
  decomp.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

  cp = sub.add_parser("compaction", help="reconstructions keeping the first k coefficients per block, "
                      "DCT vs KLT: a panel and a PSNR-vs-k plot")
  cp.add_argument("input", help="image file")
  cp.add_argument("--output", help="path prefix of the two PNG figures "
                  "(default: results/compaction_<input name>)")
  cp.add_argument("--crop", type=int, default=128, help="side of the centre crop shown in the panel "
                  "(default: %(default)s)")
  return parser


COMMANDS = {"sweep": sweep, "compress": _compress, "decompress": _decompress, "compaction": _compaction}


def main(argv=None):
  """Runs one command; returns the exit status (2 with a one-line `error:` for user errors)."""
  from utils.cli import run_reporting_errors
  args = build_parser().parse_args(argv)
  return run_reporting_errors(lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
  sys.exit(main())
