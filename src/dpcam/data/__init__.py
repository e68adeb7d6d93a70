"""The data stages: images in, a prepared dataset out, and its local-DP derivatives.

- :mod:`dpcam.data.synthetic`: the built-in synthetic-fundus generator (images, grades, lesion masks);
- :mod:`dpcam.data.sources`: readers of real datasets (APTOS, Cats vs Dogs, PetImages, any ImageFolder);
- :mod:`dpcam.data.prepare`: the prepare stage (decode, resize, split, write);
- :mod:`dpcam.data.store`: the prepared format (``images.npy``, labels, masks, splits, manifest) and its reader;
- :mod:`dpcam.data.public`: the public set for public pretraining, checked disjoint from the private one;
- :mod:`dpcam.data.augment`: training-time augmentation and its multiplicity;
- :mod:`dpcam.data.ldp`: local-DP mechanisms and the ldp stage.
"""
