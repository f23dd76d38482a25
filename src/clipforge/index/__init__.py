"""Use a trained model for search: embed a data set (embed.py), index it with FAISS (dense.py),
serve an HTTP API and a search page (server.py, static/). Needs ``pip install 'clipforge[index]'``."""
