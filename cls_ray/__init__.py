"""cls-ray: class folders to a tuned, evaluated, served image classifier on Ray."""

__version__ = "0.1.0"
