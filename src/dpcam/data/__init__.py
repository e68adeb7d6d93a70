"""The data stages: images in, a prepared dataset out, and its local-DP derivatives.

- :mod:`dpcam.data.synthetic`: the built-in synthetic-fundus generator (images, grades, lesion masks), with
  :mod:`~dpcam.data.synthetic_geometry` (per-image draws, chunk geometry), :mod:`~dpcam.data.raster` (rendering)
  and :mod:`~dpcam.data.synthetic_stage` (its prepare shell and sample grid);
- :mod:`dpcam.data.readers`: readers of real datasets (APTOS, Cats vs Dogs, PetImages, any ImageFolder);
- :mod:`dpcam.data.decode`: decoding one image (and its mask): checks, orientation, crop, resize;
- :mod:`dpcam.data.sources`: prepare from a real source (a pool of decoding processes, skipped files, patients);
- :mod:`dpcam.data.prepare`: the prepare stage (decode, resize, split, write);
- :mod:`dpcam.data.store`: the prepared format (``images.npy``, labels, masks, splits, manifest) and its reader;
- :mod:`dpcam.data.public`: the public set for public pretraining, checked disjoint from the private one;
- :mod:`dpcam.data.augment`: training-time augmentation and its multiplicity;
- :mod:`dpcam.data.mechanisms`: local-DP mechanisms (a registry), with :mod:`~dpcam.data.noise` (their noise) and
  :mod:`~dpcam.data.analytic_gaussian` (σ of the Gaussian one);
- :mod:`dpcam.data.ldp`: the ldp stage (derivatives), with :mod:`~dpcam.data.ldp_figure` (their figures).
"""
