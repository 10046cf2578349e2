"""The error every adapter raises for a model it cannot merge tokens in."""


class UnsupportedModelError(TypeError):
    """The model is not one this patch knows how to merge tokens in; the message names it and why."""
