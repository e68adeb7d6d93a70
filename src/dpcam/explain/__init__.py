"""The explain stage: Grad-CAM maps of a run's test images and the metrics that score them.

- :mod:`dpcam.explain.gradcam`: the maps (Captum's LayerGradCam, guided Grad-CAM), batched;
- :mod:`dpcam.explain.metrics`: the metrics (the paper's, deletion/insertion, ROAD, pointing games, agreement,
  the randomisation check) and their registry;
- :mod:`dpcam.explain.score`: the stage (one run or a family), explain.json and the pictures.
"""
