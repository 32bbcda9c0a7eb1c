"""speechxfer: cross-lingual speech recognition adaptation for wav2vec2 checkpoints."""

__version__ = "0.1.0"
