"""The patch bank: the on-disk contract between the offline and the online stage.

`format` (file names, schemas, the checks reader and writer share), `reader` (`PatchBank`: open,
validate, sample, read pixels, search), `writer` (`write_bank`: finalize a bank from a build's rows),
`index` (the FAISS index over the patch embeddings), `_publish` (the folder lock and the staged swap that
publishes a bank, the old one intact until then) and `_folder` (file access by name through opened
folders: never through a link, a full disk a clear error).
"""
