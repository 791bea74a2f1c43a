"""The app's tasks: classification inference, class labels, merge training."""
