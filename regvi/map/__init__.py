"""Reference mapping: put query cells onto a trained atlas model and transfer its labels."""

from regvi.map.labels import confusion_plot, transfer_accuracy, transfer_labels, write_to_obs

__all__ = ["confusion_plot", "transfer_accuracy", "transfer_labels", "write_to_obs"]
