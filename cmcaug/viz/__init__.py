"""Pictures for eyes rather than models: what a bank holds and what the augmentations do.

`patch_grids` (sampled patches per concept of a bank), `mixes` (TiMix mixes with their windows), `cmc_views`
(captions with bank patches spliced in, as an HTML page or a picture) and `crops` (what each crop mode makes
of a box). Each writes the format its path's extension names (`_picture_files`: PNG, JPEG, WebP, or HTML).
They take in-memory data; reading corpus files is the CLI's job, so no picture imports the offline stage.
"""
