"""Pure loss functions."""
from vljax.losses.contrastive import sigmoid_loss, softmax_loss

__all__ = ["sigmoid_loss", "softmax_loss"]
