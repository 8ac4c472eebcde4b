"""Dataset statistics: what a reader knows about its dataset, and the published counts.

`DatasetSpec` describes a dataset for messages and checks (title, expected layout,
where it comes from, its published statistics); `dataset_stats` counts the ids,
images and cameras of each split, `stats_table` formats them beside the published
ones and `compare_with_published` warns about every split that differs. The readers'
`reader_utils.build_dataset` logs both for every dataset it reads.
"""

from collections.abc import Iterable, Mapping
import dataclasses

from absl import logging

from input_pipeline.records import Record
from input_pipeline.records import ReIDDataset
from input_pipeline.records import SPLITS


@dataclasses.dataclass(frozen=True)
class SplitStats:
  """Counts of one split.

  Attributes:
    num_ids: distinct pids (Market's distractor id 0 counts as one).
    num_images: images.
    num_cams: distinct cameras; None in published tables where unknown.
  """
  num_ids: int
  num_images: int
  num_cams: int | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a reader knows about its dataset, for messages and checks.

  Attributes:
    title: human name, e.g. 'Market-1501'.
    layout: the expected folder tree, shown when something is missing.
    source: where the dataset is normally obtained (never downloaded here).
    published: split name -> published statistics (empty: nothing to compare).
  """
  title: str
  layout: str
  source: str
  published: Mapping[str, SplitStats] = dataclasses.field(default_factory=dict)


def split_stats(records: Iterable[Record]) -> SplitStats:
  """Counts ids, images and cameras.

  Args:
    records: the split.

  Returns:
    Its statistics.
  """
  records = list(records)
  return SplitStats(num_ids=len({r.pid for r in records}),
                    num_images=len(records),
                    num_cams=len({r.camid for r in records}))


def dataset_stats(dataset: ReIDDataset) -> dict[str, SplitStats]:
  """Statistics of the splits of a dataset.

  Args:
    dataset: the dataset.

  Returns:
    split name -> statistics (splits with no record are left out).
  """
  return {split: split_stats(getattr(dataset, split))
          for split in SPLITS if getattr(dataset, split)}


def stats_table(name: str, stats: Mapping[str, SplitStats],
                published: Mapping[str, SplitStats]) -> str:
  """Formats the found (and published) statistics as a text table.

  Args:
    name: dataset name for the title.
    stats: split -> found statistics.
    published: split -> published statistics.

  Returns:
    The table, one line per split.
  """
  def cell(found, expected):
    return f'{found}' if expected is None else f'{found} / {expected}'
  rows = [('split', '# ids', '# images', '# cameras')]
  for split in SPLITS:
    if split not in stats and split not in published:
      continue
    s = stats.get(split, SplitStats(0, 0, 0))
    p = published.get(split)
    rows.append((split,
                 cell(s.num_ids, p and p.num_ids),
                 cell(s.num_images, p and p.num_images),
                 cell(s.num_cams, p and p.num_cams)))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = [f'{name} statistics' + (' (found / published)' if published else '')]
  for i, row in enumerate(rows):
    lines.append('  ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)))
    if i == 0:
      lines.append('  ' + '-+-'.join('-' * w for w in widths))
  return '\n'.join(lines)


def compare_with_published(name: str, stats: Mapping[str, SplitStats],
                           published: Mapping[str, SplitStats]) -> list[str]:
  """Logs a warning for every split whose counts differ from the published ones.

  A mismatch is not an error: subsets and test trees are legitimate.

  Args:
    name: dataset name.
    stats: split -> found statistics.
    published: split -> published statistics (cameras None: not compared).

  Returns:
    The warning messages (empty when everything matches).
  """
  messages = []
  for split in SPLITS:
    if split not in published:
      continue
    p = published[split]
    s = stats.get(split, SplitStats(0, 0, 0))
    diffs = []
    if s.num_ids != p.num_ids:
      diffs.append(f'{s.num_ids} ids (published {p.num_ids})')
    if s.num_images != p.num_images:
      diffs.append(f'{s.num_images} images (published {p.num_images})')
    if p.num_cams is not None and s.num_cams != p.num_cams:
      diffs.append(f'{s.num_cams} cameras (published {p.num_cams})')
    if diffs:
      messages.append(f'{name}: split {split!r} differs from the published '
                      f'statistics: {", ".join(diffs)}.')
  for message in messages:
    logging.warning('%s', message)
  return messages
