"""Reading a record's image: decoding as PIL does, from a file or from memory.

A record's image comes from a `LoadImageFn`, `load_image(path, index) -> uint8
(h, w, 3)`, called inside the tf.data graph with the record's path (tf.string) and
its index in the record list (tf.int64). `load_image_file` (the default) reads the
file at the path; `in_memory_loader(encoded)` decodes `encoded[index]` instead (e.g.
the image bytes of TFDS shards). Both decode with `decode_image`: JPEG bit-exact
with PIL; PNG, BMP, GIF's first frame.
"""

from collections.abc import Callable, Sequence

import tensorflow as tf

LoadImageFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG / PNG / BMP / GIF bytes to uint8 (h, w, 3), as PIL does.

  JPEGs use the accurate integer DCT (libjpeg's JDCT_ISLOW, what PIL uses) with
  fancy upsampling: bit-exact with PIL's decoding, whereas TF's default DCT
  differs by up to ~9 grey levels.

  Args:
    encoded: scalar tf.string of the file's bytes.

  Returns:
    uint8 tensor (h, w, 3).
  """
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(encoded, channels=3,
                                 expand_animations=False))


def load_image_file(path: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Reads and decodes the image file at `path` (index unused)."""
  del index
  return decode_image(tf.io.read_file(path))


def in_memory_loader(encoded: Sequence[bytes]) -> LoadImageFn:
  """Returns a `load_image` hook decoding `encoded[index]` (e.g. TFDS bytes).

  Args:
    encoded: encoded images (JPEG/PNG bytes), aligned with the records.

  Returns:
    load_image(path, index) -> uint8 (h, w, 3).
  """
  table = tf.constant(list(encoded), dtype=tf.string)

  def load(path: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    del path
    return decode_image(tf.gather(table, index))

  return load
