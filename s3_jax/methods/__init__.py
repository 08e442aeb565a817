"""Evaluation methods (`evaluate.py --method`): s3's trained searcher (`s3.py`) and the paper's baselines
(closed-book and naive RAG in `static.py`, IRCoT, Search-o1, Search-R1, DeepRetrieval), each turning questions
into the documents the generator answers from (`base.MethodOutput`)."""
