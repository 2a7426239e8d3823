"""Pictures for eyes rather than models: what a bank holds and what the augmentations do.

`patch_grids` (sampled patches per concept of a bank), `mixes` (TiMix mixes with their windows) and
`cmc_views` (captions with bank patches spliced in, as HTML or PNG). They take in-memory data; reading
corpus files is the CLI's job, so no picture imports the offline stage.
"""
