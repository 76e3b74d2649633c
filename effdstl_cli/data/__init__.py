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

import importlib

# name -> submodule. Imported on first use (PEP 562), not here: ``spec`` is torch-free and what
# planning reads (``from effdstl_cli.data.spec import ...`` would otherwise pay for torch).
_WHERE = {
    **dict.fromkeys(("DATASETS", "check_dataset_spec", "StreamOptions"), "spec"),
    **dict.fromkeys(("DEBIAN_FASHION", "Data", "build_data", "data_args", "data_for", "per_class_subset"), "datasets"),
    **dict.fromkeys(("BadImage", "FolderSplit", "KeyedView", "MixedView", "collate_mixed", "decode_images",
                     "decode_mixed", "mixed_batches", "skipped_images"), "folder"),
    **dict.fromkeys(("augment_params", "keyed_uniforms", "sample_keys"), "keyed"),
    **dict.fromkeys(("CROP_FLIP_VARIANTS", "CROP_PAD", "TensorSplit"), "memory"),
    **dict.fromkeys(("RESIZE_CHUNK_PX", "resize_each", "resize_windows"), "resample"),
    **dict.fromkeys(("eval_batches", "train_batches"), "stream"),
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__():
    return sorted({*globals(), *_WHERE})


__all__ = list(_WHERE)
