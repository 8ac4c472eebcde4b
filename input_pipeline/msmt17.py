"""MSMT17 (V1 and V2), read from its list files as torchreid does.

Each list line is `RELATIVE_PATH PID`; the camera is the third `_`-separated
field of the file name (`0000_000_01_0303morning_0015_0.jpg` -> camera 01 ->
camid 0). As torchreid's published numbers (1,041 ids / 32,621 images), the
validation list is merged into train by default (its ids are train ids).
"""

import dataclasses
import os

from input_pipeline import reader_utils
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.dataset_stats import SplitStats
from input_pipeline.records import ReIDDataset

# version -> (train image folder, test image folder)
VERSIONS = {
    'V1': ('train', 'test'),
    'V2': ('mask_train_v2', 'mask_test_v2'),
}
LISTS = ('list_train.txt', 'list_val.txt', 'list_query.txt', 'list_gallery.txt')

MSMT17 = DatasetSpec(
    title='MSMT17',
    layout="""
MSMT17_V1/                 (V2: MSMT17_V2/ with mask_train_v2/ and mask_test_v2/)
  train/0000/0000_000_01_0303morning_0015_0.jpg ...
  test/0000/...
  list_train.txt           lines 'PID/NAME.jpg PID' (relative to train/)
  list_val.txt             (relative to train/, merged into train)
  list_query.txt           (relative to test/)
  list_gallery.txt         (relative to test/)
""",
    source=('the official MSMT17 page (Wei et al., "Person Transfer GAN", CVPR '
            '2018; granted on request after signing the release agreement)'),
    published={
        'train': SplitStats(1041, 32621, 15),
        'query': SplitStats(3060, 11659, 15),
        'gallery': SplitStats(3060, 82161, 15),
    })


def parse_list(list_path: str, image_dir: str, *, split: str
               ) -> list[reader_utils.Item]:
  """Parses an MSMT17 list file.

  Args:
    list_path: e.g. `list_query.txt`.
    image_dir: folder the listed paths are relative to.
    split: split name for messages.

  Returns:
    [(absolute path, pid, camid)] in file order.

  Raises:
    reader_utils.DatasetError: lines that do not parse, or an empty list.
  """
  lines = reader_utils.read_lines(list_path)
  items, bad = [], []
  for number, line in lines:
    fields = line.split()
    try:
      rel, pid = fields[0], int(fields[1])
      camid = int(os.path.basename(rel).split('_')[2]) - 1
      if len(fields) != 2 or camid < 0 or pid < 0:
        raise ValueError(line)
    except (IndexError, ValueError):
      bad.append(f'{os.path.basename(list_path)}:{number}: {line}')
      continue
    items.append((os.path.join(image_dir, rel), pid, camid))
  reader_utils.raise_unparsed(MSMT17, split, bad, len(lines),
                              "'PID/PID_IDX_CAM_....jpg PID' lines")
  if not items:
    raise reader_utils.DatasetError(
        f'MSMT17: no images listed in {list_path!r} ({split} split).\n'
        f'{reader_utils.layout_help(MSMT17)}')
  return items


def read_msmt17(root: str, *, merge_val: bool = True, check_files: bool = True,
                verify: bool = False, num_threads: int = 8) -> ReIDDataset:
  """Reads MSMT17 V1 or V2 (detected from the folders).

  Args:
    root: `MSMT17_V1` / `MSMT17_V2` or a parent of it.
    merge_val: add the `list_val.txt` images to train (torchreid's published
      statistics); False keeps only `list_train.txt`.
    check_files: raise if listed images do not exist.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'msmt17'.
  """
  required = [[train_dir, test_dir, *LISTS]
              for train_dir, test_dir in VERSIONS.values()]
  folder, index = reader_utils.find_root(
      root, MSMT17, required,
      candidates=('', 'MSMT17_V1', 'MSMT17_V2', 'MSMT17', 'msmt17/MSMT17_V1',
                  'msmt17/MSMT17_V2', 'msmt17'))
  version = list(VERSIONS)[index]
  train_dir, test_dir = (os.path.join(folder, d) for d in VERSIONS[version])
  lists = {
      'train': [('list_train.txt', train_dir)]
               + ([('list_val.txt', train_dir)] if merge_val else []),
      'query': [('list_query.txt', test_dir)],
      'gallery': [('list_gallery.txt', test_dir)],
  }
  spec = MSMT17 if merge_val else dataclasses.replace(
      MSMT17, published={**MSMT17.published,
                         'train': SplitStats(1041, 30248, 15)})
  items = {}
  for split, sources in lists.items():
    items[split] = []
    for list_name, image_dir in sources:
      items[split] += parse_list(os.path.join(folder, list_name), image_dir,
                                 split=split)
    # train and val never overlap; guard against lists given twice.
    items[split] = sorted(set(items[split]))
    if check_files:
      reader_utils.check_files_exist(items[split], spec=spec, split=split)
  return reader_utils.build_dataset('msmt17', spec, train=items['train'],
                                    query=items['query'], gallery=items['gallery'],
                                    verify=verify, num_threads=num_threads)
