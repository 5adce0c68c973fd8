"""Helpers for the Neovim plugin's tests: a headless editor driven over msgpack-rpc."""
