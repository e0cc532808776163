"""Train one image classifier over hundreds of thousands of classes on one modest GPU."""

__version__ = "0.1.0"
