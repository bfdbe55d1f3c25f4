"""Shared by every codec script: data, command line, training, bitstream, metrics, RD points.

Nothing in here imports a model script. Model scripts import `utils` before TensorFlow so that the
setting below takes effect before TensorFlow's C++ start-up messages are printed.
"""
import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pool_cpu_memory():
  """Has TensorFlow keep its CPU tensors' memory for reuse (its BFC allocator) instead of taking it
  from malloc and giving it back at every free: call before the process's first TensorFlow op.

  malloc returns large buffers to the kernel when they are freed, so every training step faulted in
  and zeroed its activations afresh (80 000 page faults a second in an hcae run), and so did every
  tile of a decoder's synthesis. Pooled, training steps are 2-15 % faster and a bmshj2018 N=M=192
  decompress of a 768x512 photo about 0.5 s faster, with the same bits (README, "Benchmarks").
  `train` and `decompress` pool; `compress`, which runs its graph once, was no faster with it.
  TF_CPU_ALLOCATOR_USE_BFC=false in the environment keeps malloc.
  """
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


def lazy_import(name):
  """The module `name`, imported at its first attribute access.

  Model scripts take tensorflow_compression this way: importing it imports tensorflow-probability,
  about a second of start-up that `compress` and `decompress` do not need (they run the SavedModel
  and only load the range-coding ops, see utils.codec); `train` builds layers and imports it then.
  """
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec(name)
  if spec is None:
    raise ImportError(f"No module named {name!r}")
  spec.loader = importlib.util.LazyLoader(spec.loader)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module
