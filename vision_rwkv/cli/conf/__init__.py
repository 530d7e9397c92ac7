"""Hydra configs of the commands (package data; Hydra finds them as the module vision_rwkv.cli.conf)."""
