"""kseg: reproducible nuclei segmentation in H&E histopathology around Kidney-SegNet."""

__version__ = "0.1.0"
