"""gfwsvd_core: Fisher-weighted low-rank compression of transformer linear layers."""

__version__ = "0.1.0"
