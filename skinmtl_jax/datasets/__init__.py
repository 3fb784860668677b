"""Data sources. `synthetic` is the bundled default; the real datasets come as TFDS builders."""
