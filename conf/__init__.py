"""The Hydra configs, installed as the package `siamese_retrieval.conf` (see pyproject.toml's package-dir).

Hydra finds them with `config_path="pkg://siamese_retrieval.conf"`; it needs this file to accept the folder
as a config package. Nothing to import here.
"""
