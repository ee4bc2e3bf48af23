"""refusal: steer refusal in open-weight chat models with DiM and INLP interventions."""

from refusal import _compat

__version__ = "0.1.0"

_compat.install()
