"""Training data: text sources (the bundled corpus among them), mixtures, token shards, packing.

    sources.py   documents from the bundled corpus, folders and jsonl files
    mixture.py   weighted mixtures by token share (default 70 % prose / 30 % code)
    shards.py    tokenized memory-mapped shards + manifest, held-out split by document
    loader.py    packed fixed-length sequences with a checkpointable position, sharded by rank
"""
