"""Data: datasets by name -> splits of (image in [0, 1], label, sample index), and the stream of
batches the engine trains on. Every split yields float32 CHW images in pixel space; the models
normalize (models.Net), so the FGSM probe steps and clips in pixel space and hub weights see the
statistics they were trained with.

- ``datasets``  names -> ``Data`` (digits, synthetic, mnist, fashion-mnist, cifar10/100, npz:,
                folder:, imagenet:), per-class subsets, the data keys of a run
- ``memory``    in-memory splits: a whole batch gathered and augmented on the device
- ``folder``    on-disk ImageFolder splits: PIL in workers, or bytes decoded on the device
- ``keyed``     counter-based randomness: a sample's augmentation from (epoch key, index) alone
- ``resample``  the batched, TF32-exact antialiased resize (RandomResizedCrop, eval crop)
- ``stream``    the batches of an epoch or an evaluation, with its own ``StreamOptions``
                (workers, device decoding; ``--decode`` is parsed there)

The names below are the package's public ones (``from effdstl_cli.data import build_data``).
"""

from .datasets import (DATASETS, DEBIAN_FASHION, Data, build_data, check_dataset_spec, data_args, data_for,
                       per_class_subset)
from .folder import (BadImage, FolderSplit, KeyedView, MixedView, collate_mixed, decode_images, decode_mixed,
                     mixed_batches, skipped_images)
from .keyed import augment_params, keyed_uniforms, sample_keys
from .memory import CROP_FLIP_VARIANTS, CROP_PAD, TensorSplit
from .resample import RESIZE_CHUNK_PX, resize_each, resize_windows
from .stream import StreamOptions, eval_batches, train_batches

__all__ = ["DATASETS", "DEBIAN_FASHION", "Data", "build_data", "check_dataset_spec", "data_args", "data_for",
           "per_class_subset", "BadImage", "FolderSplit", "KeyedView", "MixedView", "collate_mixed", "decode_images",
           "decode_mixed", "mixed_batches", "skipped_images", "augment_params", "keyed_uniforms", "sample_keys",
           "CROP_FLIP_VARIANTS", "CROP_PAD", "TensorSplit", "RESIZE_CHUNK_PX", "resize_each", "resize_windows",
           "StreamOptions", "eval_batches", "train_batches"]
