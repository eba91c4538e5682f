"""Pure loss functions."""
from vljax.losses.captioning import captioning_loss
from vljax.losses.contrastive import sigmoid_loss, softmax_loss

__all__ = ["captioning_loss", "sigmoid_loss", "softmax_loss"]
