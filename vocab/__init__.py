"""Generated vocabulary files (see build_vocab.py); installed as the package `wyckoffgpt_vocab`."""
