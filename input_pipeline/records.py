"""The record types every dataset reader returns and the pipeline consumes."""

import dataclasses
from typing import NamedTuple

# The splits of a ReIDDataset, in order.
SPLITS = ('train', 'query', 'gallery')


class Record(NamedTuple):
  """One image of a re-ID dataset.

  Attributes:
    path: absolute path of the image file.
    pid: identity. Train pids are relabelled to 0..C-1; query/gallery pids keep
      the dataset's own ids (0 may be a distractor, as Market's 0000).
    camid: camera index, counted from 0.
  """
  path: str
  pid: int
  camid: int


@dataclasses.dataclass(frozen=True)
class ReIDDataset:
  """The three splits of a re-ID dataset.

  Attributes:
    name: catalog name, e.g. 'market1501'.
    train: training records, pids relabelled to 0..num_train_pids-1.
    query: query records.
    gallery: gallery records.
  """
  name: str
  train: tuple[Record, ...]
  query: tuple[Record, ...]
  gallery: tuple[Record, ...]

  @property
  def num_train_pids(self) -> int:
    return len({r.pid for r in self.train})

  @property
  def num_train_cams(self) -> int:
    return len({r.camid for r in self.train})
