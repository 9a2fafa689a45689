"""Datasets and transforms, one factory per task (``factory``); nothing here knows about training.

Rooms: ``factory`` (which dataset a config names), ``loaders`` (seeded, resumable, sharded loading of any
dataset), ``classification`` (the classification sources' common part, ImageFolder, timm transforms),
``hf_images`` (Hugging Face datasets), ``wds_shards`` (WebDataset tar shards), ``cifar`` (the CIFAR builtins),
``digits`` (the bundled digits), ``segmentation`` (the segmentation dataset base, image/mask folders,
albumentations transforms, label-map files), ``cityscapes_labels`` (the label table), ``cityscapes`` (the official
layout), ``synthetic_seg`` (generated street scenes), ``video`` (video clips: the Cityscapes sequence and
frame-folder layouts, parallel streams), ``synthetic_video`` (generated street-scene video with cuts),
``inspect`` / ``flip_check`` / ``auto`` (what the images say: sizes, unreadable files, flips, the automatic
choices), ``errors``.
"""
