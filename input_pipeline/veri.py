"""Vehicle re-ID: VeRi-776 and VeRi-Wild (fast-reid's readers).

VeRi-776 is a Market-style tree (`0001_c001_00016450_0.jpg`, cameras c001..c020).
VeRi-Wild lists `VID/IMAGE_ID` lines in `train_test_split/*.txt`, images are
`images/VID/IMAGE_ID.jpg`, and `vehicle_info.txt` gives the camera of each image
(`VID/IMAGE_ID;CAMERA_ID;TIME;MODEL;TYPE;COLOR`, one header line). VeRi-Wild
camera ids are mapped to 0..N-1 in sorted order over the whole info file, so
that every split and test size shares one camid scope.
"""

from collections.abc import Mapping
import dataclasses
import functools
import os

from input_pipeline import market
from input_pipeline import reader_utils
from input_pipeline.choices import check_choice
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.dataset_stats import SplitStats
from input_pipeline.records import ReIDDataset
from input_pipeline.records import SPLITS

VERI776_PATTERN = r'([\d]+)_c(\d+)'

VERI776 = DatasetSpec(
    title='VeRi-776',
    layout="""
VeRi/
  image_train/   0001_c001_00016450_0.jpg ...  (576 ids, 37,778 images)
  image_query/   (1,678 images)
  image_test/    (11,579 images)
""",
    source=('the VeRi-776 authors (Liu et al., "Large-scale vehicle '
            're-identification in urban surveillance videos", ICME 2016 / '
            'ECCV 2016; granted on request)'),
    published={
        'train': SplitStats(576, 37778, 20),
        'query': SplitStats(200, 1678, None),
        'gallery': SplitStats(200, 11579, None),
    })

# test size -> (query list, gallery list, published query, published gallery)
VERIWILD_TESTS = {
    'small': ('test_3000_query.txt', 'test_3000.txt',
              SplitStats(3000, 3000), SplitStats(3000, 38861)),
    'medium': ('test_5000_query.txt', 'test_5000.txt',
               SplitStats(5000, 5000), SplitStats(5000, 64389)),
    'large': ('test_10000_query.txt', 'test_10000.txt',
              SplitStats(10000, 10000), SplitStats(10000, 128517)),
}

VERIWILD = DatasetSpec(
    title='VeRi-Wild',
    layout="""
VERI-Wild/
  images/00001/000001.jpg ...
  train_test_split/
    train_list.txt          lines 'VID/IMAGE_ID'
    test_3000_query.txt     test_3000.txt     (small)
    test_5000_query.txt     test_5000.txt     (medium)
    test_10000_query.txt    test_10000.txt    (large)
    vehicle_info.txt        'VID/IMAGE_ID;CAMERA_ID;TIME;MODEL;TYPE;COLOR'
                            (may also sit next to images/)
""",
    source=('the VERI-Wild authors (Lou et al., "VERI-Wild: A Large Dataset and '
            'a New Method for Vehicle Re-Identification in the Wild", CVPR '
            '2019; granted on request, see the PKU-IMRE/VERI-Wild GitHub page)'),
    published={'train': SplitStats(30671, 277797)})


def read_veri776(root: str, *, verify: bool = False,
                 num_threads: int = 8) -> ReIDDataset:
  """Reads VeRi-776.

  Args:
    root: the `VeRi` folder or its parent.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'veri776'.
  """
  return market.read_market_style(
      root, name='veri776', spec=VERI776,
      candidates=('', 'VeRi', 'VeRi-776', 'VeRi776', 'veri', 'veri776'),
      train_dir='image_train', query_dir='image_query', gallery_dir='image_test',
      pattern=VERI776_PATTERN, verify=verify, num_threads=num_threads)


def read_vehicle_info(path: str) -> dict[str, int]:
  """Reads VeRi-Wild's `vehicle_info.txt`.

  Args:
    path: the file.

  Returns:
    image id (file stem) -> camid, camera ids mapped to 0..N-1 in sorted order.

  Raises:
    reader_utils.DatasetError: lines that do not parse.
  """
  lines = reader_utils.read_lines(path)
  raw, bad = {}, []
  for i, (number, line) in enumerate(lines):
    fields = line.split(';')
    try:
      image_id = fields[0].split('/')[1].split('.')[0]
      camera = int(fields[1])
      if not image_id:
        raise ValueError(line)
    except (IndexError, ValueError):
      if i == 0:  # the header 'id/image;Camera ID;Time;Model;Type;Color'
        continue
      bad.append(f'vehicle_info.txt:{number}: {line}')
      continue
    raw[image_id] = camera
  reader_utils.raise_unparsed(VERIWILD, 'vehicle_info', bad, len(lines),
                              "'VID/IMAGE_ID;CAMERA_ID;...' lines")
  mapping = {c: i for i, c in enumerate(sorted(set(raw.values())))}
  return {image_id: mapping[c] for image_id, c in raw.items()}


def parse_veriwild_list(list_path: str, image_dir: str, cams: dict[str, int],
                        *, split: str) -> list[reader_utils.Item]:
  """Parses a VeRi-Wild list file of `VID/IMAGE_ID` lines.

  Args:
    list_path: the list file.
    image_dir: the `images` folder.
    cams: image id -> camid from `read_vehicle_info`.
    split: split name for messages.

  Returns:
    [(absolute path, vid, camid)] in file order.

  Raises:
    reader_utils.DatasetError: lines that do not parse, images without camera, or an
      empty list.
  """
  lines = reader_utils.read_lines(list_path)
  items, bad, no_cam = [], [], []
  for number, line in lines:
    try:
      vid_str, image = line.split('/')
      vid = int(vid_str)
      image_id = image.split('.')[0]
      if not image_id:
        raise ValueError(line)
    except ValueError:
      bad.append(f'{os.path.basename(list_path)}:{number}: {line}')
      continue
    if image_id not in cams:
      no_cam.append(line)
      continue
    items.append((os.path.join(image_dir, vid_str, image_id + '.jpg'), vid,
                  cams[image_id]))
  reader_utils.raise_unparsed(VERIWILD, split, bad, len(lines), "'VID/IMAGE_ID' lines")
  if no_cam:
    examples = ', '.join(repr(n) for n in no_cam[:reader_utils.MAX_EXAMPLES])
    raise reader_utils.DatasetError(
        f'VeRi-Wild: {len(no_cam)} images of the {split} split '
        f'({os.path.basename(list_path)}) are not in vehicle_info.txt, e.g. '
        f'{examples}.')
  if not items:
    raise reader_utils.DatasetError(
        f'VeRi-Wild: no images listed in {list_path!r} ({split} split).\n'
        f'{reader_utils.layout_help(VERIWILD)}')
  return items


def read_veriwild(root: str, *, test_size: str = 'small',
                  check_files: bool = True, verify: bool = False,
                  num_threads: int = 8) -> ReIDDataset:
  """Reads VeRi-Wild with one of its three test sets.

  Args:
    root: the `VERI-Wild` folder or its parent.
    test_size: 'small' (3,000 ids), 'medium' (5,000) or 'large' (10,000).
    check_files: raise if listed images do not exist.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'veriwild_{test_size}'.

  Raises:
    reader_utils.DatasetError: unknown test size or a bad dataset folder.
  """
  check_choice('VeRi-Wild test_size', test_size, tuple(VERIWILD_TESTS),
               reader_utils.DatasetError)
  query_list, gallery_list, query_stats, gallery_stats = VERIWILD_TESTS[test_size]
  spec = dataclasses.replace(
      VERIWILD, title=f'VeRi-Wild ({test_size})',
      published={**VERIWILD.published, 'query': query_stats,
                 'gallery': gallery_stats})
  lists = ['train_test_split/train_list.txt',
           f'train_test_split/{query_list}', f'train_test_split/{gallery_list}']
  info_places = ('train_test_split/vehicle_info.txt', 'vehicle_info.txt')
  folder, index = reader_utils.find_root(
      root, spec, [['images', *lists, info] for info in info_places],
      candidates=('', 'VERI-Wild', 'VeRi-Wild', 'veri-wild', 'VeRiWild',
                  'veriwild'))
  cams = read_vehicle_info(os.path.join(folder, info_places[index]))
  image_dir = os.path.join(folder, 'images')
  items = {}
  for split, list_rel in zip(SPLITS, lists):
    items[split] = parse_veriwild_list(os.path.join(folder, list_rel),
                                       image_dir, cams, split=split)
    if check_files:
      reader_utils.check_files_exist(items[split], spec=spec, split=split)
  return reader_utils.build_dataset(f'veriwild_{test_size}', spec, train=items['train'],
                                    query=items['query'], gallery=items['gallery'],
                                    verify=verify, num_threads=num_threads)


# Catalog name -> reader: 'veriwild_small', 'veriwild_medium' and 'veriwild_large'.
VERIWILD_READERS: Mapping[str, reader_utils.Reader] = {
    f'veriwild_{size}': functools.partial(read_veriwild, test_size=size)
    for size in VERIWILD_TESTS}
