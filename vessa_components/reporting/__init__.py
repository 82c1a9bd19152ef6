from .figures import plot_dice_curves

__all__ = ["plot_dice_curves"]
