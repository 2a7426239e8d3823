"""The offline stage: an image corpus becomes a patch bank (`build_bank`, `cmcaug build-bank`).

`options` (every build option and its valid range, once), `images` (listing and robust decoding of
folders, list files and tar shards, with `_tar`, reading a shard up to its damage, and `_budget`, the
bytes decoded ahead), `detect` (YOLO or COCO boxes; `_classes` names a detector's classes and maps them
to concepts), `embed` (patch embedders), `pipeline` (detect, crop with `cmcaug.crops`, embed, shard,
finalize: resumable and independent of the worker count), `_state` (the build folder BANK/.build/:
resumable state, shards, the staged bank) and `distributed` (the same pipeline on a Ray cluster).
"""
