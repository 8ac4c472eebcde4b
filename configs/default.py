"""Default hyperparameters: the Bag-of-Tricks strong baseline on Market-1501.

Every other config starts from `get_config()` here and changes what its recipe
changes. Values derived from others (steps per epoch, P from the batch size and
K, the compute dtype) are computed in code, never stored here.

Each field is documented here, with the module that reads it ("Read by"); fields
read in several places say so. `reid_jax.config_lib.validate` checks every field at
start-up against the allowed values owned by those modules.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the BoT Market-1501 recipe (softmax + triplet, BNNeck, last stride 1)."""
  config = ml_collections.ConfigDict()
  # The root of every random draw: model init (reid_jax.train), the samplers' epochs
  # (input_pipeline.pipeline.make_sampler) and the device augmentation keys
  # (reid_jax.train_step, via train).
  config.seed = 0

  # Data, read by input_pipeline.data_source (the one place that decides where a run's
  # images come from). `dataset` is a name from input_pipeline.catalog; `data_dir` its root.
  config.dataset = 'market1501'
  config.data_dir = 'data/Market-1501-v15.09.15'
  # Test sets, each evaluated and logged under its label: '[label=]dataset[:data_dir]'
  # strings, e.g. ('market1501:data/Market-1501-v15.09.15', 'dukemtmcreid:data/DukeMTMC-reID')
  # for cross-domain (see input_pipeline.data_source.parse_test_datasets). The first set's
  # mAP is "the" mAP (best checkpoint, flat keys of eval_results.json). Empty: the
  # training dataset.
  config.test_datasets = ()
  # Legacy single test set (one-entry test_datasets); leave empty with test_datasets.
  config.test_dataset = ''
  config.test_data_dir = ''
  # 'folder' reads the original folder tree, 'tfds' the TFRecords of our TFDS builders.
  config.data_format = 'folder'
  config.tfds_data_dir = ''
  # Decode every image once at start-up and skip (with a warning) corrupt ones.
  config.verify_images = False
  # The generic folder reader, dataset name 'folder' (the multi-GPU variant reads every
  # dataset this way): `data_dir` is its root (the variant's DATASETS.DATA_PATH), these
  # are the split folders inside it (TRAIN_PATH, QUERY_PATH, GALLERY_PATH; relative,
  # '..' allowed; train_dir '' for a test-only set) and the file-name regex (group 1
  # the pid, -1 = junk, dropped; group 2 the camera, numbered from 1). Passed to
  # input_pipeline.market.read_folder by input_pipeline.data_source.
  config.folder = ml_collections.ConfigDict()
  config.folder.train_dir = 'bounding_box_train'
  config.folder.query_dir = 'query'
  config.folder.gallery_dir = 'bounding_box_test'
  config.folder.pattern = r'([-\d]+)_c(\d+)'

  # Input and augmentation (the baseline's order: resize, flip, pad, crop,
  # normalise, random erasing). Read by input_pipeline.device_augment.AugmentConfig;
  # image_size also by input_pipeline.pipeline (the host resize) and reid_jax.train
  # (the model's input shape), and with the pixel mean/std by reid_jax.export.
  config.input = ml_collections.ConfigDict()
  config.input.image_size = (256, 128)  # (height, width)
  config.input.flip_prob = 0.5
  config.input.padding = 10
  config.input.random_erasing_prob = 0.5
  config.input.pixel_mean = (0.485, 0.456, 0.406)
  config.input.pixel_std = (0.229, 0.224, 0.225)
  # The fill of an erased box, written into the normalised image (one value per
  # channel). (): the pixel mean, as the baseline's RandomErasing(mean=PIXEL_MEAN).
  config.input.random_erasing_value = ()
  # Where the decoded, resized uint8 training images are kept (input_pipeline.cache,
  # CACHE_MODES): 'none'; 'host' (one host array, filled on first read: from the
  # second epoch a batch is a gather from it); 'device' (decoded once before the first
  # step into a copy on each local device, padded by input.padding; the host then
  # ships only indices); 'auto': 'device' when one copy fits cache_device_max_gb (and
  # a quarter of the device's memory; on CPU devices all copies together must fit
  # cache_max_gb), else 'host' when it fits cache_max_gb, else 'none'.
  # Market-1501 at 256x128: 1.27 GB on the host, 1.59 GB per device.
  config.input.cache = 'auto'
  config.input.cache_max_gb = 16.0
  config.input.cache_device_max_gb = 4.0

  # Sampling, read by input_pipeline.pipeline.make_sampler (SAMPLERS). 'pk' =
  # RandomIdentitySampler (P identities x K images); 'shuffle' = plain shuffling
  # (softmax-only training). batch_size is also read by reid_jax.train (per-device
  # shapes, images per second).
  config.sampler = 'pk'
  config.batch_size = 64  # global batch, P * K
  config.num_instances = 4  # K
  # The multi-GPU variant's per-GPU batch semantics (DTennant/reid_baseline_with_syncbn,
  # whose batch sizes are per GPU). 0: off, the sizes above and test.batch_size are
  # global. N > 0: reproduce its run on N GPUs on any number of devices: the global
  # batch is batch_size * N with K = num_instances * N images per identity (P
  # unchanged), the weights' lr is optim.base_lr * N (its linear scaling) while biases
  # keep base_lr * bias_lr_factor, and the test batch is test.batch_size * N. Resolved
  # once at start-up (reid_jax.config_lib.resolve_reference_gpus) into those global
  # values, which config.json then records with num_reference_gpus=0.
  config.num_reference_gpus = 0
  # Allow P x K layouts where an identity's K images span several devices (P not a
  # multiple of the device count): exact, as triplets are mined over the gathered
  # global batch and BN statistics are cross-device. num_reference_gpus turns it on.
  # Read by reid_jax.config_lib.validate.
  config.identities_may_span_devices = False

  # Model, read by reid_jax.models.create_model (NECKS, NECK_FEATS, POOLINGS, MODEL_NAMES);
  # pretrained and pretrain_choice by reid_jax.convert (through reid_jax.train).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'resnet50'
  config.model.last_stride = 1
  config.model.neck = 'bnneck'  # or 'no'
  config.model.neck_feat = 'after'  # test feature: 'after' or 'before' the neck BN
  config.model.pooling = 'avg'  # or 'gem'
  config.model.gem_p = 3.0
  # Blocks per stage and base width; () and 64 give the standard ResNet of `name`
  # (other values build custom, e.g. tiny test, networks of the same block type).
  config.model.stage_sizes = ()
  config.model.width = 64
  # Pretrained weights: an .npz from reid_jax.convert, or (with torch installed) a .pth
  # of a torchvision ResNet or a reid-strong-baseline model (plain, DataParallel
  # 'module.' prefix, or inside {'state_dict': ...}). Empty: random init. Never downloaded.
  config.model.pretrained = ''
  # 'imagenet': the backbone only; 'self': the whole model (BNNeck and classifier too),
  # to evaluate or fine-tune a trained re-ID model (see reid_jax.convert).
  config.model.pretrain_choice = 'imagenet'

  # Losses, parsed once by reid_jax.train_step.LossConfig (LOSS_TYPES): 'softmax',
  # 'triplet', 'softmax_triplet', 'softmax_triplet_center'. center_lr (the centers'
  # SGD) is read by reid_jax.optim, which takes the weight from LossConfig.
  config.loss = ml_collections.ConfigDict()
  config.loss.type = 'softmax_triplet'
  config.loss.label_smoothing = 0.1  # epsilon; 0 disables
  config.loss.triplet_margin = config_dict.FieldReference(0.3, field_type=float)  # None: soft margin
  config.loss.center_loss_weight = 5e-4
  config.loss.center_lr = 0.5

  # Optimiser with the baseline's parameter groups (biases get their own lr
  # factor and weight decay; decay is L2 added to the gradient, as torch's).
  # Read by reid_jax.optim (OPTIMIZERS).
  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'adam'  # or 'sgd'
  config.optim.base_lr = 3.5e-4
  config.optim.bias_lr_factor = 1.0
  config.optim.weight_decay = 5e-4
  config.optim.weight_decay_bias = 5e-4
  config.optim.momentum = 0.9  # sgd only

  # Learning-rate schedule, changed per epoch as in the baseline. Read by reid_jax.optim
  # (SCHEDULES, WARMUP_METHODS).
  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'warmup_multistep'  # or 'cosine'
  config.schedule.milestones = (40, 70)
  config.schedule.gamma = 0.1
  config.schedule.warmup_factor = 0.01
  config.schedule.warmup_epochs = 10
  config.schedule.warmup_method = 'linear'  # or 'constant'

  # Training length: read by reid_jax.train (the loop), reid_jax.optim (the schedule's
  # epochs) and reid_jax.checkpoint_save.SavePolicy (the last step is saved).
  config.num_epochs = 120
  # >0 caps the number of steps in an epoch (quick runs); 0 = the sampler's length.
  # Read by input_pipeline.pipeline.steps_per_epoch.
  config.steps_per_epoch = 0

  # Precision, read by reid_jax.precision (CONFIG_DTYPES): half_precision picks bfloat16
  # on TPU/CPU, float16 (with dynamic loss scaling) on GPU; `dtype` ('float32',
  # 'bfloat16', 'float16') overrides.
  config.half_precision = False
  config.dtype = ''
  # float16 only: a run stops when the dynamic loss scale falls to min_loss_scale or
  # after max_skipped_steps consecutive steps with non-finite gradients (in float32 and
  # bfloat16 any such step stops the run at the next log step; it is never applied).
  # Read by reid_jax.train (min_loss_scale also by precision.create_dynamic_scale,
  # through train).
  config.min_loss_scale = 1.0
  config.max_skipped_steps = 50

  # Logging, checkpoints, evaluation.
  # Metrics are summed on the device and fetched every log_every_steps (and at epoch
  # ends): the host never waits for the device in between. Read by reid_jax.train, and
  # by checkpoint_save.SavePolicy (it looks at the clock on log steps only).
  config.log_every_steps = 20
  # Batches kept on the devices ahead of the step (filled by a background thread);
  # reid_jax.train.
  config.prefetch_batches = 2
  # >0: write a profiler trace of this many steps to the workdir, starting
  # profile_first_step steps after the (re)start (after compilation); reid_jax.train.
  config.profile_steps = 0
  config.profile_first_step = 10
  # Checkpoints: at the end of every checkpoint_every_epochs epochs, every
  # checkpoint_every_steps steps (0: off), every checkpoint_every_minutes minutes of
  # training (0: off; checked at log steps) and at the last step. SIGTERM / SIGINT
  # save too. The best checkpoint by mAP is kept apart in checkpoints/best. The
  # checkpoint_every_* fields are read by reid_jax.checkpoint_save.SavePolicy;
  # keep_checkpoints (the latest steps kept) and eval_every_epochs by reid_jax.train.
  config.checkpoint_every_epochs = 40
  config.checkpoint_every_steps = 0
  config.checkpoint_every_minutes = 30.0
  config.keep_checkpoints = 3
  config.eval_every_epochs = 40
  config.checkpoint = ''  # explicit checkpoint for --eval_only (reid_jax.eval_only)

  # Evaluation. test.batch_size is read by input_pipeline.pipeline.create_eval_dataset
  # (global batch, split over the devices); flip (average with the mirrored image) by
  # reid_jax.train (the eval step) and reid_jax.export; feat_norm (L2-normalise the
  # features) and the metric fields below by reid_jax.evaluation / reid_jax.scoring.
  config.test = ml_collections.ConfigDict()
  config.test.batch_size = 128
  config.test.feat_norm = True
  config.test.flip = False
  config.test.max_rank = 50  # CMC length of the metrics
  # CMC ranks reported (logged, eval_results.json, the printed table), 1-based; the CMC
  # curve (cmc.png) runs to max(max_rank, the largest of them).
  config.test.cmc_ranks = (1, 5, 10)
  # 'euclidean' (squared, the baseline's) or 'cosine' (1 - cos): metrics, re-ranking and
  # reports (eval.distance.DISTANCES).
  config.test.distance = 'euclidean'
  # 'auto' (the CUHK03 single-gallery-shot protocol for classic-split CUHK03 data, the
  # Market protocol for everything else, CUHK03-NP included), 'market' or 'cuhk03'.
  config.test.protocol = 'auto'
  # fast-reid's average query expansion (TEST.AQE: ENABLED, QE_TIME, QE_K, ALPHA),
  # applied to the (normalised) features before scoring.
  config.test.aqe = False
  config.test.aqe_times = 1
  config.test.aqe_k = 5
  config.test.aqe_alpha = 3.0
  # Also report fast-reid's TPR at FPR 1e-4, 1e-3, 1e-2 (TEST.ROC_ENABLED).
  config.test.tpr_at_fpr = False
  # k-reciprocal re-ranking (Zhong et al., the baseline's TEST.RE_RANKING) with its k1,
  # k2 and lambda.
  config.test.rerank = False
  config.test.k1 = 20
  config.test.k2 = 6
  config.test.lambda_value = 0.3
  # Memory limit (GiB) of the dense evaluations (re-ranking, the CUHK03 protocol):
  # above it they are refused with the memory they would need. CMC/mAP/mINP are
  # streamed from the features and need no Q x G matrix at any size.
  config.test.max_dense_gb = 16.0
  config.test.report_queries = 10  # worst queries drawn in the report
  config.test.report_top_k = 10
  return config
