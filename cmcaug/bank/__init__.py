"""The patch bank: the on-disk contract between the offline and the online stage.

`format` (file names, schemas, the checks reader and writer share), `reader` (`PatchBank`: open,
validate, sample, read pixels, search), `writer` (`write_bank`: finalize a bank from a build's rows,
published atomically) and `index` (the FAISS index over the patch embeddings).
"""
