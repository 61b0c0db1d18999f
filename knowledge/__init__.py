"""The disease library: schema, loading, jieba tokenisation, BM25 index and search.

Knows nothing of HTTP or models.
"""
