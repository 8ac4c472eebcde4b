"""Bag-of-Tricks strong baseline on CUHK03-NP (labeled; set dataset=cuhk03_detected).

CUHK03-NP (767 train / 700 test identities, `data_dir` the `cuhk03-np` folder) is scored
with the Market protocol. The classic splits of the original release (1,367 train / 100
test identities; 20 test sets) are the catalog's 'cuhk03_classic_labeled' and
'cuhk03_classic_detected' (split 0) and '..._split1' to '..._split19':

  --config.dataset=cuhk03_classic_labeled_split3 --config.data_dir=data/cuhk03

with `data_dir` the folder holding `cuhk03_release/cuhk-03.mat` (the images are extracted
there once, see input_pipeline/cuhk03_classic.py). With `test.protocol='auto'` they are
scored with the CUHK03 single-gallery-shot protocol; the classic figures are the mean
over the 20 splits (one run per split).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'cuhk03_labeled'  # classic splits: 'cuhk03_classic_labeled[_splitK]'
  config.data_dir = 'data/cuhk03-np'  # classic splits: the folder of cuhk03_release/
  return config
