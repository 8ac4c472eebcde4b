"""CUHK03-NP (the new protocol of Zhong et al.), labeled and detected boxes.

Layout as released with the re-ranking code (`cuhk03-np/{labeled,detected}`),
each variant a Market-style tree of `PID_cCAM_N.png` images.
"""

from input_pipeline import base
from input_pipeline import market
from input_pipeline.records import ReIDDataset

VARIANTS = ('labeled', 'detected')

_LAYOUT = """
cuhk03-np/
  labeled/
    bounding_box_train/   0001_c1_1.png ...
    query/
    bounding_box_test/
  detected/
    bounding_box_train/
    query/
    bounding_box_test/
"""
_SOURCE = ('the CUHK03 release (Li et al., CVPR 2014) converted to the new '
           'protocol "CUHK03-NP" by Zhong et al. (CVPR 2017, person-re-ranking '
           'repository)')

SPECS = {
    'labeled': base.DatasetSpec(
        title='CUHK03-NP (labeled)', layout=_LAYOUT, source=_SOURCE,
        published={
            'train': base.SplitStats(767, 7368, 2),
            'query': base.SplitStats(700, 1400, 2),
            'gallery': base.SplitStats(700, 5328, 2),
        }),
    'detected': base.DatasetSpec(
        title='CUHK03-NP (detected)', layout=_LAYOUT, source=_SOURCE,
        published={
            'train': base.SplitStats(767, 7365, 2),
            'query': base.SplitStats(700, 1400, 2),
            'gallery': base.SplitStats(700, 5332, 2),
        }),
}


def read_cuhk03(root: str, *, variant: str = 'labeled', verify: bool = False,
                num_threads: int = 8) -> ReIDDataset:
  """Reads CUHK03-NP.

  Args:
    root: the `cuhk03-np` folder, its parent, or the variant folder itself.
    variant: 'labeled' (hand-drawn boxes) or 'detected' (DPM boxes).
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'cuhk03_labeled' or 'cuhk03_detected'.

  Raises:
    base.DatasetError: unknown variant or a bad dataset folder.
  """
  if variant not in VARIANTS:
    raise base.DatasetError(
        f'CUHK03-NP variant must be one of {VARIANTS}, got {variant!r}.')
  return market.read_market_style(
      root, name=f'cuhk03_{variant}', spec=SPECS[variant],
      candidates=(variant, f'cuhk03-np/{variant}', f'CUHK03-NP/{variant}',
                  f'cuhk03/cuhk03-np/{variant}', ''),
      pattern=market.FOLDER_PATTERN, verify=verify, num_threads=num_threads)


def read_cuhk03_labeled(root: str, *, verify: bool = False,
                        num_threads: int = 8) -> ReIDDataset:
  """Reads CUHK03-NP labeled; see `read_cuhk03`.

  Args:
    root: the `cuhk03-np` folder or its parent.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'cuhk03_labeled'.
  """
  return read_cuhk03(root, variant='labeled', verify=verify,
                     num_threads=num_threads)


def read_cuhk03_detected(root: str, *, verify: bool = False,
                         num_threads: int = 8) -> ReIDDataset:
  """Reads CUHK03-NP detected; see `read_cuhk03`.

  Args:
    root: the `cuhk03-np` folder or its parent.
    verify: drop images that cannot be decoded.
    num_threads: threads for the image check.

  Returns:
    The dataset named 'cuhk03_detected'.
  """
  return read_cuhk03(root, variant='detected', verify=verify,
                     num_threads=num_threads)
