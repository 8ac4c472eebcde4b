"""Helpers shared by the dataset readers: layout checks, parsing, relabelling, image checks.

Every reader follows the same steps (as torchreid / fast-reid / the BoT baseline):

1. find the dataset folder under `root` (`find_root`; a clear `DatasetError` showing
   the expected layout and where the dataset comes from when it is missing),
2. list and parse the images of each split (`list_images`, `parse_names`; junk
   images with pid -1 are dropped, file names that do not parse are an error),
3. `build_dataset`: optionally drop undecodable images (`verify_images`),
   relabel the train pids to 0..C-1 in sorted-pid order, check the query and
   gallery, log a statistics table and warn about every split whose counts
   differ from the published ones (`input_pipeline.dataset_stats`).

Nothing here imports TensorFlow.
"""

from collections.abc import Callable, Iterable, Sequence
import concurrent.futures
import os
import re

from absl import logging
from PIL import Image

from input_pipeline import dataset_stats
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.records import Record
from input_pipeline.records import ReIDDataset
from input_pipeline.records import SPLITS

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
# How many offending file names / ids an error or warning message lists.
MAX_EXAMPLES = 5
# A parsed image before relabelling: (absolute path, pid, camid).
Item = tuple[str, int, int]
# A catalog reader: reader(root, *, verify=False, num_threads=8, ...) -> dataset.
Reader = Callable[..., ReIDDataset]


class DatasetError(ValueError):
  """A dataset folder is missing, incomplete or does not parse."""


def layout_help(spec: DatasetSpec) -> str:
  """Returns the 'expected layout / where to get it' part of an error message.

  Args:
    spec: the dataset's description.

  Returns:
    A multi-line string.
  """
  layout = '\n'.join('    ' + line for line in spec.layout.strip('\n').splitlines())
  return (f'Expected layout of {spec.title} (`root` may be the dataset folder '
          f'itself or its parent):\n{layout}\n'
          f'{spec.title} is never downloaded automatically; obtain it from '
          f'{spec.source}.')


def find_root(root: str | os.PathLike[str], spec: DatasetSpec,
              required: Sequence[Sequence[str]],
              candidates: Sequence[str] = ('',)) -> tuple[str, int]:
  """Finds the folder that holds a dataset.

  Args:
    root: directory given by the user.
    spec: the dataset's description (for the error message).
    required: alternative layouts; each is a list of paths (folders or files)
      relative to the dataset folder that must all exist.
    candidates: sub-paths of `root` to try in order ('' is `root` itself).

  Returns:
    (absolute dataset folder, index of the layout in `required` it matches).

  Raises:
    DatasetError: `root` does not exist or no candidate has a complete layout.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  if not os.path.isdir(root):
    raise DatasetError(
        f'{spec.title}: root directory {root!r} does not exist (or is not a directory).\n'
        f'{layout_help(spec)}')
  best = None  # (number of present paths, folder, missing paths)
  for candidate in candidates:
    folder = os.path.join(root, candidate) if candidate else root
    if not os.path.isdir(folder):
      continue
    for index, paths in enumerate(required):
      missing = [p for p in paths if not os.path.exists(os.path.join(folder, p))]
      if not missing:
        return folder, index
      present = len(paths) - len(missing)
      if best is None or present > best[0]:
        best = (present, folder, missing)
  assert best is not None  # root itself exists
  _, folder, missing = best
  raise DatasetError(
      f'{spec.title}: incomplete dataset folder {folder!r}: missing '
      f'{", ".join(repr(m) for m in missing)}.\n{layout_help(spec)}')


def list_images(directory: str, *, spec: DatasetSpec, split: str,
                recursive: bool = False) -> list[str]:
  """Lists the image files of a split folder, sorted.

  Args:
    directory: the split folder.
    spec: the dataset's description (for error messages).
    split: split name for messages.
    recursive: also list sub-folders.

  Returns:
    Sorted absolute paths of the files with an image extension.

  Raises:
    DatasetError: the folder is missing or holds no image.
  """
  if not os.path.isdir(directory):
    raise DatasetError(
        f'{spec.title}: {split} folder {directory!r} does not exist.\n'
        f'{layout_help(spec)}')
  paths = []
  if recursive:
    for dirpath, _, filenames in os.walk(directory):
      paths.extend(os.path.join(dirpath, f) for f in filenames
                   if f.lower().endswith(IMAGE_EXTENSIONS))
  else:
    with os.scandir(directory) as it:
      paths = [e.path for e in it
               if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
  if not paths:
    raise DatasetError(
        f'{spec.title}: no images ({", ".join(IMAGE_EXTENSIONS)}) in the {split} '
        f'folder {directory!r}.\n{layout_help(spec)}')
  return sorted(os.path.abspath(p) for p in paths)


def raise_unparsed(spec: DatasetSpec, split: str, bad: Sequence[str],
                   total: int, expected: str) -> None:
  """Raises the error for file names / lines that do not parse (if any).

  Args:
    spec: the dataset's description.
    split: split name.
    bad: the offending names or lines.
    total: how many were examined.
    expected: description of the expected form.

  Raises:
    DatasetError: `bad` is not empty.
  """
  if not bad:
    return
  examples = ', '.join(repr(b) for b in bad[:MAX_EXAMPLES])
  more = f' (and {len(bad) - MAX_EXAMPLES} more)' if len(bad) > MAX_EXAMPLES else ''
  raise DatasetError(
      f'{spec.title}: {len(bad)} of {total} entries of the {split} split do not '
      f'parse as {expected}: {examples}{more}.')


def parse_names(paths: Iterable[str], pattern: str | re.Pattern[str], *,
                spec: DatasetSpec, split: str, cam_base: int = 1,
                drop_junk: bool = True) -> list[Item]:
  """Parses pid and camera from file names (torchreid's `process_dir`).

  Args:
    paths: image paths.
    pattern: regular expression searched in the file's base name; group 1 is
      the pid, group 2 the camera number.
    spec: the dataset's description (for error messages).
    split: split name for messages.
    cam_base: number of the first camera (1 for 'c1'); subtracted from the
      parsed camera so that camids count from 0.
    drop_junk: drop pid -1 images (Market's junk).

  Returns:
    [(path, pid, camid)] in the order of `paths`, junk dropped.

  Raises:
    DatasetError: some names do not match, or give a camera below `cam_base`.
  """
  regex = re.compile(pattern)
  items, bad, junk, total = [], [], 0, 0
  for path in paths:
    total += 1
    name = os.path.basename(path)
    match = regex.search(name)
    try:
      pid, cam = int(match.group(1)), int(match.group(2)) - cam_base
    except (AttributeError, IndexError, ValueError):
      bad.append(name)
      continue
    if cam < 0 or pid < -1:
      bad.append(name)
      continue
    if pid == -1 and drop_junk:
      junk += 1
      continue
    items.append((path, pid, cam))
  raise_unparsed(spec, split, bad, total,
                 f'pattern "{regex.pattern}" (pid, camera from {cam_base})')
  if junk:
    logging.info('%s: dropped %d junk images (pid -1) from the %s split.',
                 spec.title, junk, split)
  return items


def read_lines(path: str) -> list[tuple[int, str]]:
  """Reads the non-empty lines of a text file.

  Args:
    path: the file.

  Returns:
    [(1-based line number, stripped line)].
  """
  with open(path, encoding='utf-8') as f:
    return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def check_files_exist(items: Sequence[Item], *, spec: DatasetSpec,
                      split: str) -> None:
  """Raises if listed image files are missing (list-file based datasets).

  Args:
    items: parsed images.
    spec: the dataset's description.
    split: split name.

  Raises:
    DatasetError: some files do not exist.
  """
  missing = [p for p, _, _ in items if not os.path.isfile(p)]
  if missing:
    examples = ', '.join(repr(m) for m in missing[:MAX_EXAMPLES])
    raise DatasetError(
        f'{spec.title}: {len(missing)} of {len(items)} images listed for the '
        f'{split} split do not exist, e.g. {examples}.\n{layout_help(spec)}')


def relabel(items: Iterable[Item]) -> tuple[Record, ...]:
  """Relabels pids to 0..C-1 in sorted-pid order.

  Args:
    items: (path, pid, camid) tuples.

  Returns:
    Records sorted by path with relabelled pids.
  """
  items = sorted(items)
  mapping = {pid: label for label, pid in enumerate(sorted({i[1] for i in items}))}
  return tuple(Record(path, mapping[pid], camid) for path, pid, camid in items)


def to_records(items: Iterable[Item]) -> tuple[Record, ...]:
  """Returns the items as Records sorted by path, pids unchanged.

  Args:
    items: (path, pid, camid) tuples.

  Returns:
    Records sorted by path.
  """
  return tuple(Record(*item) for item in sorted(items))


def image_problem(path: str) -> str | None:
  """Returns why an image cannot be decoded, or None if it decodes."""
  try:
    with Image.open(path) as image:
      image.verify()
    with Image.open(path) as image:  # verify() leaves the image unusable
      image.load()
  except Exception as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  return None


def verify_images(records: Sequence[Record], num_threads: int = 8,
                  ) -> tuple[tuple[Record, ...], int]:
  """Drops images that PIL cannot open and fully decode.

  Each file is opened once, checked with `Image.verify` and decoded with
  `Image.load` (one attempt, never retried). Bad files are logged with a
  warning naming the first few.

  Args:
    records: images to check.
    num_threads: worker threads (decoding releases the GIL).

  Returns:
    (the records that decode, in their original order; number dropped).
  """
  records = tuple(records)
  if not records:
    return records, 0
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    problems = list(pool.map(image_problem, (r.path for r in records)))
  good = tuple(r for r, p in zip(records, problems) if p is None)
  bad = [(r.path, p) for r, p in zip(records, problems) if p is not None]
  if bad:
    examples = '; '.join(f'{path} ({why})' for path, why in bad[:MAX_EXAMPLES])
    logging.warning('Skipped %d of %d images that could not be decoded: %s%s',
                    len(bad), len(records), examples,
                    ' ...' if len(bad) > MAX_EXAMPLES else '')
  return good, len(bad)


def check_query_gallery(spec: DatasetSpec, query: Sequence[Record],
                        gallery: Sequence[Record]) -> None:
  """Checks that query and gallery are usable for evaluation.

  Args:
    spec: the dataset's description.
    query: query records.
    gallery: gallery records.

  Raises:
    DatasetError: an empty query or gallery, or query ids without any
      gallery image.
  """
  for split, records in (('query', query), ('gallery', gallery)):
    if not records:
      raise DatasetError(
          f'{spec.title}: the {split} split is empty (no usable image after '
          f'dropping junk and undecodable files).')
  gallery_pids = {r.pid for r in gallery}
  absent = sorted({r.pid for r in query} - gallery_pids)
  if absent:
    shown = ', '.join(str(p) for p in absent[:10])
    raise DatasetError(
        f'{spec.title}: {len(absent)} query ids have no image in the gallery: '
        f'{shown}{" ..." if len(absent) > 10 else ""}.')


def build_dataset(name: str, spec: DatasetSpec, *, train: Sequence[Item],
                  query: Sequence[Item], gallery: Sequence[Item],
                  verify: bool = False, num_threads: int = 8,
                  has_train: bool = True) -> ReIDDataset:
  """Assembles, checks and reports a dataset.

  Args:
    name: catalog name, stored in the dataset.
    spec: the dataset's description.
    train: parsed train images (original pids).
    query: parsed query images.
    gallery: parsed gallery images.
    verify: drop images that cannot be decoded (`verify_images`).
    num_threads: threads for `verify_images`.
    has_train: False for test-only datasets (the train split stays empty).

  Returns:
    The dataset: train pids relabelled to 0..C-1 (sorted-pid order), every
    split sorted by path.

  Raises:
    DatasetError: an empty split or query ids absent from the gallery.
  """
  splits = {'train': to_records(train), 'query': to_records(query),
            'gallery': to_records(gallery)}
  if verify:
    for split in SPLITS:
      splits[split], _ = verify_images(splits[split], num_threads)
  if has_train and not splits['train']:
    raise DatasetError(
        f'{spec.title}: the train split is empty (no usable image after '
        'dropping junk and undecodable files).')
  check_query_gallery(spec, splits['query'], splits['gallery'])
  dataset = ReIDDataset(name=name, train=relabel(splits['train']),
                        query=splits['query'], gallery=splits['gallery'])
  stats = dataset_stats.dataset_stats(dataset)
  logging.info('%s', dataset_stats.stats_table(name, stats, spec.published))
  dataset_stats.compare_with_published(name, stats, spec.published)
  return dataset

