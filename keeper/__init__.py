"""keeper: keeps WeChat OAuth2 user grants alive."""

__version__ = "0.1.0"
