"""The keys every config has, with the official recipe's defaults
(official `configs/_base_/models/seg_vit-b16.py` and `configs/segvit/segvit_vit-l_jax_*.py`).

The files in `configs/` start from `get_base_config()` and change what their paper setting changes.
Users override any key from the command line: `--config.batch_size=8 --config.mesh=data:4,model:2`.
"""

import ml_collections


def vit_base(model: ml_collections.ConfigDict) -> None:
  """ViT-B/16 as in the official `seg_vit-b16.py` (ATM head d = 384, 12 heads)."""
  model.embed_dim = 768
  model.depth = 12
  model.num_heads = 12
  model.out_indices = (5, 7, 11)
  model.drop_path_rate = 0.1
  model.decoder_dim = 384
  model.decoder_heads = 12


def vit_large(model: ml_collections.ConfigDict) -> None:
  """ViT-L/16 as in the official ViT-L configs (ATM head d = 512, 16 heads)."""
  model.embed_dim = 1024
  model.depth = 24
  model.num_heads = 16
  model.out_indices = (7, 15, 23)
  model.drop_path_rate = 0.3
  model.decoder_dim = 512
  model.decoder_heads = 16


def shrunk(model: ml_collections.ConfigDict) -> None:
  """The Shrunk variant: QD at block 8 of ViT-L, QU head + single-stage ATM (official
  `backbone/vit_shrink.py`, `decode_heads/tpn_atm_head.py`)."""
  model.name = 'segvit_shrunk'
  model.shrink_index = 8
  model.out_indices = (7, 23)
  model.use_stages = 2


def _model_defaults() -> ml_collections.ConfigDict:
  """config.model: ViT-L/16 + the ATM head."""
  m = ml_collections.ConfigDict()
  m.name = 'segvit'  # 'segvit' (ViT + ATM head) or 'segvit_shrunk' (QD in the ViT, QU + ATM head)
  m.img_size = (640, 640)  # the crop (h, w) the position-embedding grid is stored for
  m.patch_size = 16
  m.mlp_ratio = 4
  m.shrink_index = -1  # block that performs query-based down-sampling (shrunk only)
  m.use_stages = 3  # backbone taps used by the head
  m.decoder_layers = 3
  m.decoder_dropout = 0.1
  m.num_classes = 150
  m.dtype = 'float32'  # compute dtype; parameters stay float32. 'bfloat16' for mixed precision.
  m.remat = 'none'  # backbone blocks in the backward pass: 'none', 'full' (recompute) or 'dots'
  # softmax(q k^T) v: 'auto' (Pallas on TPU, cuDNN on GPU in bf16, per-head on CPU), 'xla',
  # 'per_head', 'pallas_tpu' or 'cudnn'.
  m.attention = 'auto'
  m.scan_unroll = 1  # backbone blocks per iteration of each scanned segment
  vit_large(m)
  return m


def _dataset_defaults() -> ml_collections.ConfigDict:
  """config.dataset: ADE20K with mmseg's train and test pipelines."""
  d = ml_collections.ConfigDict()
  d.name = 'ade20k'  # a declared dataset (segvit_jax.data.datasets): class names, palette
  d.source = 'tfds'  # 'tfds', 'mmseg_folder' (an mmseg-prepared folder) or an in-memory dataset
  d.tfds_name = 'ade20k'  # builder name, with config: 'pascal_context/60'
  d.data_dir = ''  # TFDS data dir; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.folder = ''  # root of an mmseg folder: img_dir/{train,val}, ann_dir/{train,val}
  d.reduce_zero_label = True  # label 0 -> 255, k -> k - 1 (ADE20K, COCO-Stuff)
  d.num_classes = 150
  d.crop_size = (640, 640)
  d.img_scale = (2048, 640)  # (long, short) side bounds before the ratio
  d.ratio_range = (0.5, 2.0)
  d.cat_max_ratio = 0.75
  d.flip_prob = 0.5
  d.photometric = True
  d.mean = (127.5, 127.5, 127.5)  # RGB
  d.std = (127.5, 127.5, 127.5)
  d.test_img_scale = (2048, 640)  # test resize: long side <= 2048, short side <= 640, aspect kept
  d.test_min_size = 0  # > 0: the short side is at least this (COCO 512, PC 480)
  d.eval_bucket = 64  # resized eval images are padded up to a multiple of this on each side
  d.eval_pad_size = (2048, 2048)  # static (h, w) bucket of test-resized eval images
  d.eval_label_pad_size = (2048, 2048)  # static (h, w) bucket of original-size eval labels
  d.shuffle_buffer = 1000
  d.prefetch = 2
  d.synthetic_image_size = 96  # source 'synthetic': square image side (or (h, w))
  d.synthetic_num_train = 1000  # source 'synthetic': examples per split, rendered in memory
  d.synthetic_num_val = 100
  d.synthetic_seed = 0  # source 'synthetic': example i of a split depends on (seed, split, i)
  return d


def get_base_config() -> ml_collections.ConfigDict:
  """ViT-L SegViT on ADE20K at 640x640, the official recipe. Configs change what differs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 16  # global, over all hosts and devices
  config.num_train_steps = 160_000
  config.log_every_steps = 50
  config.checkpoint_every_steps = 16_000
  config.keep_checkpoints = 3  # the last N; the best by mIoU is kept as well
  # axis:size pairs over data / fsdp / model; -1 takes the remaining devices
  config.mesh = 'data:-1'
  config.init_checkpoint = ''  # a directory written by `segvit_jax.convert` (or a training workdir)
  # The step of the training workdir read by --mode=eval (config.init_checkpoint or WORKDIR) and
  # by fine-tuning from config.init_checkpoint; 0: its latest.
  config.restore_step = 0
  config.pretrained_backbone = ''  # AugReg ViT `.npz` or mmseg `vit_*_p16_384*.pth`, for training

  config.model = _model_defaults()

  config.loss = ml_collections.ConfigDict()
  config.loss.no_object_weight = 0.1
  config.loss.cls_weight = 1.0
  config.loss.mask_weight = 20.0  # sigmoid focal, alpha 0.25, gamma 2
  config.loss.dice_weight = 1.0

  config.optim = o = ml_collections.ConfigDict()
  o.learning_rate = 2e-5
  o.b1 = 0.9
  o.b2 = 0.999
  o.weight_decay = 0.01
  o.head_lr_mult = 10.0
  o.warmup_steps = 1500
  o.warmup_ratio = 1e-6
  o.poly_power = 1.0
  o.min_lr = 0.0
  o.grad_clip_norm = 35.0
  o.grad_accum_steps = 1

  config.dataset = _dataset_defaults()

  # What the run evaluates (segvit_jax.evaluation.evaluators): every_steps N > 0 after every N-th step and
  # the last; -1 after the last step only; 0 never. Metrics are named '<entry>/<metric>'.
  config.evals = ml_collections.ConfigDict()
  config.evals.val = dict(type='miou', every_steps=4000)  # mIoU & co.; picks the best checkpoint
  config.evals.figure = dict(type='figure', every_steps=-1, num_images=4)  # predictions.png

  # How a model is evaluated: test resize, windows, TTA (mmseg's test_cfg and test pipeline).
  config.eval = e = ml_collections.ConfigDict()
  e.mode = 'slide'  # 'slide' or 'whole'
  e.crop_size = (640, 640)
  e.stride = (608, 608)
  e.batch_size = 8  # global
  e.multi_scale = False
  e.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  e.flip = True  # with multi_scale
  e.num_examples = -1  # -1: the whole split
  return config
