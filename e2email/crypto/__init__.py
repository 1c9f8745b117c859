"""Crypto backends: each turns canonical MIME bytes into protected MIME bytes; no sockets."""
