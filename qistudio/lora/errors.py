"""Errors a user can cause with a LoRA file or call; each names the keys or values concerned."""


class LoRAError(ValueError):
    """A LoRA file does not fit the model it is loaded into, or a call names a LoRA that is not there."""
