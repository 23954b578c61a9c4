"""ternarylm: scaling studies of language models trained natively with ternary weights."""

__version__ = "0.1.0"
