"""pgolf: the `pgolf` command line and the end-to-end `pgolf run` pipeline."""
__version__ = "0.1.0"
