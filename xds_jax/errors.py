"""Exception types a user can act on. Every message names the offending field, path or value."""


class XdsError(Exception):
    """Base class of xds-jax errors."""


class ConfigError(XdsError, ValueError):
    """A model configuration is malformed or inconsistent."""


class UnsupportedModelError(XdsError, ValueError):
    """The model architecture (``model_type``) or one of its options is not supported."""


class ModelNotFoundError(XdsError, FileNotFoundError):
    """A model path or name does not resolve to a model."""


class WeightLoadError(XdsError, ValueError):
    """A checkpoint is missing a tensor, has a mis-shaped one, or cannot be read."""


class PromptTooLongError(XdsError, ValueError):
    """A prompt (plus requested output) does not fit the model's context window."""


class SamplingParamsError(XdsError, ValueError):
    """A sampling parameter is out of range."""


class InvalidPromptError(XdsError, ValueError):
    """A prompt is empty, of the wrong type, or holds token ids outside the vocabulary."""
