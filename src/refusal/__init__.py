"""refusal: steer refusal in open-weight chat models with DiM and INLP interventions."""

__version__ = "0.1.0"
