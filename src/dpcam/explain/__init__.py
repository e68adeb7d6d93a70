"""The explain stage: Grad-CAM maps of a run's test images and the metrics that score them.

- :mod:`dpcam.explain.gradcam`: the maps (Captum's LayerGradCam, guided Grad-CAM), batched;
- the metrics by family: :mod:`dpcam.explain.confidence` (the paper's, masking baselines),
  :mod:`dpcam.explain.faithfulness` (deletion/insertion, ROAD; its solver :mod:`dpcam.explain.imputation`),
  :mod:`dpcam.explain.localisation` (pointing games), :mod:`dpcam.explain.agreement` (map agreement, the
  randomisation check), on :mod:`dpcam.explain.inputs`;
- :mod:`dpcam.explain.metrics`: their registry; :mod:`dpcam.explain.streaming`: streamed means;
  :mod:`dpcam.explain.degeneracy`: the degenerate-model check;
- :mod:`dpcam.explain.score`: the stage (one run or a family), explain.json and the pictures.
"""
