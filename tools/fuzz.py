"""Fuzzes the decoders of every codec with damaged, truncated, extended, random and edited files.

    python tools/fuzz.py --cases 10000                  # every codec; tiny models trained if missing
    python tools/fuzz.py --codecs hcae,dct --cases 500 --models_dir /tmp/fuzz-models

Each case starts from a real compressed file and ends, within a time bound, in one of:
  rejected   a one-line BitstreamError (the command line prints it and exits with status 2)
  intact     the file was not changed and decodes to exactly the picture it encodes
  forged     (crafted cases only) a file re-signed with the model's key, as only someone holding
             the model can make: it is a valid file, and decodes to whatever it encodes
  timeout    (crafted cases only) entropy decoding stopped by its time limit (status 2)
Anything else is a failure: another exception, a message of several lines, a changed file that
decodes, a slow case, a hung or crashed decoder. Cases run in a worker process, restarted after a
timeout or a hang (a native decoder cannot be interrupted); failures are saved for replay.

Kinds of damage: bit flips, truncation at every length class, extension, random bytes, header
fields and strings edited and re-framed (as anyone without the model can), and (crafted) header
or string edits re-signed with the model's key.
"""
import argparse
import collections
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402,F401  (quiets TensorFlow start-up logs)
from utils import bitstream  # noqa: E402
from utils.errors import BitstreamError, DecodeTimeout  # noqa: E402

NEURAL = ("bls2017", "bmshj2018", "hcae")
TEACHING = ("dct", "klt")
CODECS = NEURAL + TEACHING
# The tiny models of tests/test_codecs.py.
TINY_FLAGS = {
    "bls2017": ["--num_filters", "16"],
    "bmshj2018": ["--num_filters", "16", "--latent_depth", "24"],
    "hcae": ["--levels", "6", "--num_filters", "16", "--latent_channels", "8"],
}
TRAIN_FLAGS = ["--lambda", "0.01", "--patch_size", "64", "--batch_size", "4", "--steps_per_epoch", "12",
               "--epochs", "3", "--learning_rate", "1e-3", "--verbose", "0"]
UNSIGNED_KINDS = ("bit flips", "truncation", "extension", "random bytes", "header edit", "string edit")
CRAFTED_KINDS = ("crafted header", "crafted strings")
BOUND = 20.0  # seconds a case may take (crafted cases: their entropy decoding gets BOUND / 2)
CRAFTED_MAX_PIXELS = 1 << 22  # crafted sizes stay below 4 megapixels: a case must fit the bound


def natural_image(height, width, seed=0):
  """A smooth, photo-like uint8 RGB test image (random noise would not compress like a photo); the
  tests use it too."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.stack([
      128 + 60 * np.sin(xx / 7 + c) * np.cos(yy / 11 - c) + 30 * np.sin((xx + yy) / 17 * (c + 1))
      for c in range(3)], axis=-1)
  image += rng.normal(0, 4, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


# --- targets: a decoder, its reference files and their pictures --------------------------------


class Target:
  """A decoder with real files to start from; decode(data) -> uint8 image or BitstreamError."""

  def __init__(self, name, decode, key, files):
    self.name, self.decode, self.key = name, decode, key
    self.files = files
    self.pictures = [decode(f) for f in files]


def neural_target(name, model_dir, images):
  from utils import codec
  model = codec.Codec(model_dir)
  decode = lambda data: model.decode(data, time_limit=BOUND / 2)
  return Target(name, decode, model._key, [model.encode(im)[0] for im in images])


def teaching_target(name, images):
  import jpeg_baseline as jb
  settings = ([jb.Settings("dct", 50, "420"), jb.Settings("dct", 90, "444")] if name == "dct" else
              [jb.Settings("klt", 60, "420", "global"), jb.Settings("klt", 80, "444", "image")])
  files = [jb.encode(im, s) for im, s in zip(images, settings)]
  # The check's key is public for these codecs: each file's settings give it.
  keys = {f: jb.expected_key(jb.read_settings(f)[1]) for f in files}
  target = Target(name, lambda data: jb.decode(data)[0], None, files)
  target.key_of = keys.get
  return target


def make_target(name, models_dir):
  images = [natural_image(37, 53, 5), natural_image(64, 80, 6)]
  if name in TEACHING:
    return teaching_target(name, images)
  return neural_target(name, os.path.join(models_dir, name), images)


# --- cases ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
  index: int
  kind: str
  data: bytes
  source: int       # which reference file it started from
  crafted: bool     # re-signed with the model's key


def _flip_bits(data, rng):
  out = bytearray(data)
  for _ in range(int(rng.choice([1, 1, 2, 3, 8, rng.integers(1, 33)]))):
    i = int(rng.integers(len(out) * 8))
    out[i // 8] ^= 1 << (i % 8)
  return bytes(out)


def _field_ends(data):
  """Offsets where the framing's fields end: the length classes of truncation."""
  header, strings = bitstream.unpack(data)
  ends = [1, 2, 3, 4, 6, 6 + bitstream.CHECK_BYTES]
  pos = ends[-1]
  for value in [header.height, header.width] + [len(s) for s in strings[:-1]]:
    pos += max(1, -(-value.bit_length() // 7))  # bytes of its varint
    ends.append(pos)
  for s in strings:
    ends += [pos + 1, pos + len(s) // 2, pos + len(s)]
    pos += len(s)
  return sorted({e for e in ends + [len(data) - 4, len(data) - 2, len(data) - 1] if 0 <= e < len(data)})


def _truncate(data, rng):
  classes = [0, 1] + _field_ends(data)
  end = int(rng.choice(classes))
  return data[:max(0, end + int(rng.integers(-1, 2)))] if rng.random() < 0.3 else data[:end]


def _extend(data, rng, other):
  choice = rng.integers(5)
  if choice == 0:
    return data + bytes(int(rng.integers(1, 9)))
  if choice == 1:
    return data + rng.bytes(int(rng.integers(1, 1000)))
  if choice == 2:
    return data + data
  if choice == 3:
    return data + other
  return data[:-4] + rng.bytes(int(rng.integers(1, 64))) + data[-4:]  # bytes inside the payload


def _random_bytes(data, rng):
  n = int(rng.integers(0, 2 * len(data) + 2))
  choice = rng.integers(3)
  if choice == 0:
    return rng.bytes(n)
  if choice == 1:
    return data[:3] + rng.bytes(n)  # magic and version right, the rest noise
  return data[:6] + rng.bytes(n)  # and codec, count and fingerprint right


def _edit_header_fields(header, strings, rng):
  """A header with one field changed (sizes near and far, fingerprint, check), same strings."""
  field = rng.integers(4)
  if field == 0:
    deltas = [1, -1, 2, 15, 16, -16, 17, 64, -64, 1000]
    side = "height" if rng.random() < 0.5 else "width"
    value = getattr(header, side)
    new = int(rng.choice([value + int(rng.choice(deltas)), value * 2, int(rng.integers(1, 4096)), 1]))
    new = min(max(new, 1), bitstream.MAX_SIDE)
    if new * (header.width if side == "height" else header.height) > CRAFTED_MAX_PIXELS:
      new = value + 1
    return dataclasses.replace(header, **{side: new}), strings
  if field == 1:
    return dataclasses.replace(header, fingerprint=rng.bytes(bitstream.FINGERPRINT_BYTES)), strings
  if field == 2:
    return dataclasses.replace(header, check=rng.bytes(bitstream.CHECK_BYTES)), strings
  # Move a boundary between two strings (or cut the last).
  if len(strings) > 1:
    i = int(rng.integers(len(strings) - 1))
    joined = strings[i] + strings[i + 1]
    cut = int(rng.integers(len(joined) + 1))
    return header, strings[:i] + [joined[:cut], joined[cut:]] + strings[i + 2:]
  return header, [strings[0][:int(rng.integers(len(strings[0]) + 1))]]


def _edit_header_bytes(data, rng):
  """Raw edits of the framing bytes (version, codec and count nibbles, overlong varints, inserted or
  deleted bytes)."""
  body = bytearray(data)
  choice = rng.integers(5)
  if choice == 0:
    body[2] = int(rng.integers(256))
  elif choice == 1:
    body[3] = (int(rng.integers(16)) << 4) | (body[3] & 0x0F)
  elif choice == 2:
    body[3] = (body[3] & 0xF0) | int(rng.integers(16))
  elif choice == 3:
    at = 6 + bitstream.CHECK_BYTES  # the height varint: re-encoded one byte longer
    end = at
    while body[end] & 0x80:
      end += 1
    body[end] |= 0x80
    body.insert(end + 1, 0)
  else:
    at = int(rng.integers(3, min(len(body), 16)))
    if rng.random() < 0.5:
      del body[at]
    else:
      body.insert(at, int(rng.integers(256)))
  return bytes(body)


def _edit_strings(strings, rng):
  strings = list(strings)
  choice = rng.integers(6)
  i = int(rng.integers(len(strings)))
  s = bytearray(strings[i])
  if choice == 0 and s:
    for _ in range(int(rng.integers(1, 4))):
      s[int(rng.integers(len(s)))] = int(rng.integers(256))
  elif choice == 1:
    s = s[:int(rng.integers(len(s) + 1))]
  elif choice == 2:
    s += rng.bytes(int(rng.integers(1, 16)))
  elif choice == 3:
    s = bytearray(rng.bytes(len(s)))
  elif choice == 4:
    return [b""] * len(strings)
  else:
    return strings[::-1] if len(strings) > 1 else [bytes(s) + bytes(s)]
  strings[i] = bytes(s)
  return strings


def make_case(target, index, seed=0, crafted_share=0.15):
  """The index-th case for `target`, a pure function of (target files, index, seed)."""
  rng = np.random.default_rng([seed, index, CODECS.index(target.name)])
  source = int(rng.integers(len(target.files)))
  data = target.files[source]
  header, strings = bitstream.unpack(data)
  if rng.random() < crafted_share:
    kind = CRAFTED_KINDS[int(rng.integers(2))]
    if kind == "crafted header":
      header, strings = _edit_header_fields(header, strings, rng)
    else:
      strings = _edit_strings(strings, rng)
    key = target.key if target.key is not None else target.key_of(data)
    return Case(index, kind, bitstream.pack(header, strings, key=key), source, True)
  kind = UNSIGNED_KINDS[int(rng.integers(len(UNSIGNED_KINDS)))]
  if kind == "bit flips":
    mutated = _flip_bits(data, rng)
  elif kind == "truncation":
    mutated = _truncate(data, rng)
  elif kind == "extension":
    mutated = _extend(data, rng, target.files[1 - source])
  elif kind == "random bytes":
    mutated = _random_bytes(data, rng)
  elif kind == "header edit":
    if rng.random() < 0.5:
      mutated = bitstream.pack(*_edit_header_fields(header, strings, rng))
    else:
      mutated = _edit_header_bytes(data, rng)
  else:
    mutated = bitstream.pack(header, _edit_strings(strings, rng))
  return Case(index, kind, mutated, source, False)


def run_case(target, case):
  """(outcome, seconds, message): the outcomes of the module docstring, or 'FAIL ...'."""
  start = time.time()
  message = ""
  try:
    picture = target.decode(case.data)
    if case.data == target.files[case.source]:
      same = np.array_equal(picture, target.pictures[case.source])
      outcome = "intact" if same else "FAIL intact file decodes to another picture"
    elif case.crafted:
      outcome = "forged"
    else:
      outcome = "FAIL changed file decodes"
  except DecodeTimeout as e:
    outcome, message = ("timeout" if case.crafted else "FAIL timeout"), str(e)
  except BitstreamError as e:
    message = str(e)
    outcome = "rejected" if message and "\n" not in message else "FAIL message not one line"
  except Exception as e:  # noqa: BLE001  the point is to catch what should never happen
    outcome, message = f"FAIL {type(e).__name__}", str(e)[:500]
  seconds = time.time() - start
  if seconds > BOUND and not outcome.startswith("FAIL"):
    outcome = "FAIL slow"
  return outcome, seconds, message


def reason(message):
  """A short class of a rejection message, for the counts."""
  for words in ("checksum", "check does not match", "magic", "format version", "truncated",
                "outside the supported range", "minimally encoded", "unknown codec", "made by",
                "another", "strings, expected", "settings field", "range-coded string",
                "decoding did not finish", "Huffman", "segment", "quantizer"):
    if words in message:
      return words
  return message[:40]


# --- the campaign: a worker process per codec, restarted after a hang or a timeout ----------------


def _worker(name, models_dir, first, last, seed, crafted_share, connection):
  target = make_target(name, models_dir)
  connection.send(("ready", None))
  for index in range(first, last):
    case = make_case(target, index, seed, crafted_share)
    outcome, seconds, message = run_case(target, case)
    connection.send(("case", (index, case.kind, outcome, seconds, message, case.data.hex())))
    if outcome in ("timeout", "FAIL timeout"):
      return  # its decoding thread still runs: start afresh


def campaign(name, models_dir, cases, seed, failures_dir, crafted_share=0.15, log=print):
  """Runs `cases` cases against `name`; returns {kind: Counter(outcome)}, reasons, times."""
  context = multiprocessing.get_context("spawn")
  counts = collections.defaultdict(collections.Counter)
  reasons, times = collections.Counter(), []
  index = 0
  while index < cases:
    parent, child = context.Pipe()
    worker = context.Process(target=_worker, daemon=True,
                             args=(name, models_dir, index, cases, seed, crafted_share, child))
    worker.start()
    child.close()  # the worker holds it: its death then reads as end of file here
    if not parent.poll(600):
      raise RuntimeError(f"{name}: the worker did not start")
    parent.recv()
    while index < cases:
      if not parent.poll(BOUND * 3):
        counts["?"]["FAIL hang" if worker.is_alive() else "FAIL crash"] += 1
        log(f"  case {index}: worker {'hung' if worker.is_alive() else 'died'}")
        index += 1
        break
      try:
        _, (i, kind, outcome, seconds, message, data_hex) = parent.recv()
      except EOFError:
        counts["?"]["FAIL crash"] += 1
        index += 1
        break
      counts[kind][outcome] += 1
      times.append(seconds)
      if outcome == "rejected":
        reasons[reason(message)] += 1
      if outcome.startswith("FAIL"):
        _save_failure(failures_dir, name, i, kind, outcome, message, data_hex)
      index = i + 1
      if outcome in ("timeout", "FAIL timeout"):
        break
      if index % 1000 == 0:
        log(f"  {name}: {index} cases")
    worker.kill()
    worker.join()
  return counts, reasons, times


def _save_failure(failures_dir, name, index, kind, outcome, message, data_hex):
  os.makedirs(failures_dir, exist_ok=True)
  with open(os.path.join(failures_dir, f"{name}-{index}.json"), "w") as f:
    json.dump(dict(codec=name, index=index, kind=kind, outcome=outcome, message=message,
                   data=data_hex), f)


# --- through the real command line --------------------------------------------------------------


def command_line_checks(name, models_dir, seed, count=3, log=print):
  """Decompresses a few rejected cases with the real program: status 2, one `error:` line."""
  import tempfile
  target = make_target(name, models_dir)
  picked, index = [], 0
  while len(picked) < count and index < 1000:
    case = make_case(target, index, seed, crafted_share=0)
    if case.kind in ("bit flips", "header edit", "string edit") and run_case(target, case)[0] == "rejected":
      picked.append(case)
    index += 1
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for case in picked:
      path = os.path.join(tmp, f"case{case.index}.lic")
      with open(path, "wb") as f:
        f.write(case.data)
      script = "jpeg_baseline.py" if name in TEACHING else name + ".py"
      argv = [sys.executable, os.path.join(ROOT, script), "decompress", path]
      if name in NEURAL:
        argv += ["--model_path", os.path.join(models_dir, name)]
      out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
      lines = out.stderr.strip().splitlines()
      ok = out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
      ok = ok and not os.path.exists(path + ".png")
      results.append((case.kind, out.returncode, lines[-1] if lines else "", ok))
      log(f"  {name} CLI, {case.kind}: exit {out.returncode}, {len(lines)} line(s): "
          f"{lines[-1] if lines else ''}")
  return results


def ensure_models(models_dir, names, log=print):
  """Trains the tiny models of tests/test_codecs.py into models_dir (once)."""
  val = os.path.join(models_dir, "val.png")
  if not os.path.exists(val):
    from PIL import Image
    os.makedirs(models_dir, exist_ok=True)
    Image.fromarray(natural_image(48, 64, 10)).save(val)
  for name in names:
    model_dir = os.path.join(models_dir, name)
    if name in NEURAL and not os.path.exists(os.path.join(model_dir, "saved_model", "saved_model.pb")):
      log(f"training a tiny {name} model into {model_dir}")
      subprocess.run([sys.executable, os.path.join(ROOT, name + ".py"), "train", *TRAIN_FLAGS,
                      *TINY_FLAGS[name], "--eval_glob", val, "--model_path", model_dir], check=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated (default: all)")
  parser.add_argument("--cases", type=int, default=10000, help="cases per codec")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--crafted_share", type=float, default=0.15,
                      help="share of the cases re-signed with the model's key (default: %(default)s)")
  parser.add_argument("--models_dir", default="/tmp/fuzz-models", help="tiny models (trained if missing)")
  parser.add_argument("--failures", default="/tmp/fuzz-failures", help="failing cases are saved here")
  args = parser.parse_args()
  names = args.codecs.split(",")
  ensure_models(args.models_dir, names)
  failed = False
  for name in names:
    start = time.time()
    counts, reasons, times = campaign(name, args.models_dir, args.cases, args.seed, args.failures,
                                      args.crafted_share)
    total = collections.Counter()
    for c in counts.values():
      total.update(c)
    print(f"{name}: {args.cases} cases in {time.time() - start:.0f} s, slowest {max(times):.2f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    for kind in sorted(counts):
      print(f"  {kind:16s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts[kind].items())))
    print("  rejected by: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common()))
    cli = command_line_checks(name, args.models_dir, args.seed)
    failed |= any(k.startswith("FAIL") for k in total) or not all(ok for *_, ok in cli)
  print("FAILURES, see " + args.failures if failed else "no failures")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
