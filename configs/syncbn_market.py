"""The multi-GPU variant's Market-1501 recipe (DTennant/reid_baseline_with_syncbn).

Reproduces its `configs/debug.yml` (one GPU) and, with `--config.num_reference_gpus=2`,
`configs/debug_multi-gpu.yml` (the same values on two GPUs with synchronized BN; its
batch sizes are per GPU: see `num_reference_gpus` in configs/default.py). Cross-device
BN is always on in reid_jax. The other syncbn_* recipes start from this file, as the
variant's YAMLs all start from its `config.py` defaults.

The variant's values (its YAMLs, `config.py`, `dataset/`, `losses/`, `optim.py`,
`trainer.py`): ResNet-50 (last stride 1, BNNeck, test feature after the neck BN,
Euclidean distance, no feature normalisation); every dataset read by one generic folder
reader (DATA_PATH with TRAIN_PATH, QUERY_PATH, GALLERY_PATH, names matching
`([-\\d]+)_c(\\d+)`: here `dataset='folder'`, `data_dir` and `config.folder`); resize,
flip 0.5, no padding, normalise with mean = std = 0.5, random erasing 0.5 filling the
normalised tensor with the pixel mean (0.5); P=8 identities x K=8; plain cross-entropy
(no label smoothing) + batch-hard triplet (margin 0.3); Adam, base lr 1e-4, bias lr
factor 1, weight decay 5e-4 (biases too); linear warmup from 0.01 over 10 epochs, lr
x0.6 at epochs 20, 30, 45, ..., 255; test batch 16 per GPU at the training size;
CMC ranks 1, 5, 10. Market: 224x224, batch 64, 30 epochs, checkpoint and evaluation
every epoch.

Published Market-1501 figures (the variant's README, 30 epochs, ImageNet-pretrained
ResNet-50: pass `--config.model.pretrained=resnet50.npz`, see reid_jax.convert):

  one GPU (this file)                          rank-1 89.6, mAP 74.5
  two GPUs (--config.num_reference_gpus=2)     rank-1 87.4, mAP 72.1
  one GPU, fp16 (--config.dtype=float16)       rank-1 90.4, mAP 75.9

(with re-ranking, `--config.test.rerank=True`: 92.7 / 90.0, 91.3 / 88.9, 93.1 / 90.2).
The variant's trainer refuses fp16 on several GPUs (NotImplementedError), so its fp16
recipes are one-GPU runs.
"""

import ml_collections

from configs import default

# The variant's lr steps: 20, then every 15 epochs from 30 to 255 (its SOLVER.STEPS).
MILESTONES = (20,) + tuple(range(30, 256, 15))


def read_folders(config: ml_collections.ConfigDict, data_path: str, train_path: str,
                 query_path: str, gallery_path: str) -> None:
  """Points the variant's generic folder reader at a dataset (its DATASETS section).

  Args:
    config: the recipe, changed in place (`data_dir` and `config.folder`).
    data_path: DATASETS.DATA_PATH, the dataset's root.
    train_path: TRAIN_PATH, the training folder inside it.
    query_path: QUERY_PATH.
    gallery_path: GALLERY_PATH.
  """
  config.data_dir = data_path
  config.folder.train_dir = train_path
  config.folder.query_dir = query_path
  config.folder.gallery_dir = gallery_path


def get_config() -> ml_collections.ConfigDict:
  """Returns the variant's `configs/debug.yml` recipe (Market-1501, one GPU)."""
  config = default.get_config()
  # DATASETS: the generic folder reader.
  config.dataset = 'folder'
  read_folders(config, 'data/Market-1501-v15.09.15', 'bounding_box_train', 'query',
               'bounding_box_test')
  config.folder.pattern = r'([-\d]+)_c(\d+)'
  # INPUT (SIZE_TEST = SIZE_TRAIN: one image_size here).
  config.input.image_size = (224, 224)
  config.input.flip_prob = 0.5
  config.input.padding = 0
  config.input.random_erasing_prob = 0.5
  config.input.pixel_mean = (0.5, 0.5, 0.5)
  config.input.pixel_std = (0.5, 0.5, 0.5)
  # DATALOADER / SOLVER.IMS_PER_BATCH (per GPU: see num_reference_gpus).
  config.sampler = 'pk'
  config.batch_size = 64
  config.num_instances = 8
  config.num_reference_gpus = 0
  # MODEL.
  config.model.name = 'resnet50'
  config.model.last_stride = 1
  config.model.neck = 'bnneck'
  config.model.neck_feat = 'after'
  # Losses: F.cross_entropy (MODEL.LABEL_SMOOTH off) + TripletLoss(SOLVER.MARGIN).
  config.loss.type = 'softmax_triplet'
  config.loss.label_smoothing = 0.0
  config.loss.triplet_margin = 0.3
  # SOLVER.
  config.optim.name = 'adam'
  config.optim.base_lr = 1e-4
  config.optim.bias_lr_factor = 1.0
  config.optim.weight_decay = 5e-4
  config.optim.weight_decay_bias = 5e-4
  config.schedule.name = 'warmup_multistep'
  config.schedule.milestones = MILESTONES
  config.schedule.gamma = 0.6
  config.schedule.warmup_factor = 0.01
  config.schedule.warmup_epochs = 10
  config.schedule.warmup_method = 'linear'
  config.num_epochs = 30
  config.dtype = ''  # float32 (SOLVER.FP16 False); half_precision stays off
  config.log_every_steps = 100
  config.checkpoint_every_epochs = 1
  config.eval_every_epochs = 1
  # TEST (IMS_PER_BATCH per GPU; the neck feature, Euclidean, not normalised).
  config.test.batch_size = 16
  config.test.feat_norm = False
  config.test.flip = False
  config.test.rerank = False
  config.test.cmc_ranks = (1, 5, 10)
  return config
