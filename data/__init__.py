"""Data pipeline for llama-mini: document readers, tokenized datasets, sequence-length
policies and collators. Never imports ``llama_mini``; tokenization accepts any tokenizer with
the interface of ``llama_mini.Tokenizer`` (``encode``, ``decode``, ``bos_id``, ``eos_id``,
``pad_id``, ``vocab_size``).

The streaming Pile reader and the policies arrive with the data-pipeline issue; this package
exists now so the distribution's layout is complete.
"""
