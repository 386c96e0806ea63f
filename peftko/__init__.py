"""peftko: parameter-efficient fine-tuning for Korean text with structural markers."""

__version__ = "0.1.0"
