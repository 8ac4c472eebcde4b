"""CUHK03-NP (the new protocol of Zhong et al.), labeled and detected boxes.

Layout as released with the re-ranking code (`cuhk03-np/{labeled,detected}`),
each variant a Market-style tree of `PID_cCAM_N.png` images.
"""

from collections.abc import Mapping
import functools

from input_pipeline import market
from input_pipeline import reader_utils
from input_pipeline.choices import check_choice
from input_pipeline.dataset_stats import DatasetSpec
from input_pipeline.dataset_stats import SplitStats
from input_pipeline.records import ReIDDataset

# The boxes of the CUHK03 release: hand-labelled or from a person detector.
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
    'labeled': DatasetSpec(
        title='CUHK03-NP (labeled)', layout=_LAYOUT, source=_SOURCE,
        published={
            'train': SplitStats(767, 7368, 2),
            'query': SplitStats(700, 1400, 2),
            'gallery': SplitStats(700, 5328, 2),
        }),
    'detected': DatasetSpec(
        title='CUHK03-NP (detected)', layout=_LAYOUT, source=_SOURCE,
        published={
            'train': SplitStats(767, 7365, 2),
            'query': SplitStats(700, 1400, 2),
            'gallery': SplitStats(700, 5332, 2),
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
    reader_utils.DatasetError: unknown variant or a bad dataset folder.
  """
  check_choice('CUHK03-NP variant', variant, VARIANTS, reader_utils.DatasetError)
  return market.read_market_style(
      root, name=f'cuhk03_{variant}', spec=SPECS[variant],
      candidates=(variant, f'cuhk03-np/{variant}', f'CUHK03-NP/{variant}',
                  f'cuhk03/cuhk03-np/{variant}', ''),
      pattern=market.FOLDER_PATTERN, verify=verify, num_threads=num_threads)


# Catalog name -> reader: 'cuhk03_labeled' and 'cuhk03_detected'.
READERS: Mapping[str, reader_utils.Reader] = {
    f'cuhk03_{variant}': functools.partial(read_cuhk03, variant=variant)
    for variant in VARIANTS}
