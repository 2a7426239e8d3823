"""Text: which words of a caption name a concept, and which tokens they become.

`grounding` (`GroundingTagger`: spaCy finds the visually-grounded words, with `_form_matcher` and
`_object_nouns`, and `_clean` mapping a cleaned caption back to its own offsets), `tags` (tagging a
corpus into a Parquet tags file), `corpus` (reading caption corpora: .txt, .jsonl, COCO .json, .parquet,
gzipped; with the fields to keep), `tokenize` (any tokenizer's tokens with their character offsets) and
`align` (character spans -> token ranges).
"""
