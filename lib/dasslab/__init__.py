"""dasslab: a research workbook for image domain translation in domain-adaptive segmentation."""
__version__ = "0.1.0"
