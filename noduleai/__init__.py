"""NoduleAI engine: lung nodule detection on chest CT with 3D ResNets and Grad-CAM.

Plain Python (no Slicer, Qt or VTK imports). Research use, not for diagnosis.
"""

__version__ = "0.1.0"
DISCLAIMER = "Research use, not for diagnosis."
