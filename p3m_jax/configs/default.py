"""Quickstart: P3M-Net(ResNet-34) on the synthetic P3M-10k stand-in, small enough for a 2-core CPU.

    python -m p3m_jax.main --config=default --workdir=/tmp/p3m_quickstart

The synthetic dataset (procedural portraits with exact alpha, fg and bg) is built into
`data.data_dir` on first use. About 4-7 minutes on a 2-core CPU (0.6-1.0 s per step): the loss falls from
7.7 to 1.7-2.0 and the validation SAD from 4.3-5.4 (step 100) to 1.2-2.2 (step 300). Every field can be overridden on the command line, e.g. `--config.batch_size=16`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.seed = 10007  # the paper's seed; drives init, shuffling, augmentation and dropout
    config.arch = "resnet34"  # "resnet34" | "swin_t" | "vitae_s"
    config.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (params/optimizer stay float32)
    config.model = ml_collections.ConfigDict()  # extra build_model kwargs (e.g. drop_path_rate for swin_t)

    config.batch_size = 8  # GLOBAL batch over all devices and processes (divisible by the device count)
    config.num_train_steps = 300  # optimizer steps in total
    # Rematerialisation (activations recomputed in the backward pass): "none" | "encoder" (encoder stages) |
    # "decoder" (decoder blocks and bridges keep only inputs and convolution outputs) | "full" (both, the
    # decoder keeping only block inputs). Lower memory, a little more compute; same maths.
    config.remat = "none"
    config.grad_accum_steps = 1  # micro-batches per optimizer step (the global batch stays batch_size)
    config.ema_decay = 0.0  # EMA of the parameters and BatchNorm statistics; 0 disables (e.g. 0.999)
    # Device memory the train step may use, in GiB; 0 reads it from the device (GPUs/TPUs report it). Before the
    # first step the compiled step's memory is compared with it, and a step that does not fit stops the run.
    config.device_memory_gib = 0.0
    config.param_sharding = "replicated"  # "replicated" | "fsdp" (params + optimizer state sharded on "data")
    # JAX's persistent compilation cache: a resumed or repeated run skips compiling the train step and the
    # validation programs. "" turns it off; a folder set by JAX_COMPILATION_CACHE_DIR takes precedence.
    config.compilation_cache_dir = "~/.cache/p3m_jax/xla"
    # "FIRST:LAST" (e.g. "10:15"): a jax.profiler trace of those steps into <workdir>/profile, for TensorBoard's
    # profile tab or ui.perfetto.dev; "" traces nothing.
    config.profile_steps = ""

    # Optimizer: the paper uses Adam with a constant 1e-5; the quickstart trains from scratch, faster.
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # "adam" | "adamw" (decoupled weight decay)
    config.optimizer.learning_rate = 1e-3  # peak learning rate
    config.optimizer.schedule = "warmup_cosine"  # "constant" | "warmup_cosine"
    config.optimizer.warmup_steps = 20  # linear warmup length (warmup_cosine only)
    config.optimizer.end_learning_rate_factor = 0.05  # final lr = factor * peak (warmup_cosine only)
    config.optimizer.weight_decay = 0.0  # adamw only
    config.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 disables
    config.optimizer.b1 = 0.9  # Adam beta1
    config.optimizer.b2 = 0.999  # Adam beta2

    # Input pipeline (p3m_jax/data): TFDS p3m10k read through grain.
    config.data = ml_collections.ConfigDict()
    config.data.tfds_name = "p3m10k/synthetic_128x128_96_8_8"  # TFDS name/config to read
    config.data.data_dir = "~/tensorflow_datasets"  # TFDS data_dir (a gs:// bucket works on Cloud TPU)
    config.data.build_synthetic = True  # build a synthetic tfds_name here on first use (no download)
    config.data.image_size = 64  # training crop side after resizing (the paper: 512)
    config.data.crop_sizes = (64, 96, 128)  # candidate crop sides before resizing (the paper: 512, 768, 1024)
    config.data.trimap_kernel_range = (3, 6)  # random elliptical dilate/erode kernel, inclusive (paper: 15, 30)
    config.data.transition_crop_prob = 0.5  # probability of centring the crop on a transition pixel
    config.data.flip_prob = 0.5  # horizontal flip probability
    config.data.validation_count = 8  # train examples held out (by a stable hash of name) for validation
    config.data.validation_fraction = 0.0  # alternative to validation_count when > 0
    config.data.num_workers = 0  # grain worker processes per JAX process (0: in-process)
    config.data.prefetch_batches = 2  # batches prefetched to the devices
    config.data.use_fg_bg = True  # decode fg/bg for the composition loss when the example has them
    config.data.use_facemask = True  # decode facemasks when present (P3M-CP needs them; False saves a PNG decode)
    config.data.read_threads = 1  # grain read/transform threads per worker (1: one core per worker process)
    config.data.worker_buffer_size = 2  # batches buffered per grain worker process
    config.data.reduced_dct_decode = True  # decode JPEGs at 1/2, 1/4, 1/8 scale when the crop shrinks that much
    config.data.skip_bad_examples = False  # skip (and count) undecodable examples instead of stopping

    # Evaluation and checkpoints.
    config.log_every_steps = 10  # progress line and TensorBoard scalars
    config.eval_every_steps = 100  # validation slice metrics (SAD, MSE, GRAD, CONN); 0 disables
    config.checkpoint_every_steps = 100  # asynchronous orbax save
    config.keep_checkpoints = 2  # last K checkpoints kept (the best by validation SAD is kept as well)
    config.num_summary_images = 2  # validation mattes written as TensorBoard images at each evaluation
    config.eval = ml_collections.ConfigDict()
    config.eval.strategy = "hybrid"  # test strategy for the final scoring: "hybrid" | "resize"
    config.eval.test_splits = ("p3m_500_p", "p3m_500_np")  # scored at the end of training
    config.eval.validation_strategy = "resize"  # strategy on the validation slice during training
    config.eval.limit = 0  # score only the first N images per split (0: all)
    config.eval.select_ema = False  # with ema_decay > 0: choose the best checkpoint and score tests on the EMA

    # Initialisation: both empty = random init.
    config.init = ml_collections.ConfigDict()
    config.init.pretrained_backbone = ""  # authors' ImageNet backbone (.pth/.pth.tar) -> encoder only
    config.init.checkpoint = ""  # fine-tune from an authors' P3M-Net .pth or a p3m-jax model checkpoint

    # P3M-CP (copy and paste of normal faces), off by default.
    config.copy_paste = ml_collections.ConfigDict()
    # Geometry and sources: p3m_jax/data/cp_transforms.py, p3m_jax/data/faces.py, p3m_jax/models/fcp.py.
    config.copy_paste.icp = ml_collections.ConfigDict()
    config.copy_paste.icp.enabled = False  # image-level copy and paste in the input pipeline
    config.copy_paste.icp.prob = 0.5  # per-sample probability (the paper: 0.5)
    config.copy_paste.icp.face_source = "synthetic"  # "synthetic" or a folder of normal faces with masks
    config.copy_paste.icp.face_source_format = "celebamask_hq"  # "celebamask_hq" | "pair" (images/ + masks/)
    config.copy_paste.icp.num_synthetic_faces = 64  # size of the "synthetic" face set
    config.copy_paste.icp.synthetic_face_size = 64  # side of each synthetic face
    config.copy_paste.icp.rotation_deg = 30.0  # random rotation in [-r, r] degrees
    config.copy_paste.icp.scale_range = (0.8, 1.2)  # random scale on top of fitting the target face box
    config.copy_paste.icp.flip_prob = 0.5  # horizontal flip probability of the source face
    config.copy_paste.icp.keep_aspect = False  # False: stretch the face to fill the target box; True: keep aspect
    config.copy_paste.fcp = ml_collections.ConfigDict()
    config.copy_paste.fcp.enabled = False  # feature-level copy and paste in the model
    config.copy_paste.fcp.prob = 0.5  # per-sample probability (the paper: 0.5)
    config.copy_paste.fcp.start_step = 0  # first step that applies FCP (the paper: epoch 50 of 150)
    config.copy_paste.fcp.layers = ("e3",)  # encoder features replaced: any of e0..e4 (skips), "deep" (1/32)
    config.copy_paste.fcp.face_source = "synthetic"  # as icp.face_source (shared when the settings agree)
    config.copy_paste.fcp.face_source_format = "celebamask_hq"  # as icp.face_source_format
    config.copy_paste.fcp.num_synthetic_faces = 64  # as icp.num_synthetic_faces
    config.copy_paste.fcp.synthetic_face_size = 64  # as icp.synthetic_face_size
    config.copy_paste.fcp.rotation_deg = 30.0  # augmentation of the aligned source face, as icp
    config.copy_paste.fcp.scale_range = (0.8, 1.2)  # as icp.scale_range
    config.copy_paste.fcp.flip_prob = 0.5  # as icp.flip_prob
    config.copy_paste.fcp.keep_aspect = False  # as icp.keep_aspect
    return config
